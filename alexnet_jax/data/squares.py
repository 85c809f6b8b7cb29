"""ILSVRC-2012 prepared once as the paper's 256x256 squares (a tfds dataset), and the pipelines that read it.

The paper (section 2) down-sampled every image once: shorter side rescaled to 256, centre 256x256 patch kept;
training drew its 224 patches and reflections from those. Decoding a full-size JPEG for every training image
costs most of the host's time per image; a 256x256 square costs a fraction of it (raw uint8: a slice).

- `Imagenet2012Squares`: a tfds `GeneratorBasedBuilder` whose source is the prepared `imagenet2012`; one
  `SquareConfig` per (size, resize method, encoding, JPEG quality), e.g. `256px_area_raw`, `256px_area_jpeg95`.
  tfds writes, shards and shuffles it like any dataset, so `tfds.split_for_jax_process` gives every process
  its own files. Images are stored as raw uint8 (`tfds.features.Tensor`, bytes) or JPEG at a set quality.
- Resuming: each source shard is converted into its own finished file under
  `<data_dir>/downloads/imagenet2012_squares/<config>/` (tfds-serialized examples) before tfds writes the
  dataset from them, so an interrupted preparation converts only the shards not done yet; the folder is removed
  once the dataset is written. A source JPEG that does not decode (the full image, not only its square) stops
  the preparation with its file name.
- `create_data`: the same stream as `imagenet.create_data` (order, skipping on resume, padded exactly-once
  evaluation: `imagenet.train_dataset` / `eval_dataset`), with the per-image work done batch-wide on 256x256
  uint8 squares: a batch of records is parsed at once, raw squares are one reshape (of a JPEG square only the
  patch is decoded), and the random 224/227 patches, reflections, PCA lighting and the mean image of the
  prepared squares run as one XLA-compiled pass (`augment.paper_batch`); the 10-crop test from the same squares.
  The random choices come from (seed, step) for the whole global batch, row r taking row r of them
  (`augment.batch_draws`): the same distributions as the source path, and the same determinism and resumption,
  though not the same draws. With `config.augment_on_device=True` the host stops at the uint8 squares of the batch
  and their draws, and the jitted train step cuts, reflects, subtracts and lights them (`on_device`): the same
  batch, for less host work per image and a little more device work.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from tqdm import tqdm

from alexnet_jax.data import augment, imagenet, images
from alexnet_jax.data.base import (
    Data,
    Normalisation,
    check_data_dir,
    given_normalisation,
    lighting_for,
    normalisation_for,
    stats_for,
)
from alexnet_jax.errors import UserError

FORMATS = ("raw", "jpeg")
SPLITS = ("train", "validation")
COMMAND = "python -m alexnet_jax.data.prepare --config configs/imagenet.py"


@dataclasses.dataclass(eq=True)
class SquareConfig(tfds.core.BuilderConfig):
    """One preparation: squares of `size` px resized with `method`, stored as `encoding` ('raw' or 'jpeg')."""

    size: int = 256
    method: str = "area"
    encoding: str = "jpeg"
    quality: int = 95


def square_config(config: ml_collections.ConfigDict) -> SquareConfig:
    """The preparation a training config reads (its resize size and method, `prepared_format`, `_quality`)."""
    size, method, fmt = int(config.resize_size), config.resize_method, config.prepared_format
    quality = int(config.prepared_quality)
    name = f"{size}px_{method}_" + ("raw" if fmt == "raw" else f"jpeg{quality}")
    return SquareConfig(name=name, size=size, method=method, encoding=fmt, quality=quality,
                        description=f"ILSVRC-2012, shorter side to {size} ({method}), centre square, {fmt}")


class Imagenet2012Squares(tfds.core.GeneratorBasedBuilder):
    """`imagenet2012` as the paper's stored training images: every image rescaled and centre-cropped once."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Squares of the prepared imagenet2012 5.1.0, raw uint8 or JPEG."}

    def __init__(self, *, source: tfds.core.DatasetBuilder | None = None, **kwargs):
        self._source = source  # only needed to prepare; reading needs none
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c: SquareConfig = self.builder_config
        shape = (c.size, c.size, 3)
        image = (tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
                 if c.encoding == "raw" else tfds.features.Image(shape=shape, encoding_format="jpeg"))
        labels = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
        return tfds.core.DatasetInfo(
            builder=self,
            description="ILSVRC-2012 images rescaled (shorter side) and centre-cropped once to a square.",
            features=tfds.features.FeaturesDict({
                "image": image,
                "label": tfds.features.ClassLabel(names_file=labels),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def work_dir(self) -> str:
        return os.path.join(os.fspath(self.data_dir_root), "downloads", "imagenet2012_squares",
                            self.builder_config.name)

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._source is None:
            raise ValueError("preparing needs the source imagenet2012 builder (squares.prepare)")
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        instructions = list(self._source.info.splits[split].file_instructions)
        folder = os.path.join(self.work_dir(), split)
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, f"{i:05d}-of-{len(instructions):05d}.tfrecord") for i in range(len(instructions))]
        done = sum(fi.take for fi, p in zip(instructions, paths, strict=True) if os.path.isfile(p))
        total = self._source.info.splits[split].num_examples
        if done:
            logging.info("%s: %d of %d images converted before; resuming", split, done, total)
        features = self.info.features
        with tqdm(total=total, initial=done, unit=" images", desc=f"{split}: {self.builder_config.name}",
                  mininterval=2.0, smoothing=0.05) as bar:
            for fi, path in zip(instructions, paths, strict=True):
                if not os.path.isfile(path):
                    self._convert(split, fi, path, bar)
                records = tf.data.TFRecordDataset(path).map(
                    lambda r: features.deserialize_example(r, decoders={"image": tfds.decode.SkipDecoding()}))
                for ex in records.as_numpy_iterator():
                    image = ex["image"]
                    if self.builder_config.encoding == "raw":
                        image = np.frombuffer(image, np.uint8).reshape(features["image"].shape)
                    name = ex["file_name"].decode()
                    yield name, {"image": image, "label": int(ex["label"]), "file_name": name}

    def _convert(self, split: str, fi, path: str, bar: tqdm) -> None:
        """One source shard to a finished file of squares (written to a temporary name, then renamed)."""
        c: SquareConfig = self.builder_config
        parse = imagenet._parser(self._source)

        def one(record):
            ex = parse(record)
            square = square_of_jpeg(ex["image"], c.size, c.method)
            image = square if c.encoding == "raw" else tf.io.encode_jpeg(square, quality=c.quality)
            return ex["file_name"], ex["label"], image

        ds = imagenet._records([fi]).map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(64)
        features = self.info.features
        tmp = path + ".tmp"
        try:
            with tf.io.TFRecordWriter(tmp) as w:
                for name, label, image in ds.as_numpy_iterator():
                    w.write(features.serialize_example({"image": image, "label": int(label), "file_name": name}))
                    bar.update(1)
        except tf.errors.InvalidArgumentError:
            os.remove(tmp)
            bad = undecodable(self._source, fi)
            shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise UserError(
                f"{len(bad) or 'an'} image(s) of {imagenet.NAME}'s {split} split in {self._source.data_dir} do not "
                f"decode: {shown or fi.filename}. Replace them in the archive, prepare {imagenet.NAME} again "
                f"(scripts/prepare_imagenet.py checks every JPEG) and rerun `{COMMAND}`: the shards converted so "
                "far are kept.") from None
        os.replace(tmp, path)


def upright(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """(H, W, C) pixels as stored -> upright for EXIF `orientation` 1-8 (`images.orient_array`, in-graph)."""
    def t(a: tf.Tensor) -> tf.Tensor:
        return tf.transpose(a, (1, 0, 2))

    branches = [lambda: image, lambda: image, lambda: image[:, ::-1], lambda: image[::-1, ::-1],
                lambda: image[::-1], lambda: t(image), lambda: tf.image.rot90(image, 3),
                lambda: t(image[::-1, ::-1]), lambda: tf.image.rot90(image, 1)]
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation, 1)
    return tf.switch_case(tf.cast(index, tf.int32), branches)


def _orientation(data: bytes | np.ndarray) -> np.int64:
    """(tf.numpy_function hands a string over as bytes in a graph, as a 0-d array eagerly.)"""
    return np.int64(images.orientation_of_bytes(data if isinstance(data, bytes) else data.item()))


def square_of_jpeg(jpeg: tf.Tensor, size: int, method: str) -> tf.Tensor:
    """The prepared square (uint8) of a source JPEG: decoded whole (so a damaged image anywhere fails), upright by
    its EXIF orientation (`images.orientation_of_bytes`: TensorFlow's decoder ignores the tag), centre square,
    resized like the source path's `augment.decode_square`, rounded."""
    orientation = tf.numpy_function(_orientation, [jpeg], tf.int64,
                                    stateful=False)
    image = upright(tf.io.decode_jpeg(jpeg, channels=3), orientation)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(h, w)
    square = image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    return tf.cast(tf.round(augment.resize(square, size, method)), tf.uint8)


def undecodable(source: tfds.core.DatasetBuilder, fi) -> list[str]:
    """File names in one source shard that do not decode."""
    parse = imagenet._parser(source)
    parsed = imagenet._records([fi]).map(parse)
    names = {n.decode() for n in parsed.map(lambda ex: ex["file_name"]).as_numpy_iterator()}
    good = parsed.map(lambda ex: (ex["file_name"], tf.shape(tf.io.decode_jpeg(ex["image"], channels=3))))
    return sorted(names - {n.decode() for n, _ in good.ignore_errors().as_numpy_iterator()})


def builder_for(config: ml_collections.ConfigDict, source: tfds.core.DatasetBuilder | None = None):
    data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
    return Imagenet2012Squares(config=square_config(config), data_dir=data_dir, source=source)


def prepare(config: ml_collections.ConfigDict) -> Imagenet2012Squares:
    """Prepare the squares the config reads, from the prepared imagenet2012 (prepared first from the manual tars
    when it is not: `config.manual_dir`)."""
    check_config(config)
    data_dir = check_data_dir(config.data_dir)
    source = imagenet.open_builder(data_dir)
    if not source.is_prepared():
        source = imagenet.prepare(data_dir, config.get("manual_dir", ""))
    builder = builder_for(config, source)
    if not builder.is_prepared():
        logging.info("preparing %s/%s from %s", builder.name, builder.builder_config.name, source.data_dir)
        builder.download_and_prepare()
    shutil.rmtree(builder.work_dir(), ignore_errors=True)
    return builder


def check_config(config: ml_collections.ConfigDict) -> None:
    imagenet.check_config(config)
    if config.prepared_format not in FORMATS:
        raise UserError(f"--config.prepared_format={config.prepared_format!r}: choose one of {FORMATS}")
    if not 1 <= config.prepared_quality <= 100:
        raise UserError(f"--config.prepared_quality={config.prepared_quality}: a JPEG quality, 1-100")
    if config.train_crop != "paper":
        raise UserError(f"--config.train_crop={config.train_crop!r} with --config.prepared=True: prepared squares "
                        "serve the paper's crops; use the source JPEGs (--config.prepared=False) for random "
                        "resized crops")


def open_prepared(config: ml_collections.ConfigDict) -> Imagenet2012Squares:
    builder = builder_for(config)
    if not builder.is_prepared():
        dd = f" --config.data_dir={config.data_dir}" if config.data_dir else ""
        raise UserError(
            f"{builder.name}/{builder.builder_config.name} (ImageNet prepared as {config.resize_size}px squares, "
            f"{config.prepared_format}) is not in {builder.data_dir_root}: run `{COMMAND}{dd} "
            f"--config.prepared_format={config.prepared_format}` once (it prepares imagenet2012 from the tars "
            "first if needed), or train from the source JPEGs with --config.prepared=False.")
    return builder


def decoder(builder: Imagenet2012Squares):
    """The uint8 (S, S, 3) square of a stored image feature (raw bytes or JPEG)."""
    c: SquareConfig = builder.builder_config
    if c.encoding == "jpeg":
        return lambda image: tf.ensure_shape(tf.io.decode_jpeg(image, channels=3), (c.size, c.size, 3))
    return lambda image: tf.reshape(tf.io.decode_raw(image, tf.uint8), (c.size, c.size, 3))


# The records' layout (tfds serialises the image feature as one bytes value, raw or JPEG, the label as int64).
RECORD_SPEC = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}


