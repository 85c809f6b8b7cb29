"""The training set's statistics, and the normalisation and PCA lighting chosen from them: one pass per dataset.

- Photos (`dataset_stats`): the mean image at the square's size, the per-channel mean and std (0-255 scale) and
  the RGB PCA of the pixels (`augment.pixel_pca`), over the first `stats_examples` training images, in one pass,
  cached beside the prepared data (computed by process 0 of a multi-process run, the others wait: `once`).
  `normalisation_and_lighting` is what the photo pipelines call, once: it runs the pass only where something
  needs it (no normalisation handed in, or the lighting's PCA from the data) and at most once.
- The small datasets (`channel_stats`): per-channel mean and std of the training images held in memory.
"""

from __future__ import annotations

import functools
import os
import re
import zipfile
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from alexnet_jax.data import augment, once
from alexnet_jax.data.base import Normalisation, data_options, normalisation_for
from alexnet_jax.data.sources import Source, guard, parser
from alexnet_jax.data.spec import DataSpec
from alexnet_jax.errors import UserError

STATS = ("mean_image", "mean", "std", "pca_eigval", "pca_eigvec")


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images, on the 0-255 scale (computed on the training split): from exact
    integer sums (no float64 copy of the whole split: 4 s for FashionMNIST's 47M pixels before)."""
    x = images.reshape(-1, images.shape[-1])
    n = x.shape[0]
    total = x.sum(0, dtype=np.int64)
    squares = np.einsum("ic,ic->c", x, x, dtype=np.int64)
    mean = total / n
    var = (squares - total.astype(np.float64) * mean) / n
    return mean.astype(np.float32), np.sqrt(np.maximum(var, 0.0)).astype(np.float32)


def _stats_path(source: Source, resize: int, method: str, n: int) -> str:
    split = "" if source.train_split == "train" else "_" + re.sub(r"[^\w]+", "-", source.train_split).strip("-")
    return os.path.join(os.fspath(source.builder.data_dir), f"alexnet_jax_stats{split}_{resize}px_{method}_{n}.npz")


def _cached_stats(path: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as f:
            if all(k in f for k in STATS):  # a cache from before the PCA was kept is computed again
                return {k: f[k] for k in STATS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # none yet, or unreadable: computed again
        pass
    return None


def square_of(source: Source, resize: int, method: str = "area") -> Callable[[tf.Tensor], tf.Tensor]:
    """Image feature -> the float32 square the statistics average: a stored square as it is (`source.square`),
    else the image's centre square decoded and resized to `resize`."""
    if source.square:
        side = source.square
        if source.is_jpeg:
            return lambda image: tf.cast(tf.ensure_shape(tf.io.decode_jpeg(image, channels=3), (side, side, 3)),
                                         tf.float32)
        return lambda image: tf.cast(tf.reshape(tf.io.decode_raw(image, tf.uint8), (side, side, 3)), tf.float32)
    return lambda image: augment.decode_square(image, resize, method, source.is_jpeg)


def dataset_stats(source: Source, resize: int, examples: int, method: str = "area", threads: int | None = None,
                  processes: once.Processes = once.ONE) -> dict[str, np.ndarray]:
    """Mean image (resize, resize, 3), per-channel mean/std (0-255 scale) and the RGB PCA of the pixels
    (`augment.pixel_pca`, [0, 1] scale) over the first `examples` training images (0: all; tfds shuffled the
    records when preparing, so the first ones are a random sample), in one pass (`square_of` each), cached."""
    total_n = source.num_examples(source.train_split)
    n = total_n if examples <= 0 else min(examples, total_n)
    path = _stats_path(source, resize, method, n)
    stats: dict[str, np.ndarray] = {}  # the cache's, read once, or the computed ones

    def ready() -> bool:
        stats.update(_cached_stats(path) or {})
        return bool(stats)

    once.prepare_once(f"the training statistics {path}", ready,
                      lambda: stats.update(_compute_stats(source, square_of(source, resize, method), resize, n, path,
                                                          threads)),
                      path + ".prepare.json", processes)
    return stats


def _compute_stats(source: Source, square: Callable, resize: int, n: int, path: str,
                   threads: int | None) -> dict[str, np.ndarray]:
    logging.info("computing the training mean image over %d images (cached in %s)", n, path)
    parse = parser(source)
    ds = source.records(source.train_split).in_order(0, n)
    ds = ds.map(tf.autograph.experimental.do_not_convert(lambda r: square(parse(r)[source.image_key])),
                num_parallel_calls=tf.data.AUTOTUNE).batch(64).with_options(data_options(threads))
    total = np.zeros((resize, resize, 3), np.float64)
    second = np.zeros((3, 3), np.float64)  # sum of x x^T over pixels: the colour covariance, with the mean
    for batch in guard(ds.as_numpy_iterator(), source, source.train_split):
        b = batch.astype(np.float64)
        total += b.sum(0)
        rgb = b.reshape(-1, 3)
        second += rgb.T @ rgb
    mean_image = total / n
    mean = mean_image.mean((0, 1))
    second /= n * resize * resize
    std = np.sqrt(np.maximum(np.diag(second) - np.square(mean), 0.0))
    eigval, eigvec = augment.pixel_pca(second, mean)
    stats = {"mean_image": mean_image.astype(np.float32), "mean": mean.astype(np.float32),
             "std": std.astype(np.float32), "pca_eigval": eigval, "pca_eigvec": eigvec}
    try:  # written whole, then renamed: other processes (hosts, workers) sharing data_dir never read half a file
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **stats)
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("could not cache the mean image in %s (%s); it will be computed again", path, e.strerror)
    return stats


def lighting_for(spec: DataSpec, stats: dict[str, np.ndarray]) -> augment.Lighting:
    """The PCA the lighting augmentation uses: `spec.pca` 'data' (the training pixels', from `dataset_stats`)
    or 'published' (fb.resnet.torch's constants)."""
    if spec.pca == "published" or spec.pca_lighting == 0:  # (off: nothing to compute for it)
        return augment.PUBLISHED
    logging.info("PCA lighting from the training pixels: eigenvalues %s, eigenvectors (columns) %s",
                 np.round(stats["pca_eigval"], 4).tolist(), np.round(stats["pca_eigvec"], 4).tolist())
    return np.asarray(stats["pca_eigval"], np.float32), np.asarray(stats["pca_eigvec"], np.float32)


def fixed_stats(spec: DataSpec) -> dict[str, np.ndarray] | None:
    """`channel_mean`/`channel_std` when the spec fixes them (e.g. converted torchvision weights; checked by
    `DataSpec.from_config`), else None."""
    if not spec.channel_mean and not spec.channel_std:
        return None
    return {"mean": np.asarray(spec.channel_mean, np.float32), "std": np.asarray(spec.channel_std, np.float32),
            "mean_image": None}


def given_normalisation(spec: DataSpec, norm: Normalisation) -> Normalisation:
    """A normalisation handed in (pretrained weights', a checkpoint's), checked against the crops this spec makes."""
    if norm.kind == "pixel" and norm.mean_image is not None and norm.mean_image.shape[0] != spec.resize_size:
        raise UserError(f"the pretrained weights' mean image is {norm.mean_image.shape[0]} px, the config resizes "
                        f"to --config.resize_size={spec.resize_size}: use the same size, or "
                        "--config.init_normalisation=data to compute the normalisation from these images")
    return norm


def normalisation_and_lighting(spec: DataSpec, source: Source, given: Normalisation | None = None,
                               processes: once.Processes = once.ONE
                               ) -> tuple[Normalisation, Callable[[], augment.Lighting]]:
    """The normalisation (`given`, checked, or the training set's) and the lighting's PCA, for the photo
    pipelines. The statistics pass runs here, at most once: now when the normalisation needs it, else when the
    lighting is first asked for (evaluation never asks: a checkpoint's normalisation costs no pass)."""
    size = source.square or spec.resize_size
    computed = functools.cache(lambda: dataset_stats(source, size, spec.stats_examples, spec.resize_method,
                                                     processes=processes))
    if given is not None:
        norm = given_normalisation(spec, given)
        return norm, functools.cache(lambda: lighting_for(spec, computed()) if spec.pca == "data"
                                     and spec.pca_lighting > 0 else augment.PUBLISHED)
    stats = fixed_stats(spec) or computed()
    if spec.pca == "data" and spec.pca_lighting > 0 and "pca_eigval" not in stats:  # fixed mean/std
        stats = {**computed(), **stats}
    lighting = lighting_for(spec, stats)
    return normalisation_for(spec, stats), lambda: lighting
