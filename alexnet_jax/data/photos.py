"""What is done to photos, whatever they come from: the paper's streaming pipeline over any prepared tfds dataset
with an image and a label feature (a `sources.Source`: ImageNet, a tfds dataset by name, a folder of the user's
images, or their 256x256 squares prepared once, `squares`). The pipelines take the frozen `DataSpec` and plain
arguments.

Training stream (`records`): global batch s is rows [sB, (s+1)B) of a permutation of the training split seeded by
(seed, epoch); each process reads its rows by index (array_record), so the batch is the same whatever the number
of processes, a resume at step N reads nothing before step N, and the augmentation of global row r of step s is
keyed by (seed, s, r). Stored squares (`Source.square`) augment a whole local batch at once from the step's key
and the rows' positions (`square_batches`).

Evaluation. Each process reads its slice of the evaluation split in order, padded with masked zero images to the
same number of batches on every process (`base.eval_slice`), so every image counts exactly once. Each image is
seen through `views.of_square`, as `predict` sees a file.

Normalisation. `stats.normalisation_and_lighting`, called once: a normalisation handed in (pretrained weights', a
checkpoint's), else the training statistics' (`stats.dataset_stats`); the training and evaluation pipelines take
their arrays from it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax.data import augment, once, records, square_batches, stats, views
from alexnet_jax.data.base import Data, Normalisation, data_options, eval_slice
from alexnet_jax.data.sources import Source, guard, parser
from alexnet_jax.data.spec import DataSpec
from alexnet_jax.errors import UserError

KEY_STRIDE = 1_000_003  # an image's key is (seed * KEY_STRIDE + step, global row), as in `small.py`


def train_arrays(spec: DataSpec, norm: Normalisation) -> tuple[np.ndarray, np.ndarray]:
    """The paper's crops line up with the mean image; random resized crops do not (per-channel mean instead)."""
    return norm.arrays(per_pixel=spec.train_crop == "paper")


def train_dataset(source: Source, spec: DataSpec, norm: Normalisation, start_step: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1, threads: int | None = None,
                  lighting: augment.Lighting = augment.PUBLISHED,
                  recs: records.Records | None = None) -> tf.data.Dataset:
    """This process's rows of global batches `start_step .. num_steps-1` (images float32, labels int32), with
    PCA lighting from `lighting` (`stats.lighting_for`). Stored squares (`source.square`): a whole local batch of
    records augmented at once from the step's key (seed, step) and the rows' global positions
    (`square_batches`); otherwise each image alone from its key (seed, step, row). `recs`: the training split's
    reader (one is opened otherwise; a test passes its own to count what is read)."""
    recs = recs or source.records(source.train_split)
    local = spec.batch_size // process_count
    steps = records.train_steps(len(recs), spec.batch_size, spec.seed, start_step, num_steps, process_index,
                                process_count)
    mean, std = train_arrays(spec, norm)
    parse = parser(source)
    squares = square_batches.pipelines(spec, norm, source, lighting)[0] if source.square else None

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


def train_indices(source: Source, spec: DataSpec, start_step: int, num_steps: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
    """(steps, local) record indices this process reads for global batches `start_step .. num_steps-1`: the
    records' identities, which the tests compare across process counts."""
    n = source.num_examples(source.train_split)
    steps = records.train_steps(n, spec.batch_size, spec.seed, start_step, num_steps, process_index, process_count)
    return np.stack([rows for _, rows, _ in steps.with_options(data_options()).as_numpy_iterator()])


def eval_dataset(source: Source, spec: DataSpec, norm: Normalisation, process_index: int = 0,
                 process_count: int = 1, threads: int | None = None, row_multiple: int = 0, file_names: bool = False,
                 split: str | None = None) -> tf.data.Dataset:
    """This process's slice of the evaluation split (or `split`), in local batches padded with mask-0 rows to the
    same count on every process (`base.eval_slice`). Images are (B, crop, crop, 3), or (B, 10, crop, crop, 3)
    with `eval_crops=10`: `views.of_square` of each image, or for stored squares (`source.square`) each record's
    uint8 square, then the crops of a whole batch at once (`square_batches`). `file_names`: each row's
    "file_name" too ('' where the source has none)."""
    split = split or source.eval_split
    named = file_names and "file_name" in source.builder.info.features
    local = spec.eval_batch_size // process_count
    recs = source.records(split)
    lo, hi, rows = eval_slice(len(recs), local, process_index, process_count, row_multiple)
    view = views.View.of(spec)
    squares = square_batches.pipelines(spec, norm, source)[1] if source.square else None
    parse = parser(source)

    @tf.autograph.experimental.do_not_convert
    def one(record):
        ex = parse(record)
        out = {"label": tf.cast(ex[source.label_key], tf.int32), "mask": tf.constant(1.0)}
        if squares is not None:
            out["image"] = squares[0](ex[source.image_key])
        else:
            out["image"] = views.of_square(augment.centre_square(ex[source.image_key], source.is_jpeg), view, norm)
        if file_names:
            out["file_name"] = ex["file_name"] if named else tf.constant("")
        return out

    ds = recs.in_order(lo, hi).map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pad = {k: tf.zeros(v.shape, v.dtype) for k, v in ds.element_spec.items()}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(rows - (hi - lo))).batch(local)
    if squares is not None:
        ds = ds.map(tf.autograph.experimental.do_not_convert(lambda b: {**b, "image": squares[1](b["image"])}))
    return ds.prefetch(2).with_options(data_options(threads))


def check_classes(num_classes: int, source: Source) -> None:
    """The configured class count (`DataSpec.num_classes`, 0: any) against the source's."""
    names = source.class_names
    if num_classes not in (0, len(names)):
        raise UserError(f"--config.num_classes={num_classes}: {source.name} has {len(names)} classes "
                        "(0 takes the dataset's count)")


def create_data(spec: DataSpec, source: Source, normalisation: Normalisation | None = None,
                processes: once.Processes = once.ONE) -> Data:
    """The `Data` the trainer consumes, streaming from a prepared source (its images, or its squares stored once:
    `source.square`), normalised by `normalisation` when given, else by the training images' statistics."""
    check_classes(spec.num_classes, source)
    norm, lighting = stats.normalisation_and_lighting(spec, source, normalisation, processes)
    mean, std = train_arrays(spec, norm)

    def evaluation(pid: int, nproc: int, row_multiple: int = 0, split: str | None = None, names: bool = False):
        return guard(tfds.as_numpy(eval_dataset(source, spec, norm, pid, nproc, row_multiple=row_multiple,
                                                file_names=names, split=split)),
                     source, split or source.eval_split)

    def on_device(batch: dict) -> dict:  # (the lighting's statistics are read when the train step is traced)
        return square_batches.on_device(spec, norm, lighting())(batch)

    return Data(
        num_train=source.num_examples(source.train_split),
        num_eval=source.num_examples(source.eval_split),
        image_shape=(spec.image_size, spec.image_size, 3),
        class_names=source.class_names,
        train=lambda start, stop, pid, nproc: guard(tfds.as_numpy(
            train_dataset(source, spec, norm, start, stop, pid, nproc, lighting=lighting())),
            source, source.train_split),
        eval=evaluation,
        mean=mean,
        std=std,
        normalisation=norm,
        on_device=on_device if source.square and spec.augment_on_device else None,
        views=lambda split, pid, nproc: evaluation(
            pid, nproc, split=source.train_split if split == "train" else source.eval_split, names=True),
    )
