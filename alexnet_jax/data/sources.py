"""Where photos come from: the `Source` type and one per kind, whatever is done to them afterwards.

A `Source` names a prepared tfds builder, its training and evaluation splits (tfds split syntax, e.g.
'train[:90%]'), the image and label features and whether the images are JPEGs (only those are partially decoded),
or, for the paper's squares prepared once (`squares`), their side. `parser` reads its records, `guard` turns a
record that does not decode into one UserError saying how to repair it.

- `imagenet2012`: tfds's builder over the two manual ILSVRC-2012 tars (`imagenet`), train / validation;
- `folder` (`--config.folder=ROOT`): the user's images, `ROOT/<split>/<class>/*` or `ROOT/<class>/*` (`folder`);
- any other name: that tfds dataset (`tfds.builder(name)`, downloaded and prepared where tfds can, or already
  prepared in `data_dir`), e.g. `oxford_flowers102`, `imagenette`, `caltech101`.

Splits are tfds split strings (`--config.train_split='train[:90%]'`); unset, the training split is 'train' and
the evaluation split the dataset's 'validation' (else 'test', else a folder's other split). A dataset with only a
training split holds out its last `holdout_fraction` of records (tfds stores them shuffled by key, so the held-out
images are a fixed random sample) for evaluation and trains on the rest.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax.data import folder, imagenet, once, records
from alexnet_jax.data.base import check_data_dir
from alexnet_jax.data.spec import DATASETS, DataSpec
from alexnet_jax.errors import UserError

EVAL_SPLITS = ("validation", "test")


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
    # the side of the paper's squares stored once (`squares`: raw uint8, or JPEG with `is_jpeg`); 0: photos as found
    square: int = 0

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


def parser(source: Source) -> Callable[[tf.Tensor], dict]:
    """Serialized example -> features, the image left encoded."""
    features = source.builder.info.features
    decoders = {source.image_key: tfds.decode.SkipDecoding()}
    return lambda record: features.deserialize_example(record, decoders=decoders)


def guard(batches: Iterator, source: Source, split: str) -> Iterator:
    """Decode failures stop training with a UserError; a broken image never becomes a silent zero example."""
    try:
        yield from batches
    except tf.errors.InvalidArgumentError as e:
        first = str(getattr(e, "message", e)).strip().splitlines()[0][:200]
        raise UserError(f"an image of {source.name}'s {split} split in {source.builder.data_dir} does not decode "
                        f"({first}): {source.repair}.") from None


def imagenet_source(builder: tfds.core.DatasetBuilder, data_dir: str = "") -> Source:
    """ImageNet's prepared builder (`imagenet.open_prepared`) as the photo pipelines read it."""
    dd = f" --data_dir {data_dir}" if data_dir else ""
    return Source(builder, "train", "validation", repair=(
        f"run `python scripts/prepare_imagenet.py --verify_only{dd}` to list the damaged files, replace them in "
        "the archive and prepare again"))


def holdout(builder: tfds.core.DatasetBuilder, train: str, fraction: float) -> tuple[str, str]:
    """(training split, evaluation split): the last `fraction` of `train`'s records held out."""
    if not 0 < fraction < 1:
        raise UserError(f"--config.holdout_fraction={fraction}: {builder.name} has no evaluation split, so a "
                        "fraction of its training images (0 < fraction < 1, e.g. 0.1) is held out for it; or "
                        "name one with --config.eval_split")
    if "[" in train:
        raise UserError(f"--config.train_split={train!r}: {builder.name} has no evaluation split; give one with "
                        "--config.eval_split (tfds split syntax, e.g. 'train[90%:]')")
    n = builder.info.splits[train].num_examples
    held = max(1, round(n * fraction))
    if held >= n:
        raise UserError(f"{builder.name} has {n} training image(s): too few to hold {fraction:.0%} out for "
                        "evaluation; add images or give --config.eval_split")
    return f"{train}[:{n - held}]", f"{train}[{n - held}:]"


def _splits(spec: DataSpec, builder: tfds.core.DatasetBuilder, default_eval: str | None) -> tuple[str, str]:
    train = spec.train_split or "train"
    if spec.eval_split:
        return train, spec.eval_split
    if default_eval is None:
        return holdout(builder, train, float(spec.holdout_fraction))
    return train, default_eval


