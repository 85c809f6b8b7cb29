"""Where the training curves go: TensorBoard scalars through clu on process 0, JSON lines without TensorFlow, and
a write that fails (full disk, vanished workdir) as one `UserError` naming the step, the directory and the cause."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from alexnet_jax.errors import UserError


class JsonlWriter:
    """Scalars as JSON lines in WORKDIR/metrics.jsonl: where TensorBoard's writer cannot load (no TensorFlow,
    e.g. an accelerator image), the curves are still kept."""

    def __init__(self, path: str | None):
        self._file = open(path, "a") if path else None  # noqa: SIM115 - closed in close()

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._file:
            self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def flush(self) -> None:
        if self._file:
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


class WriteFailed(UserError):
    """A write of the training curves that cannot succeed, as one line naming the step, the directory and the cause.
    `what` and `cause` let whoever holds the run's other writers say more: the training loop's `SavePolicy` stops
    the checkpoint saves and names the checkpoints a rerun resumes from."""

    def __init__(self, what: str, cause: BaseException):
        super().__init__(f"{what}: {(str(cause).splitlines() or [type(cause).__name__])[0][:200]}")
        self.what = what
        self.cause = cause


class Scalars:
    """One run's scalar writer: `write` writes and flushes (so a full disk shows at the step that hit it, not
    at exit). A failure raises `WriteFailed` instead of TensorFlow's or Python's many exception types. The writer
    is opened by the first `write`, so that a failure to open it is met inside the loop, as any other write's."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._writer: Any = None
        self._open: Callable[[], Any] = lambda: JsonlWriter(None)
        if jax.process_index() != 0:  # process 0 writes; the others write nothing
            return
        try:
            from clu import metric_writers
        except ImportError as e:  # clu's SummaryWriter needs TensorFlow
            logging.warning("TensorBoard scalars off (%s): writing them to %s/metrics.jsonl", e, workdir)
            self._open = lambda: JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
            return
        self._open = lambda: metric_writers.SummaryWriter(workdir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        try:
            if self._writer is None:
                self._writer = self._open()
            self._writer.write_scalars(step, scalars)
            self._writer.flush()
        except Exception as e:  # noqa: BLE001 - tf.errors.*, OSError, ...: a write that cannot succeed
            raise WriteFailed(f"writing the training curves of step {step} in {self.workdir}", e) from None

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.close()
        except Exception as e:  # noqa: BLE001 - the last events could not be flushed
            logging.warning("closing the scalar writer in %s: %s", self.workdir, str(e).splitlines()[0][:200])
