"""Run `alexnet_jax.main` and send this very process a signal right after the loop's checkpoint hook for a
given step returns: `python tests/signal_after_step.py STEP SIGNAME --config ... --workdir ...`; or, with
`PAUSE=DIR` for SIGNAME, hold the run there (its checkpoints so far on disk, its workdir locked) until DIR/go exists.

A deterministic stand-in for a kill or preemption "at step N": an external `kill` would race a tiny model's
millisecond steps. Saves already started are let finish first, so the latest checkpoint before STEP is on disk
(the half-written case has its own test). With SIGKILL nothing more runs; SIGTERM goes through the handler
that `alexnet_jax.preemption` installs, as a real one would.
"""

import os
import signal
import sys
import time

from absl import app

from alexnet_jax import cli, main
from alexnet_jax.preemption import SavePolicy

STEP = int(sys.argv.pop(1))
ACTION = sys.argv.pop(1)  # a signal's name, or PAUSE=DIR: create DIR/paused, then wait until DIR/go exists
_after_step = SavePolicy.after_step


def after_step(self, step, state, **kwargs):
    stop = _after_step(self, step, state, **kwargs)
    if step == STEP:
        self.ckpt.wait_until_finished()
        if ACTION.startswith("PAUSE="):
            folder = ACTION.removeprefix("PAUSE=")
            open(os.path.join(folder, "paused"), "w").close()
            while not os.path.exists(os.path.join(folder, "go")):
                time.sleep(0.05)
        else:
            os.kill(os.getpid(), getattr(signal, ACTION))
    return stop


SavePolicy.after_step = after_step

if __name__ == "__main__":
    app.run(main.main, flags_parser=cli.parse_flags)  # as `python -m alexnet_jax.main` (its XLA flags too)
