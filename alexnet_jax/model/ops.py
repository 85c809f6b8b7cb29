"""Pure-JAX numeric kernels of AlexNet, with their hand-written gradients: what the layers compute, without Flax and
without any mesh.

The paper's local response normalisation (section 3.3), cuda-convnet's conv1 edge padding, grouped convolution as one
convolution per group, the paper's overlapping 3/2 max-pooling and torchvision's adaptive average pooling.

`kernels` chooses how LRN and pooling are differentiated (`resolve_kernels`): 'cpu_tuned' (LRN with a hand-written
VJP, ~3x faster than autodiff of its formula on XLA:CPU; pooling as two 1-D passes whose gradients are selects
interleaved, instead of select-and-scatter, which XLA:CPU runs ~9x slower), 'native' (XLA's own `reduce_window`
pooling and autodiff of the LRN formula, what cuDNN / XLA's fused kernels on a GPU or TPU are tuned for), or 'auto'
(cpu_tuned on CPU, native elsewhere). Both compute the same function to float32 rounding; tests compare values and
gradients. Convolutions are XLA's own either way: which CPU library runs them is XLA_FLAGS' choice
(`alexnet_jax.xla_cpu`), not the model's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

KERNELS = ("auto", "native", "cpu_tuned")


def resolve_kernels(kernels: str) -> str:
    """'auto' -> 'cpu_tuned' on the CPU backend, 'native' elsewhere (docs/benchmarks.md says why)."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {KERNELS}")
    if kernels == "auto":
        return "cpu_tuned" if jax.default_backend() == "cpu" else "native"
    return kernels

# The paper's LRN constants (section 3.3): k=2, n=5, alpha=1e-4, beta=0.75; alpha is NOT divided by n.
LRN_DEPTH_RADIUS = 2
LRN_BIAS = 2.0
LRN_ALPHA = 1e-4
LRN_BETA = 0.75


