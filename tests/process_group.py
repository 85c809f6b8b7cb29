"""A group of processes forked from this one once the libraries are imported: the tests' multi-process runs over
gloo (photo_stream_worker.py, multiprocess_worker.py). Started by tests/forkserver.py, which has imported them
already, no process of the group imports TensorFlow or JAX (~9 s of CPU each on the 2-core machine)."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable


def run_forked(target: Callable[[int], None], processes: int) -> int:
    """`target(pid)` in `processes` forked processes; 0 when all of them succeeded, else 1, with the others killed
    as soon as one fails (they would wait for it at their next collective)."""
    children = []
    for pid in range(processes):
        child = os.fork()
        if child == 0:
            code = 1
            try:
                target(pid)
                code = 0
            except BaseException:  # noqa: BLE001 - reported, then this process's exit status says it
                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        children.append(child)
    failed = False
    while children:
        child, status = os.wait()
        children.remove(child)
        if os.waitstatus_to_exitcode(status) != 0 and not failed:
            failed = True
            print(f"process {child} of the group exited with {os.waitstatus_to_exitcode(status)}: stopping the "
                  "others", file=sys.stderr, flush=True)
            for other in children:
                os.kill(other, signal.SIGKILL)
    return 1 if failed else 0
