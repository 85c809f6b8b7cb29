"""How evaluation sees an image, in one function: `of_square`, which `Data.eval` / `Data.views` apply to every
evaluation image and `predict` / `features` to an image file's pixels, so a file is classified exactly as the
evaluation scored it.

A `View` is everything about it but the pixels and the normalisation: the crop, and for photos the side the
centre square is resized to first (the normalisation's `resize_size`), the resize method and the crops (1 or the
paper's 10); the small datasets are used whole, resized to the crop.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.data.base import Normalisation
from alexnet_jax.data.spec import DataSpec, is_photos


@dataclasses.dataclass(frozen=True)
class View:
    """What evaluation does to an image besides normalising it."""

    crop: int
    resize: int = 0  # photos: the side the centre square is resized to before cropping; 0: whole image to `crop`
    method: str = "area"
    crops: int = 1  # photos: 1 (centre) or 10 (corners, centre and their reflections)

    @classmethod
    def of(cls, spec: DataSpec) -> View:
        if not is_photos(spec):
            return cls(int(spec.image_size))
        return cls(int(spec.image_size), int(spec.resize_size), spec.resize_method, int(spec.eval_crops))


def resize_and_normalise(image: tf.Tensor, mean: np.ndarray, std: np.ndarray, size: int) -> tf.Tensor:
    """uint8 image(s) (..., H, W, C) to float32 (..., size, size, C), bilinear when the size differs, then
    `(image - mean) / std`: the small datasets' view (their training batches too)."""
    image = tf.cast(image, tf.float32)
    if image.shape[-3] != size or image.shape[-2] != size:
        image = tf.image.resize(image, (size, size), method="bilinear")
    return (image - mean) / std


def of_square(square: tf.Tensor, view: View, norm: Normalisation) -> tf.Tensor:
    """The model's float32 input for a uint8 centre square: photos' (S, S, 3), any side S, to (crop, crop, 3) or
    (10, crop, crop, 3); the small datasets' image(s) (..., H, W, C), whole, to (..., crop, crop, C)."""
    if not view.resize:
        mean, std = norm.arrays()
        return resize_and_normalise(square, mean, std, view.crop)
    mean, std = norm.arrays(per_pixel=True)  # crops of the resized square: they line up with the mean image
    return augment.eval_view(square, resize_to=view.resize, crop=view.crop, crops=view.crops,
                             normalization=norm.kind, mean=mean, std=std, method=view.method)
