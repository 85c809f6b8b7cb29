"""Orbax checkpoints under `WORKDIR/checkpoints/`: save, keep, resume, survive preemption, restore on any mesh.

One step directory per checkpoint (`checkpoints/<step>/`), written by `orbax.checkpoint.CheckpointManager`,
holds these items, so a user with only orbax installed can read any of them:

- `params`: the model's parameter tree (`conv1..conv5`, `fc6..fc8`, each `kernel`/`bias`);
- `batch_stats`: BatchNorm statistics (only for `--config.norm=batchnorm`);
- `train_state`: `step`, `opt_state` (momentum and injected hyperparameters), `plateau` (reduce-on-plateau
  state) and the dropout `rng`;
- `data`: JSON, the data position (the training stream is a pure function of (seed, step));
- `meta`: JSON, what inference needs without the training set: normalisation mean/std, class names,
  image shape, and the last evaluation;
- `config`: JSON, the run's whole config;
- `metrics`: JSON written by orbax, validation top-1/top-5 when the checkpoint follows an evaluation.

Saves are asynchronous: `save` copies the arrays to host memory and returns; a background thread writes
them to a temporary directory and renames it to `<step>/` once complete. Old checkpoints are deleted by that
thread only after the new one is finalised, so the last complete checkpoint always survives a crash.
"""

from __future__ import annotations

import dataclasses
import logging as logging_std
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from alexnet_jax.config import config_differences, config_to_dict
from alexnet_jax.errors import UserError

CHECKPOINT_SUBDIR = "checkpoints"
REJECTED_SUBDIR = "checkpoints.unreadable"  # where unreadable checkpoints are moved (never deleted)
ITEMS = ("params", "batch_stats", "train_state", "data", "meta", "config")
ARRAY_ITEMS = ("params", "batch_stats", "train_state")

