"""What every dataset hands the trainer, and the pieces more than one pipeline shares.

- `Data`: the interface the trainer, evaluation and checkpointing consume, whatever the dataset's size or source.
- `Normalisation`: how images are normalised, decided once by `normalisation_for` and used by the training and
  evaluation pipelines alike; `to_json` / `from_json` carry it in checkpoint metadata.
- `padded_rows`, `steps_per_epoch`, `check_data_dir`, `data_options`: batch arithmetic, the tfds data folder
  check and the deterministic tf.data options, the same for the in-memory and the streaming pipelines.

Nothing here imports the model, the trainer, checkpointing or sharding: data sits below them. Nor TensorFlow at
import time: the trainer, the accelerator check and inference read `Data` and `Normalisation` on machines without
it (the TF helpers import it when called).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from alexnet_jax.data.spec import DataSpec, is_photos
from alexnet_jax.errors import UserError

NORMALISATION_KINDS = ("pixel", "channel")


@dataclasses.dataclass(frozen=True, eq=False)
class Normalisation:
    """How an image on the 0-255 scale becomes the model's input: `(image - mean) / std`.

    'channel': `mean`, `std` per channel. 'pixel' (the paper): subtract the training set's mean image
    `mean_image` ((resize_size, resize_size, C)) from crops that line up with the resized square, its per-channel
    average `mean` from crops that do not; `std` is all ones. `resize_size` is the square images are resized to
    before cropping (the crop itself for the small datasets).
    """

    kind: str
    mean: np.ndarray
    std: np.ndarray
    mean_image: np.ndarray | None = None
    resize_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in NORMALISATION_KINDS:
            raise ValueError(f"normalisation kind {self.kind!r}: choose one of {NORMALISATION_KINDS}")
        if self.kind == "pixel" and self.mean_image is None:
            raise ValueError("'pixel' normalisation needs the training set's mean image")

    def arrays(self, per_pixel: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) to apply. With 'pixel', `per_pixel` picks the mean image (crops of the resized square)
        over its per-channel average (crops that do not line up with it, e.g. random resized crops)."""
        if self.kind == "pixel" and per_pixel:
            return self.mean_image, self.std
        return self.mean, self.std

    def to_json(self) -> dict[str, Any]:
        """Plain lists and numbers (float32 values, so `from_json` gives back the same arrays bit for bit)."""
        return {
            "kind": self.kind,
            "mean": np.asarray(self.mean, np.float32).tolist(),
            "std": np.asarray(self.std, np.float32).tolist(),
            "mean_image": None if self.mean_image is None else np.asarray(self.mean_image, np.float32).tolist(),
            "resize_size": int(self.resize_size),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Normalisation:
        mean_image = d.get("mean_image")
        return cls(
            kind=d["kind"],
            mean=np.asarray(d["mean"], np.float32),
            std=np.asarray(d["std"], np.float32),
            mean_image=None if mean_image is None else np.asarray(mean_image, np.float32),
            resize_size=int(d.get("resize_size", 0)),
        )


def normalisation_for(spec: DataSpec, stats: Mapping[str, np.ndarray | None]) -> Normalisation:
    """The one place the normalisation is chosen. `stats`: the training set's per-channel `mean` and `std`
    (0-255 scale) and, for photos, its `mean_image` (or the spec's fixed `channel_mean` / `channel_std`).

    Small datasets: per channel, at the crop size. Photos: `spec.normalization` at `spec.resize_size`."""
    if is_photos(spec):
        kind, resize = spec.normalization, int(spec.resize_size)
    else:
        kind, resize = "channel", int(spec.image_size)
    mean = np.asarray(stats["mean"], np.float32)
    if kind == "pixel":
        return Normalisation("pixel", mean, np.ones(3, np.float32), stats["mean_image"], resize)
    return Normalisation("channel", mean, np.asarray(stats["std"], np.float32), None, resize)


@dataclasses.dataclass
class Data:
    """What the trainer needs from a dataset, whatever its size or source.

    `train(start_step, num_steps, process_index, process_count)` yields this process's rows of global
    training batches `start_step .. num_steps-1`; `eval(process_index, process_count, row_multiple=0)` yields
    this process's padded, masked share of the evaluation split (see `padded_rows`).
    """

    num_train: int
    num_eval: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    train: Callable[[int, int, int, int], Iterator[dict[str, np.ndarray]]]
    eval: Callable[..., Iterator[dict[str, np.ndarray]]]
    # The normalisation training images get (0-255 scale): saved with checkpoints so `predict` can
    # preprocess an image exactly like `eval` without the training set.
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    normalisation: Normalisation | None = None
    # Set when `train` yields raw material (e.g. uint8 squares and random draws) that the jitted train step turns
    # into the batch: a JAX function, global batch -> {"image", "label"} (`config.augment_on_device`).
    on_device: Callable[[dict], dict] | None = None
    # `views(split, process_index, process_count)`: split 'train' or 'eval' as evaluation sees images (no
    # augmentation; padded, masked batches; "file_name" where the source has them): what features are taken of
    views: Callable[[str, int, int], Iterator[dict[str, np.ndarray]]] | None = None


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return num_examples // batch_size


def padded_rows(count: int, local: int, row_multiple: int = 0) -> int:
    """Rows one process yields for `count` examples in batches of `local`: whole batches, except that with
    `row_multiple` > 0 a set that fits in one batch is only padded up to a multiple of it (e.g. the devices the
    batch is split over), so a small evaluation set does not cost a full batch of padding. Either way every batch
    has one shape: one compiled evaluation step (a last batch of its own size compiled a second one, seconds each
    at 224 px, for at most one batch of padding saved)."""
    num_batches = max(1, -(-count // local))
    if row_multiple <= 0 or num_batches > 1:
        return num_batches * local
    return min(local, -(-max(count, 1) // row_multiple) * row_multiple)


def eval_slice(count: int, local: int, process_index: int, process_count: int,
               row_multiple: int = 0) -> tuple[int, int, int]:
    """(lo, hi, rows): process `process_index` evaluates examples [lo, hi) of `count`, padded to `rows` (the same
    on every process, whole local batches: `padded_rows`), so together the processes see each example once and
    every process runs the same number of evaluation steps."""
    rows = padded_rows(-(-count // process_count), local, row_multiple)
    lo = min(count, process_index * rows)
    return lo, min(count, lo + rows), rows


def check_data_dir(data_dir: str) -> str | None:
    """`config.data_dir` expanded and created, or None for tfds's default; a UserError if it is unusable."""
    if not data_dir:
        return None
    data_dir = os.path.expanduser(data_dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir!r} is a file, not a directory: give --config.data_dir a folder "
                        "where tfds may keep prepared datasets (or '' for tfds's default).")
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"data_dir {data_dir!r} cannot be created ({e.strerror}): give --config.data_dir a "
                        "writable folder (or '' for tfds's default).") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise UserError(f"data_dir {data_dir!r} is not writable: give --config.data_dir a writable folder.")
    return data_dir


def data_options(threads: int | None = None) -> Any:
    """Deterministic tf.data on a private pool of `threads` (default: all cores; 1 also stops intra-op threads),
    without tf.data's autotuning model: its thread sleeps between optimisations (the period doubles, up to a minute)
    and destroying an iterator could wait for it with the CPU idle (gdb: `~RootDataset::Iterator` waiting on the
    `Model::OptimizeLoop` thread): 8 s at the end of a 50-step FashionMNIST run in 2 of 4 runs (TensorFlow 2.21).
    AUTOTUNE then means the pool's size for parallel calls, and the classic adaptive buffer for `prefetch`."""
    import tensorflow as tf

    opts = tf.data.Options()
    opts.deterministic = True
    opts.autotune.enabled = False
    opts.threading.private_threadpool_size = threads or max(1, os.cpu_count() or 1)
    if threads == 1:
        opts.threading.max_intra_op_parallelism = 1
    return opts
