"""What is done to photos, whatever they come from: the paper's streaming pipeline over any prepared tfds dataset
with an image and a label feature (ImageNet, a tfds dataset by name, a folder of the user's images: `sources`;
their 256x256 squares: `squares`).

A `Source` names the prepared builder, its training and evaluation splits (tfds split syntax, e.g. 'train[:90%]'),
the image and label features and whether the images are JPEGs (only those are partially decoded). The config is
read once, at the door (`create_data`), into a frozen `Spec`; the pipelines below take it and plain arguments.

Training stream (`records`): global batch s is rows [sB, (s+1)B) of a permutation of the training split seeded by
(seed, epoch); each process reads its rows by index (array_record), so the batch is the same whatever the number
of processes, a resume at step N reads nothing before step N, and the augmentation of global row r of step s is
keyed by (seed, s, r). Stored squares (`Stored`, `config.prepared=True`) augment a whole local batch at once from
the step's key and the rows' positions.

Evaluation. Each process reads its slice of the evaluation split in order, padded with masked zero images to the
same number of batches on every process (`base.eval_slice`), so every image counts exactly once.

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
from typing import Protocol

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from alexnet_jax.data import augment, once, records
from alexnet_jax.data.base import (
    Data,
    Normalisation,
    data_options,
    eval_slice,
    given_normalisation,
    lighting_for,
    normalisation_for,
    stats_for,
)
from alexnet_jax.errors import UserError

PCA_SOURCES = ("data", "published")
STATS = ("mean_image", "mean", "std", "pca_eigval", "pca_eigvec")
KEY_STRIDE = 1_000_003  # an image's key is (seed * KEY_STRIDE + step, global row), as in `small.py`


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

    def records(self, split: str) -> records.Records:
        return records.Records(self.builder, split)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the photo pipelines read from the config, once (`Spec.of`)."""

    seed: int
    batch_size: int
    eval_batch_size: int
    image_size: int
    resize_size: int
    resize_method: str = "area"
    train_crop: str = "paper"
    random_flip: bool = True
    pca_lighting: float = 0.1
    rrc_area_range: tuple[float, float] = (0.08, 1.0)
    rrc_aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    eval_crops: int = 1
    stats_examples: int = 0
    augment_on_device: bool = False

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> Spec:
        return cls(int(config.seed), int(config.batch_size), int(config.eval_batch_size), int(config.image_size),
                   int(config.resize_size), config.resize_method, config.train_crop, bool(config.random_flip),
                   float(config.pca_lighting), tuple(config.rrc_area_range), tuple(config.rrc_aspect_range),
                   int(config.eval_crops), int(config.stats_examples), bool(config.get("augment_on_device", False)))


class Stored(Protocol):
    """Squares prepared once (`squares.Prepared`): how their records become batches."""

    size: int

    def square_of(self, image: tf.Tensor) -> tf.Tensor: ...

    def pipelines(self, spec: Spec, norm: Normalisation, lighting: augment.Lighting) -> tuple[Callable, tuple]: ...

    def on_device(self, spec: Spec, norm: Normalisation, lighting: augment.Lighting) -> Callable | None: ...


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


def parser(source: Source) -> Callable[[tf.Tensor], dict]:
    """Serialized example -> features, the image left encoded."""
    features = source.builder.info.features
    decoders = {source.image_key: tfds.decode.SkipDecoding()}
    return lambda record: features.deserialize_example(record, decoders=decoders)


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