class _QuietOrbax(logging_std.Filter):
    """Orbax logs every save's internals at INFO through absl; keep its warnings and errors only."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
    handler = logging.get_absl_handler().python_handler  # ABSLHandler forwards records to it unfiltered
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
        handler.addFilter(_QuietOrbax())


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_SUBDIR)


def _leaf_paths(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """`'conv1/kernel' -> (shape, dtype)` for every array leaf; orbax restores namedtuples as lists and
    dicts, so only the names and shapes are compared, not the container types."""
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


def _abstract(tree: Any, shardings: Any) -> Any:
    """Restore targets: shape, dtype and the sharding the current mesh wants (so any topology works)."""
    return jax.tree_util.tree_map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings)


def _train_part(state: Any) -> dict[str, Any]:
    return {"step": state.step, "opt_state": state.opt_state, "plateau": state.plateau, "rng": state.rng}


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # the TrainState (model-only restores leave opt_state/plateau/rng as in `template`)
    data: dict[str, Any]
    meta: dict[str, Any]
    config: dict[str, Any]


class CheckpointUnreadable(Exception):
    """A checkpoint directory that exists but cannot be read back (truncated, half-written, corrupted)."""


class Checkpointer:
    """Saves and restores one run's TrainState items plus the metadata dict handed to it; when to save, and
    SIGTERM, are the training loop's (`alexnet_jax.preemption`). The loop calls `restore_or`, `save`, `close`.

    `abstract_state` is the TrainState as `jax.ShapeDtypeStruct`s and `state_sharding` the shardings the
    current mesh wants: restores land directly on that mesh, whatever mesh wrote the checkpoint.
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, abstract_state: Any, state_sharding: Any,
                 *, metadata: dict[str, Any] | None = None, read_only: bool = False):
        self.config = config
        self.directory = checkpoint_dir(workdir)
        self.workdir = os.path.dirname(self.directory)
        self.abstract_state = abstract_state
        self.state_sharding = state_sharding
        self.metadata = dict(metadata or {})
        self.has_batch_stats = bool(jax.tree_util.tree_leaves(abstract_state.batch_stats))
        self.keep = int(config.get("checkpoint_keep", 3))
        self.keep_best = int(config.get("checkpoint_keep_best", 0))
        self._saved_steps: set[int] = set()
        if read_only and not os.path.isdir(self.directory):
            raise UserError(f"no checkpoints in {self.directory}: train with --workdir {self.workdir} first")
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=self.keep)]
        if self.keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m.get("top1", float("-inf")), reverse=False, n=self.keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # orbax 0.12 writes the `metrics` item (which BestN reads back after a restart) only when
            # `best_fn` is set; the preservation policy above decides what is kept.
            best_fn=(lambda m: m.get("top1", float("-inf"))) if self.keep_best else None,
            best_mode="max",
            enable_async_checkpointing=bool(config.get("checkpoint_async", True)),
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in ("data", "meta", "config")})
        quiet_orbax_logs()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ------------------------------------------------------------------------------------------------- save
    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, eval_metrics: dict[str, float] | None = None,
             last_eval: dict[str, float] | None = None) -> bool:
        """Start an (async) save of `state` at `step`; returns False when that step is already on disk."""
        if step in self._saved_steps or step in self.manager.all_steps():
            return False
        per_epoch = self.metadata.get("steps_per_epoch") or 0
        data = {"next_step": step, "epoch": step / per_epoch if per_epoch else None, "seed": self.config.seed,
                "batch_size": self.config.batch_size, "steps_per_epoch": per_epoch or None,
                "dataset": self.config.dataset}
        meta = {**self.metadata, "last_eval": last_eval or None}
        items: dict[str, Any] = {
            "params": ocp.args.StandardSave(state.params),
            "train_state": ocp.args.StandardSave(_train_part(state)),
            "data": ocp.args.JsonSave(data),
            "meta": ocp.args.JsonSave(meta),
            "config": ocp.args.JsonSave(config_to_dict(self.config)),
        }
        if self.has_batch_stats:
            items["batch_stats"] = ocp.args.StandardSave(state.batch_stats)
        metrics = {k: float(eval_metrics[k]) for k in ("top1", "top5", "loss")} if eval_metrics else {}
        saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        if saved:
            self._saved_steps.add(step)
        return saved

    def reached_preemption(self, step: int) -> bool:
        """Whether JAX's preemption service (multi-process jobs) asks for a checkpoint at `step`."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for the last save to be finalised; raise if a save failed."""
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
        self.manager.close()
        if self._saved_steps:
            logging.info("checkpoints in %s: steps %s", self.directory, self.manager.all_steps())

    # ---------------------------------------------------------------------------------------------- restore
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _read_json(self, step: int, item: str) -> dict[str, Any]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
            raise CheckpointUnreadable(f"its {item!r} item cannot be read ({type(e).__name__}: {e})") from e
        if not isinstance(out, dict):
            raise CheckpointUnreadable(f"its {item!r} item is not a JSON object")
        return out

    def read_config(self, step: int) -> dict[str, Any]:
        return self._read_json(step, "config")

    def _check_compatible(self, step: int, saved_config: dict[str, Any]) -> None:
        """Refuse (UserError) a checkpoint of another model/config; never restore part of it silently."""
        diffs = config_differences(saved_config, config_to_dict(self.config))
        if diffs:
            raise UserError(
                f"the checkpoints in {self.directory} (step {step}) were written with a different config: "
                + "; ".join(diffs) + ". Rerun with those values, or use a new --workdir to start a new run.")
        try:
            metadata = self.manager.item_metadata(step)
            saved_params = metadata["params"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointUnreadable(f"its metadata cannot be read ({type(e).__name__}: {e})") from e
        if saved_params is None:
            raise CheckpointUnreadable("it has no 'params' item")
        diffs = tree_differences(saved_params, self.abstract_state.params)
        if diffs:
            raise UserError(f"the checkpoint at step {step} in {self.directory} holds parameters of a different "
                            "model: " + "; ".join(diffs) + ". Use a new --workdir to start a new run.")

    def restore(self, step: int, template: Any | None = None, model_only: bool = False) -> Restored:
        """Restore `step` onto the current mesh. `model_only` reads params (and batch stats) only, for
        evaluation and prediction, taking the rest of the state from `template`."""
        if step not in self.manager.all_steps():
            raise UserError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        saved_config = self.read_config(step)
        self._check_compatible(step, saved_config)
        abstract = _abstract(self.abstract_state, self.state_sharding)
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(abstract.params),
                                 "data": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
        if self.has_batch_stats:
            items["batch_stats"] = ocp.args.StandardRestore(abstract.batch_stats)
        if not model_only:
            items["train_state"] = ocp.args.StandardRestore(_train_part(abstract))
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - a truncated or half-written item fails in many ways
            raise CheckpointUnreadable(f"{type(e).__name__}: {e}") from e
        base = template if template is not None else self.abstract_state
        state = base.replace(params=out["params"])
        if self.has_batch_stats:
            state = state.replace(batch_stats=out["batch_stats"])
        if not model_only:
            ts = out["train_state"]
            state = state.replace(step=ts["step"], opt_state=ts["opt_state"], plateau=ts["plateau"], rng=ts["rng"])
            if int(ts["step"]) != step or int(out["data"].get("next_step", -1)) != step:
                raise CheckpointUnreadable(f"its step ({int(ts['step'])}) or data position "
                                           f"({out['data'].get('next_step')}) is not {step}")
        return Restored(step, state, dict(out["data"]), dict(out["meta"]), saved_config)

    def _set_aside(self, step: int, reason: str) -> None:
        """Move an unreadable checkpoint out of the manager's way (kept for inspection, never deleted)."""
        target = os.path.join(self.workdir, REJECTED_SUBDIR, str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(self.step_dir(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"alexnet_jax:set_aside:{step}")
        logging.warning("the checkpoint at step %d is unreadable (%s): moved it to %s and trying the one before",
                        step, reason, target)
        self.manager.reload()

    def latest(self, template: Any | None = None, model_only: bool = False,
               set_aside: bool = True) -> Restored | None:
        """The newest checkpoint that reads back whole; unreadable ones are skipped with a warning (and, when
        `set_aside`, moved to `WORKDIR/checkpoints.unreadable/`). None when there is no checkpoint."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return self.restore(step, template, model_only)
            except CheckpointUnreadable as e:
                if set_aside:
                    self._set_aside(step, str(e))
                else:
                    logging.warning("the checkpoint at step %d is unreadable (%s): trying the one before", step, e)
        if steps:
            raise UserError(f"none of the checkpoints in {self.directory} (steps {steps}) can be read back: move "
                            "the folder aside to start over, or give another --workdir")
        return None

    def restore_or(self, state: Any) -> tuple[Any, dict[str, float]]:
        """Resume: the latest readable checkpoint's state and last evaluation, or `state` when there is none."""
        found = self.latest(template=state)
        if found is None:
            logging.info("no checkpoint in %s: starting from step 0", self.directory)
            return state, {}
        self._saved_steps.add(found.step)
        logging.info("resumed from %s: step %d (epoch %s), data position %d", self.step_dir(found.step),
                     found.step, found.data.get("epoch"), found.data.get("next_step"))
        return found.state, dict(found.meta.get("last_eval") or {})


def restore_arrays(workdir: str, step: int, targets: dict[str, Any]) -> dict[str, Any]:
    """Array items of checkpoint `step` (e.g. 'params', 'batch_stats') restored onto `targets`, trees of
    `jax.ShapeDtypeStruct` with the shardings wanted: what inference needs, without the optimizer state.
    A saved parameter tree of another shape is a UserError naming the differences."""
    directory = checkpoint_dir(workdir)
    quiet_orbax_logs()
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                    item_handlers={name: ocp.StandardCheckpointHandler() for name in targets})
    try:
        saved = manager.item_metadata(step)["params"]
    except Exception as e:  # noqa: BLE001 - unreadable metadata means an unusable checkpoint
        raise UserError(f"the checkpoint at step {step} in {directory} cannot be read ({type(e).__name__}: {e})"
                        ) from None
    diffs = tree_differences(saved, targets["params"])
    if diffs:
        raise UserError(f"the checkpoint at step {step} in {directory} holds parameters of a different model: "
                        + "; ".join(diffs))
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(tree) for name, tree in targets.items()}))
    except Exception as e:  # noqa: BLE001 - a truncated or half-written item fails in many ways
        raise UserError(f"the checkpoint at step {step} in {directory} cannot be read ({type(e).__name__}: {e})"
                        ) from None
    finally:
        manager.close()
    return {name: out[name] for name in targets}


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
    directory = checkpoint_dir(workdir)
    quiet_orbax_logs()
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                    item_handlers={name: ocp.StandardCheckpointHandler() for name in names})
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        metadata = manager.item_metadata(step)
        targets = {}
        for name in names:
            tree = metadata.get(name) if hasattr(metadata, "get") else None
            if tree:
                targets[name] = jax.tree_util.tree_map(
                    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
        out = manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(tree) for name, tree in targets.items()}))
    except Exception as e:  # noqa: BLE001 - a truncated or half-written item fails in many ways
        raise UserError(f"the checkpoint at step {step} in {directory} cannot be read ({type(e).__name__}: {e})"
                        ) from None
    finally:
        manager.close()
    return {name: jax.tree_util.tree_map(np.asarray, jax.device_get(out[name])) for name in targets}


def read_saved(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, config, meta) of `step` or of the newest checkpoint whose JSON items read back, without
    knowing the model: what `evaluate` and `predict` start from."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise UserError(f"no checkpoints in {directory}: train with --workdir {os.path.dirname(directory)} first")
    quiet_orbax_logs()
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={name: ocp.JsonCheckpointHandler() for name in ("config", "meta")})
    steps = sorted(manager.all_steps())
    if not steps:
        raise UserError(f"no checkpoints in {directory}: train with --workdir {os.path.dirname(directory)} first")
    if step is not None and step not in steps:
        raise UserError(f"no checkpoint for step {step} in {directory}; available: {steps}")
    for s in [step] if step is not None else reversed(steps):
        try:
            out = manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                             meta=ocp.args.JsonRestore()))
            return s, dict(out["config"]), dict(out["meta"])
        except Exception as e:  # noqa: BLE001 - unreadable: fall back to the one before
            logging.warning("the checkpoint at step %d is unreadable (%s: %s): trying the one before",
                            s, type(e).__name__, e)
    raise UserError(f"none of the checkpoints in {directory} (steps {steps}) can be read back")
