"""What is done to photos, whatever they come from: the paper's streaming pipeline over any prepared tfds dataset
with an image and a label feature (ImageNet, a tfds dataset by name, a folder of the user's images: `sources`).

A `Source` names the prepared builder, its training and evaluation splits (tfds split syntax, e.g. 'train[:90%]'),
the image and label features and whether the images are JPEGs (only those are partially decoded).

Training stream. The prepared TFRecord shards are read in-graph, so the stream is a pure function of
(seed, step, process_index, process_count):
- each process reads its own even slice of the split (`tfds.split_for_jax_process`), as file instructions;
- epoch e visits that slice's shards in a permutation seeded by (seed, e), interleaved deterministically, then
  a shuffle buffer seeded by (seed, e); the epoch is cut to whole batches;
- a run resumed at step N builds the same epochs and skips the first N % steps_per_epoch batches of its epoch
  (records are skipped before any image is decoded, so skipping costs only reading);
- the augmentation of row r of step s is seeded by (seed, s, r), like the in-memory datasets.
So a restart at step N continues the same stream. TFRecord is tfds's default format, so a copy someone already
prepared works as is.

Evaluation. Each process reads its even slice of the evaluation split in order, padded with masked zero images to
the same number of batches on every process, so every image counts exactly once whatever the batch size.

Normalisation. `base.normalisation_for` builds one `Normalisation` from the training statistics (`dataset_stats`:
mean image, per-channel mean/std, RGB PCA, one pass, cached beside the prepared data); the training and
evaluation pipelines take their arrays from it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from alexnet_jax.data import augment, once
from alexnet_jax.data.base import (
    Data,
    Normalisation,
    data_options,
    given_normalisation,
    lighting_for,
    normalisation_for,
    padded_rows,
    stats_for,
)
from alexnet_jax.errors import UserError

PCA_SOURCES = ("data", "published")
STATS = ("mean_image", "mean", "std", "pca_eigval", "pca_eigvec")


@dataclasses.dataclass(frozen=True)
class Source:
    """A prepared tfds dataset of photos and how to read it."""

    builder: tfds.core.DatasetBuilder
    train_split: str = "train"
    eval_split: str = "validation"
    image_key: str = "image"
    label_key: str = "label"
    is_jpeg: bool = True  # JPEG images are decoded only where a crop needs them
    # what a user does when a prepared image does not decode (one sentence)
    repair: str = "prepare the dataset again"

    @property
    def name(self) -> str:
        return self.builder.name

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.builder.info.features[self.label_key].names)

    def num_examples(self, split: str) -> int:
        return self.builder.info.splits[split].num_examples


def as_source(source: Source | tfds.core.DatasetBuilder) -> Source:
    """A `Source`; a bare builder reads as ImageNet's layout (train/validation, JPEG 'image', 'label')."""
    return source if isinstance(source, Source) else Source(source)


def check_config(config: ml_collections.ConfigDict) -> None:
    """The augmentation and evaluation keys of the photo pipelines."""
    def fail(key: str, msg: str) -> None:
        raise UserError(f"--config.{key}={config.get(key)!r}: {msg}")

    if config.train_crop not in augment.TRAIN_CROPS:
        fail("train_crop", f"choose one of {augment.TRAIN_CROPS}")
    if config.normalization not in augment.NORMALIZATIONS:
        fail("normalization", f"choose one of {augment.NORMALIZATIONS}")
    if config.resize_method not in augment.RESIZE_METHODS:
        fail("resize_method", f"choose one of {augment.RESIZE_METHODS}")
    if config.eval_crops not in (1, 10):
        fail("eval_crops", "choose 1 (centre crop) or 10 (the paper's corners + centre and reflections)")
    if not 0 < config.image_size <= config.resize_size:
        fail("image_size", f"must be a crop of the {config.resize_size} px square (--config.resize_size)")
    if config.pca_lighting < 0:
        fail("pca_lighting", "is the std of the PCA lighting alpha (paper: 0.1); use 0 to turn it off")
    if config.pca not in PCA_SOURCES:
        fail("pca", f"choose one of {PCA_SOURCES}: the training pixels' own RGB PCA (the paper) or "
                    "fb.resnet.torch's")
    lo, hi = config.rrc_area_range
    if not 0 < lo <= hi <= 1:
        fail("rrc_area_range", "must be (low, high) fractions of the image area with 0 < low <= high <= 1")


# ---------------------------------------------------------------------------------------------------------
# Reading records.