def pipelines(config: ml_collections.ConfigDict, norm, builder: Imagenet2012Squares,
              lighting: augment.Lighting = augment.PUBLISHED) -> tuple[Callable, tuple]:
    """The `squares=` hooks of `imagenet.train_dataset` (a batch of records to augmented images) and
    `eval_dataset` (each record's uint8 square, then a batch's crops).

    Batch-wide: a batch of records is parsed at once, raw squares are decoded at once (of a JPEG square only the
    patch is decoded, one by one with `tf.map_fn`), and the augmentation (`augment.paper_batch`) / the crops run
    as one XLA-compiled function, so gathering the patch, subtracting its part of the mean image, adding the
    lighting and casting to float32 is one pass over the pixels instead of one pass per op."""
    mean, std = norm.arrays(per_pixel=True)
    crop, size = int(config.image_size), builder.builder_config.size
    decode = decoder(builder)
    jpeg = builder.builder_config.encoding == "jpeg"

    @tf.function(jit_compile=True)
    def augment_batch(images: tf.Tensor, yx: tf.Tensor, flips: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
        return augment.paper_batch(images, yx, flips, alpha, crop=crop, flip=bool(config.random_flip),
                                   pca_std=float(config.pca_lighting), normalization=norm.kind, mean=mean, std=std,
                                   pca=lighting)

    def patch_of_jpeg(args):  # decodes only the patch's rows and columns (bit-identical to slicing the square)
        image, yx = args
        return augment.decode_window(image, yx[0], yx[1], crop, size)

    def train_batch(records: tf.Tensor, key: tf.Tensor, rows: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = tf.io.parse_example(records, RECORD_SPEC)
        yx, flips, alpha = augment.batch_draws(key, rows, int(config.batch_size), size, crop,
                                               float(config.pca_lighting))
        if config.get("augment_on_device", False):  # whole uint8 squares and the draws: `on_device` does the rest
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

    @tf.function(jit_compile=True)
    def eval_batch(images: tf.Tensor) -> tf.Tensor:
        return augment.eval_batch(images, crop=crop, crops=int(config.eval_crops), normalization=norm.kind,
                                  mean=mean, std=std)

    return train_batch, (decode, eval_batch)


def on_device(config: ml_collections.ConfigDict, norm,
              lighting: augment.Lighting = augment.PUBLISHED) -> Callable | None:
    """With `config.augment_on_device`: the jitted step's half of `pipelines`' training batches (uint8 squares and
    their draws in, the augmented float32 batch out: `augment.paper_batch_on_device`), else None."""
    if not config.get("augment_on_device", False):
        return None
    mean, std = norm.arrays(per_pixel=True)
    return functools.partial(augment.paper_batch_on_device, crop=int(config.image_size),
                             flip=bool(config.random_flip), pca_std=float(config.pca_lighting),
                             normalization=norm.kind, mean=mean, std=std, pca=lighting)


def create_data(config: ml_collections.ConfigDict, normalisation: Normalisation | None = None) -> Data:
    """The `Data` the trainer consumes, streaming from the prepared squares (`config.prepared=True`)."""
    check_config(config)
    check_data_dir(config.data_dir)
    builder = open_prepared(config)
    decode = decoder(builder)
    def computed() -> dict[str, np.ndarray]:
        return imagenet.dataset_stats(builder, builder.builder_config.size, int(config.stats_examples),
                                      config.resize_method, square_of=lambda image: tf.cast(decode(image), tf.float32))

    if normalisation is not None:
        norm = given_normalisation(config, normalisation)
        lighting = (lighting_for(config, computed()) if config.pca == "data" and config.pca_lighting > 0
                    else augment.PUBLISHED)
    else:
        stats, lighting = stats_for(config, computed)
        norm = normalisation_for(config, stats)
    train, evaluation = pipelines(config, norm, builder, lighting)
    crop = int(config.image_size)
    names = tuple(builder.info.features["label"].names)
    if config.num_classes != len(names):
        raise UserError(f"--config.num_classes={config.num_classes}: {imagenet.NAME} has {len(names)} classes")
    return Data(
        num_train=builder.info.splits["train"].num_examples,
        num_eval=builder.info.splits["validation"].num_examples,
        image_shape=(crop, crop, 3),
        class_names=names,
        train=lambda start, stop, pid, nproc: imagenet._guard(tfds.as_numpy(imagenet.train_dataset(
            builder, config, norm, start, stop, pid, nproc, squares=train)), builder, "train"),
        eval=lambda pid, nproc, row_multiple=0: imagenet._guard(tfds.as_numpy(imagenet.eval_dataset(
            builder, config, norm, pid, nproc, row_multiple=row_multiple, squares=evaluation)), builder,
            "validation"),
        mean=norm.arrays(per_pixel=True)[0],
        std=norm.std,
        normalisation=norm,
        on_device=on_device(config, norm, lighting),
    )
