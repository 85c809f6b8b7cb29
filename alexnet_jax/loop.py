"""The training loop's bookkeeping, apart from the loop: when something is due, and how fast it goes.

- `periodic(step, every, total)`: is an every-N-steps action (log, evaluate) due after `step` steps?
- `Meter`: interval timing for the logs (images/s, ETA) and the run's training throughput, with compilation
  (the first interval) and evaluation time left out.
(big_vision keeps these in `u.chrono` / `u.itstime`.)
"""

from __future__ import annotations

import time
from collections.abc import Callable


def periodic(step: int, every: int, total: int) -> bool:
    """True after `step` steps when `every` (> 0) divides it, and after the last step (`total`)."""
    return step == total or (every > 0 and step % every == 0)


def format_seconds(s: float) -> str:
    """'1h02m' or '3m07s': an ETA at a glance."""
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Meter:
    """Times the steps between two reports. The first interval of a run (or of a resumed run) holds the
    compilation, so it counts for the log's images/s but not for `images_per_second`, the run's throughput;
    time spent in `excluded()` (evaluation) counts for neither."""

    def __init__(self, batch_size: int, total: int, clock: Callable[[], float] = time.time):
        self.batch_size, self.total, self.clock = batch_size, total, clock
        self.interval_start, self.interval_steps, self.first = clock(), 0, True
        self.train_seconds, self.timed_images = 0.0, 0

    def step(self) -> None:
        self.interval_steps += 1

    def report(self, done: int) -> tuple[float, float]:
        """(images/s over the interval that ends after `done` steps, seconds left at that rate). The next interval
        starts at `restart()`, once the report is logged: writing it is not training time."""
        elapsed = self.clock() - self.interval_start
        if not self.first:
            self.train_seconds += elapsed
            self.timed_images += self.interval_steps * self.batch_size
        rate = self.interval_steps * self.batch_size / max(elapsed, 1e-9)
        eta = (self.total - done) * self.batch_size / rate
        self.interval_steps, self.first = 0, False
        return rate, eta

    def restart(self) -> None:
        """Start the next interval now (after a report is logged)."""
        self.interval_start = self.clock()

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (e.g. an evaluation's) out of the current interval."""
        self.interval_start += seconds

    @property
    def images_per_second(self) -> float | None:
        """Training images per second over every interval but the first; None before the second report."""
        return self.timed_images / self.train_seconds if self.train_seconds else None
