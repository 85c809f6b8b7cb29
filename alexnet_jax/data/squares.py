"""Any source of photos prepared once as the paper's 256x256 squares (a tfds dataset), and how they become batches.

The paper (section 2) down-sampled every image once: shorter side rescaled to 256, centre 256x256 patch kept;
training drew its 224 patches and reflections from those. Decoding a full-size JPEG for every training image
costs most of the host's time per image; a 256x256 square costs a fraction of it (raw uint8: a slice).

- `PhotoSquares`: a tfds builder whose source is any prepared `photos.Source` (ImageNet, a folder, a tfds dataset
  by name): its training and evaluation splits become the squares' 'train' and 'validation', record i the square
  of the source split's record i. One `SquareConfig` per
  (source, splits, size, resize method, encoding, JPEG quality), named e.g. `imagenet2012-3f2a9c1d-256px_area_raw`.
  Images are stored as raw uint8 (`tfds.features.Tensor`, bytes) or JPEG at a set quality, in array_record.
- Preparing: `python -m alexnet_jax.data.prepare --config CONFIG` (`prepare`), or, for a folder or a tfds dataset,
  the first training run with `--config.prepared=True` (process 0; the others wait: `once`). The source's records
  are read by index in units of `UNIT`, each unit converted into its own finished file under
  `<data_dir>/downloads/photo_squares/<config>/` before tfds writes the dataset from them, so an interrupted
  preparation converts only the units not done yet; the folder is removed once the dataset is written. Source
  images that do not decode (the full image, not only its square) stop the preparation, named.
- Reading (`Prepared`, `photos.create_data(stored=...)`): the same stream as the source images (the same batches
  of rows, keys and resumption), with the per-image work done batch-wide on uint8 squares: a batch of records is
  parsed at once, raw squares are one reshape (of a JPEG square only the patch is decoded), and the random
  patches, reflections, PCA lighting and the mean image run as one XLA-compiled pass (`augment.paper_batch`); the
  10-crop test from the same squares. The random choices come from (seed, step) for the whole global batch, row r
  taking row r of them (`augment.batch_draws`): the same distributions as the source path, not the same draws.
  With `config.augment_on_device=True` the host stops at the uint8 squares and their draws, and the jitted train
  step cuts, reflects, subtracts and lights them (`on_device`): the same batch, for less host work per image.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from tqdm import tqdm

from alexnet_jax.data import augment, imagenet, images, once, photos, records, sources
from alexnet_jax.data.base import check_data_dir, data_options
from alexnet_jax.errors import UserError

FORMATS = ("raw", "jpeg")
SPLITS = ("train", "validation")
UNIT = 4096  # source records per finished work file (what an interrupted preparation keeps)
COMMAND = "python -m alexnet_jax.data.prepare --config"


@dataclasses.dataclass(eq=True)
class SquareConfig(tfds.core.BuilderConfig):
    """One preparation: squares of `size` px resized with `method`, stored as `encoding` ('raw' or 'jpeg')."""

    size: int = 256
    method: str = "area"
    encoding: str = "jpeg"
    quality: int = 95
    class_names: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # (tfds logs the config)


def square_config(config: ml_collections.ConfigDict, source: photos.Source) -> SquareConfig:
    """The preparation a training config reads: its source (dataset, version, splits, features), resize size and
    method, `prepared_format`, `prepared_quality`."""
    size, method, fmt = int(config.resize_size), config.resize_method, config.prepared_format
    quality = int(config.prepared_quality)
    b = source.builder
    identity = "|".join(map(str, (b.name, b.builder_config.name if b.builder_config else "", b.version,
                                  source.train_split, source.eval_split, source.image_key, source.label_key)))
    tag = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in b.name)[:40]
    name = (f"{tag}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}-{size}px_{method}_"
            + ("raw" if fmt == "raw" else f"jpeg{quality}"))
    return SquareConfig(name=name, size=size, method=method, encoding=fmt, quality=quality,
                        class_names=source.class_names,
                        description=f"{b.name} ({source.train_split} / {source.eval_split}), shorter side to {size} "
                                    f"({method}), centre square, {fmt}")


class PhotoSquares(tfds.core.GeneratorBasedBuilder):
    """A source's photos as the paper's stored training images: every image rescaled and centre-cropped once."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Squares of any prepared photo source, raw uint8 or JPEG, in array_record."}

    def __init__(self, *, source: photos.Source | None = None, **kwargs):
        self._source = source  # only needed to prepare; reading needs none
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c: SquareConfig = self.builder_config
        shape = (c.size, c.size, 3)
        image = (tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
                 if c.encoding == "raw" else tfds.features.Image(shape=shape, encoding_format="jpeg"))
        return tfds.core.DatasetInfo(
            builder=self,
            description="Photos rescaled (shorter side) and centre-cropped once to a square.",
            features=tfds.features.FeaturesDict({
                "image": image,
                "label": tfds.features.ClassLabel(names=list(c.class_names)),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # square i is the source split's record i (tfds shuffled those already)
        )

    def _example_writer(self) -> records.Writer:
        return records.Writer()

    def work_dir(self) -> str:
        return os.path.join(os.fspath(self.data_dir_root), "downloads", "photo_squares", self.builder_config.name)

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._source is None:
            raise ValueError("preparing needs the source (squares.prepare)")
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        src = self._source
        source_split = src.train_split if split == "train" else src.eval_split
        recs = src.records(source_split)
        units = [(lo, min(lo + UNIT, len(recs))) for lo in range(0, len(recs), UNIT)]
        folder = os.path.join(self.work_dir(), split)
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, f"{i:05d}-of-{len(units):05d}.tfrecord") for i in range(len(units))]
        done = sum(hi - lo for (lo, hi), p in zip(units, paths, strict=True) if os.path.isfile(p))
        if done:
            logging.info("%s: %d of %d images converted before; resuming", split, done, len(recs))
        features = self.info.features
        with tqdm(total=len(recs), initial=done, unit=" images", desc=f"{split}: {self.builder_config.name}",
                  mininterval=2.0, smoothing=0.05) as bar:
            for (lo, hi), path in zip(units, paths, strict=True):
                if not os.path.isfile(path):
                    self._convert(recs, source_split, lo, hi, path, bar)
                parsed = tf.data.TFRecordDataset(path).map(
                    lambda r: features.deserialize_example(r, decoders={"image": tfds.decode.SkipDecoding()})
                ).with_options(data_options())
                for i, ex in enumerate(parsed.as_numpy_iterator(), lo):
                    image = ex["image"]
                    if self.builder_config.encoding == "raw":
                        image = np.frombuffer(image, np.uint8).reshape(features["image"].shape)
                    name = ex["file_name"].decode()
                    yield f"{i}:{name}", {"image": image, "label": int(ex["label"]), "file_name": name}

    def _convert(self, recs: records.Records, split: str, lo: int, hi: int, path: str, bar: tqdm) -> None:
        """Source records lo .. hi-1 to a finished file of squares (written to a temporary name, then renamed)."""
        c: SquareConfig = self.builder_config
        src = self._source
        parse = photos.parser(src)
        named = "file_name" in src.builder.info.features

        @tf.autograph.experimental.do_not_convert
        def one(record):
            ex = parse(record)
            square = square_of_image(ex[src.image_key], c.size, c.method, src.is_jpeg)
            image = square if c.encoding == "raw" else tf.io.encode_jpeg(square, quality=c.quality)
            return ex["file_name"] if named else tf.constant(""), ex[src.label_key], image

        ds = recs.in_order(lo, hi).map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(64)
        ds = ds.with_options(data_options())
        features = self.info.features
        tmp = path + ".tmp"
        try:
            with tf.io.TFRecordWriter(tmp) as w:
                for name, label, image in ds.as_numpy_iterator():
                    w.write(features.serialize_example({"image": image, "label": int(label), "file_name": name}))
                    bar.update(1)
        except tf.errors.InvalidArgumentError:
            os.remove(tmp)
            bad = undecodable(src, recs, split, lo, hi)
            shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise UserError(
                f"{len(bad) or 'an'} image(s) of {src.name}'s {split} split in {src.builder.data_dir} do not "
                f"decode: {shown}. {src.repair[0].upper()}{src.repair[1:]}, then run the preparation again: the "
                "squares converted so far are kept.") from None
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
    orientation = tf.numpy_function(_orientation, [jpeg], tf.int64, stateful=False)
    return centre_square(upright(tf.io.decode_jpeg(jpeg, channels=3), orientation), size, method)


