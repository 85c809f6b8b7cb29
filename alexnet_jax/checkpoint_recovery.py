"""What checkpointing does when a checkpoint cannot be written or read back, apart from orbax's manager (which
`alexnet_jax.checkpointing` wraps): the disk space a save needs, half-written steps removed and the intact ones
named after a failed write, unreadable checkpoints diagnosed and set aside in `WORKDIR/checkpoints.unreadable/`
(never deleted), and a checkpoint of another run refused with every difference named.

Everything here works on the checkpoint directory and on what the wrapper read from it, so each rule and each
message a user sees lives in one place whatever manager wrote the files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from absl import logging

from alexnet_jax.checkpoint_files import tree_differences
from alexnet_jax.config import config_differences
from alexnet_jax.errors import UserError

REJECTED_SUBDIR = "checkpoints.unreadable"  # where unreadable checkpoints are moved (never deleted)
PARTIAL_MARK = ".orbax-checkpoint-tmp"  # in the name of a step orbax has not finished writing
T = TypeVar("T")


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


# ------------------------------------------------------------------------------------------------ writes
def finished_steps(directory: str) -> list[int]:
    """Steps whose directory is complete on disk (orbax renames a step's tmp directory when it is done)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def remove_partial(directory: str) -> list[str]:
    """Remove the steps orbax left half-written; their names."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    partial = [n for n in names if PARTIAL_MARK in n]
    for n in partial:
        shutil.rmtree(os.path.join(directory, n), ignore_errors=True)
    return partial


def space_shortfall(directory: str, array_bytes: int) -> OSError | None:
    """An ENOSPC error when the next checkpoint will not fit where the checkpoints go, else None: refused before
    orbax's writers start (and fail noisily). A checkpoint takes what the largest one on disk takes, else the
    state's `array_bytes` plus a margin; disk blocks are counted, as a small file takes a whole one."""
    sizes = [sum(os.stat(os.path.join(r, f)).st_blocks * 512 for r, _, fs in os.walk(os.path.join(directory, str(s)))
                 for f in fs) for s in finished_steps(directory)]
    need = (max(sizes) if sizes else int(1.1 * array_bytes)) + (1 << 16)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None  # unknown: orbax's own error will say
    if free >= need:
        return None
    return OSError(28, f"No space left on device: about {need / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free")


def first_unfinished(directory: str, started: set[int], default: int) -> int:
    """The earliest of the `started` saves that is not complete on disk (the one a failure hit), else `default`."""
    done = finished_steps(directory)
    return next((s for s in sorted(started) if s not in done), default)


def write_failed(directory: str, what: str, e: BaseException) -> CheckpointWriteError:
    """`what` failed with `e` once the run's writers have stopped: remove half-written steps and say in one line
    what happened, what to do and which checkpoints the same command resumes from."""
    removed = remove_partial(directory)
    intact = finished_steps(directory)
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


# ------------------------------------------------------------------------------------------------- reads
def check_compatible(directory: str, step: int, saved_config: dict[str, Any], run_config: dict[str, Any],
                     read_params: Callable[[], Any], expected_params: Any) -> None:
    """Refuse (UserError) a checkpoint of another model/config, never restoring part of it silently;
    CheckpointUnreadable when its parameters' metadata (`read_params()`) cannot be read."""
    diffs = config_differences(saved_config, run_config)
    if diffs:
        raise UserError(
            f"the checkpoints in {directory} (step {step}) were written with a different config: "
            + "; ".join(diffs) + ". Rerun with those values, or use a new --workdir to start a new run.")
    try:
        saved_params = read_params()
    except Exception as e:  # noqa: BLE001
        raise CheckpointUnreadable(f"its metadata cannot be read ({type(e).__name__}: {e})") from e
    if saved_params is None:
        raise CheckpointUnreadable("it has no 'params' item")
    diffs = tree_differences(saved_params, expected_params)
    if diffs:
        raise UserError(f"the checkpoint at step {step} in {directory} holds parameters of a different "
                        "model: " + "; ".join(diffs) + ". Use a new --workdir to start a new run.")


def move_aside(directory: str, step: int, reason: str) -> None:
    """Move the unreadable checkpoint `step` to `WORKDIR/checkpoints.unreadable/` (kept for inspection, never
    deleted), out of the manager's way; every process waits for process 0 to have moved it."""
    target = os.path.join(os.path.dirname(directory), REJECTED_SUBDIR, str(step))
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.move(os.path.join(directory, str(step)), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"alexnet_jax:set_aside:{step}")
    logging.warning("the checkpoint at step %d is unreadable (%s): moved it to %s and trying the one before",
                    step, reason, target)


def first_readable(directory: str, steps: list[int], restore: Callable[[int], T], *, set_aside: bool,
                   after_set_aside: Callable[[], None]) -> T | None:
    """`restore(step)` of the newest of `steps` that reads back whole; unreadable ones are skipped with a warning
    (and, when `set_aside`, moved aside, then `after_set_aside()`). None when there is no checkpoint."""
    for step in reversed(steps):
        try:
            return restore(step)
        except CheckpointUnreadable as e:
            if set_aside:
                move_aside(directory, step, str(e))
                after_set_aside()
            else:
                logging.warning("the checkpoint at step %d is unreadable (%s): trying the one before", step, e)
    if steps:
        raise UserError(f"none of the checkpoints in {directory} (steps {steps}) can be read back: move "
                        "the folder aside to start over, or give another --workdir")
    return None
