"""Reading checkpoint files without the training loop: what inference and fine-tuning need (`read_saved`: config
and meta; `restore_arrays`: parameters onto a mesh; `restore_as_saved`: arrays as saved, whatever wrote them),
and the helpers `checkpointing` shares (`checkpoint_dir`, quiet orbax logs, tree comparisons).

JAX and orbax are imported by the functions that use them, not with the module: `peek_saved` reads a checkpoint's
JSON items without either, so `predict` starts reading images during their import (seconds on a CPU).
"""

from __future__ import annotations

import json
import logging as logging_std
import os
from typing import Any

import numpy as np
from absl import logging

from alexnet_jax.errors import UserError

CHECKPOINT_SUBDIR = "checkpoints"


class _QuietOrbax(logging_std.Filter):
    """Orbax logs every save's internals at INFO through absl; keep its warnings and errors only."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
    handler = logging.get_absl_handler().python_handler  # ABSLHandler forwards records to it unfiltered
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
        handler.addFilter(_QuietOrbax())


def manager(directory: str, options: Any = None, *, arrays: tuple[str, ...] = (),
            json_items: tuple[str, ...] = ()) -> Any:
    """An orbax CheckpointManager of `directory` whose items are `arrays` (orbax's StandardCheckpointHandler:
    PyTrees of arrays) and `json_items` (JsonCheckpointHandler), declared through orbax's handler registry (the
    per-item handler argument is deprecated since orbax 0.12). Read-only unless `options` say otherwise."""
    import orbax.checkpoint as ocp

    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for names, handler_type, save, restore in ((arrays, ocp.StandardCheckpointHandler, ocp.args.StandardSave,
                                                ocp.args.StandardRestore),
                                               (json_items, ocp.JsonCheckpointHandler, ocp.args.JsonSave,
                                                ocp.args.JsonRestore)):
        for name in names:
            handler = handler_type()
            registry.add(name, save, handler)
            registry.add(name, restore, handler)
    if options is None:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def metadata_of(checkpoints: Any, step: int) -> Any:
    """The items' metadata of checkpoint `step` (orbax's `metadata(step).item_metadata`)."""
    return checkpoints.metadata(step).item_metadata


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_SUBDIR)


def _leaf_paths(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """`'conv1/kernel' -> (shape, dtype)` for every array leaf; orbax restores namedtuples as lists and
    dicts, so only the names and shapes are compared, not the container types."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]

    def name(path: Any) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    return {name(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves
            if hasattr(leaf, "shape")}


def tree_differences(saved: Any, expected: Any, limit: int = 6) -> list[str]:
    """Leaves that are missing, extra, or of another shape/dtype in `saved` compared with `expected`."""
    a, b = _leaf_paths(saved), _leaf_paths(expected)
    out = [f"{k}: checkpoint {a[k][0]} {a[k][1]}, model {b[k][0]} {b[k][1]}" for k in sorted(a.keys() & b.keys())
           if a[k] != b[k]]
    out += [f"{k}: only in the checkpoint" for k in sorted(a.keys() - b.keys())]
    out += [f"{k}: not in the checkpoint" for k in sorted(b.keys() - a.keys())]
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def has_checkpoint(workdir: str) -> bool:
    directory = checkpoint_dir(workdir)
    return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def latest_normalisation(workdir: str) -> dict[str, Any] | None:
    """The normalisation record of the newest readable checkpoint in `workdir` (None if it has none)."""
    try:
        _, _, meta = read_saved(workdir)
    except UserError:
        return None
    return meta.get("normalisation")


def restore_as_saved(workdir: str, step: int, names: tuple[str, ...] = ("params",)) -> dict[str, Any]:
    """Array items of checkpoint `step` as NumPy trees in the shapes they were saved with, whatever model or mesh
    wrote them (what fine-tuning reads from another run); items the checkpoint lacks or holds empty are left out."""
    import jax
    import orbax.checkpoint as ocp

    directory = checkpoint_dir(workdir)
    quiet_orbax_logs()
    checkpoints = manager(directory, arrays=names)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        metadata = metadata_of(checkpoints, step)
        targets = {}
        for name in names:
            tree = metadata.get(name) if hasattr(metadata, "get") else None
            if tree:
                targets[name] = jax.tree_util.tree_map(
                    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
        out = checkpoints.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(tree) for name, tree in targets.items()}))
    except Exception as e:  # noqa: BLE001 - a truncated or half-written item fails in many ways
        raise UserError(f"the checkpoint at step {step} in {directory} cannot be read ({type(e).__name__}: {e})"
                        ) from None
    finally:
        checkpoints.close()
    return {name: jax.tree_util.tree_map(np.asarray, jax.device_get(out[name])) for name in targets}


