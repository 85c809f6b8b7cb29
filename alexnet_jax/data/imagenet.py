"""ILSVRC-2012 through tfds's `imagenet2012` builder: preparation, a resumable streaming pipeline, 10-crop eval.

Preparation. tfds cannot download ImageNet: the user puts `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`
in a manual folder (`config.manual_dir`, tfds's `<data_dir>/downloads/manual` when unset) and runs
`scripts/prepare_imagenet.py`, which runs tfds's own builder and then decodes every prepared JPEG once, so a
damaged archive is reported by file name before training instead of failing (or worse) mid-run.

Training stream. The prepared TFRecord shards are read in-graph, so the stream is a pure function of
(seed, step, process_index, process_count):
- each process reads its own even slice of the split (`tfds.split_for_jax_process`), as file instructions;
- epoch e visits that slice's shards in a permutation seeded by (seed, e), interleaved deterministically, then
  a shuffle buffer seeded by (seed, e); the epoch is cut to whole batches;
- a run resumed at step N builds the same epochs and skips the first N % steps_per_epoch batches of its epoch
  (records are skipped before any JPEG is decoded, so skipping costs only reading);
- the augmentation of row r of step s is seeded by (seed, s, r), like the in-memory datasets.
So a restart at step N continues the same stream. TFRecord is tfds's default format, so a copy someone already
prepared works as is; random access (array_record) would make the skip O(1) but needs re-preparing 150 GB.

Evaluation. Each process reads its even slice of `validation` in order, padded with masked zero images to the
same number of batches on every process, so every image counts exactly once whatever the batch size.

Normalisation. `base.normalisation_for` builds one `Normalisation` from the training statistics; the training and
evaluation pipelines take their arrays from it.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from alexnet_jax.data import augment, base
from alexnet_jax.data.base import Data, Normalisation, check_data_dir, data_options, normalisation_for, padded_rows
from alexnet_jax.errors import UserError

NAME = "imagenet2012"
MANUAL_FILES = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
DOWNLOAD_PAGE = "https://image-net.org/download-images"
PCA_SOURCES = ("data", "published")
STATS = ("mean_image", "mean", "std", "pca_eigval", "pca_eigvec")


def _data_dir(config_data_dir: str) -> str | None:
    return os.path.expanduser(config_data_dir) if config_data_dir else None


def open_builder(data_dir: str | None) -> tfds.core.DatasetBuilder:
    return tfds.builder(NAME, data_dir=data_dir)


def manual_dir_for(builder: tfds.core.DatasetBuilder, manual_dir: str) -> str:
    """The folder holding the archives: the given one, or tfds's own default `<data_dir>/downloads/manual`."""
    if manual_dir:
        return os.path.expanduser(manual_dir)
    return os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def prepare_command(data_dir: str | None, manual_dir: str) -> str:
    dd = f" --data_dir {data_dir}" if data_dir else ""
    return f"python scripts/prepare_imagenet.py{dd} --manual_dir {manual_dir}"


def _archive_message(manual: str, data_dir: str | None, missing: list[str]) -> str:
    return (f"{' and '.join(missing)} not found in {manual}: download ILSVRC2012_img_train.tar (138 GB) and "
            f"ILSVRC2012_img_val.tar (6.3 GB) from {DOWNLOAD_PAGE} (free registration), put both in that folder "
            f"(or pass --manual_dir), then run `{prepare_command(data_dir, manual)}` once (a few hours).")


def missing_archives(manual: str) -> list[str]:
    return [f for f in MANUAL_FILES.values() if not os.path.isfile(os.path.join(manual, f))]


