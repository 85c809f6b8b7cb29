"""The config's JSON round trip (checkpoints store it), the keys a resume may change, and the checks of the keys
no one concern owns (batch sizes against processes, the run's length, logging).

Each concern checks its own keys where the config is read into its spec (`ModelSpec.from_config`,
`OptimizerSpec.from_config`, ...): this module imports none of them, so every layer may import it."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from alexnet_jax import default_config
from alexnet_jax.errors import UserError

# Config keys that may change when a run is resumed: they do not change what the checkpoint holds
# (lengthening a run, logging, evaluation, checkpoint policy, where data lives, the device mesh).
RESUMABLE_CHANGES = frozenset({
    "num_train_steps", "num_epochs", "log_every_steps", "eval_every_steps", "eval_batch_size", "eval_crops",
    "mesh_shape", "sharding", "data_dir", "fashion_mnist_dir", "checkpoint_every_steps", "checkpoint_keep",
    "checkpoint_keep_best", "checkpoint_async", "kernels",
    "augment_on_device",  # the same batches, augmented in the step instead of on the host
    "init_from",  # read at step 0 only: a resumed run continues from its own checkpoint
    # how many processes read the stream and how they meet: the global batches do not depend on it (data.records)
    "distributed", "coordinator_address", "num_processes", "process_id", "cpu_collectives", "prepare_wait_s",
})


def check_config(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
    """Reject bad values with a message that says what to change, before data or devices are touched. The data
    keys are checked where the data package reads them (`data.DataSpec.from_config`)."""

    def fail(key: str, msg: str) -> None:
        raise UserError(f"--config.{key}={config.get(key)!r}: {msg}")

    if config.batch_size <= 0:
        fail("batch_size", "must be a positive number of images (the global batch across all devices)")
    if config.eval_batch_size <= 0:
        fail("eval_batch_size", "must be positive")
    # divisibility by the mesh's batch shards: sharding.check_mesh, once the mesh is known
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % process_count:
            fail(key, f"must be divisible by the {process_count} processes")
    if config.num_train_steps == 0 or config.num_train_steps < -1:
        fail("num_train_steps", "must be a positive number of steps, or -1 to use num_epochs")
    if config.num_train_steps == -1 and config.num_epochs <= 0:
        fail("num_epochs", "must be positive (or set num_train_steps)")
    if config.image_size < 16:
        fail("image_size", "must be at least 16 pixels")
    if config.log_every_steps <= 0:
        fail("log_every_steps", "must be positive")


def _absent(saved: dict[str, Any], key: str, default: Any) -> Any:
    """What a key missing from a saved config meant when that checkpoint was written: today's default, except
    where the code did something else before the key existed (ImageNet's PCA lighting used fb.resnet.torch's
    published constants before `pca` was added)."""
    if key == "pca" and saved.get("dataset") == "imagenet2012":
        return "published"
    return default


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), as stored in the `config` item."""
    return json.loads(config.to_json())


def config_from_dict(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A full config from a saved one: keys added since the checkpoint was written keep their defaults."""
    config = default_config.get_config()
    for key in config:
        if key not in saved:
            config[key] = _absent(saved, key, config[key])
    for key, value in saved.items():
        if key in config:
            default = config[key]
            config[key] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
        else:
            config[key] = value
    return config


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       allowed: frozenset[str] = RESUMABLE_CHANGES) -> list[str]:
    """`key: saved -> current` for every key that differs and is not allowed to; a key missing on one side
    counts as its default value."""
    defaults = config_to_dict(default_config.get_config())
    missing = object()
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in allowed or key not in defaults:  # retired keys (e.g. `model`) never block a resume
            continue
        a = saved[key] if key in saved else _absent(saved, key, defaults.get(key, missing))
        b = current.get(key, defaults.get(key, missing))
        if a != b:
            out.append(f"{key}: checkpoint {'(absent)' if a is missing else repr(a)}, now "
                       f"{'(absent)' if b is missing else repr(b)}")
    return out
