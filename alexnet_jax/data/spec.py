"""What the data package reads from a run's config, read once: `DataSpec.from_config(config)`.

The one door from an ml_collections ConfigDict into the data package: every other function below it takes the
frozen `DataSpec` (or plain values), so what a pipeline depends on is in its signature, and nothing written into
the config later (e.g. the trainer's `num_classes`) can change what the data does. `from_config` also rejects the
data keys' bad values with a message that says what to change, before anything is prepared or read.

No TensorFlow here (nor anything that imports it): the trainer, inference and the tests build a spec without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from alexnet_jax.errors import UserError

DATASETS = ("fashion_mnist", "cifar10", "imagenet2012")  # by name; besides them: 'folder' and any tfds dataset
SMALL_DATASETS = ("fashion_mnist", "cifar10")  # held in memory at their own size; all others are photos
TRAIN_CROPS = ("paper", "random_resized")
NORMALIZATIONS = ("pixel", "channel")
RESIZE_METHODS = ("area", "bilinear", "antialias")
PCA_SOURCES = ("data", "published")
PREPARED_FORMATS = ("raw", "jpeg")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Every config value the data package reads (the keys of the same names; default_config.py says what each
    means). `num_classes` is the configured count (0: the dataset's, whatever it is)."""

    dataset: str
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 256
    image_size: int = 224
    num_classes: int = 1000
    # where the images are and which of them
    data_dir: str = ""
    folder: str = ""
    manual_dir: str = ""
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    train_split: str = ""
    eval_split: str = ""
    holdout_fraction: float = 0.1
    image_key: str = ""
    label_key: str = ""
    prepare_wait_s: float = 7200.0
    # what is done to them
    crop_padding: int = 0
    random_flip: bool = True
    resize_size: int = 256
    resize_method: str = "area"
    train_crop: str = "paper"
    rrc_area_range: tuple[float, float] = (0.08, 1.0)
    rrc_aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    pca_lighting: float = 0.1
    pca: str = "data"
    normalization: str = "pixel"
    channel_mean: tuple[float, ...] = ()
    channel_std: tuple[float, ...] = ()
    stats_examples: int = 50_000
    eval_crops: int = 1
    # the paper's squares, prepared once (`squares`)
    prepared: bool = False
    prepared_format: str = "raw"
    prepared_quality: int = 95
    augment_on_device: bool = False

    @property
    def is_photos(self) -> bool:
        return is_photos(self)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> DataSpec:
        """The config's data keys, checked (a UserError naming the key and what to change): the only function
        of the data package that reads a ConfigDict."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in config:
                value = config[field.name]
                values[field.name] = tuple(value) if isinstance(value, list | tuple) else value
        spec = cls(**values)
        check(spec)
        return spec


def is_photos(spec: Any) -> bool:
    """Photos (ImageNet, a folder, a tfds dataset): resized squares, crops, the paper's augmentations; the small
    datasets are used at their own size."""
    return spec.dataset not in SMALL_DATASETS


def check(spec: DataSpec) -> None:
    """The data keys: the ones every dataset reads, then the small datasets' or the photos'."""
    def fail(key: str, msg: str) -> None:
        raise UserError(f"--config.{key}={getattr(spec, key)!r}: {msg}")

    if not spec.dataset:
        raise UserError(f"--config.dataset is empty: choose one of {DATASETS}, 'folder' or a tfds dataset's name")
    if spec.eval_crops not in (1, 2, 10):
        fail("eval_crops", "choose 1 (centre), 2 (whole image and its reflection, small datasets) or 10 (four "
                           "corners and centre, and their reflections, photo datasets)")
    if spec.augment_on_device and not (spec.dataset not in SMALL_DATASETS and spec.prepared):
        fail("augment_on_device", "needs the prepared 256x256 squares: --config.prepared=True (the source images "
                                  "and the small datasets augment on the host)")
    if spec.prepare_wait_s <= 0:
        fail("prepare_wait_s", "must be a positive number of seconds (how long a process waits for process 0 "
                               "to prepare the data)")
    if spec.dataset in SMALL_DATASETS:
        if spec.eval_crops not in (1, 2):
            raise UserError(f"--config.eval_crops={spec.eval_crops}: {spec.dataset} images are evaluated "
                            "whole (they are no larger than the crop): use 1, or 2 to add the reflection; 10-crop "
                            "evaluation is for imagenet2012")
        return
    _check_photos(spec, fail)
    if spec.prepared:
        _check_squares(spec, fail)


def _check_photos(spec: DataSpec, fail: Any) -> None:
    """The augmentation, evaluation and normalisation keys of the photo pipelines."""
    if spec.train_crop not in TRAIN_CROPS:
        fail("train_crop", f"choose one of {TRAIN_CROPS}")
    if spec.normalization not in NORMALIZATIONS:
        fail("normalization", f"choose one of {NORMALIZATIONS}")
    if spec.resize_method not in RESIZE_METHODS:
        fail("resize_method", f"choose one of {RESIZE_METHODS}")
    if spec.eval_crops not in (1, 10):
        fail("eval_crops", "choose 1 (centre crop) or 10 (the paper's corners + centre and reflections)")
    if not 0 < spec.image_size <= spec.resize_size:
        fail("image_size", f"must be a crop of the {spec.resize_size} px square (--config.resize_size)")
    if spec.pca_lighting < 0:
        fail("pca_lighting", "is the std of the PCA lighting alpha (paper: 0.1); use 0 to turn it off")
    if spec.pca not in PCA_SOURCES:
        fail("pca", f"choose one of {PCA_SOURCES}: the training pixels' own RGB PCA (the paper) or "
                    "fb.resnet.torch's")
    lo, hi = spec.rrc_area_range
    if not 0 < lo <= hi <= 1:
        fail("rrc_area_range", "must be (low, high) fractions of the image area with 0 < low <= high <= 1")
    mean, std = spec.channel_mean, spec.channel_std
    if (mean or std) and (spec.normalization != "channel" or len(mean) != 3 or len(std) != 3 or min(std) <= 0):
        raise UserError(f"--config.channel_mean={mean} / channel_std={std}: give three values each (0-255 scale, "
                        "std > 0) with --config.normalization=channel, or () to use the training set's")


def _check_squares(spec: DataSpec, fail: Any) -> None:
    """What reading (or preparing) the squares adds (`--config.prepared=True`)."""
    if spec.prepared_format not in PREPARED_FORMATS:
        fail("prepared_format", f"choose one of {PREPARED_FORMATS}")
    if not 1 <= spec.prepared_quality <= 100:
        fail("prepared_quality", "a JPEG quality, 1-100")
    if spec.train_crop != "paper":
        raise UserError(f"--config.train_crop={spec.train_crop!r} with --config.prepared=True: prepared squares "
                        "serve the paper's crops; use the source images (--config.prepared=False) for random "
                        "resized crops")