def _check_splits(builder: tfds.core.DatasetBuilder, splits: tuple[str, ...]) -> None:
    for split in splits:
        try:
            n = builder.info.splits[split].num_examples
        except (KeyError, ValueError, AssertionError) as e:
            raise UserError(f"split {split!r} of {builder.name}: {str(e).splitlines()[0][:160]}; it has splits "
                            f"{sorted(builder.info.splits)} (tfds syntax: 'train', 'train[:90%]', "
                            "'train[100:]')") from None
        if n == 0:
            raise UserError(f"split {split!r} of {builder.name} holds no images: choose another "
                            "(--config.train_split / --config.eval_split)")


def _keys(image_key: str, label_key: str, builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
    features = builder.info.features
    supervised = tuple(builder.info.supervised_keys or ())
    image = image_key or (supervised[0] if len(supervised) == 2 else "image")
    label = label_key or (supervised[1] if len(supervised) == 2 else "label")
    for key, what in ((image, "image"), (label, "label")):
        if key not in features:
            raise UserError(f"{builder.name} has no feature {key!r}: its features are {sorted(features)}; name "
                            f"the {what} with --config.{what}_key")
    if not isinstance(features[image], tfds.features.Image):
        raise UserError(f"{builder.name}'s feature {image!r} is not an image ({type(features[image]).__name__})")
    if not isinstance(features[label], tfds.features.ClassLabel):
        raise UserError(f"{builder.name}'s feature {label!r} is not a class label: name it with --config.label_key")
    return image, label


def _tfds_builder(name: str, data_dir: str | None, manual_dir: str,
                  processes: once.Processes = once.ONE) -> tfds.core.DatasetBuilder:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise UserError(f"--config.dataset={name!r} is unknown; choose one of {DATASETS}, 'folder' (with "
                        "--config.folder=ROOT) or a tfds dataset's name (e.g. oxford_flowers102; none is prepared "
                        f"under that name in {data_dir or '~/tensorflow_datasets'} either)") from None

    def ready() -> bool:  # prepared, and in array_record (a copy prepared before in TFRecord is converted)
        return records.is_readable(tfds.builder(name, data_dir=data_dir))

    def build() -> None:
        if builder.is_prepared():
            records.to_array_record(builder)
            return
        try:
            builder.download_and_prepare(file_format=records.FORMAT, download_config=tfds.download.DownloadConfig(
                manual_dir=os.path.expanduser(manual_dir) if manual_dir else None))
        except Exception as e:  # noqa: BLE001 - any download or preparation failure means the same to the user
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"tfds could not download and prepare {name} into {os.fspath(builder.data_dir_root)} "
                            f"({first}): run where there is internet once (the prepared copy is then reused), "
                            "or copy a prepared one into --config.data_dir") from None

    state = os.path.join(os.fspath(builder.data_dir_root), ".alexnet_jax_prepare",
                         f"{builder.name}-{builder.builder_config.name if builder.builder_config else ''}.json")
    once.prepare_once(name, ready, build, state, processes)
    # opened again: what was prepared or converted meanwhile (by this process or, while it waited, by process 0)
    return records.random_access(tfds.builder(name, data_dir=data_dir))


def open_source(spec: DataSpec, processes: once.Processes = once.ONE) -> Source:
    """The spec's dataset of photos, prepared (by process 0 of a multi-process run: `once`); its splits and
    features checked."""
    data_dir = check_data_dir(spec.data_dir)
    if spec.dataset == imagenet.NAME:
        src = imagenet_source(imagenet.open_prepared(spec.data_dir, spec.manual_dir), spec.data_dir)
        if spec.train_split or spec.eval_split:
            src = Source(src.builder, spec.train_split or "train", spec.eval_split or "validation",
                         repair=src.repair)
        _check_splits(src.builder, (src.train_split, src.eval_split))
        return src
    if spec.dataset == "folder":
        if not spec.folder:
            raise UserError("--config.dataset=folder needs --config.folder=ROOT (ROOT/<split>/<class>/*.jpg or "
                            "ROOT/<class>/*.jpg)")
        builder, folder_eval = folder.prepare(spec.folder, data_dir, processes)
        train, evaluation = _splits(spec, builder, folder_eval)
        repair = f"delete {builder.data_dir} and run again (the folder is prepared anew)"
    else:
        builder = _tfds_builder(spec.dataset, data_dir, spec.manual_dir, processes)
        known = builder.info.splits
        train, evaluation = _splits(spec, builder, next((s for s in EVAL_SPLITS if s in known), None))
        repair = f"delete {builder.data_dir} and run again (tfds prepares it anew)"
    _check_splits(builder, (train, evaluation))
    image, label = _keys(spec.image_key, spec.label_key, builder)
    is_jpeg = getattr(builder.info.features[image], "encoding_format", None) == "jpeg"
    return Source(builder, train, evaluation, image, label, is_jpeg, repair)