def _parser(source: Source | tfds.core.DatasetBuilder):
    """Serialized example -> features, the image left encoded."""
    source = as_source(source)
    features = source.builder.info.features
    decoders = {source.image_key: tfds.decode.SkipDecoding()}
    return lambda record: features.deserialize_example(record, decoders=decoders)


def _instructions(builder: tfds.core.DatasetBuilder, split: str, pid: int, nproc: int):
    """This process's slice of the split as (file, skip, take) rows, and every process's example count."""
    counts = [builder.info.splits[tfds.split_for_jax_process(split, process_index=p, process_count=nproc)]
              .num_examples for p in range(nproc)]
    sub = builder.info.splits[tfds.split_for_jax_process(split, process_index=pid, process_count=nproc)]
    return list(sub.file_instructions), counts


def _records(instructions, order: tf.Tensor | None = None, cycle_length: int = 1) -> tf.data.Dataset:
    """Serialized examples of the file instructions, in `order` (default: as listed), interleaved."""
    files = tf.constant([fi.filename for fi in instructions])
    skips = tf.constant([fi.skip for fi in instructions], tf.int64)
    takes = tf.constant([fi.take for fi in instructions], tf.int64)
    if order is None:
        order = tf.range(len(instructions), dtype=tf.int64)

    def read(i):
        return tf.data.TFRecordDataset(tf.gather(files, i), buffer_size=8 << 20).skip(
            tf.gather(skips, i)).take(tf.gather(takes, i))

    ds = tf.data.Dataset.from_tensor_slices(order)
    if cycle_length <= 1:
        return ds.flat_map(read)
    return ds.interleave(read, cycle_length=cycle_length, block_length=1, num_parallel_calls=cycle_length,
                         deterministic=True)


# ---------------------------------------------------------------------------------------------------------
# Statistics for normalisation.


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


def dataset_stats(source: Source | tfds.core.DatasetBuilder, resize: int, examples: int, method: str = "area",
                  threads: int | None = None, square_of: Callable | None = None,
                  processes: once.Processes = once.ONE) -> dict[str, np.ndarray]:
    """Mean image (resize, resize, 3), per-channel mean/std (0-255 scale) and the RGB PCA of the pixels
    (`augment.pixel_pca`, [0, 1] scale) over the first `examples` training images (0: all; tfds shuffled the
    records when preparing, so the first ones are a random sample), in one pass. Cached beside the prepared data
    (computed by process 0 of a multi-process run, the others wait for the cache: `once`).
    `square_of(image feature)`: the float32 square (default: decode an image's centre square and resize it)."""
    source = as_source(source)
    square_of = square_of or (lambda image: augment.decode_square(image, resize, method, source.is_jpeg))
    total_n = source.num_examples(source.train_split)
    n = total_n if examples <= 0 else min(examples, total_n)
    path = _stats_path(source, resize, method, n)
    stats: dict[str, np.ndarray] = {}  # the cache's, read once, or the computed ones

    def ready() -> bool:
        stats.update(_cached_stats(path) or {})
        return bool(stats)

    once.prepare_once(f"the training statistics {path}", ready,
                      lambda: stats.update(_compute_stats(source, square_of, resize, n, path, threads)),
                      path + ".prepare.json", processes)
    return stats


def _compute_stats(source: Source, square_of: Callable, resize: int, n: int, path: str,
                   threads: int | None) -> dict[str, np.ndarray]:
    logging.info("computing the training mean image over %d images (cached in %s)", n, path)
    parse = _parser(source)
    ds = _records(source.builder.info.splits[source.train_split].file_instructions).take(n)
    ds = ds.map(lambda r: square_of(parse(r)[source.image_key]),
                num_parallel_calls=tf.data.AUTOTUNE).batch(64).with_options(data_options(threads))
    total = np.zeros((resize, resize, 3), np.float64)
    second = np.zeros((3, 3), np.float64)  # sum of x x^T over pixels: the colour covariance, with the mean
    try:
        for batch in ds.as_numpy_iterator():
            b = batch.astype(np.float64)
            total += b.sum(0)
            rgb = b.reshape(-1, 3)
            second += rgb.T @ rgb
    except tf.errors.InvalidArgumentError as e:
        raise _corrupt_error(source, source.train_split, e) from None
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


# ---------------------------------------------------------------------------------------------------------
# Pipelines.


def _corrupt_error(source: Source, split: str, e: Exception) -> UserError:
    first = str(getattr(e, "message", e)).strip().splitlines()[0][:200]
    return UserError(f"an image of {source.name}'s {split} split in {source.builder.data_dir} does not decode "
                     f"({first}): {source.repair}.")


