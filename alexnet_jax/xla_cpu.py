"""What XLA:CPU's convolutions run on, decided once: set by the entry points (`cli`), read by the model's kernels.

XLA:CPU hands matmuls and convolutions to YNNPACK by default. On the 2-core AVX2 machine YNNPACK's convolutions,
and above all their gradients, ran 1.2-5.8x slower than XLA's own Eigen convolution kernels, which in turn beat
the Winograd and matmul formulations `model/ops.py` uses while YNNPACK has them (docs/performance.md, "XLA:CPU's
convolution library"). YNNPACK's matmuls stay: they are faster than Eigen's. XLA reads XLA_FLAGS once, when its
CPU backend starts, so the entry points add the flag before that (`cli.cpu_collective_timeouts`) and the model
reads the same variable to choose its formulation; library use without the flag keeps XLA's default and the
formulations tuned for it. Either way the function computed is the same to float32 rounding.
"""

from __future__ import annotations

import os

from alexnet_jax import xla_flags

YNNPACK_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNNPACK_WITHOUT_CONVOLUTIONS = "dot"  # YNNPACK keeps the matmuls (and what it fuses into them) only
# Nothing for YNNPACK: `predict`'s forward passes of at most 50 images, where the fully connected layers' matmuls
# are memory-bound (each weight read once per pass) and Eigen's ran 2.3x faster than YNNPACK's (fc6 at 50 rows:
# 41 against 95 ms; at 200 rows YNNPACK's is the faster, 127 against 266); the whole forward 7% faster
# (docs/performance.md).
YNNPACK_OFF = ""


def convolutions_in_ynnpack() -> bool:
    """Whether XLA:CPU gives convolutions to YNNPACK: yes by default; no when XLA_FLAGS sets YNNPACK_FLAG to a
    list without 'individual_convolution'."""
    value = xla_flags.set_flags(os.environ.get("XLA_FLAGS", "")).get(YNNPACK_FLAG)
    return value is None or "individual_convolution" in value
