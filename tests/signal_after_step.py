"""Run `alexnet_jax.main` and send this very process a signal right after the loop's checkpoint hook for a
given step returns: `python tests/signal_after_step.py STEP SIGNAME --config ... --workdir ...`.

A deterministic stand-in for a kill or preemption "at step N": an external `kill` would race a tiny model's
millisecond steps. Saves already started are let finish first, so the latest checkpoint before STEP is on disk
(the half-written case has its own test). With SIGKILL nothing more runs; SIGTERM goes through the handler
that `alexnet_jax.preemption` installs, as a real one would.
"""

import os
import signal
import sys

from absl import app

from alexnet_jax import cli, main
from alexnet_jax.preemption import SavePolicy

STEP = int(sys.argv.pop(1))
SIGNAL = getattr(signal, sys.argv.pop(1))
_after_step = SavePolicy.after_step


def after_step(self, step, state, **kwargs):
    stop = _after_step(self, step, state, **kwargs)
    if step == STEP:
        self.ckpt.manager.wait_until_finished()
        os.kill(os.getpid(), SIGNAL)
    return stop


SavePolicy.after_step = after_step

if __name__ == "__main__":
    app.run(main.main, flags_parser=cli.parse_flags)  # as `python -m alexnet_jax.main` (its XLA flags too)