def read_saved(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, config, meta) of `step` or of the newest checkpoint whose JSON items read back, without
    knowing the model: what `evaluate` and `predict` start from."""
    import orbax.checkpoint as ocp

    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise UserError(f"no checkpoints in {directory}: train with --workdir {os.path.dirname(directory)} first")
    quiet_orbax_logs()
    checkpoints = manager(directory, json_items=("config", "meta"))
    steps = sorted(checkpoints.all_steps())
    if not steps:
        raise UserError(f"no checkpoints in {directory}: train with --workdir {os.path.dirname(directory)} first")
    if step is not None and step not in steps:
        raise UserError(f"no checkpoint for step {step} in {directory}; available: {steps}")
    for s in [step] if step is not None else reversed(steps):
        try:
            out = checkpoints.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                             meta=ocp.args.JsonRestore()))
            return s, dict(out["config"]), dict(out["meta"])
        except Exception as e:  # noqa: BLE001 - unreadable: fall back to the one before
            logging.warning("the checkpoint at step %d is unreadable (%s: %s): trying the one before",
                            s, type(e).__name__, e)
    raise UserError(f"none of the checkpoints in {directory} (steps {steps}) can be read back")


def peek_saved(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """A guess at `read_saved(workdir, step)` without JAX or orbax: the JSON files orbax's JsonCheckpointHandler
    wrote for `config` and `meta` in the newest step directory (or `step`'s); None where they cannot be read so.
    Only for work started early that `read_saved`'s answer then confirms (it may fall back to an older step)."""
    directory = checkpoint_dir(workdir)
    try:
        s = step if step is not None else max(int(d) for d in os.listdir(directory) if d.isdigit())
        items = []
        for item in ("config", "meta"):
            with open(os.path.join(directory, str(s), item, "metadata")) as f:
                items.append(json.load(f))
    except (OSError, ValueError):  # no such folder or file, no step, not JSON (json's error is a ValueError)
        return None
    return (s, *items) if all(isinstance(i, dict) for i in items) else None


def restore_arrays(workdir: str, step: int, targets: dict[str, Any]) -> dict[str, Any]:
    """Array items of checkpoint `step` (e.g. 'params', 'batch_stats') restored onto `targets`, trees of
    `jax.ShapeDtypeStruct` with the shardings wanted: what inference needs, without the optimizer state.
    A saved parameter tree of another shape is a UserError naming the differences."""
    import orbax.checkpoint as ocp

    directory = checkpoint_dir(workdir)
    quiet_orbax_logs()
    checkpoints = manager(directory, arrays=tuple(targets))
    try:
        saved = metadata_of(checkpoints, step)["params"]
    except Exception as e:  # noqa: BLE001 - unreadable metadata means an unusable checkpoint
        raise UserError(f"the checkpoint at step {step} in {directory} cannot be read ({type(e).__name__}: {e})"
                        ) from None
    diffs = tree_differences(saved, targets["params"])
    if diffs:
        raise UserError(f"the checkpoint at step {step} in {directory} holds parameters of a different model: "
                        + "; ".join(diffs))
    try:
        out = checkpoints.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(tree) for name, tree in targets.items()}))
    except Exception as e:  # noqa: BLE001 - a truncated or half-written item fails in many ways
        raise UserError(f"the checkpoint at step {step} in {directory} cannot be read ({type(e).__name__}: {e})"
                        ) from None
    finally:
        checkpoints.close()
    return {name: out[name] for name in targets}
