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

This module wraps orbax's manager; what happens when a checkpoint cannot be written or read back (disk space,
half-written steps, unreadable checkpoints set aside) is `alexnet_jax.checkpoint_recovery`'s. The run's config
reaches it only as a `CheckpointSpec`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from alexnet_jax import checkpoint_recovery as recovery
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
from alexnet_jax.checkpoint_recovery import (  # noqa: F401 - as above
    REJECTED_SUBDIR,
    CheckpointUnreadable,
    CheckpointWriteError,
)
from alexnet_jax.config import config_to_dict
from alexnet_jax.errors import UserError

ITEMS = ("params", "batch_stats", "train_state", "data", "meta", "config")
ARRAY_ITEMS = ("params", "batch_stats", "train_state")
JSON_ITEMS = ("data", "meta", "config")
# orbax's "replica-parallel" save (its default off GPU) has each replica of a replicated array write a slice of it,
# which costs one compiled slicing program per array and shape: ~100 programs (3-6 s of compilation) for the first
# save of a run on 8 CPU devices, for arrays of kilobytes. Only arrays whose slices would be at least this large are
# split; the rest are written whole by one replica (the same files either way).
MIN_REPLICA_SLICE_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """What checkpointing needs of a run's config, so nothing below the entry points holds the whole ConfigDict:
    the save cadence (the loop's `SavePolicy`), retention and async writes (orbax's options), and the run's config
    as plain JSON (`run_config`), stored in each checkpoint's `config` item and compared with it on resume."""

    run_config: dict[str, Any] = dataclasses.field(hash=False)
    every_steps: int = 1000  # 0: save only at the end and on SIGTERM/preemption
    keep: int = 3  # the latest K checkpoints
    keep_best: int = 1  # and the best K by validation top-1 (0: off)
    async_save: bool = True  # orbax writes in a background thread

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> CheckpointSpec:
        """The spec of `config`; a UserError naming the key for a bad `checkpoint_*` value."""
        checks = (("checkpoint_every_steps", 0, 0, "must be >= 0 (0: save only at the end and on "
                                                   "SIGTERM/preemption)"),
                  ("checkpoint_keep", 3, 1, "must be at least 1 (the latest checkpoint is what a rerun resumes from)"),
                  ("checkpoint_keep_best", 0, 0, "must be >= 0"))
        values = {}
        for key, default, least, msg in checks:
            values[key] = config.get(key, default)
            if values[key] < least:
                raise UserError(f"--config.{key}={values[key]!r}: {msg}")
        return cls(run_config=config_to_dict(config), every_steps=int(values["checkpoint_every_steps"]),
                   keep=int(values["checkpoint_keep"]), keep_best=int(values["checkpoint_keep_best"]),
                   async_save=bool(config.get("checkpoint_async", True)))

    def with_run_value(self, key: str, value: Any) -> CheckpointSpec:
        """This spec with `key` of the stored config set to `value`: what the run resolved after reading its config
        (e.g. `num_classes` from the dataset), so that a resume compares and inference rebuilds what ran."""
        return dataclasses.replace(self, run_config={**self.run_config, key: value})


def _split_only_large_replicated_arrays() -> None:
    """Register orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES (orbax's handler registry is global: this
    affects every orbax save in the process, in speed only)."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
        override=True)


def _options(spec: CheckpointSpec, read_only: bool) -> ocp.CheckpointManagerOptions:
    """orbax's options for `spec`: keep the latest `keep` and, if asked, the best `keep_best` by top-1."""
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=spec.keep)]
    if spec.keep_best:
        policies.append(ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda m: m.get("top1", float("-inf")), reverse=False, n=spec.keep_best,
            keep_checkpoints_without_metrics=False))
    return ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # orbax 0.12 writes the `metrics` item (which BestN reads back after a restart) only when
        # `best_fn` is set; the preservation policy above decides what is kept.
        best_fn=(lambda m: m.get("top1", float("-inf"))) if spec.keep_best else None,
        best_mode="max",
        enable_async_checkpointing=spec.async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )


def _abstract(tree: Any, shardings: Any) -> Any:
    """Restore targets: shape, dtype and the sharding the current mesh wants (so any topology works)."""
    return jax.tree_util.tree_map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings)


def _train_part(state: Any) -> dict[str, Any]:
    return {"step": state.step, "opt_state": state.opt_state, "plateau": state.plateau, "rng": state.rng}


