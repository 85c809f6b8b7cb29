"""Multi-process (multi-host) start-up: `jax.distributed.initialize` when the config or the environment asks.

Its own module because it must run before any other JAX call, from the entry points, and knows nothing of
meshes, models or data.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from absl import logging

from alexnet_jax.errors import UserError


def _multi_process_env() -> bool:
    """Whether the environment describes a job of more than one process (as jax's cluster detection reads it)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts:
        return True
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How this process joins the others (`--config.distributed` and its companions), read once."""

    mode: str = "auto"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    cpu_collectives: str = "gloo"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> DistributedSpec:
        mode = config.get("distributed", "auto")
        if mode not in ("auto", "on", "off"):
            raise UserError(f"--config.distributed={mode!r}: choose 'auto', 'on' or 'off'")
        return cls(mode, config.get("coordinator_address", ""), config.get("num_processes", 0),
                   config.get("process_id", -1), config.get("cpu_collectives", "gloo"))


def initialize(spec: DistributedSpec) -> bool:
    """`jax.distributed.initialize` when the config or the environment asks for it; True if it ran.

    Must run before any other JAX call. `spec.mode`: 'auto' (initialize when a coordinator is
    configured or the environment describes a multi-process job: JAX_COORDINATOR_ADDRESS, a multi-host Cloud
    TPU, SLURM with several tasks, Open MPI), 'on' (always; jax detects TPU pods, SLURM, Open MPI, k8s) or
    'off'. Unset `coordinator_address` / `num_processes` / `process_id` come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID or jax's cluster detection. CPU devices talk over gloo.
    """
    mode = spec.mode
    address = spec.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if mode == "off" or (mode == "auto" and address is None and not _multi_process_env()):
        return False
    num = spec.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0) or None
    pid = spec.process_id
    if pid < 0:
        pid = int(os.environ["JAX_PROCESS_ID"]) if os.environ.get("JAX_PROCESS_ID") else None
    jax.config.update("jax_cpu_collectives_implementation", spec.cpu_collectives)
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"multi-process start-up failed ({e}); set --config.coordinator_address=HOST:PORT, "
                        "--config.num_processes and --config.process_id (or JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --config.distributed=off") from None
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
