"""The data package: every dataset the trainer can read, behind one door, `create_data(config)`.

- `base`: the `Data` interface, the `Normalisation` record and the helpers the pipelines share.
- `small`: FashionMNIST and CIFAR-10, prepared by tfds and held in memory.
- `imagenet`: ILSVRC-2012, prepared by tfds and streamed; `augment`: the paper's augmentation ops it maps.
- `squares`: ILSVRC-2012 prepared once more as the paper's 256x256 squares (`config.prepared=True`);
  `prepare`: its command, `python -m alexnet_jax.data.prepare --config configs/imagenet.py`.

Callers import from here (`from alexnet_jax import data`), not from the modules, except for dataset-specific
tools (e.g. `scripts/prepare_imagenet.py` uses `data.imagenet`).
"""

from __future__ import annotations

import ml_collections

from alexnet_jax.data import augment, imagenet, small, squares
from alexnet_jax.data.base import (
    DATASETS,
    Data,
    Normalisation,
    check_data_dir,
    normalisation_for,
    padded_rows,
    steps_per_epoch,
)
from alexnet_jax.data.small import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    InMemoryData,
    channel_stats,
    fashion_mnist_files_present,
    resize_and_normalise,
)
from alexnet_jax.errors import UserError

__all__ = [
    "CIFAR10_CLASSES", "DATASETS", "FASHION_MNIST_CLASSES", "Data", "InMemoryData", "Normalisation", "augment",
    "channel_stats", "check_data_dir", "create_data", "fashion_mnist_files_present", "imagenet",
    "normalisation_for", "padded_rows", "resize_and_normalise", "small", "squares", "steps_per_epoch",
]


def create_data(config: ml_collections.ConfigDict) -> Data:
    """Prepare (if needed) and open the configured dataset: the small ones in memory, ImageNet streaming."""
    if config.dataset == "imagenet2012":
        return squares.create_data(config) if config.get("prepared", False) else imagenet.create_data(config)
    if config.dataset not in DATASETS:
        raise UserError(f"--config.dataset={config.dataset!r} is unknown; choose one of {DATASETS}")
    return small.create_data(config)
