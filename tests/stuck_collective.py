"""A collective that one device thread reaches long after the other (tests/test_failures.py): device 0 works
first (~80 s of matmuls on a quiet 2-core machine, so the delay does not depend on the machine's load); XLA warns
after 1 s and ends the process 2 s later. Through `cli.report_stuck_collectives`, as every entry point runs."""

import os
import sys

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=1"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=2")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alexnet_jax import cli  # noqa: E402

cli.set_xla_cpu_flags()
cli.report_stuck_collectives()
print("before the collective", file=sys.stderr, flush=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

mesh = jax.make_mesh((2,), ("d",))


def late_sum(x):
    def slow(x):
        return jax.lax.fori_loop(0, 200_000, lambda _, y: jnp.tanh(y @ y.T @ y / 100.0), x)

    return jax.lax.psum(jax.lax.cond(jax.lax.axis_index("d") == 0, slow, lambda x: x, x), "d")


f = jax.jit(jax.shard_map(late_sum, mesh=mesh, in_specs=P("d"), out_specs=P()))
print(float(f(jax.device_put(jnp.ones((400, 200)), NamedSharding(mesh, P("d")))).sum()))
