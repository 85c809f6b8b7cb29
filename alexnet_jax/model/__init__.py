"""AlexNet in Flax, as a package: numeric kernels (`ops`), mesh-aware layers (`layers`), the network (`alexnet`).

`from alexnet_jax.model import AlexNet, ModelSpec, create_model, ...` gives the public names of all three; the shape and
multiply-add analysis of a built model is in `alexnet_jax.flops`.
"""

from alexnet_jax.model.alexnet import INITS, NORMS, VARIANTS, AlexNet, ModelSpec, Variant, create_model
from alexnet_jax.model.layers import Conv, Dense
from alexnet_jax.model.ops import (
    KERNELS,
    LRN_ALPHA,
    LRN_BETA,
    LRN_BIAS,
    LRN_DEPTH_RADIUS,
    POOL_STRIDE,
    POOL_WINDOW,
    adaptive_avg_pool,
    conv1_edge_padding,
    grouped_conv,
    local_response_norm,
    max_pool,
    pool,
    resolve_kernels,
)

__all__ = [
    "INITS",
    "KERNELS",
    "LRN_ALPHA",
    "LRN_BETA",
    "LRN_BIAS",
    "LRN_DEPTH_RADIUS",
    "NORMS",
    "POOL_STRIDE",
    "POOL_WINDOW",
    "VARIANTS",
    "AlexNet",
    "Conv",
    "Dense",
    "ModelSpec",
    "Variant",
    "adaptive_avg_pool",
    "conv1_edge_padding",
    "create_model",
    "grouped_conv",
    "local_response_norm",
    "max_pool",
    "pool",
    "resolve_kernels",
]