def _window_sum(v: jax.Array, depth_radius: int, groups: int) -> jax.Array:
    """Sum over channels c-r..c+r, never crossing a group boundary (zero padding at the edges).

    As 2r+1 shifted slices of the padded maps, which XLA fuses with the LRN around them; a `reduce_window` over the
    channels made the quick start's train step ~10% slower (docs/benchmarks.md)."""
    grouped = v.reshape(*v.shape[:-1], groups, v.shape[-1] // groups)
    size = grouped.shape[-1]
    padded = jnp.pad(grouped, [(0, 0)] * (grouped.ndim - 1) + [(depth_radius, depth_radius)])
    sums = padded[..., :size]
    for shift in range(1, 2 * depth_radius + 1):
        sums = sums + padded[..., shift:shift + size]
    return sums.reshape(v.shape)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _lrn(x: jax.Array, depth_radius: int, bias: float, alpha: float, beta: float, groups: int) -> jax.Array:
    return _lrn_fwd(x, depth_radius, bias, alpha, beta, groups)[0]


def _neg_power(d: jax.Array, beta: float) -> jax.Array:
    """d ** -beta; for the paper's beta = 0.75 as rsqrt(d) * rsqrt(sqrt(d)), ~5x cheaper than pow on CPU."""
    if beta == 0.75:
        return jax.lax.rsqrt(d) * jax.lax.rsqrt(jnp.sqrt(d))
    return jnp.power(d, -beta)


def _lrn_fwd(x, depth_radius, bias, alpha, beta, groups):
    d = bias + alpha * _window_sum(x * x, depth_radius, groups)
    scale = _neg_power(d, beta)
    return x * scale, (x, d, scale)


def _lrn_bwd(depth_radius, bias, alpha, beta, groups, res, g):
    # dy_c/dx_j = [c == j] d_c^-beta - 2 alpha beta x_j x_c d_c^(-beta-1) [j in window(c)]; the window relation
    # is symmetric, so the second term is one more window sum. Autodiff of the forward is ~3x slower on CPU.
    x, d, scale = res
    return (g * scale - 2.0 * alpha * beta * x * _window_sum(g * x * scale / d, depth_radius, groups),)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def local_response_norm(
    x: jax.Array,
    depth_radius: int = LRN_DEPTH_RADIUS,
    bias: float = LRN_BIAS,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
    groups: int = 1,
    kernels: str = "cpu_tuned",
) -> jax.Array:
    """b[c] = a[c] / (bias + alpha * sum_{|c'-c|<=r} a[c']^2) ** beta over the last (channel) axis.

    Same formula as `tf.nn.local_response_normalization` (alpha not divided by the window size, unlike
    PyTorch/Caffe). With `groups > 1` the window never crosses a group boundary: in the paper's net each
    GPU normalises only its own maps (cuda-convnet's rnorm1a/rnorm1b). Computed in float32 at least (bfloat16 maps
    too; float64 ones in float64), with a hand-written gradient (tests compare it with autodiff of the formula,
    which `kernels='native'` uses).
    """
    channels = x.shape[-1]
    if channels % groups:
        raise ValueError(f"LRN: {channels} channels do not split into {groups} groups")
    lrn = _lrn if resolve_kernels(kernels) == "cpu_tuned" else lambda *a: _lrn_fwd(*a)[0]
    y = lrn(x.astype(jnp.promote_types(x.dtype, jnp.float32)), depth_radius, float(bias), float(alpha), float(beta),
            groups)
    return y.astype(x.dtype)


def conv1_edge_padding(size: int, kernel: int, stride: int) -> int:
    """Bottom/right zero padding of cuda-convnet's conv1: 1 + ceil((size - kernel) / stride) outputs.

    224 px inputs get 3 px (55x55 maps, the paper's figure); 227 px inputs (Caffe) need none.
    """
    outputs = 1 + math.ceil((size - kernel) / stride)
    return (outputs - 1) * stride + kernel - size


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int, strides: int,
                 padding: Sequence[tuple[int, int]]) -> jax.Array:
    """What `conv_general_dilated(..., feature_group_count=groups)` computes (NHWC, HWIO), as one convolution per
    channel slice, concatenated. XLA:CPU runs that ~3x faster than `feature_group_count`, it is what lets the layers
    place each group on its own device, and with `feature_group_count` XLA's SPMD partitioner all-gathers the whole
    batch around a batch-sharded grouped convolution (docs/sharding.md)."""
    outs = [jax.lax.conv_general_dilated(xi, ki, (strides, strides), list(padding),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
            for xi, ki in zip(jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1), strict=True)]
    return outs[0] if groups == 1 else jnp.concatenate(outs, axis=-1)


POOL_WINDOW, POOL_STRIDE = 3, 2


def _window_views(x: jax.Array, axis: int) -> list[jax.Array]:
    """The 3 strided views along `axis` whose elementwise maximum is the 1-D pooling's output."""
    out = (x.shape[axis] - POOL_WINDOW) // POOL_STRIDE + 1
    return [jax.lax.slice_in_dim(x, i, i + POOL_STRIDE * (out - 1) + 1, POOL_STRIDE, axis) for i in range(POOL_WINDOW)]