def centre_square(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(h, w)
    square = image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    return tf.cast(tf.round(augment.resize(square, size, method)), tf.uint8)


def square_of_image(image: tf.Tensor, size: int, method: str, is_jpeg: bool) -> tf.Tensor:
    """`square_of_jpeg`, or for a source whose images are not JPEGs (PNG, ...), the same of the decoded image."""
    return square_of_jpeg(image, size, method) if is_jpeg else centre_square(augment.decode_any(image), size, method)


def undecodable(source: photos.Source, recs: records.Records, split: str, lo: int, hi: int) -> list[str]:
    """The images among records lo .. hi-1 that do not decode: file names, or `split[index]` without them."""
    parse = photos.parser(source)
    named = "file_name" in source.builder.info.features
    bad = []
    for i, record in enumerate(recs.read(np.arange(lo, hi)), lo):
        ex = parse(tf.constant(record))
        try:
            augment.decode_any(ex[source.image_key]) if not source.is_jpeg else tf.io.decode_jpeg(
                ex[source.image_key], channels=3)
        except tf.errors.InvalidArgumentError:
            bad.append(ex["file_name"].numpy().decode() if named else f"{split}[{i}]")
    return bad


def check_config(config: ml_collections.ConfigDict) -> None:
    photos.check_config(config)
    if config.prepared_format not in FORMATS:
        raise UserError(f"--config.prepared_format={config.prepared_format!r}: choose one of {FORMATS}")
    if not 1 <= config.prepared_quality <= 100:
        raise UserError(f"--config.prepared_quality={config.prepared_quality}: a JPEG quality, 1-100")
    if config.train_crop != "paper":
        raise UserError(f"--config.train_crop={config.train_crop!r} with --config.prepared=True: prepared squares "
                        "serve the paper's crops; use the source images (--config.prepared=False) for random "
                        "resized crops")


def builder_for(config: ml_collections.ConfigDict, source: photos.Source) -> PhotoSquares:
    data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
    return PhotoSquares(config=square_config(config, source), data_dir=data_dir, source=source)


def _build(builder: PhotoSquares) -> None:
    logging.info("preparing %s/%s from %s", builder.name, builder.builder_config.name, builder._source.builder.data_dir)
    builder.download_and_prepare(file_format=records.FORMAT)
    shutil.rmtree(builder.work_dir(), ignore_errors=True)


def prepare(config: ml_collections.ConfigDict) -> PhotoSquares:
    """Prepare the squares the config reads, from its source (ImageNet prepared first from the manual tars when it
    is not: `config.manual_dir`; a folder or a tfds dataset as training prepares them)."""
    check_config(config)
    data_dir = check_data_dir(config.data_dir)
    if config.dataset == imagenet.NAME and not imagenet.open_builder(data_dir).is_prepared():
        imagenet.prepare(data_dir, config.get("manual_dir", ""))
    builder = builder_for(config, sources.open_source(config))
    if not builder.is_prepared():
        _build(builder)
    return builder


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The prepared squares a training run reads (`photos.Stored`)."""

    builder: PhotoSquares

    @property
    def size(self) -> int:
        return self.builder.builder_config.size

    @property
    def source(self) -> photos.Source:
        c = self.builder.builder_config
        return photos.Source(self.builder, "train", "validation", is_jpeg=c.encoding == "jpeg",
                             repair=f"delete {self.builder.data_dir} and prepare the squares again")

    def decode(self, image: tf.Tensor) -> tf.Tensor:
        """The uint8 (S, S, 3) square of a stored image feature (raw bytes or JPEG)."""
        s = self.size
        if self.builder.builder_config.encoding == "jpeg":
            return tf.ensure_shape(tf.io.decode_jpeg(image, channels=3), (s, s, 3))
        return tf.reshape(tf.io.decode_raw(image, tf.uint8), (s, s, 3))

    def square_of(self, image: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.decode(image), tf.float32)

    def pipelines(self, spec: photos.Spec, norm, lighting: augment.Lighting) -> tuple[Callable, tuple]:
        return pipelines(spec, norm, self, lighting)

    def on_device(self, spec: photos.Spec, norm, lighting: augment.Lighting) -> Callable | None:
        return on_device(spec, norm, lighting)


def open_prepared(config: ml_collections.ConfigDict, source: photos.Source,
                  processes: once.Processes = once.ONE) -> Prepared:
    """The squares of `source` the config reads: prepared (a folder's or a tfds dataset's, by process 0 of a
    multi-process run, the others waiting: `once`), or, for ImageNet (hours), a UserError naming the command."""
    builder = builder_for(config, source)
    if not builder.is_prepared():
        if config.dataset == imagenet.NAME:
            dd = f" --config.data_dir={config.data_dir}" if config.data_dir else ""
            raise UserError(
                f"{builder.name}/{builder.builder_config.name} (ImageNet prepared as {config.resize_size}px squares, "
                f"{config.prepared_format}) is not in {builder.data_dir_root}: run `{COMMAND} configs/imagenet.py"
                f"{dd} --config.prepared_format={config.prepared_format}` once (it prepares imagenet2012 from the "
                "tars first if needed), or train from the source JPEGs with --config.prepared=False.")
        info = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
        once.prepare_once(f"the squares of {source.name}", lambda: os.path.exists(info), lambda: _build(builder),
                          os.path.join(os.fspath(builder.data_dir_root), ".alexnet_jax_prepare",
                                       f"photo_squares-{builder.builder_config.name}.json"), processes)
        if not builder.info.splits:  # prepared by process 0 while this one waited: read what it wrote
            builder = builder_for(config, source)
    return Prepared(builder)


# The records' layout (tfds serialises the image feature as one bytes value, raw or JPEG, the label as int64).
RECORD_SPEC = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}


def pipelines(spec: photos.Spec, norm, stored: Prepared,
              lighting: augment.Lighting = augment.PUBLISHED) -> tuple[Callable, tuple]:
    """The `squares=` hooks of `photos.train_dataset` (a batch of records to augmented images) and
    `eval_dataset` (each record's uint8 square, then a batch's crops).

    Batch-wide: a batch of records is parsed at once, raw squares are decoded at once (of a JPEG square only the
    patch is decoded, one by one with `tf.map_fn`), and the augmentation (`augment.paper_batch`) / the crops run
    as one XLA-compiled function, so gathering the patch, subtracting its part of the mean image, adding the
    lighting and casting to float32 is one pass over the pixels instead of one pass per op."""
    mean, std = norm.arrays(per_pixel=True)
    crop, size = spec.image_size, stored.size
    jpeg = stored.builder.builder_config.encoding == "jpeg"

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
            images = (tf.map_fn(stored.decode, ex["image"], fn_output_signature=tf.TensorSpec((size, size, 3),
                                                                                               tf.uint8))
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

    return train_batch, (stored.decode, eval_batch)


def on_device(spec: photos.Spec, norm, lighting: augment.Lighting = augment.PUBLISHED) -> Callable | None:
    """With `augment_on_device`: the jitted step's half of `pipelines`' training batches (uint8 squares and their
    draws in, the augmented float32 batch out: `augment.paper_batch_on_device`), else None."""
    if not spec.augment_on_device:
        return None
    mean, std = norm.arrays(per_pixel=True)
    return functools.partial(augment.paper_batch_on_device, crop=spec.image_size, flip=spec.random_flip,
                             pca_std=spec.pca_lighting, normalization=norm.kind, mean=mean, std=std, pca=lighting)
