"""The loop's bookkeeping on its own (alexnet_jax.loop): when an every-N action is due, and the meter's figures
against hand arithmetic on a fake clock."""

from __future__ import annotations

import pytest

from alexnet_jax import loop


def test_periodic_fires_every_n_and_at_the_end():
    assert [s for s in range(1, 11) if loop.periodic(s, 3, 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 7) if loop.periodic(s, 2, 6)] == [2, 4, 6]  # the end falls on a multiple: once
    assert [s for s in range(1, 6) if loop.periodic(s, 0, 5)] == [5]  # every <= 0: only the end
    assert [s for s in range(5, 9) if loop.periodic(s, 4, 8)] == [8]  # a resumed run counts from step 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_meter_leaves_out_compilation_logging_and_evaluation():
    clock = FakeClock()
    meter = loop.Meter(batch_size=32, total=10, clock=clock)
    for _ in range(2):  # the first interval: 2 steps in 5 s, compilation included
        meter.step()
    clock.now += 5.0
    rate, eta = meter.report(done=2)
    assert rate == pytest.approx(64 / 5.0)
    assert eta == pytest.approx(8 * 32 / (64 / 5.0))
    assert meter.images_per_second is None  # nothing timed yet but the compiling interval
    clock.now += 1.0  # writing the report: not training time
    meter.restart()
    clock.now += 3.0  # an evaluation of 3 s, left out of the next interval
    meter.exclude(3.0)
    for _ in range(4):  # 4 steps in 2 s of training
        meter.step()
    clock.now += 2.0
    rate, eta = meter.report(done=6)
    assert rate == pytest.approx(128 / 2.0)
    assert eta == pytest.approx(4 * 32 / 64.0)
    meter.restart()
    for _ in range(4):  # 4 more in 4 s
        meter.step()
    clock.now += 4.0
    rate, eta = meter.report(done=10)
    assert rate == pytest.approx(32.0) and eta == 0.0
    assert meter.images_per_second == pytest.approx(256 / 6.0)  # (128 + 128) images over 2 + 4 s


def test_format_seconds():
    assert loop.format_seconds(187) == "3m07s"
    assert loop.format_seconds(3725) == "1h02m"
    assert loop.format_seconds(-4) == "0m00s"
