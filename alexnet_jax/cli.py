"""What the command lines share: `--config.key=value` overrides and one-line errors for bad flags.

`main` reads a config file and applies the overrides; `evaluate`, `predict` and `convert` take the same
`--config.key=value` flags on top of the config their checkpoint (or conversion) supplies, so one spelling works
everywhere (`--config.data_dir=...`, `--config.eval_crops=10`, `--config.mesh_shape='(2,2)'`).
"""

from __future__ import annotations

import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

from alexnet_jax import default_config

FLAGS = flags.FLAGS


def define_config_overrides() -> None:
    """`--config.key=value` for every key of the defaults, recorded as overrides (no config file)."""
    config_flags.DEFINE_config_dict("config", default_config.get_config(),
                                    "Override checkpoint config keys: --config.key=value.", lock_config=True)


def config_overrides() -> dict[str, Any]:
    """The `--config.key=value` pairs given on the command line (only those)."""
    return dict(config_flags.get_override_values(FLAGS["config"]))


# XLA:CPU aborts the process when a device thread reaches a collective's rendezvous 40 s after the others, which a
# loaded machine running several simulated or real CPU devices can cause (docs/sharding.md's 2x2 quick start died
# so beside other CPU-heavy work): the tests' timeouts, for every entry point on the CPU backend.
CPU_COLLECTIVE_FLAGS = {"--xla_cpu_collective_call_terminate_timeout_seconds": "600",
                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds": "120"}
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def cpu_collective_timeouts() -> None:
    """Add `CPU_COLLECTIVE_FLAGS` to XLA_FLAGS (those not set already) before JAX starts its backends, where the
    backend will be the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin is installed (another XLA build
    may not know these flags)."""
    import importlib.util
    import os

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and platforms != "cpu":
        return
    if not platforms and any(importlib.util.find_spec(p) for p in ACCELERATOR_PLUGINS):
        return
    flags_now = os.environ.get("XLA_FLAGS", "")
    extra = [f"{k}={v}" for k, v in CPU_COLLECTIVE_FLAGS.items() if k not in flags_now]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags_now, *extra]).strip()


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line message instead of a trace for a bad --config override; sets the
    CPU collective timeouts first (every entry point parses its flags before touching JAX)."""
    cpu_collective_timeouts()
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"alexnet_jax: error: {e}\nSee --helpfull for the flags.")
    except (AttributeError, KeyError) as e:  # ml_collections: --config.<key> names no field
        key = str(e).strip("\"'")
        given = next((a for a in argv if a.startswith("--config.") and key in a), key)
        sys.exit(f"alexnet_jax: error: {given}: unknown config key {key!r}. The keys and their defaults are "
                 "in alexnet_jax/default_config.py.")
    except (ValueError, TypeError) as e:
        sys.exit(f"alexnet_jax: error: cannot apply the command line's config overrides: {e}")
