"""The paper's training augmentation in JAX, for the jitted train step (`config.augment_on_device=True`): the
device's half of `augment.paper_batch`, importable without TensorFlow (the accelerator check times it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Lighting = tuple[np.ndarray, np.ndarray]  # (eigval (3,), eigvec (3, 3), eigenvectors as columns), [0, 1] scale


def paper_batch_on_device(batch: dict, *, crop: int, flip: bool, pca_std: float, normalization: str,
                          mean: np.ndarray, std: np.ndarray, pca: Lighting) -> dict:
    """`paper_batch` in JAX, inside the jitted train step (`config.augment_on_device=True`): `batch` holds the uint8
    squares (B, S, S, 3) and the host's `batch_draws` for them ("offset" (B, 2), "flip" (B,), "lighting" (B, 3));
    returns {"image": (B, crop, crop, 3) float32, "label"}, the batch the host's `paper_batch` computes from the same
    draws (a few float roundings apart). Each row's patch is a `dynamic_slice` of its square and of the mean
    image, so the mean is subtracted as if before the reflection."""
    yx = batch["offset"].astype(jnp.int32)

    def cut(images, y, x):
        return jax.lax.dynamic_slice(images, (y, x, 0), (crop, crop, images.shape[-1]))

    image = jax.vmap(cut)(batch["image"], yx[:, 0], yx[:, 1]).astype(jnp.float32)
    if normalization == "pixel":
        image = image - jax.vmap(cut, in_axes=(None, 0, 0))(jnp.asarray(mean, jnp.float32), yx[:, 0], yx[:, 1])
    if flip:
        image = jnp.where(batch["flip"].astype(bool)[:, None, None, None], image[:, :, ::-1], image)
    if pca_std > 0:  # elementwise, not a matmul: no reduced-precision matmul on an accelerator
        eigval, eigvec = pca
        weighted = batch["lighting"].astype(jnp.float32) * jnp.asarray(eigval, jnp.float32)  # (B, 3)
        shift = 255.0 * jnp.sum(jnp.asarray(eigvec, jnp.float32)[None] * weighted[:, None, :], axis=-1)
        image = image + shift[:, None, None, :]
    if normalization == "channel":
        image = (image - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return {"image": image, "label": batch["label"]}