def _guard(batches: Iterator, source: Source | tfds.core.DatasetBuilder, split: str) -> Iterator:
    """Decode failures stop training with a UserError; a broken image never becomes a silent zero example."""
    try:
        yield from batches
    except tf.errors.InvalidArgumentError as e:
        raise _corrupt_error(as_source(source), split, e) from None


def _train_arrays(config: ml_collections.ConfigDict, norm: Normalisation) -> tuple[np.ndarray, np.ndarray]:
    """The paper's crops line up with the mean image; random resized crops do not (per-channel mean instead)."""
    return norm.arrays(per_pixel=config.train_crop == "paper")


def train_dataset(source: Source | tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                  norm: Normalisation, start_step: int, num_steps: int, process_index: int = 0,
                  process_count: int = 1, threads: int | None = None,
                  squares: Callable | None = None,
                  lighting: augment.Lighting = augment.PUBLISHED) -> tf.data.Dataset:
    """This process's rows of global batches `start_step .. num_steps-1` (images float32, labels int32), with
    PCA lighting from `lighting` (`base.lighting_for`). `squares(records, key, rows)` for stored squares: a whole
    local batch of records augmented at once from the step's key (seed, step) and the rows' global indices;
    otherwise each image alone from its key (seed, step, row). The stream (order, keys, skipping) is the same."""
    source = as_source(source)
    ds = train_records(source, config, start_step, num_steps, process_index, process_count)
    local = config.batch_size // process_count
    seed = int(config.seed)
    crop, resize = int(config.image_size), int(config.resize_size)
    mean, std = _train_arrays(config, norm)
    parse = _parser(source)

    def one(index, record):
        ex = parse(record)
        step, row = index // local, process_index * local + index % local
        key = tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + step, row])
        if config.train_crop == "paper":
            image = augment.paper_train_image(
                ex[source.image_key], key, resize=resize, crop=crop, flip=bool(config.random_flip),
                pca_std=float(config.pca_lighting), normalization=norm.kind, mean=mean, std=std,
                method=config.resize_method, pca=lighting, is_jpeg=source.is_jpeg)
        else:
            image = augment.random_resized_crop(
                ex[source.image_key], key, crop=crop, area_range=tuple(config.rrc_area_range),
                aspect_range=tuple(config.rrc_aspect_range), flip=bool(config.random_flip),
                pca_std=float(config.pca_lighting), normalization=norm.kind, mean=mean, std=std,
                method=config.resize_method, pca=lighting, is_jpeg=source.is_jpeg)
        return {"image": image, "label": tf.cast(ex[source.label_key], tf.int32)}

    def whole_batch(index, records):
        key = tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + index[0] // local, tf.constant(-1, tf.int64)])
        return squares(records, key, process_index * local + index % local)

    if squares is None:
        ds = ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(local, drop_remainder=True)
    else:
        ds = ds.batch(local, drop_remainder=True).map(whole_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                                      deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(data_options(threads))


def train_records(source: Source | tfds.core.DatasetBuilder, config: ml_collections.ConfigDict, start_step: int,
                  num_steps: int, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """(index in this process's stream, serialized example) of every row this process reads for global batches
    `start_step .. num_steps-1`, before decoding: what the tests compare across processes (record identities)."""
    source = as_source(source)
    bs = config.batch_size
    local = bs // process_count
    instructions, counts = _instructions(source.builder, source.train_split, process_index, process_count)
    per_epoch = sum(counts) // bs
    if per_epoch == 0 or min(counts) < per_epoch * local:
        raise UserError(f"--config.batch_size={bs} is larger than the {sum(counts)} training images")
    seed = int(config.seed)
    buffer = min(counts[process_index], config.shuffle_buffer or 16 * local)
    cycle = min(len(instructions), 16)

    def epoch(e):
        key = tf.stack([tf.constant(seed, tf.int64), e])
        order = tf.random.experimental.stateless_shuffle(tf.range(len(instructions), dtype=tf.int64), seed=key)
        ds = _records(instructions, order, cycle)
        ds = ds.shuffle(buffer, seed=tf.constant(seed, tf.int64) * 7919 + e, reshuffle_each_iteration=False)
        return ds.take(per_epoch * local)

    first_epoch = start_step // per_epoch
    last_epoch = -(-num_steps // per_epoch)
    ds = tf.data.Dataset.range(first_epoch, last_epoch).flat_map(epoch)
    ds = ds.skip((start_step - first_epoch * per_epoch) * local).take((num_steps - start_step) * local)
    return ds.enumerate(start=start_step * local)


def eval_dataset(source: Source | tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                 norm: Normalisation, process_index: int = 0, process_count: int = 1,
                 threads: int | None = None, row_multiple: int = 0,
                 squares: tuple[Callable, Callable] | None = None, file_names: bool = False) -> tf.data.Dataset:
    """This process's slice of the evaluation split, in local batches padded with mask-0 rows to the same count
    on every process (`base.padded_rows`). Images are (B, crop, crop, 3), or (B, 10, crop, crop, 3) with
    `eval_crops=10`. `squares=(decode, crops_batch)` for stored squares: each record's uint8 square, then the
    crops of a whole batch at once. `file_names`: each row's "file_name" too ('' where the source has none)."""
    source = as_source(source)
    named = file_names and "file_name" in source.builder.info.features
    local = config.eval_batch_size // process_count
    instructions, counts = _instructions(source.builder, source.eval_split, process_index, process_count)
    fill = padded_rows(max(counts), local, row_multiple) - counts[process_index]
    crop, resize, crops = int(config.image_size), int(config.resize_size), int(config.eval_crops)
    mean, std = norm.arrays(per_pixel=True)  # crops of the resized square: they line up with the mean image
    parse = _parser(source)

    def one(record):
        ex = parse(record)
        label = tf.cast(ex[source.label_key], tf.int32)
        if squares is not None:
            return {"image": squares[0](ex[source.image_key]), "label": label, "mask": tf.constant(1.0)}
        image = augment.eval_image(ex[source.image_key], resize=resize, crop=crop, crops=crops,
                                   normalization=norm.kind, mean=mean, std=std, method=config.resize_method,
                                   is_jpeg=source.is_jpeg)
        out = {"image": image, "label": label, "mask": tf.constant(1.0)}
        if file_names:
            out["file_name"] = ex["file_name"] if named else tf.constant("")
        return out

    ds = _records(instructions).map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    image = ds.element_spec["image"]
    pad = {"image": tf.zeros(image.shape, image.dtype), "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0)}
    if file_names:
        pad["file_name"] = tf.constant("")
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(fill)).batch(local)
    if squares is not None:
        ds = ds.map(lambda b: {**b, "image": squares[1](b["image"])})
    return ds.prefetch(2).with_options(data_options(threads))


def check_classes(config: ml_collections.ConfigDict, source: Source) -> None:
    names = source.class_names
    if config.num_classes not in (0, len(names)):
        raise UserError(f"--config.num_classes={config.num_classes}: {source.name} has {len(names)} classes "
                        "(0 takes the dataset's count)")


def create_data(config: ml_collections.ConfigDict, source: Source, normalisation: Normalisation | None = None,
                processes: once.Processes = once.ONE) -> Data:
    """The `Data` the trainer consumes, streaming from a prepared source's images (normalised by `normalisation`
    when given, else by the training images' statistics)."""
    check_config(config)
    check_classes(config, source)

    def computed() -> dict:
        return dataset_stats(source, int(config.resize_size), int(config.stats_examples), config.resize_method,
                             processes=processes)

    if normalisation is not None:
        norm = given_normalisation(config, normalisation)
        lighting = (lighting_for(config, computed()) if config.pca == "data" and config.pca_lighting > 0
                    else augment.PUBLISHED)
    else:
        stats, lighting = stats_for(config, computed)
        norm = normalisation_for(config, stats)
    mean, std = _train_arrays(config, norm)
    crop = int(config.image_size)
    return Data(
        num_train=source.num_examples(source.train_split),
        num_eval=source.num_examples(source.eval_split),
        image_shape=(crop, crop, 3),
        class_names=source.class_names,
        train=lambda start, stop, pid, nproc: _guard(tfds.as_numpy(
            train_dataset(source, config, norm, start, stop, pid, nproc, lighting=lighting)), source,
            source.train_split),
        eval=lambda pid, nproc, row_multiple=0: _guard(tfds.as_numpy(eval_dataset(
            source, config, norm, pid, nproc, row_multiple=row_multiple)), source, source.eval_split),
        mean=mean,
        std=std,
        normalisation=norm,
        views=lambda split, pid, nproc: _guard(tfds.as_numpy(eval_dataset(
            dataclasses.replace(source, eval_split=source.train_split if split == "train" else source.eval_split),
            config, norm, pid, nproc, file_names=True)), source, split),
    )
