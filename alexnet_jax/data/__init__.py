"""The data package: every dataset the trainer can read, behind one door, `create_data(DataSpec.from_config(config))`.

- `spec`: `DataSpec`, every config value the package reads, read and checked once (`DataSpec.from_config`, the
  only function here that takes a ConfigDict); everything below takes the spec and plain arguments.
- `base`: the `Data` interface, the `Normalisation` record and the helpers the pipelines share.
- `small`: FashionMNIST and CIFAR-10, prepared by tfds and held in memory.
- Photos, streamed, one way: source -> records -> decode -> augment -> batches. Where they come from (`sources`:
  the `Source` type; ILSVRC-2012 from its manual tars, `imagenet`; any tfds dataset by name; a folder of the user's
  images, `folder`), each prepared in array_record and read by index (`records`: index -> bytes, the training
  stream's rows); optionally preprocessed once more as the paper's 256x256 squares (`squares`,
  `config.prepared=True`: a source like the others; its command `prepare`). What is done to them (`photos`: the
  paper's augmentations from `augment`, batch-wide for squares in `square_batches`, the 10-crop test, the (seed,
  step) stream). The training statistics and the normalisation chosen from them: `stats`, one pass.
- `views`: how evaluation sees an image (`views.of_square`), which `predict` and `features` apply to files.

Callers import from here (`from alexnet_jax import data`), not from the modules, except for dataset-specific
tools (e.g. `scripts/prepare_imagenet.py` uses `data.imagenet`). Importing the package costs no TensorFlow: the
pipelines (and TensorFlow) load when `create_data` or one of their names is first used, so the trainer, the
model and inference import on an accelerator image that has no TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

from alexnet_jax.data.base import Data, Normalisation, check_data_dir, normalisation_for, padded_rows, steps_per_epoch
from alexnet_jax.data.spec import DATASETS, SMALL_DATASETS, DataSpec, is_photos

# Names served from the modules that import TensorFlow, loaded on first use (PEP 562).
_LAZY = {
    "augment": None, "folder": None, "imagenet": None, "photos": None, "records": None, "small": None,
    "sources": None, "square_batches": None, "squares": None, "stats": None, "views": None,
    "CIFAR10_CLASSES": "small", "FASHION_MNIST_CLASSES": "small", "InMemoryData": "small", "channel_stats": "stats",
    "fashion_mnist_files_present": "small", "resize_and_normalise": "views", "Source": "sources", "View": "views",
}

__all__ = [
    "CIFAR10_CLASSES", "DATASETS", "FASHION_MNIST_CLASSES", "SMALL_DATASETS", "Data", "DataSpec", "InMemoryData",
    "Normalisation", "Source", "View", "augment", "channel_stats", "check_data_dir", "create_data",
    "fashion_mnist_files_present", "folder", "imagenet", "is_photos", "normalisation_for", "padded_rows", "photos",
    "records", "resize_and_normalise", "small", "sources", "square_batches", "squares", "stats", "steps_per_epoch",
    "tensorflow_on_cpu", "views",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'alexnet_jax.data' has no attribute {name!r}")
    module = importlib.import_module(f"alexnet_jax.data.{_LAZY[name] or name}")
    return module if _LAZY[name] is None else getattr(module, name)


_TENSORFLOW_ON_CPU = False


def tensorflow_on_cpu() -> None:
    """tf.data only feeds the accelerator: keep TensorFlow off the GPU memory JAX uses. Called before TensorFlow's
    first use (it cannot change its devices afterwards), so a run that stops at a bad flag never imports it."""
    global _TENSORFLOW_ON_CPU
    if not _TENSORFLOW_ON_CPU:
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow already started (e.g. by the caller): too late, nothing to do
            pass
        _TENSORFLOW_ON_CPU = True


def create_data(spec: DataSpec, normalisation: Normalisation | None = None,
                process_index: int = 0, process_count: int = 1) -> Data:
    """Prepare (if needed) and open the spec's dataset: the small ones in memory, photos streaming (their squares
    prepared once with `spec.prepared`). `normalisation`: use this one (pretrained weights', a checkpoint's)
    instead of the training set's statistics. In a run of `process_count` processes, process 0 prepares what is
    missing and the others wait for it (`once`)."""
    tensorflow_on_cpu()
    from alexnet_jax.data import once, photos, small, sources, squares

    if not spec.is_photos:
        return small.create_data(spec, normalisation)
    processes = once.Processes(process_index, process_count, float(spec.prepare_wait_s))
    source = sources.open_source(spec, processes)
    if spec.prepared:
        source = squares.open_prepared(spec, source, processes)
    return photos.create_data(spec, source, normalisation, processes)
