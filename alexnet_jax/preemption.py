"""When the training loop saves, and what SIGTERM does: the loop's policy over `checkpointing.Checkpointer`.

The checkpointer only saves and restores what it is handed; this module decides when: every
`checkpoint_every_steps`, after each evaluation when the best checkpoints are kept, at the end, and at the next
step boundary after SIGTERM (one process) or a preemption notice from JAX's preemption service (many
processes), after which the loop stops and a rerun resumes. It also decides how the loop stops on an error: the
saves are finished first, and a failed write of the curves names the checkpoints a rerun resumes from.
It uses only the checkpointer's public methods (`save`, `wait_until_finished`, `reached_preemption`, `abandon`,
`stop_after`, `step_dir`).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging

from alexnet_jax.checkpointing import Checkpointer, CheckpointSpec
from alexnet_jax.scalars import WriteFailed


class SavePolicy:
    """Wraps one run's Checkpointer; use as a context manager so the SIGTERM handler is always removed. `spec`
    says how often to save (`every_steps`, 0: only at the end) and whether after each evaluation (`keep_best`)."""

    def __init__(self, ckpt: Checkpointer, spec: CheckpointSpec, *, handle_sigterm: bool = True):
        self.ckpt = ckpt
        self.every = spec.every_steps
        self.keep_best = spec.keep_best
        self.preempted_at: int | None = None
        self._signalled = threading.Event()
        self._previous: Any = None
        self._handle_sigterm = handle_sigterm

    def __enter__(self) -> SavePolicy:
        """On one process, SIGTERM asks for a checkpoint at the next step boundary and a clean exit. On many
        processes JAX's preemption service owns SIGTERM and orbax's `reached_preemption` reports it."""
        if (self._handle_sigterm and jax.process_count() == 1
                and threading.current_thread() is threading.main_thread()):
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        """The run stops on an error: its last save finishes first, and no orbax thread may outlive the interpreter
        (they printed dozens of tracebacks at exit). A failed write of the curves becomes one line that also names
        the checkpoints a rerun resumes from."""
        try:
            if isinstance(exc, WriteFailed):
                raise self.ckpt.stop_after(exc.what, exc.cause) from None
            if exc_type is not None:
                self.ckpt.abandon()
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)
                self._previous = None

    def _on_sigterm(self, signum: int, _frame: Any) -> None:
        logging.warning("received %s: saving a checkpoint at the next step boundary, then exiting",
                        signal.Signals(signum).name)
        self._signalled.set()

    def after_step(self, step: int, state: Any, *, final: bool, eval_metrics: dict[str, float] | None,
                   last_eval: dict[str, float] | None) -> bool:
        """Save when due; returns True when training must stop (SIGTERM or preemption).

        `step` is the number of steps done; `state` must include the updates made after this step's evaluation
        (the plateau schedule), so a resumed run continues exactly as the uninterrupted one would."""
        preempt = self._signalled.is_set() or self.ckpt.reached_preemption(step)
        due = (final or preempt or (self.every > 0 and step % self.every == 0)
               or (eval_metrics is not None and self.keep_best > 0))
        if due:
            self.ckpt.save(step, state, eval_metrics, last_eval)
        if preempt and not final:
            self.ckpt.wait_until_finished()
            self.preempted_at = step
            logging.warning("preempted after step %d: checkpoint saved in %s; rerun the same command (same "
                            "--workdir) to resume from it", step, self.ckpt.step_dir(step))
            return True
        return False