def dataset_stats(source: Source, resize: int, examples: int, method: str = "area", threads: int | None = None,
                  square_of: Callable | None = None, processes: once.Processes = once.ONE) -> dict[str, np.ndarray]:
    """Mean image (resize, resize, 3), per-channel mean/std (0-255 scale) and the RGB PCA of the pixels
    (`augment.pixel_pca`, [0, 1] scale) over the first `examples` training images (0: all; tfds shuffled the
    records when preparing, so the first ones are a random sample), in one pass. Cached beside the prepared data
    (computed by process 0 of a multi-process run, the others wait for the cache: `once`).
    `square_of(image feature)`: the float32 square (default: decode an image's centre square and resize it)."""
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
    parse = parser(source)
    ds = source.records(source.train_split).in_order(0, n)
    ds = ds.map(tf.autograph.experimental.do_not_convert(lambda r: square_of(parse(r)[source.image_key])),
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


# ---------------------------------------------------------------------------------------------------------
# Pipelines.


def guard(batches: Iterator, source: Source, split: str) -> Iterator:
    """Decode failures stop training with a UserError; a broken image never becomes a silent zero example."""
    try:
        yield from batches
    except tf.errors.InvalidArgumentError as e:
        first = str(getattr(e, "message", e)).strip().splitlines()[0][:200]
        raise UserError(f"an image of {source.name}'s {split} split in {source.builder.data_dir} does not decode "
                        f"({first}): {source.repair}.") from None


def train_arrays(spec: Spec, norm: Normalisation) -> tuple[np.ndarray, np.ndarray]:
    """The paper's crops line up with the mean image; random resized crops do not (per-channel mean instead)."""
    return norm.arrays(per_pixel=spec.train_crop == "paper")


def train_dataset(source: Source, spec: Spec, norm: Normalisation, start_step: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1, threads: int | None = None,
                  squares: Callable | None = None, lighting: augment.Lighting = augment.PUBLISHED,
                  recs: records.Records | None = None) -> tf.data.Dataset:
    """This process's rows of global batches `start_step .. num_steps-1` (images float32, labels int32), with
    PCA lighting from `lighting` (`base.lighting_for`). `squares(records, key, rows)` for stored squares: a whole
    local batch of records augmented at once from the step's key (seed, step) and the rows' global positions;
    otherwise each image alone from its key (seed, step, row). `recs`: the training split's reader (one is opened
    otherwise; a test passes its own to count what is read)."""
    recs = recs or source.records(source.train_split)
    local = spec.batch_size // process_count
    steps = records.train_steps(len(recs), spec.batch_size, spec.seed, start_step, num_steps, process_index,
                                process_count)
    mean, std = train_arrays(spec, norm)
    parse = parser(source)

    @tf.autograph.experimental.do_not_convert
    def one(step, record, row):
        ex = parse(record)
        key = tf.stack([tf.constant(spec.seed, tf.int64) * KEY_STRIDE + step, row])
        common = dict(flip=spec.random_flip, pca_std=spec.pca_lighting, normalization=norm.kind, mean=mean, std=std,
                      method=spec.resize_method, pca=lighting, is_jpeg=source.is_jpeg)
        if spec.train_crop == "paper":
            image = augment.paper_train_image(ex[source.image_key], key, resize=spec.resize_size,
                                              crop=spec.image_size, **common)
        else:
            image = augment.random_resized_crop(ex[source.image_key], key, crop=spec.image_size,
                                                area_range=spec.rrc_area_range, aspect_range=spec.rrc_aspect_range,
                                                **common)
        return {"image": image, "label": tf.cast(ex[source.label_key], tf.int32)}

    @tf.autograph.experimental.do_not_convert
    def whole_batch(step, indices, rows):  # (the read in the same map: one stage less, ~8% less CPU per image)
        return squares(recs.read_tf(indices), tf.stack([tf.constant(spec.seed, tf.int64) * KEY_STRIDE + step,
                                                        tf.constant(-1, tf.int64)]), rows)

    if squares is None:
        @tf.autograph.experimental.do_not_convert
        def read(step, indices, rows):
            return tf.fill([local], step), recs.read_tf(indices), rows

        ds = steps.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
        ds = ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(local, drop_remainder=True)
    else:
        ds = steps.map(whole_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(data_options(threads))


def train_indices(source: Source, spec: Spec, start_step: int, num_steps: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
    """(steps, local) record indices this process reads for global batches `start_step .. num_steps-1`: the
    records' identities, which the tests compare across process counts."""
    n = source.num_examples(source.train_split)
    steps = records.train_steps(n, spec.batch_size, spec.seed, start_step, num_steps, process_index, process_count)
    return np.stack([rows for _, rows, _ in steps.with_options(data_options()).as_numpy_iterator()])


def eval_dataset(source: Source, spec: Spec, norm: Normalisation, process_index: int = 0, process_count: int = 1,
                 threads: int | None = None, row_multiple: int = 0, squares: tuple[Callable, Callable] | None = None,
                 file_names: bool = False, split: str | None = None) -> tf.data.Dataset:
    """This process's slice of the evaluation split (or `split`), in local batches padded with mask-0 rows to the
    same count on every process (`base.eval_slice`). Images are (B, crop, crop, 3), or (B, 10, crop, crop, 3)
    with `eval_crops=10`. `squares=(decode, crops_batch)` for stored squares: each record's uint8 square, then the
    crops of a whole batch at once. `file_names`: each row's "file_name" too ('' where the source has none)."""
    split = split or source.eval_split
    named = file_names and "file_name" in source.builder.info.features
    local = spec.eval_batch_size // process_count
    recs = source.records(split)
    lo, hi, rows = eval_slice(len(recs), local, process_index, process_count, row_multiple)
    mean, std = norm.arrays(per_pixel=True)  # crops of the resized square: they line up with the mean image
    parse = parser(source)

    @tf.autograph.experimental.do_not_convert
    def one(record):
        ex = parse(record)
        out = {"label": tf.cast(ex[source.label_key], tf.int32), "mask": tf.constant(1.0)}
        if squares is not None:
            out["image"] = squares[0](ex[source.image_key])
        else:
            out["image"] = augment.eval_image(ex[source.image_key], resize=spec.resize_size, crop=spec.image_size,
                                              crops=spec.eval_crops, normalization=norm.kind, mean=mean, std=std,
                                              method=spec.resize_method, is_jpeg=source.is_jpeg)
        if file_names:
            out["file_name"] = ex["file_name"] if named else tf.constant("")
        return out

    ds = recs.in_order(lo, hi).map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pad = {k: tf.zeros(v.shape, v.dtype) for k, v in ds.element_spec.items()}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(rows - (hi - lo))).batch(local)
    if squares is not None:
        ds = ds.map(tf.autograph.experimental.do_not_convert(lambda b: {**b, "image": squares[1](b["image"])}))
    return ds.prefetch(2).with_options(data_options(threads))


def check_classes(config: ml_collections.ConfigDict, source: Source) -> None:
    names = source.class_names
    if config.num_classes not in (0, len(names)):
        raise UserError(f"--config.num_classes={config.num_classes}: {source.name} has {len(names)} classes "
                        "(0 takes the dataset's count)")


def create_data(config: ml_collections.ConfigDict, source: Source, normalisation: Normalisation | None = None,
                processes: once.Processes = once.ONE, stored: Stored | None = None) -> Data:
    """The `Data` the trainer consumes, streaming from a prepared source's images, or from its `stored` squares
    (`source` is then the squares' dataset), normalised by `normalisation` when given, else by the training
    images' statistics."""
    check_config(config)
    check_classes(config, source)
    spec = Spec.of(config)
    size = stored.size if stored is not None else spec.resize_size

    def computed() -> dict:
        return dataset_stats(source, size, spec.stats_examples, spec.resize_method, processes=processes,
                             square_of=stored.square_of if stored is not None else None)

    if normalisation is not None:
        norm = given_normalisation(config, normalisation)
        lighting = (lighting_for(config, computed()) if config.pca == "data" and config.pca_lighting > 0
                    else augment.PUBLISHED)
    else:
        stats, lighting = stats_for(config, computed)
        norm = normalisation_for(config, stats)
    train_hook, eval_hook = stored.pipelines(spec, norm, lighting) if stored is not None else (None, None)
    mean, std = train_arrays(spec, norm)

    def evaluation(pid: int, nproc: int, row_multiple: int = 0, split: str | None = None, names: bool = False):
        return guard(tfds.as_numpy(eval_dataset(source, spec, norm, pid, nproc, row_multiple=row_multiple,
                                                squares=eval_hook, file_names=names, split=split)),
                     source, split or source.eval_split)

    return Data(
        num_train=source.num_examples(source.train_split),
        num_eval=source.num_examples(source.eval_split),
        image_shape=(spec.image_size, spec.image_size, 3),
        class_names=source.class_names,
        train=lambda start, stop, pid, nproc: guard(tfds.as_numpy(
            train_dataset(source, spec, norm, start, stop, pid, nproc, squares=train_hook, lighting=lighting)),
            source, source.train_split),
        eval=evaluation,
        mean=mean,
        std=std,
        normalisation=norm,
        on_device=stored.on_device(spec, norm, lighting) if stored is not None else None,
        views=lambda split, pid, nproc: evaluation(
            pid, nproc, split=source.train_split if split == "train" else source.eval_split, names=True),
    )
