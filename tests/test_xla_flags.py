"""No XLA flag can abort a process: each flag alexnet_jax or the tests add is asked of the running jaxlib first
(`alexnet_jax.xla_flags`), and one it does not know is left out with one line, the command going on without it."""

from __future__ import annotations

import json
import os
import sys

import forkserver
import pytest
from conftest import REPO, needs_fmnist

from alexnet_jax import xla_flags

UNKNOWN = "--xla_cpu_collective_call_terminate_timeout_seconds_renamed"  # a flag no jaxlib knows


def test_known_asks_the_running_jaxlib_once_per_version(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    flags = ["--xla_force_host_platform_device_count=2", f"{UNKNOWN}=600"]
    assert xla_flags.known(flags) == {flags[0]: True, flags[1]: False}  # a real process started with each
    cached = json.loads((tmp_path / "alexnet_jax" / "xla_flags.json").read_text())
    assert cached == {xla_flags.jaxlib_version(): {flags[0]: True, flags[1]: False}}

    def no_probe(_):
        raise AssertionError("asked again: the answers are cached per jaxlib version")

    monkeypatch.setattr(xla_flags, "_probe", no_probe)
    assert xla_flags.known(flags[::-1]) == {flags[1]: False, flags[0]: True}


def test_add_keeps_what_is_set_and_leaves_out_the_unknown(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    added = xla_flags.add({"--xla_force_host_platform_device_count": "2", UNKNOWN: "600",
                           "--xla_cpu_collective_call_warn_stuck_timeout_seconds": "120"}, {UNKNOWN: "what it costs"})
    assert added == ["--xla_cpu_collective_call_warn_stuck_timeout_seconds=120"]
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *added]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"does not know the XLA flag {UNKNOWN}=600" in lines[0], lines
    assert "what it costs" in lines[0]


@needs_fmnist
def test_an_entry_point_runs_on_when_jaxlib_lacks_one_of_its_flags(tmp_path, fmnist_data_dir):
    """`main` with one of its XLA flags renamed to a name no jaxlib knows (as a jaxlib release that drops a flag
    would make it): it trains and evaluates, saying in one line which flag it left out and what that costs.
    Without the guard XLA aborts the process at its first JAX call ('Unknown flag in XLA_FLAGS')."""
    workdir = tmp_path / "run"
    code = ("import sys\n"
            "from absl import app\n"
            "from alexnet_jax import cli, main\n"
            f"cli.CPU_COLLECTIVE_FLAGS[{UNKNOWN!r}] = '600'\n"
            f"cli.FLAG_COSTS[{UNKNOWN!r}] = 'a late collective stops the run sooner'\n"
            "app.run(main.main, flags_parser=cli.parse_flags, argv=sys.argv)\n")
    args = ["--config=configs/fashion_mnist.py", f"--workdir={workdir}", f"--config.data_dir={fmnist_data_dir}",
            "--config.num_train_steps=2", "--config.widths=(8,16,16,16,8)", "--config.fc_width=32",
            "--config.eval_split=test[:64]", "--config.eval_batch_size=32", "--config.mesh_shape=(1,1)",
            "--config.warmup_epochs=0.0"]
    env = {**os.environ, "XLA_FLAGS": "", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = forkserver.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "does not know the XLA flag" in line]
    assert len(notes) == 1 and f"{UNKNOWN}=600" in notes[0] and "a late collective" in notes[0], notes
    assert json.loads((workdir / "summary.json").read_text())["num_eval_examples"] == 64


@pytest.mark.parametrize("flag", ["--xla_cpu_use_fusion_emitters=false"])
def test_the_tests_own_flags_go_through_the_guard(flag):
    """conftest adds its flags through `xla_flags.add` too: on a jaxlib without one (0.11+ has no
    --xla_cpu_use_fusion_emitters) it is absent from XLA_FLAGS instead of aborting every test process."""
    assert (flag in os.environ["XLA_FLAGS"].split()) == xla_flags.known([flag])[flag]