def _pool_axis(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Max over windows of 3 along `axis` at stride 2: the values and which of the 3 (the first maximum).

    One variadic reduction (value, index) over the 3 stacked strided views, not a chain of selects: XLA:CPU does not
    fuse a tuple-shaped reduction into its consumers, so each map and its argmax are computed once (with selects the
    comparison, and the LRN and conv bias before it, were fused into and recomputed by every consumer)."""
    views = jnp.stack(_window_views(x, axis))
    index = jax.lax.broadcasted_iota(jnp.int8, views.shape, 0)

    def first_max(a, b):  # (value, index) pairs: the larger value; on a tie the earlier window position
        take_b = (b[0] > a[0]) | ((b[0] == a[0]) & (b[1] < a[1]))
        return jnp.where(take_b, b[0], a[0]), jnp.where(take_b, b[1], a[1])

    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(POOL_WINDOW, jnp.int8))
    return jax.lax.reduce((views, index), init, first_max, (0,))


def _unpool_axis(g: jax.Array, arg: jax.Array, n: int, axis: int) -> jax.Array:
    """`_pool_axis`'s gradient: each output's gradient back to the input it took, `n` inputs along `axis`.

    Input 2m is position 0 of window m and position 2 of window m-1, input 2m+1 position 1 of window m: the even
    and odd inputs are two sums of selects, interleaved by a reshape (no scatter, no pad with holes)."""
    out, zero = g.shape[axis], jnp.zeros((), g.dtype)
    took = [jnp.where(arg == k, g, zero) for k in range(POOL_WINDOW)]

    def pad(v: jax.Array, before: int, after: int) -> jax.Array:
        return jax.lax.pad(v, zero, [(before, after, 0) if a == axis else (0, 0, 0) for a in range(v.ndim)])

    even = pad(took[0], 0, 1) + pad(took[2], 1, 0)  # inputs 0, 2, ..., 2 * out
    odd = pad(took[1], 0, 1)  # inputs 1, 3, ..., 2 * out + 1 (the last has no window)
    both = jnp.stack([even, odd], axis=axis + 1)
    both = both.reshape(*g.shape[:axis], 2 * (out + 1), *g.shape[axis + 1:])
    return jax.lax.slice_in_dim(both, 0, n, axis=axis)  # n is 2 * out + 2 (even) or 2 * out + 1 (odd)


@jax.custom_vjp
def max_pool(x: jax.Array) -> jax.Array:
    """The paper's overlapping pooling: 3x3 windows, stride 2, no padding (NHWC).

    Same values and gradients as `nn.max_pool(x, (3, 3), (2, 2), 'VALID')`, computed as two 1-D poolings, along the
    width and then the height. The first maximum of a window in row-major order gets the gradient, as XLA's
    select-and-scatter does: the height pass picks the first row holding the window's maximum, the width pass the
    first column of that row holding it. XLA:CPU runs select-and-scatter ~9x slower, and the two passes (3 views
    each, their gradients interleaved) cost the quick start's train step a third less than the 9 views of one
    3x3 pass did (docs/benchmarks.md). Undifferentiated (evaluation, predict) it is two passes of plain maxima:
    the argmax reduction, fused with the LRN before it, ran unvectorised and made evaluation ~1.4x slower.
    """
    for axis in (2, 1):
        first, second, third = _window_views(x, axis)
        x = jnp.maximum(jnp.maximum(first, second), third)
    return x


def pool(x: jax.Array, kernels: str = "cpu_tuned") -> jax.Array:
    """The paper's 3x3/2 max-pooling: `max_pool` ('cpu_tuned') or XLA's `reduce_window` ('native')."""
    if resolve_kernels(kernels) == "cpu_tuned":
        return max_pool(x)
    window, strides = (1, POOL_WINDOW, POOL_WINDOW, 1), (1, POOL_STRIDE, POOL_STRIDE, 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, "VALID")


def _max_pool_fwd(x: jax.Array):
    rows, arg_w = _pool_axis(x, 2)
    pooled, arg_h = _pool_axis(rows, 1)
    return pooled, (arg_w, arg_h, x.shape[1], x.shape[2])


def _max_pool_bwd(res, g: jax.Array):
    arg_w, arg_h, h, w = res
    return (_unpool_axis(_unpool_axis(g, arg_h, h, 1), arg_w, w, 2),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torchvision's AdaptiveAvgPool2d: bin i covers [floor(i*H/size), ceil((i+1)*H/size))."""
    h, w = x.shape[1:3]
    if (h, w) == (size, size):
        return x
    rows = []
    for i in range(size):
        r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
        cols = []
        for j in range(size):
            c0, c1 = (j * w) // size, -((-(j + 1) * w) // size)
            cols.append(jnp.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)
