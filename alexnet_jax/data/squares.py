"""Any source of photos prepared once as the paper's 256x256 squares (a tfds dataset): a source, preprocessed.

The paper (section 2) down-sampled every image once: shorter side rescaled to 256, centre 256x256 patch kept;
training drew its 224 patches and reflections from those. Decoding a full-size JPEG for every training image
costs most of the host's time per image; a 256x256 square costs a fraction of it (raw uint8: a slice).

- `PhotoSquares`: a tfds builder whose source is any prepared `Source` (ImageNet, a folder, a tfds dataset
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
- Reading (`open_prepared`): the squares are a `Source` like any other (`Source.square`: their side), which
  `photos` reads through the batch-wide pipelines of `square_batches` (the same stream as the source images, the
  per-image work done on whole batches of uint8 squares; `config.augment_on_device=True`: in the jitted step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from tqdm import tqdm

from alexnet_jax.data import augment, imagenet, images, once, records, sources
from alexnet_jax.data.base import check_data_dir, data_options
from alexnet_jax.data.sources import Source
from alexnet_jax.data.spec import PREPARED_FORMATS, DataSpec, check
from alexnet_jax.errors import UserError

FORMATS = PREPARED_FORMATS
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


def square_config(spec: DataSpec, source: Source) -> SquareConfig:
    """The preparation a training spec reads: its source (dataset, version, splits, features), resize size and
    method, `prepared_format`, `prepared_quality`."""
    size, method, fmt = int(spec.resize_size), spec.resize_method, spec.prepared_format
    quality = int(spec.prepared_quality)
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

    def __init__(self, *, source: Source | None = None, **kwargs):
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
        parse = sources.parser(src)
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


def undecodable(source: Source, recs: records.Records, split: str, lo: int, hi: int) -> list[str]:
    """The images among records lo .. hi-1 that do not decode: file names, or `split[index]` without them."""
    parse = sources.parser(source)
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


def builder_for(spec: DataSpec, source: Source) -> PhotoSquares:
    data_dir = os.path.expanduser(spec.data_dir) if spec.data_dir else None
    return PhotoSquares(config=square_config(spec, source), data_dir=data_dir, source=source)


def _build(builder: PhotoSquares) -> None:
    logging.info("preparing %s/%s from %s", builder.name, builder.builder_config.name, builder._source.builder.data_dir)
    builder.download_and_prepare(file_format=records.FORMAT)
    shutil.rmtree(builder.work_dir(), ignore_errors=True)


def prepare(spec: DataSpec) -> PhotoSquares:
    """Prepare the squares the spec reads, from its source (ImageNet prepared first from the manual tars when it
    is not: `spec.manual_dir`; a folder or a tfds dataset as training prepares them). The squares' keys are
    checked whatever `spec.prepared` says: preparing them is what this is for."""
    check(dataclasses.replace(spec, prepared=True))
    data_dir = check_data_dir(spec.data_dir)
    if spec.dataset == imagenet.NAME and not imagenet.open_builder(data_dir).is_prepared():
        imagenet.prepare(data_dir, spec.manual_dir)
    builder = builder_for(spec, sources.open_source(spec))
    if not builder.is_prepared():
        _build(builder)
    return builder


def source_of(builder: PhotoSquares) -> Source:
    """Prepared squares as a `Source` the photo pipelines read (`Source.square`: their side)."""
    c = builder.builder_config
    return Source(builder, "train", "validation", is_jpeg=c.encoding == "jpeg",
                  repair=f"delete {builder.data_dir} and prepare the squares again", square=c.size)


def open_prepared(spec: DataSpec, source: Source, processes: once.Processes = once.ONE) -> Source:
    """The squares of `source` the spec reads, as a `Source`: prepared (a folder's or a tfds dataset's, by process
    0 of a multi-process run, the others waiting: `once`), or, for ImageNet (hours), a UserError naming the
    command."""
    builder = builder_for(spec, source)
    if not builder.is_prepared():
        if spec.dataset == imagenet.NAME:
            dd = f" --config.data_dir={spec.data_dir}" if spec.data_dir else ""
            raise UserError(
                f"{builder.name}/{builder.builder_config.name} (ImageNet prepared as {spec.resize_size}px squares, "
                f"{spec.prepared_format}) is not in {builder.data_dir_root}: run `{COMMAND} configs/imagenet.py"
                f"{dd} --config.prepared_format={spec.prepared_format}` once (it prepares imagenet2012 from the "
                "tars first if needed), or train from the source JPEGs with --config.prepared=False.")
        info = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
        once.prepare_once(f"the squares of {source.name}", lambda: os.path.exists(info), lambda: _build(builder),
                          os.path.join(os.fspath(builder.data_dir_root), ".alexnet_jax_prepare",
                                       f"photo_squares-{builder.builder_config.name}.json"), processes)
        if not builder.info.splits:  # prepared by process 0 while this one waited: read what it wrote
            builder = builder_for(spec, source)
    return source_of(builder)