def _save_args(spec: CheckpointSpec, run_metadata: dict[str, Any], step: int, state: Any,
               last_eval: dict[str, float] | None) -> dict[str, Any]:
    """orbax's save arguments for each item of the checkpoint of `state` at `step`."""
    per_epoch = run_metadata.get("steps_per_epoch") or 0
    run = spec.run_config
    data = {"next_step": step, "epoch": step / per_epoch if per_epoch else None, "seed": run.get("seed"),
            "batch_size": run.get("batch_size"), "steps_per_epoch": per_epoch or None, "dataset": run.get("dataset")}
    items: dict[str, Any] = {
        "params": ocp.args.StandardSave(state.params),
        "train_state": ocp.args.StandardSave(_train_part(state)),
        "data": ocp.args.JsonSave(data),
        "meta": ocp.args.JsonSave({**run_metadata, "last_eval": last_eval or None}),
        "config": ocp.args.JsonSave(run),
    }
    if jax.tree_util.tree_leaves(state.batch_stats):
        items["batch_stats"] = ocp.args.StandardSave(state.batch_stats)
    return items


def _restored_state(step: int, out: Any, base: Any, *, batch_stats: bool, model_only: bool) -> Any:
    """`base` with the restored items `out` of checkpoint `step`; CheckpointUnreadable where they disagree on it."""
    state = base.replace(params=out["params"])
    if batch_stats:
        state = state.replace(batch_stats=out["batch_stats"])
    if not model_only:
        ts = out["train_state"]
        state = state.replace(step=ts["step"], opt_state=ts["opt_state"], plateau=ts["plateau"], rng=ts["rng"])
        if int(ts["step"]) != step or int(out["data"].get("next_step", -1)) != step:
            raise CheckpointUnreadable(f"its step ({int(ts['step'])}) or data position "
                                       f"({out['data'].get('next_step')}) is not {step}")
    return state


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # the TrainState (model-only restores leave opt_state/plateau/rng as in `template`)
    data: dict[str, Any]
    meta: dict[str, Any]
    config: dict[str, Any]


