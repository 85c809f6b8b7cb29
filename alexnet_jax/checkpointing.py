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
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from alexnet_jax.checkpoint_files import (  # noqa: F401 - one door for the loop, inference and tests
    CHECKPOINT_SUBDIR,
    checkpoint_dir,
    has_checkpoint,
    latest_normalisation,
    manager,
    metadata_of,
    quiet_orbax_logs,
    read_saved,
    restore_arrays,
    restore_as_saved,
    tree_differences,
)
from alexnet_jax.config import config_differences, config_to_dict
from alexnet_jax.errors import UserError

REJECTED_SUBDIR = "checkpoints.unreadable"  # where unreadable checkpoints are moved (never deleted)
ITEMS = ("params", "batch_stats", "train_state", "data", "meta", "config")
ARRAY_ITEMS = ("params", "batch_stats", "train_state")
# orbax's "replica-parallel" save (its default off GPU) has each replica of a replicated array write a slice of it,
# which costs one compiled slicing program per array and shape: ~100 programs (3-6 s of compilation) for the first
# save of a run on 8 CPU devices, for arrays of kilobytes. Only arrays whose slices would be at least this large are
# split; the rest are written whole by one replica (the same files either way).
MIN_REPLICA_SLICE_BYTES = 4 << 20


def _split_only_large_replicated_arrays() -> None:
    """Register orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES (orbax's handler registry is global: this
    affects every orbax save in the process, in speed only)."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
        override=True)


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


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, read-only or vanished directory, quota): the message names
    the directory, the step, the cause and what to do; the half-written step is removed."""


_CAUSES = (("no space left", "the disk is full"), ("resource_exhausted", "the disk is full"),
           ("enospc", "the disk is full"), ("quota", "the disk quota is exceeded"),
           ("read-only file system", "the file system is read-only"), ("permission denied", "permission is denied"),
           ("no such file or directory", "the directory vanished"), ("not_found", "the directory vanished"))


def write_failure_cause(e: BaseException) -> str:
    """What a failed write says, in words, from the exception and its causes."""
    texts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(f"{type(e).__name__} {e} {getattr(e, 'strerror', '') or ''}".lower())
        e = e.__cause__ or e.__context__
    text = " ".join(texts)
    return next((cause for key, cause in _CAUSES if key in text), texts[0].split("\n")[0][:160])


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
        _split_only_large_replicated_arrays()
        quiet_orbax_logs()
        self.manager = manager(self.directory, options, arrays=ARRAY_ITEMS, json_items=("data", "meta", "config"))

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
        try:  # orbax would wait for the previous save here anyway; done first, its size and the free space are known
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the previous asynchronous save failed
            raise self._write_failed(step, e) from None
        need, free = self._space(state)
        if free is not None and free < need:  # refused before orbax's writers start (and fail noisily)
            raise self._write_failed(step, OSError(
                28, f"No space left on device: about {need / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free"))
        try:  # also where the previous asynchronous save's failure surfaces
            saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a failed write
            raise self._write_failed(step, e) from None
        if saved:
            self._saved_steps.add(step)
        return saved

    def _space(self, state: Any) -> tuple[int, int | None]:
        """(bytes a checkpoint takes: the largest one on disk, else the state's arrays plus a margin, free bytes
        where the checkpoints go, or None if unknown)."""
        sizes = [sum(os.stat(os.path.join(r, f)).st_blocks * 512 for r, _, fs in os.walk(self.step_dir(s))
                     for f in fs) for s in self._finished_steps()]  # blocks: a small file takes a whole one
        arrays = sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves((state.params, _train_part(state))))
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            free = None
        return (max(sizes) if sizes else int(1.1 * arrays)) + (1 << 16), free

    def _write_failed(self, step: int, e: BaseException) -> CheckpointWriteError:
        failed = [s for s in sorted(self._saved_steps | {step}) if s not in self._finished_steps()] or [step]
        return self.stop_after(f"saving the checkpoint of step {failed[0]} in {self.directory}", e)

    def stop_after(self, what: str, e: BaseException) -> CheckpointWriteError:
        """`what` failed with `e` (this checkpointer's write, or another write of the run: its curves, its
        summary): finish or cancel orbax's writers, remove half-written steps, and say in one line what happened,
        what to do and which checkpoints the same command resumes from."""
        self.abandon()
        removed = self._remove_partial()
        intact = self._finished_steps()
        cause = write_failure_cause(e)
        todo = ("free space or move --workdir" if "full" in cause or "quota" in cause else
                "make the directory writable or move --workdir")
        held = (f"checkpoints {', '.join(map(str, intact))} are" if len(intact) > 1 else f"checkpoint {intact[-1]} is"
                ) if intact else ""
        where = (f"{held} intact and the same command resumes from {intact[-1]}" if intact
                 else "no earlier checkpoint exists; the same command starts again")
        return CheckpointWriteError(
            f"{what} failed: {cause}. {todo.capitalize()}; {where}"
            + (f" (the half-written {', '.join(removed)} was removed)" if removed else "") + ".")

    def abandon(self) -> None:
        """Let an asynchronous save finish (or fail) and close the manager, raising nothing: the run is stopping
        for another reason, and no orbax thread may outlive it (a save still writing at interpreter exit printed
        dozens of tracebacks)."""
        for stop in (self.manager.wait_until_finished, self.manager.close):
            try:
                stop()
            except Exception:  # noqa: BLE001, S110 - the run already failed; only the cleanup is left
                pass

    def _finished_steps(self) -> list[int]:
        """Steps whose directory is complete on disk (orbax renames a step's tmp directory when it is done)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    def _remove_partial(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        partial = [n for n in names if ".orbax-checkpoint-tmp" in n]
        for n in partial:
            shutil.rmtree(os.path.join(self.directory, n), ignore_errors=True)
        return partial

    def reached_preemption(self, step: int) -> bool:
        """Whether JAX's preemption service (multi-process jobs) asks for a checkpoint at `step`."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for the last save to be finalised; a CheckpointWriteError if a save failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - see save
            raise self._write_failed(max(self._saved_steps, default=0), e) from None
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
            metadata = metadata_of(self.manager, step)
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
