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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line message instead of a trace for a bad --config override."""
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
