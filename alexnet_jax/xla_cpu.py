"""What XLA:CPU's convolutions run on: set by the entry points (`cli`) before JAX starts its CPU backend.

XLA:CPU hands matmuls and convolutions to YNNPACK by default. On the 2-core AVX2 machine YNNPACK's convolutions,
and above all their gradients, ran 1.2-5.8x slower than XLA's own Eigen convolution kernels, which in turn beat
the Winograd and matmul formulations an earlier model used to work around YNNPACK (docs/notes/2026-12.md,
"XLA:CPU's convolution library"). YNNPACK's matmuls stay: they are faster than Eigen's. XLA reads XLA_FLAGS once,
when its CPU backend starts, so the entry points add the flag before that (`cli.set_xla_cpu_flags`); library
use (a notebook) calls the same function before its first JAX computation. The model is one program either way:
the flag only says which library runs its convolutions.
"""

from __future__ import annotations

from alexnet_jax import xla_flags

YNNPACK_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNNPACK_WITHOUT_CONVOLUTIONS = "dot"  # YNNPACK keeps the matmuls (and what it fuses into them) only
# Nothing for YNNPACK: `predict`'s forward passes of at most 50 images, where the fully connected layers' matmuls
# are memory-bound (each weight read once per pass) and Eigen's ran 2.3x faster than YNNPACK's (fc6 at 50 rows:
# 41 against 95 ms; at 200 rows YNNPACK's is the faster, 127 against 266); the whole forward 7% faster
# (docs/notes/2026-12.md).
YNNPACK_OFF = ""


def convolutions_in_ynnpack(xla_flags_value: str) -> bool:
    """Whether an XLA_FLAGS value leaves convolutions to YNNPACK: yes by default; no where it sets YNNPACK_FLAG to a
    list without 'individual_convolution'."""
    value = xla_flags.set_flags(xla_flags_value).get(YNNPACK_FLAG)
    return value is None or "individual_convolution" in value


# What library use without the entry points' flags costs (docs/benchmarks.md): the paper net's train step, batch 32,
# 227 px, on the 2-core AVX-512 EPYC.
SLOW_CONVOLUTIONS = ("XLA:CPU runs this process's convolutions on YNNPACK "
                     f"(XLA_FLAGS does not set {YNNPACK_FLAG}=dot), "
                     "~1.4x slower than on the Eigen kernels the command lines choose: call "
                     "alexnet_jax.cli.set_xla_cpu_flags() before JAX starts (as the notebook does) for their speed")
