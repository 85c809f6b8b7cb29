"""What the command lines share: `--config.key=value` overrides and one-line errors for bad flags.

`main` reads a config file and applies the overrides; `evaluate`, `predict` and `convert` take the same
`--config.key=value` flags on top of the config their checkpoint (or conversion) supplies, so one spelling works
everywhere (`--config.data_dir=...`, `--config.eval_crops=10`, `--config.mesh_shape='(2,2)'`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from alexnet_jax import default_config, xla_cpu, xla_flags

FLAGS = flags.FLAGS


def define_config_overrides() -> None:
    """`--config.key=value` for every key of the defaults, recorded as overrides (no config file)."""
    config_flags.DEFINE_config_dict("config", default_config.get_config(),
                                    "Override checkpoint config keys: --config.key=value.", lock_config=True)


def config_overrides() -> dict[str, Any]:
    """The `--config.key=value` pairs given on the command line (only those)."""
    return dict(config_flags.get_override_values(FLAGS["config"]))


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """A configs/*.py file with `key=value` overrides, parsed exactly as `main` parses `--config.key=value`
    (ml_collections' config flag on a flag set of its own: tuples, booleans and numbers spelled the same way);
    a UserError naming the bad override."""
    from alexnet_jax.errors import UserError

    values, argv = flags.FlagValues(), ["load_config", f"--config={path}", *(f"--config.{o}" for o in overrides)]
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except flags.Error as e:
        raise UserError(f"{e}") from None
    except (AttributeError, KeyError) as e:
        raise UserError(f"unknown config key {str(e).strip(chr(34) + chr(39))!r} in {list(overrides)}; the keys "
                        "are in alexnet_jax/default_config.py") from None
    return values.config


def persistent_compilation_cache() -> None:
    """JAX's persistent compilation cache in ~/.cache/alexnet_jax/jax ($XDG_CACHE_HOME/alexnet_jax/jax), unless
    JAX_COMPILATION_CACHE_DIR already names one: a second `predict` of the same checkpoint and batch compiles
    nothing. An unwritable home leaves it off. Before JAX is imported, by the environment variables JAX reads when
    it is (so `predict` reads images during that import, not after it)."""
    import os

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alexnet_jax", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    settings = {"jax_compilation_cache_dir": path}
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        settings["jax_persistent_cache_min_compile_time_secs"] = "0.5"  # (the network; not tiny programs)
    if "jax" not in sys.modules:
        os.environ.update({k.upper(): v for k, v in settings.items()})
        return
    import jax

    for key, value in settings.items():
        jax.config.update(key, float(value) if key.endswith("_secs") else value)


# XLA:CPU aborts the process when a device thread reaches a collective's rendezvous 40 s after the others, which a
# loaded machine running several simulated or real CPU devices can cause (docs/sharding.md's 2x2 quick start died
# so beside other CPU-heavy work): the tests' timeouts, for every entry point on the CPU backend.
CPU_COLLECTIVE_FLAGS = {"--xla_cpu_collective_call_terminate_timeout_seconds": "600",
                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds": "120"}
# What running without each flag costs (the line `xla_flags.add` prints when the running jaxlib lacks one).
FLAG_COSTS = {
    "--xla_cpu_collective_call_terminate_timeout_seconds": "a collective 40 s late on a loaded machine stops the run",
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds": "warnings of a slow collective come sooner",
    xla_cpu.YNNPACK_FLAG: "convolutions stay on YNNPACK: slower on CPU, docs/benchmarks.md",
}
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def _cpu_backend() -> bool:
    """The backend will be the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin is installed."""
    import importlib.util
    import os

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms == "cpu"
    return not any(importlib.util.find_spec(p) for p in ACCELERATOR_PLUGINS)


def set_xla_cpu_flags(ynnpack: str = xla_cpu.YNNPACK_WITHOUT_CONVOLUTIONS) -> None:
    """Add `CPU_COLLECTIVE_FLAGS` (the collective timeouts) and YNNPACK's share of the work (`ynnpack`; by default
    convolutions by XLA's own Eigen kernels, matmuls still by YNNPACK: YNNPACK's convolutions and their gradients
    ran 1.2-5.8x slower on the 2-core AVX2 machine, docs/notes/2026-12.md) to XLA_FLAGS, those not set already,
    before JAX starts its backends, where the backend will be the CPU. Each only where the running jaxlib knows it
    (`xla_flags.add`: an unknown XLA flag aborts the process); one line for each left out."""
    if not _cpu_backend():
        return
    xla_flags.add({**CPU_COLLECTIVE_FLAGS, xla_cpu.YNNPACK_FLAG: ynnpack}, FLAG_COSTS)


# XLA:CPU ends a collective that one device thread never reached with LOG(FATAL): its line, a native stack dump and
# SIGABRT, which no Python code in the process can intercept. A small process between the run's stderr and the
# terminal forwards everything and replaces that line and the dump with one line of ours.
STUCK_MARK = "Termination timeout for `"
STUCK_MESSAGE = ("alexnet_jax: error: a collective across the CPU devices timed out: one device thread did not reach "
                 "it within XLA's limit (12 minutes with the timeouts alexnet_jax sets; a heavily loaded machine?) "
                 "and XLA stopped the process. Rerun the same command when the machine is less "
                 "busy (or with fewer simulated devices): it resumes from the last checkpoint in --workdir.")
_STDERR_FILTER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run reports Ctrl-C and SIGTERM; the filter forwards until EOF
signal.signal(signal.SIGTERM, signal.SIG_IGN)
mark, message = sys.argv[1].encode(), sys.argv[2].encode()
tail, last, stopped = b"", b"\n", False
while chunk := os.read(0, 1 << 16):
    if stopped:
        continue  # XLA's native stack dump
    text = tail + chunk
    at = text.find(mark)
    if at < 0:
        os.write(2, chunk)
        tail, last = text[-len(mark):], chunk[-1:]
        continue
    start = text.rfind(b"\n", 0, at) + 1 - len(tail)  # the fatal line's start, in this chunk
    if start > 0:
        os.write(2, chunk[:start])
        last = chunk[start - 1:start]
    os.write(2, (b"" if last == b"\n" else b"\n") + message + b"\n")
    stopped = True
"""


def report_stuck_collectives() -> None:
    """Where this process will run several CPU devices, put `_STDERR_FILTER` between its stderr (fd 2, so XLA's
    native writes too) and the real one; before JAX starts any thread."""
    import os
    import re
    import subprocess

    count = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if not _cpu_backend() or not count or int(count[1]) < 2:
        return
    read, write = os.pipe()
    subprocess.Popen([sys.executable, "-c", _STDERR_FILTER, STUCK_MARK, STUCK_MESSAGE], stdin=read,
                     close_fds=True, start_new_session=False)
    os.close(read)
    sys.stderr.flush()
    os.dup2(write, 2)
    os.close(write)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line message instead of a trace for a bad --config override; sets the
    CPU collective timeouts first (every entry point parses its flags before touching JAX)."""
    set_xla_cpu_flags()
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"alexnet_jax: error: {e}\nSee --helpfull for the flags.")
    except (AttributeError, KeyError) as e:  # ml_collections: --config.<key> names no field
        key = str(e).strip("\"'")
        given = next((a for a in argv if a.startswith("--config.") and key in a), key)
        sys.exit(f"alexnet_jax: error: {given}: unknown config key {key!r}. The keys and their defaults are "
                 "in alexnet_jax/default_config.py.")
    except (ValueError, TypeError) as e:
        sys.exit(f"alexnet_jax: error: cannot apply the command line's config overrides: {e}")
    report_stuck_collectives()
    return rest
