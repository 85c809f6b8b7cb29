"""How the paper's squares stored once (`squares`, `--config.prepared=True`) become batches: batch-wide.

The same stream as the source images (the same batches of rows, keys and resumption: `photos.train_dataset`),
with the per-image work done batch-wide on uint8 squares: a batch of records is parsed at once, raw squares are one
reshape (of a JPEG square only the patch is decoded), and the random patches, reflections, PCA lighting and the
mean image run as one XLA-compiled pass (`augment.paper_batch`); the 10-crop test from the same squares. The random
choices come from (seed, step) for the whole global batch, row r taking row r of them (`augment.batch_draws`): the
same distributions as the source path, not the same draws. With `augment_on_device=True` the host stops at the
uint8 squares and their draws, and the jitted train step cuts, reflects, subtracts and lights them (`on_device`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.data.base import Normalisation
from alexnet_jax.data.sources import Source
from alexnet_jax.data.spec import DataSpec


def decode_square(image: tf.Tensor, side: int, jpeg: bool) -> tf.Tensor:
    """The uint8 (side, side, 3) square of a stored image feature (raw bytes or JPEG)."""
    if jpeg:
        return tf.ensure_shape(tf.io.decode_jpeg(image, channels=3), (side, side, 3))
    return tf.reshape(tf.io.decode_raw(image, tf.uint8), (side, side, 3))


# The records' layout (tfds serialises the image feature as one bytes value, raw or JPEG, the label as int64).
RECORD_SPEC = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}


def pipelines(spec: DataSpec, norm: Normalisation, source: Source,
              lighting: augment.Lighting = augment.PUBLISHED) -> tuple[Callable, tuple[Callable, Callable]]:
    """What `photos.train_dataset` maps over a batch of stored squares' records (to augmented images) and
    `photos.eval_dataset` over each record (its uint8 square), then over a batch (its crops).

    Batch-wide: a batch of records is parsed at once, raw squares are decoded at once (of a JPEG square only the
    patch is decoded, one by one with `tf.map_fn`), and the augmentation (`augment.paper_batch`) / the crops run
    as one XLA-compiled function, so gathering the patch, subtracting its part of the mean image, adding the
    lighting and casting to float32 is one pass over the pixels instead of one pass per op."""
    mean, std = norm.arrays(per_pixel=True)
    crop, size = spec.image_size, source.square
    jpeg = source.is_jpeg

    def decode(image: tf.Tensor) -> tf.Tensor:
        return decode_square(image, size, jpeg)

    @tf.function(jit_compile=True, autograph=False)  # (plain Python branching: no AutoGraph start-up)
    def augment_batch(images: tf.Tensor, yx: tf.Tensor, flips: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
        return augment.paper_batch(images, yx, flips, alpha, crop=crop, flip=spec.random_flip,
                                   pca_std=spec.pca_lighting, normalization=norm.kind, mean=mean, std=std, pca=lighting)

    def patch_of_jpeg(args):  # decodes only the patch's rows and columns (bit-identical to slicing the square)
        image, yx = args
        return augment.decode_window(image, yx[0], yx[1], crop, size)

    @tf.autograph.experimental.do_not_convert
    def train_batch(records_: tf.Tensor, key: tf.Tensor, rows: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = tf.io.parse_example(records_, RECORD_SPEC)
        yx, flips, alpha = augment.batch_draws(key, rows, spec.batch_size, size, crop, spec.pca_lighting)
        if spec.augment_on_device:  # whole uint8 squares and the draws: `on_device` does the rest
            images = (tf.map_fn(decode, ex["image"], fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
                      if jpeg else tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), (-1, size, size, 3)))
            return {"image": images, "label": tf.cast(ex["label"], tf.int32), "offset": yx, "flip": flips,
                    "lighting": alpha}
        if jpeg:
            images = tf.map_fn(patch_of_jpeg, (ex["image"], yx),
                               fn_output_signature=tf.TensorSpec((crop, crop, 3), tf.uint8))
        else:
            images = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), (-1, size, size, 3))
        return {"image": augment_batch(images, yx, flips, alpha), "label": tf.cast(ex["label"], tf.int32)}

    @tf.function(jit_compile=True, autograph=False)  # (plain Python branching: no AutoGraph start-up)
    def eval_batch(images: tf.Tensor) -> tf.Tensor:
        return augment.eval_batch(images, crop=crop, crops=spec.eval_crops, normalization=norm.kind, mean=mean,
                                  std=std)

    return train_batch, (decode, eval_batch)


def on_device(spec: DataSpec, norm: Normalisation, lighting: augment.Lighting = augment.PUBLISHED) -> Callable | None:
    """With `augment_on_device`: the jitted step's half of `pipelines`' training batches (uint8 squares and their
    draws in, the augmented float32 batch out: `augment.paper_batch_on_device`), else None."""
    if not spec.augment_on_device:
        return None
    mean, std = norm.arrays(per_pixel=True)
    return functools.partial(augment.paper_batch_on_device, crop=spec.image_size, flip=spec.random_flip,
                             pca_std=spec.pca_lighting, normalization=norm.kind, mean=mean, std=std, pca=lighting)
