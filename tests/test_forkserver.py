"""tests/forkserver.py's forked command lines behave as real processes do: the other tests' claims about exit
statuses, signals, one-line errors, environments and output rest on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import forkserver
import pytest
from conftest import REPO

PROGRAMS = {
    "output and status": "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)",
    "an error message": "import sys; sys.exit('alexnet_jax: error: bad')",
    "an exception": "raise ValueError('boom')",
    "a signal": "import os, signal; print('before', flush=True); os.kill(os.getpid(), signal.SIGKILL)",
    "argv, cwd, env": "import os, sys; print(sys.argv[1:], os.getcwd(), os.environ['ALEXNET_PROBE'])",
    "atexit and unflushed output": "import atexit, sys; atexit.register(print, 'at exit'); sys.stdout.write('x')",
}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_forked_run_equals_subprocess_run(name, tmp_path):
    cmd = [sys.executable, "-c", PROGRAMS[name], "a", "b c"]
    env = {**forkserver.os.environ, "ALEXNET_PROBE": name}
    kwargs = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    real = subprocess.run(cmd, **kwargs)
    before = forkserver.forked_cpu_seconds
    forked = forkserver.run(cmd, **kwargs)
    assert forkserver.forked_cpu_seconds > before  # it was forked (and its CPU counted), not run as a subprocess
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)


def test_preloaded_modules_are_the_servers_and_work():
    """The child finds TensorFlow and alexnet_jax imported (the ~6 s it saves), and they work after the fork."""
    code = ("import sys; print('tensorflow' in sys.modules, 'alexnet_jax.train' in sys.modules)\n"
            "import tensorflow as tf, jax.numpy as jnp\n"
            "print(int(tf.reduce_sum(tf.range(4))), int(jnp.arange(5).sum()))")
    r = forkserver.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "True True\n6 10\n"), r.stderr[-2000:]


def test_signal_and_exception_statuses():
    killed = forkserver.run([sys.executable, "-c", PROGRAMS["a signal"]], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL and killed.stdout == "before\n"
    failed = forkserver.run([sys.executable, "-c", PROGRAMS["an exception"]], capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.strip().endswith("ValueError: boom")


def test_a_timeout_kills_the_child():
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                       capture_output=True, text=True, timeout=2)
    assert forkserver.run([sys.executable, "-c", "print(1)"], capture_output=True, text=True).stdout == "1\n"


def test_an_import_time_variable_that_differs_runs_a_real_process():
    env = {**forkserver.os.environ, "JAX_ENABLE_X64": "1"}
    before = forkserver.forked_cpu_seconds
    r = forkserver.run([sys.executable, "-c", "import jax; print(jax.config.jax_enable_x64)"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.stdout == "True\n" and forkserver.forked_cpu_seconds == before


MODULE = """import sys
print(__name__, sys.argv[1:], __file__.rsplit('/', 1)[-1])
print('err', file=sys.stderr)
if sys.argv[1:] == ['boom']:
    raise RuntimeError('boom from ' + __name__)
sys.exit(4)
"""


@pytest.mark.parametrize("form", ["-m", "FILE"])
@pytest.mark.parametrize("args", [["a", "b c"], ["boom"]])
def test_module_and_file_programs_equal_subprocess_run(form, args, tmp_path):
    """`python -m MODULE` and `python FILE.py`, the forms the other tests run through the server: the same
    status, output and traceback as a real process (the module found from the working directory)."""
    (tmp_path / "probe_program.py").write_text(MODULE)
    cmd = [sys.executable, *(["-m", "probe_program"] if form == "-m" else [str(tmp_path / "probe_program.py")]),
           *args]
    kwargs = dict(cwd=tmp_path, env=dict(forkserver.os.environ), capture_output=True, text=True, timeout=60)
    real = subprocess.run(cmd, **kwargs)
    before = forkserver.forked_cpu_seconds
    forked = forkserver.run(cmd, **kwargs)
    assert forkserver.forked_cpu_seconds > before
    assert real.returncode == (1 if args == ["boom"] else 4)
    assert (forked.returncode, forked.stdout) == (real.returncode, real.stdout)
    assert forked.stderr.strip().splitlines()[-1] == real.stderr.strip().splitlines()[-1], forked.stderr


ENTRY_POINTS = ["-m alexnet_jax.main", "-m alexnet_jax.evaluate", "-m alexnet_jax.predict", "-m alexnet_jax.convert",
                "-m alexnet_jax.features", "-m alexnet_jax.collectives", "-m alexnet_jax.data.prepare",
                "-m alexnet_jax.flops"] + sorted(
    f"scripts/{f}" for f in forkserver.os.listdir(os.path.join(REPO, "scripts")) if f.endswith(".py"))


def test_every_entry_point_starts_as_a_real_process():
    """Each command a user runs, as a real process (not forked: a forked child inherits the server's imports, so
    an import-time failure of an entry point could not show): a bad flag stops it with one line naming the
    flag (or, argparse's way, the required argument missing before it), no traceback."""
    env = {**forkserver.os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    failures = []
    for entry in ENTRY_POINTS:
        proc = subprocess.run([sys.executable, *entry.split(), "--no-such-flag-xyz"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        named = any("no-such-flag-xyz" in ln or "no_such_flag_xyz" in ln or "required" in ln for ln in lines[-3:])
        one_line = "error" in " ".join(lines[-2:])
        if proc.returncode not in (1, 2) or "Traceback" in proc.stderr or not named or not one_line:
            failures.append(f"{entry}: status {proc.returncode}: {proc.stderr[-600:]}")
    assert len(ENTRY_POINTS) >= 20 and not failures, "\n".join(failures)