class Checkpointer:
    """Saves and restores one run's TrainState items plus the metadata dict handed to it, through orbax's
    CheckpointManager (nothing else touches the manager); when to save, and SIGTERM, are the training loop's
    (`alexnet_jax.preemption`). The loop calls `restore_or`, `save`, `close`.

    `abstract_state` is the TrainState as `jax.ShapeDtypeStruct`s and `state_sharding` the shardings the
    current mesh wants: restores land directly on that mesh, whatever mesh wrote the checkpoint.
    """

    def __init__(self, workdir: str, spec: CheckpointSpec, abstract_state: Any, state_sharding: Any,
                 *, metadata: dict[str, Any] | None = None, read_only: bool = False):
        self.spec = spec
        self.directory = checkpoint_dir(workdir)
        self.workdir = os.path.dirname(self.directory)
        self.abstract_state = abstract_state
        self.state_sharding = state_sharding
        self.run_metadata = dict(metadata or {})  # stored in each checkpoint's `meta` item
        self.has_batch_stats = bool(jax.tree_util.tree_leaves(abstract_state.batch_stats))
        self._saved_steps: set[int] = set()
        if read_only and not os.path.isdir(self.directory):
            raise UserError(f"no checkpoints in {self.directory}: train with --workdir {self.workdir} first")
        _split_only_large_replicated_arrays()
        quiet_orbax_logs()
        self._manager = manager(self.directory, _options(spec, read_only), arrays=ARRAY_ITEMS, json_items=JSON_ITEMS)

    # ------------------------------------------------------------------------------------------------- save
    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, eval_metrics: dict[str, float] | None = None,
             last_eval: dict[str, float] | None = None) -> bool:
        """Start an (async) save of `state` at `step`; returns False when that step is already on disk."""
        if step in self._saved_steps or step in self._manager.all_steps():
            return False
        items = _save_args(self.spec, self.run_metadata, step, state, last_eval)
        metrics = {k: float(eval_metrics[k]) for k in ("top1", "top5", "loss")} if eval_metrics else {}
        try:  # orbax would wait for the previous save here anyway; done first, its size and the free space are known
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the previous asynchronous save failed
            raise self._write_failed(step, e) from None
        arrays = sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves((state.params, _train_part(state))))
        short = recovery.space_shortfall(self.directory, arrays)
        if short is not None:
            raise self._write_failed(step, short)
        try:  # also where the previous asynchronous save's failure surfaces
            saved = self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a failed write
            raise self._write_failed(step, e) from None
        if saved:
            self._saved_steps.add(step)
        return saved

    def _write_failed(self, step: int, e: BaseException) -> CheckpointWriteError:
        failed = recovery.first_unfinished(self.directory, self._saved_steps | {step}, default=step)
        return self.stop_after(f"saving the checkpoint of step {failed} in {self.directory}", e)

    def stop_after(self, what: str, e: BaseException) -> CheckpointWriteError:
        """`what` failed with `e` (this checkpointer's write, or another write of the run: its curves, its
        summary): finish or cancel orbax's writers, remove half-written steps, and say in one line what happened,
        what to do and which checkpoints the same command resumes from."""
        self.abandon()
        return recovery.write_failed(self.directory, what, e)

    def abandon(self) -> None:
        """Let an asynchronous save finish (or fail) and close the manager, raising nothing: the run is stopping
        for another reason, and no orbax thread may outlive it (a save still writing at interpreter exit printed
        dozens of tracebacks)."""
        for stop in (self._manager.wait_until_finished, self._manager.close):
            try:
                stop()
            except Exception:  # noqa: BLE001, S110 - the run already failed; only the cleanup is left
                pass

    def wait_until_finished(self) -> None:
        """Block until the last asynchronous save is on disk; a CheckpointWriteError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - see save
            raise self._write_failed(max(self._saved_steps, default=0), e) from None

    def reached_preemption(self, step: int) -> bool:
        """Whether JAX's preemption service (multi-process jobs) asks for a checkpoint at `step`."""
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for the last save to be finalised; a CheckpointWriteError if a save failed."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - see save
            raise self._write_failed(max(self._saved_steps, default=0), e) from None
        self._manager.close()
        if self._saved_steps:
            logging.info("checkpoints in %s: steps %s", self.directory, self._manager.all_steps())

    # ---------------------------------------------------------------------------------------------- restore
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def metadata(self, step: int) -> Any:
        """The items' metadata of checkpoint `step` (shapes and dtypes of the saved trees)."""
        return metadata_of(self._manager, step)

    def _read_json(self, step: int, item: str) -> dict[str, Any]:
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
            raise CheckpointUnreadable(f"its {item!r} item cannot be read ({type(e).__name__}: {e})") from e
        if not isinstance(out, dict):
            raise CheckpointUnreadable(f"its {item!r} item is not a JSON object")
        return out

    def read_config(self, step: int) -> dict[str, Any]:
        """The config checkpoint `step` was written with, as plain JSON."""
        return self._read_json(step, "config")

    def restore(self, step: int, template: Any | None = None, model_only: bool = False) -> Restored:
        """Restore `step` onto the current mesh. `model_only` reads params (and batch stats) only, for
        evaluation and prediction, taking the rest of the state from `template`."""
        if step not in self._manager.all_steps():
            raise UserError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        saved_config = self.read_config(step)
        recovery.check_compatible(self.directory, step, saved_config, self.spec.run_config,
                                  lambda: self.metadata(step)["params"], self.abstract_state.params)
        abstract = _abstract(self.abstract_state, self.state_sharding)
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(abstract.params),
                                 "data": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
        if self.has_batch_stats:
            items["batch_stats"] = ocp.args.StandardRestore(abstract.batch_stats)
        if not model_only:
            items["train_state"] = ocp.args.StandardRestore(_train_part(abstract))
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - a truncated or half-written item fails in many ways
            raise CheckpointUnreadable(f"{type(e).__name__}: {e}") from e
        state = _restored_state(step, out, template if template is not None else self.abstract_state,
                                batch_stats=self.has_batch_stats, model_only=model_only)
        return Restored(step, state, dict(out["data"]), dict(out["meta"]), saved_config)

    def latest(self, template: Any | None = None, model_only: bool = False,
               set_aside: bool = True) -> Restored | None:
        """The newest checkpoint that reads back whole; unreadable ones are skipped with a warning (and, when
        `set_aside`, moved to `WORKDIR/checkpoints.unreadable/`). None when there is no checkpoint."""
        return recovery.first_readable(self.directory, self.all_steps(),
                                       lambda step: self.restore(step, template, model_only),
                                       set_aside=set_aside, after_set_aside=self._manager.reload)

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
