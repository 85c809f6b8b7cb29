"""One preparation per multi-process run: process 0 prepares a dataset (or a cache), the other processes wait.

Without this, every process of a run that finds a dataset unprepared prepares it: the same files written at the
same moment by several writers. The processes share `data_dir` (a shared filesystem or a bucket: the multi-host
docs ask for it), so they meet through a small state file beside what is prepared, not through the network
(this package knows none):
- process 0 writes `{"state": "preparing"}` and refreshes its heartbeat every few seconds while it prepares, then
  `done`, or `failed` with its one-line error;
- every other process waits (one log line, then one every 30 s) until the dataset is there, and stops in one line
  if process 0 failed, if its heartbeat stopped (it was killed), if it finished but the dataset is not visible
  here (no shared data_dir), or when `Processes.wait_s` have passed.
A state file older than the waiting process (by more than `GRACE_S`) belongs to an earlier run and is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable

from absl import logging

from alexnet_jax.errors import UserError

HEARTBEAT_S = 2.0  # process 0 refreshes its state this often
STALE_S = 60.0  # no heartbeat for this long: process 0 is gone
GRACE_S = 60.0  # the processes of one run start within this of each other
DONE_BUT_MISSING_S = 10.0  # 'done' and still not visible here after this: data_dir is not shared
POLL_S = 0.25
LOG_EVERY_S = 30.0


@dataclasses.dataclass(frozen=True)
class Processes:
    """Which process this is of how many, and how long a process waits for process 0's preparation."""

    index: int = 0
    count: int = 1
    wait_s: float = 7200.0


ONE = Processes()  # a single-process run: prepare whatever is missing


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or being replaced
        return None


def _write(path: str, state: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)  # whole or not at all: a reader never sees half a state
    except OSError as e:
        logging.warning("could not write %s (%s): other processes cannot see this one's progress", path, e.strerror)


def prepare_once(what: str, ready: Callable[[], bool], prepare: Callable[[], object], state_path: str,
                 processes: Processes) -> None:
    """Make `ready()` true: by calling `prepare()` in process 0 (or in a single-process run), by waiting for
    process 0 in the others. `what` names it in messages; `state_path` is a file beside it that every process
    sees."""
    if ready():
        return
    if processes.count <= 1:
        prepare()
        return
    if processes.index == 0:
        _prepare_as_zero(prepare, state_path)
        return
    _wait(what, ready, state_path, processes)


def _prepare_as_zero(prepare: Callable[[], object], state_path: str) -> None:
    os.makedirs(os.path.dirname(state_path) or ".", exist_ok=True)
    state = {"state": "preparing", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    _write(state_path, {**state, "beat": time.time()})
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            _write(state_path, {**state, "beat": time.time()})

    thread = threading.Thread(target=beat, name="prepare-heartbeat", daemon=True)
    thread.start()
    final = {"state": "done"}
    try:
        prepare()
    except BaseException as e:
        final = {"state": "failed", "error": str(e).strip().splitlines()[0][:600] if str(e).strip()
                 else type(e).__name__}
        raise
    finally:
        stop.set()
        thread.join()  # (no heartbeat may overwrite the final state)
        _write(state_path, {**state, **final, "time": time.time(), "beat": time.time()})


def _wait(what: str, ready: Callable[[], bool], state_path: str, processes: Processes) -> None:
    start = time.time()
    where = os.path.dirname(state_path)
    logging.info("process %d: waiting for process 0 to prepare %s (up to %.0f s: --config.prepare_wait_s)",
                 processes.index, what, processes.wait_s)
    last_log, done_seen = start, None
    while not ready():
        now = time.time()
        state = _read(state_path)
        if state is not None and state.get("started", 0) < start - GRACE_S:
            state = None  # an earlier run's
        kind = (state or {}).get("state")
        if kind == "failed":
            raise UserError(f"process 0 could not prepare {what}: {state.get('error', '?')}")
        if kind == "preparing" and now - state.get("beat", 0) > STALE_S:
            raise UserError(f"process 0 (pid {state.get('pid')} on {state.get('host')}) stopped preparing {what}: "
                            f"no sign of it for {now - state.get('beat', 0):.0f} s. Look at its log, fix what "
                            "stopped it and start the run again.")
        if kind == "done":
            done_seen = done_seen or now
            if now - done_seen > DONE_BUT_MISSING_S:
                raise UserError(f"process 0 prepared {what}, but this process does not see it in {where}: give "
                                "every process the same --config.data_dir on a shared filesystem or bucket, or "
                                "prepare the data on each host before the run.")
        if now - start > processes.wait_s:
            how = "it is still preparing" if kind == "preparing" else "it never started (no state in " + where + ")"
            raise UserError(f"process {processes.index} waited {processes.wait_s:.0f} s for process 0 to prepare "
                            f"{what} and gave up: {how}. Prepare the data before the run (one process), give the "
                            "processes the same --config.data_dir, or wait longer with --config.prepare_wait_s.")
        if now - last_log > LOG_EVERY_S:
            logging.info("process %d: still waiting for process 0 to prepare %s (%.0f s)", processes.index, what,
                         now - start)
            last_log = now
        time.sleep(POLL_S)
    logging.info("process %d: %s prepared by process 0 (waited %.0f s)", processes.index, what, time.time() - start)