def find_undecodable(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
    """File names of the prepared images of `split` that do not decode as JPEG (all cores, one pass)."""
    records = _records(builder.info.splits[split].file_instructions)
    parsed = records.map(_parser(builder), num_parallel_calls=tf.data.AUTOTUNE)
    names = {n.decode() for n in parsed.map(lambda ex: ex["file_name"]).as_numpy_iterator()}
    decoded = parsed.map(
        lambda ex: (ex["file_name"], tf.shape(tf.io.decode_jpeg(ex["image"], channels=3))),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors()
    good = {n.decode() for n, _ in decoded.as_numpy_iterator()}
    return sorted(names - good)


def prepare(data_dir: str | None, manual_dir: str = "", verify: bool = True) -> tfds.core.DatasetBuilder:
    """Run tfds's imagenet2012 builder on the manual archives; then check every JPEG decodes."""
    builder = open_builder(data_dir)
    manual = manual_dir_for(builder, manual_dir)
    missing = missing_archives(manual)
    if missing:
        raise UserError(_archive_message(manual, data_dir, missing))
    if not builder.is_prepared():
        logging.info("preparing %s from %s into %s", NAME, manual, builder.data_dir)
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
        except (OSError, EOFError, KeyError, ValueError, tarfile.TarError) as e:
            raise UserError(f"tfds could not prepare {NAME} from {manual} ({type(e).__name__}: {e}): the archives "
                            f"are not the ILSVRC-2012 tars (see {DOWNLOAD_PAGE}); check their md5 and size, "
                            "re-download what differs and run the command again.") from None
    if verify:
        for split in MANUAL_FILES:
            bad = find_undecodable(builder, split)
            if bad:
                shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
                shutil.rmtree(builder.data_dir, ignore_errors=True)
                raise UserError(
                    f"{len(bad)} JPEG(s) in {os.path.join(manual, MANUAL_FILES[split])} do not decode: {shown}. "
                    "The archive is damaged (compare its md5 with image-net.org's) - replace it or those files "
                    f"and run `{prepare_command(data_dir, manual)}` again; the prepared copy was removed so no "
                    "corrupt image can reach training.")
    return builder


def open_prepared(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared builder, or a UserError naming the exact files, where they go and the command to run."""
    data_dir = _data_dir(config.data_dir)
    builder = open_builder(data_dir)
    manual = manual_dir_for(builder, config.get("manual_dir", ""))
    if not builder.is_prepared():
        missing = missing_archives(manual)
        if missing:
            raise UserError(f"{NAME} is not prepared in {builder.data_dir_root}, and "
                            + _archive_message(manual, data_dir, missing))
        raise UserError(f"{NAME} is not prepared in {builder.data_dir_root}; the archives are in {manual}: run "
                        f"`{prepare_command(data_dir, manual)}` once (a few hours), then train.")
    absent = [s for s in MANUAL_FILES if s not in builder.info.splits]
    if absent:
        raise UserError(f"{NAME} in {builder.data_dir} was prepared without its {'/'.join(absent)} split "
                        f"({' and '.join(MANUAL_FILES[s] for s in absent)} was missing): put the file(s) in "
                        f"{manual}, delete {builder.data_dir} and run `{prepare_command(data_dir, manual)}`.")
    return builder


def check_config(config: ml_collections.ConfigDict) -> None:
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


def _parser(builder: tfds.core.DatasetBuilder):
    features = builder.info.features
    decoders = {"image": tfds.decode.SkipDecoding()}
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


def dataset_stats(builder: tfds.core.DatasetBuilder, resize: int, examples: int, method: str = "area",
                  threads: int | None = None, square_of: Callable | None = None) -> dict[str, np.ndarray]:
    """Mean image (resize, resize, 3), per-channel mean/std (0-255 scale) and the RGB PCA of the pixels
    (`augment.pixel_pca`, [0, 1] scale) over the first `examples` training images (0: all; tfds shuffled the
    records when preparing, so the first ones are a random sample), in one pass. Cached beside the prepared data.
    `square_of(image feature)`: the float32 square (default: decode a source JPEG's centre square and resize it)."""
    square_of = square_of or (lambda jpeg: augment.decode_square(jpeg, resize, method))
    n = builder.info.splits["train"].num_examples if examples <= 0 else min(examples, builder.info.splits[
        "train"].num_examples)
    path = os.path.join(os.fspath(builder.data_dir), f"alexnet_jax_stats_{resize}px_{method}_{n}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            if all(k in f for k in STATS):  # a cache from before the PCA was kept is computed again
                return {k: f[k] for k in STATS}
    logging.info("computing the training mean image over %d images (cached in %s)", n, path)
    ds = _records(builder.info.splits["train"].file_instructions).take(n)
    ds = ds.map(lambda r: square_of(_parser(builder)(r)["image"]),
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
        raise _corrupt_error(builder, "train", e) from None
    mean_image = total / n
    mean = mean_image.mean((0, 1))
    second /= n * resize * resize
    std = np.sqrt(np.diag(second) - np.square(mean))
    eigval, eigvec = augment.pixel_pca(second, mean)
    stats = {"mean_image": mean_image.astype(np.float32), "mean": mean.astype(np.float32),
             "std": std.astype(np.float32), "pca_eigval": eigval, "pca_eigvec": eigvec}
    try:
        np.savez(path, **stats)
    except OSError as e:
        logging.warning("could not cache the mean image in %s (%s); it will be computed again", path, e.strerror)
    return stats


def fixed_stats(config: ml_collections.ConfigDict) -> dict[str, np.ndarray] | None:
    """`channel_mean`/`channel_std` when the config fixes them (e.g. converted torchvision weights), else None."""
    mean, std = tuple(config.get("channel_mean", ())), tuple(config.get("channel_std", ()))
    if not mean and not std:
        return None
    if config.normalization != "channel" or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"--config.channel_mean={mean} / channel_std={std}: give three values each (0-255 scale, "
                        "std > 0) with --config.normalization=channel, or () to use the training set's")
    return {"mean": np.asarray(mean, np.float32), "std": np.asarray(std, np.float32), "mean_image": None}


# ---------------------------------------------------------------------------------------------------------
# Pipelines.


def _corrupt_error(builder: tfds.core.DatasetBuilder, split: str, e: Exception) -> UserError:
    first = str(getattr(e, "message", e)).strip().splitlines()[0][:200]
    return UserError(f"an image of {NAME}'s {split} split in {builder.data_dir} does not decode ({first}). "
                     "Run `python scripts/prepare_imagenet.py --verify_only` with the same --data_dir to list the "
                     "damaged files, replace them in the archive and prepare again.")


def _guard(batches: Iterator, builder: tfds.core.DatasetBuilder, split: str) -> Iterator:
    """Decode failures stop training with a UserError; a broken image never becomes a silent zero example."""
    try:
        yield from batches
    except tf.errors.InvalidArgumentError as e:
        raise _corrupt_error(builder, split, e) from None


def _train_arrays(config: ml_collections.ConfigDict, norm: Normalisation) -> tuple[np.ndarray, np.ndarray]:
    """The paper's crops line up with the mean image; random resized crops do not (per-channel mean instead)."""
    return norm.arrays(per_pixel=config.train_crop == "paper")


def train_dataset(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                  norm: Normalisation, start_step: int, num_steps: int, process_index: int = 0,
                  process_count: int = 1, threads: int | None = None,
                  squares: Callable | None = None,
                  lighting: augment.Lighting = augment.PUBLISHED) -> tf.data.Dataset:
    """This process's rows of global batches `start_step .. num_steps-1` (images float32, labels int32), with
    PCA lighting from `lighting` (`base.lighting_for`). `squares(records, key, rows)` for stored squares: a whole local
    batch of records augmented at once from the step's key (seed, step) and the rows' global indices; otherwise
    each source JPEG alone from its key (seed, step, row). The stream (order, keys, skipping) is the same."""
    ds = train_records(builder, config, start_step, num_steps, process_index, process_count)
    local = config.batch_size // process_count
    seed = int(config.seed)
    crop, resize = int(config.image_size), int(config.resize_size)
    mean, std = _train_arrays(config, norm)
    parse = _parser(builder)

    def one(index, record):
        ex = parse(record)
        step, row = index // local, process_index * local + index % local
        key = tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + step, row])
        if config.train_crop == "paper":
            image = augment.paper_train_image(
                ex["image"], key, resize=resize, crop=crop, flip=bool(config.random_flip),
                pca_std=float(config.pca_lighting), normalization=norm.kind, mean=mean, std=std,
                method=config.resize_method, pca=lighting)
        else:
            image = augment.random_resized_crop(
                ex["image"], key, crop=crop, area_range=tuple(config.rrc_area_range),
                aspect_range=tuple(config.rrc_aspect_range), flip=bool(config.random_flip),
                pca_std=float(config.pca_lighting), normalization=norm.kind, mean=mean, std=std,
                method=config.resize_method, pca=lighting)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    def whole_batch(index, records):
        key = tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + index[0] // local, tf.constant(-1, tf.int64)])
        return squares(records, key, process_index * local + index % local)

    if squares is None:
        ds = ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(local, drop_remainder=True)
    else:
        ds = ds.batch(local, drop_remainder=True).map(whole_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                                      deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(data_options(threads))


def train_records(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict, start_step: int,
                  num_steps: int, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """(index in this process's stream, serialized example) of every row this process reads for global batches
    `start_step .. num_steps-1`, before decoding: what the tests compare across processes (record identities)."""
    bs = config.batch_size
    local = bs // process_count
    instructions, counts = _instructions(builder, "train", process_index, process_count)
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


def eval_dataset(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                 norm: Normalisation, process_index: int = 0, process_count: int = 1,
                 threads: int | None = None, row_multiple: int = 0,
                 squares: tuple[Callable, Callable] | None = None) -> tf.data.Dataset:
    """This process's slice of `validation`, in local batches padded with mask-0 rows to the same count on
    every process (`base.padded_rows`). Images are (B, crop, crop, 3), or (B, 10, crop, crop, 3)
    with `eval_crops=10`. `squares=(decode, crops_batch)` for stored squares: each record's uint8 square, then
    the crops of a whole batch at once."""
    local = config.eval_batch_size // process_count
    instructions, counts = _instructions(builder, "validation", process_index, process_count)
    fill = padded_rows(max(counts), local, row_multiple) - counts[process_index]
    crop, resize, crops = int(config.image_size), int(config.resize_size), int(config.eval_crops)
    mean, std = norm.arrays(per_pixel=True)  # crops of the resized square: they line up with the mean image
    parse = _parser(builder)

    def one(record):
        ex = parse(record)
        if squares is not None:
            return {"image": squares[0](ex["image"]), "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(1.0)}
        image = augment.eval_image(ex["image"], resize=resize, crop=crop, crops=crops,
                                   normalization=norm.kind, mean=mean, std=std,
                                   method=config.resize_method)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(1.0)}

    ds = _records(instructions).map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    image = ds.element_spec["image"]
    pad = {"image": tf.zeros(image.shape, image.dtype), "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(fill)).batch(local)
    if squares is not None:
        ds = ds.map(lambda b: {**b, "image": squares[1](b["image"])})
    return ds.prefetch(2).with_options(data_options(threads))


def create_data(config: ml_collections.ConfigDict) -> Data:
    """The `Data` the trainer consumes, streaming from the prepared imagenet2012."""
    check_config(config)
    check_data_dir(config.data_dir)
    builder = open_prepared(config)
    def computed() -> dict[str, np.ndarray]:
        return dataset_stats(builder, int(config.resize_size), int(config.stats_examples), config.resize_method)

    stats = fixed_stats(config) or computed()
    if config.pca == "data" and config.pca_lighting > 0 and "pca_eigval" not in stats:  # fixed mean/std
        stats = {**computed(), **stats}
    lighting = base.lighting_for(config, stats)
    norm = normalisation_for(config, stats)
    mean, std = _train_arrays(config, norm)
    crop = int(config.image_size)
    names = tuple(builder.info.features["label"].names)
    if config.num_classes != len(names):
        raise UserError(f"--config.num_classes={config.num_classes}: {NAME} has {len(names)} classes")
    return Data(
        num_train=builder.info.splits["train"].num_examples,
        num_eval=builder.info.splits["validation"].num_examples,
        image_shape=(crop, crop, 3),
        class_names=names,
        train=lambda start, stop, pid, nproc: _guard(tfds.as_numpy(
            train_dataset(builder, config, norm, start, stop, pid, nproc, lighting=lighting)), builder, "train"),
        eval=lambda pid, nproc, row_multiple=0: _guard(tfds.as_numpy(eval_dataset(
            builder, config, norm, pid, nproc, row_multiple=row_multiple)), builder, "validation"),
        mean=mean,
        std=std,
        normalisation=norm,
    )
