"""AlexNet in Flax: the NIPS 2012 network and the variants users ask for.

The default `AlexNet()` is the paper's two-GPU network exactly (Krizhevsky et al. 2012, section 3.5):
conv1 96@11x11/4, local response normalisation with the paper's formula, overlapping 3/2 max-pooling,
conv2/conv4/conv5 split in two groups (each GPU's kernels only see that GPU's maps), conv3 and the FC
layers connected across groups, dropout 0.5 in fc6/fc7 and the paper's initialisation.

Parameters are stored as ordinary Flax trees (`conv1..conv5`, `fc6..fc8`, each `kernel`/`bias`). A grouped
kernel has the shape `nn.Conv(feature_group_count=2)` would give it, (kh, kw, cin/groups, cout), but the
convolution is computed as one convolution per group: XLA:CPU runs that ~3x faster than a
`feature_group_count` convolution, and it is what lets `sharding.py` place each group on its own device.

Given a `mesh` with a 'model' axis of size > 1 and `strategy='paper'`, every conv and FC layer runs as a
`jax.shard_map` that says who talks to whom, as on the paper's two GPUs: each device holds its slice of
every layer's kernels (output channels / neurons), conv2/conv4/conv5 read only the maps on their own device
(no communication), conv3 and fc6/fc7 all-gather their input maps over 'model', fc8 sums its two halves.
The SPMD partitioner alone does not find that pattern (it all-gathers around a sharded grouped conv).
With `strategy='owt'` (Krizhevsky 2014) the convs are data-parallel over every device and only the FC layers
are split. The parameter tree and the numbers are the same with or without a mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Dtype = Any

# The paper's LRN constants (section 3.3): k=2, n=5, alpha=1e-4, beta=0.75; alpha is NOT divided by n.
LRN_DEPTH_RADIUS = 2
LRN_BIAS = 2.0
LRN_ALPHA = 1e-4
LRN_BETA = 0.75


def _window_sum(v: jax.Array, depth_radius: int, groups: int) -> jax.Array:
    """Sum over channels c-r..c+r, never crossing a group boundary (zero padding at the edges)."""
    grouped = v.reshape(*v.shape[:-1], groups, v.shape[-1] // groups)
    window = (1,) * (grouped.ndim - 1) + (2 * depth_radius + 1,)
    padding = [(0, 0)] * (grouped.ndim - 1) + [(depth_radius, depth_radius)]
    sums = jax.lax.reduce_window(grouped, 0.0, jax.lax.add, window, (1,) * grouped.ndim, padding)
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
) -> jax.Array:
    """b[c] = a[c] / (bias + alpha * sum_{|c'-c|<=r} a[c']^2) ** beta over the last (channel) axis.

    Same formula as `tf.nn.local_response_normalization` (alpha not divided by the window size, unlike
    PyTorch/Caffe). With `groups > 1` the window never crosses a group boundary: in the paper's net each
    GPU normalises only its own maps (cuda-convnet's rnorm1a/rnorm1b). Computed in float32, with a
    hand-written gradient (tests compare it with autodiff of the formula).
    """
    channels = x.shape[-1]
    if channels % groups:
        raise ValueError(f"LRN: {channels} channels do not split into {groups} groups")
    y = _lrn(x.astype(jnp.float32), depth_radius, float(bias), float(alpha), float(beta), groups)
    return y.astype(x.dtype)


def conv1_edge_padding(size: int, kernel: int, stride: int) -> int:
    """Bottom/right zero padding of cuda-convnet's conv1: 1 + ceil((size - kernel) / stride) outputs.

    224 px inputs get 3 px (55x55 maps, the paper's figure); 227 px inputs (Caffe) need none.
    """
    outputs = 1 + math.ceil((size - kernel) / stride)
    return (outputs - 1) * stride + kernel - size


@dataclasses.dataclass(frozen=True)
class Variant:
    """The shape of one AlexNet family member."""

    widths: tuple[int, int, int, int, int]
    fc_width: int
    conv1_kernel: int
    conv1_stride: int
    conv1_padding: str | int  # 'cuda-convnet' (bottom/right edge, see above) or symmetric pixels
    conv2_kernel: int
    default_norm: str
    default_groups: int
    adaptive_pool: int | None = None  # torchvision's AdaptiveAvgPool2d((6, 6))
    dropout_before_fc: bool = False  # torchvision: dropout on fc6's and fc7's inputs


VARIANTS: dict[str, Variant] = {
    # Krizhevsky et al. 2012, Figure 2: 60,965,224 parameters at 1000 classes.
    "paper": Variant((96, 256, 384, 384, 256), 4096, 11, 4, "cuda-convnet", 5, "lrn", 2),
    # torchvision.models.alexnet, Krizhevsky 2014 "one weird trick": 61,100,840 parameters.
    "owt": Variant(
        (64, 192, 384, 256, 256), 4096, 11, 4, 2, 5, "none", 1, adaptive_pool=6, dropout_before_fc=True
    ),
    # The same topology for 28-32 px inputs (FashionMNIST, CIFAR): stride-1 conv1, narrower layers.
    "small": Variant((64, 128, 192, 192, 128), 512, 3, 1, 1, 5, "lrn", 2),
}

NORMS = ("lrn", "batchnorm", "none")
# How layers are placed on a mesh ('data', 'model'); see sharding.py for the parameter rules of each.
STRATEGIES = ("paper", "owt", "data_parallel")
DATA, MODEL = "data", "model"


def model_axis_size(mesh: Mesh | None) -> int:
    """How many devices split each layer (1 without a mesh or without a 'model' axis)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(MODEL, 1))


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int, strides: int,
                 padding: Sequence[tuple[int, int]]) -> jax.Array:
    """`groups` convolutions on channel slices, concatenated: what `feature_group_count=groups` computes."""
    xs = jnp.split(x, groups, axis=-1)
    ks = jnp.split(kernel, groups, axis=-1)
    if strides > 1:  # conv1: XLA:CPU's strided convolution is ~3x slower than the same sums as matmuls
        outs = [strided_conv_as_matmuls(xi, ki, (strides, strides), padding) for xi, ki in zip(xs, ks, strict=True)]
    else:
        outs = [
            jax.lax.conv_general_dilated(xi, ki, (1, 1), list(padding), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            for xi, ki in zip(xs, ks, strict=True)
        ]
    return outs[0] if groups == 1 else jnp.concatenate(outs, axis=-1)


INITS = ("paper", "he")


def _kernel_init(init: str) -> nn.initializers.Initializer:
    if init == "paper":
        return nn.initializers.normal(stddev=0.01)
    return nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He et al. 2015, for ReLU


class Conv(nn.Module):
    """A 2-D convolution whose `groups` are computed as separate convolutions on channel slices.

    The parameters are those of `nn.Conv(features, feature_group_count=groups)`. With a `mesh` whose
    'model' axis m > 1, each device computes its features/m output channels in a `shard_map`: from its own
    input maps when those are all its kernels read (groups divisible by m), else after all-gathering them.
    `split_input=False` means the input is not split over 'model' (conv1 reads the whole image).
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
    groups: int = 1
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    mesh: Mesh | None = None
    split_input: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]  # the global array: shard_map below hands each device its slice
        if cin % self.groups or self.features % self.groups:
            raise ValueError(
                f"{self.name}: {cin} input and {self.features} output channels do not split into "
                f"{self.groups} groups"
            )
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, cin // self.groups, self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if not self._sharded():
            return grouped_conv(x, kernel, self.groups, self.strides, self.padding) + bias
        return jax.shard_map(
            self._local,
            mesh=self.mesh,
            in_specs=(P(DATA, None, None, MODEL if self.split_input else None), P(None, None, None, MODEL),
                      P(MODEL)),
            out_specs=P(DATA, None, None, MODEL),
        )(x, kernel, bias)

    def _sharded(self) -> bool:
        return model_axis_size(self.mesh) > 1

    def _local(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """One device's share: its output channels, from the input maps they are connected to."""
        m, groups = model_axis_size(self.mesh), self.groups
        if not self.split_input:  # conv1: every device sees the whole image
            local_groups = groups
        elif groups % m == 0:  # the paper's grouped layers: this device's maps are all its kernels read
            local_groups = groups // m
        else:  # connected across devices (conv3; or a group spread over several devices)
            x = jax.lax.all_gather(x, MODEL, axis=3, tiled=True)
            if groups > 1:  # m is a multiple of groups (checked in sharding.py): keep this device's group
                per = x.shape[-1] // groups
                group = jax.lax.axis_index(MODEL) // (m // groups)
                x = jax.lax.dynamic_slice_in_dim(x, group * per, per, axis=3)
            local_groups = 1
        return grouped_conv(x, kernel, local_groups, self.strides, self.padding) + bias


class Dense(nn.Module):
    """`nn.Dense` (same parameters, same numbers) that can run split over a mesh's 'model' axis.

    `split='column'`: each device holds a slice of the neurons (kernel columns) and all-gathers its input
    first when the input arrives split (`split_input`); `split='row'`: each device holds the rows that read
    its slice of the input and the partial products are summed over 'model'. Inputs of rank > 2 are
    flattened (after the gather, so the feature order is that of the whole layer).
    """

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    mesh: Mesh | None = None
    split: str = "column"
    split_input: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m = model_axis_size(self.mesh)
        sharded = m > 1
        in_features = math.prod(x.shape[1:])
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if not sharded:
            return jnp.dot(x.reshape(x.shape[0], -1), kernel) + bias
        x_spec = P(DATA, *([None] * (x.ndim - 2)), MODEL if self.split_input else None)
        if self.split == "row":
            if not self.split_input:
                raise ValueError(f"{self.name}: a row-split layer reads an input split over '{MODEL}'")

            def row(x, kernel, bias):
                return jax.lax.psum(jnp.dot(x, kernel), MODEL) + bias

            return jax.shard_map(row, mesh=self.mesh, in_specs=(x_spec, P(MODEL, None), P()),
                                 out_specs=P(DATA, None))(x, kernel, bias)

        def column(x, kernel, bias):
            if self.split_input:
                x = jax.lax.all_gather(x, MODEL, axis=x.ndim - 1, tiled=True)
            return jnp.dot(x.reshape(x.shape[0], -1), kernel) + bias

        return jax.shard_map(column, mesh=self.mesh, in_specs=(x_spec, P(None, MODEL), P(MODEL)),
                             out_specs=P(DATA, MODEL))(x, kernel, bias)


def strided_conv_as_matmuls(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Sequence[tuple[int, int]]
) -> jax.Array:
    """The same convolution as `lax.conv_general_dilated(x, kernel, strides, padding)` (NHWC, HWIO), as matmuls.

    For conv1 (11x11/4 on 3 channels) XLA:CPU's convolution, and above all its kernel gradient, is ~3x slower
    than PyTorch's (docs/performance.md). Space-to-depth turns it into a stride-1 convolution on s*s*C
    channels with a ceil(k/s)-tap kernel (zero-padded to a multiple of the stride); with the rows outermost,
    (H, N, W, C), each kernel row is one matmul over a contiguous slice of the column-shifted input, so the
    patches are only built kw/s-fold, and autodiff of the matmuls gives the kernel gradient as matmuls too.
    """
    n, h, w, c = x.shape
    kh, kw, _, cout = kernel.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    th, tw = -(-kh // sh), -(-kw // sw)  # kernel taps in units of the stride
    hb, wb = oh - 1 + th, ow - 1 + tw  # input blocks read; rows past the last block meet only zero taps
    zero = jnp.zeros((), x.dtype)
    x = jax.lax.pad(x, zero, [(0, 0, 0), (pt, hb * sh - h - pt, 0), (pl, wb * sw - w - pl, 0), (0, 0, 0)])
    x = x.reshape(n, hb, sh, wb, sw, c).transpose(1, 0, 3, 2, 4, 5).reshape(hb, n, wb, sh * sw * c)
    cols = jnp.concatenate([x[:, :, j : j + ow] for j in range(tw)], axis=-1)  # (hb, n, ow, tw*sh*sw*c)
    k = jnp.pad(kernel, [(0, th * sh - kh), (0, tw * sw - kw), (0, 0), (0, 0)])
    k = k.reshape(th, sh, tw, sw, c, cout).transpose(0, 2, 1, 3, 4, 5).reshape(th, tw * sh * sw * c, cout)
    y = None
    for i in range(th):
        part = cols[i : i + oh].reshape(oh * n * ow, -1) @ k[i]
        y = part if y is None else y + part
    return y.reshape(oh, n, ow, cout).transpose(1, 0, 2, 3)


POOL_WINDOW, POOL_STRIDE = 3, 2


def _pool_slices(x: jax.Array):
    """The 9 strided views whose elementwise max is the pooled map, in row-major window order."""
    n, h, w, c = x.shape
    oh, ow = (h - POOL_WINDOW) // POOL_STRIDE + 1, (w - POOL_WINDOW) // POOL_STRIDE + 1
    for i in range(POOL_WINDOW):
        for j in range(POOL_WINDOW):
            end = (n, i + POOL_STRIDE * (oh - 1) + 1, j + POOL_STRIDE * (ow - 1) + 1, c)
            yield i, j, jax.lax.slice(x, (0, i, j, 0), end, (1, POOL_STRIDE, POOL_STRIDE, 1))


@jax.custom_vjp
def max_pool(x: jax.Array) -> jax.Array:
    """The paper's overlapping pooling: 3x3 windows, stride 2, no padding (NHWC).

    Same values and gradients as `nn.max_pool(x, (3, 3), (2, 2), 'VALID')` (the first maximum of a window
    gets the gradient, as XLA's select-and-scatter does), but the backward pass is 9 strided pads instead
    of select-and-scatter, which XLA:CPU runs ~9x slower.
    """
    return _max_pool_fwd(x)[0]


def _max_pool_fwd(x: jax.Array):
    best = arg = None
    for k, (_, _, view) in enumerate(_pool_slices(x)):
        if best is None:
            best, arg = view, jnp.zeros(view.shape, jnp.int8)
        else:
            better = view > best  # strict: ties keep the earlier position
            best = jnp.where(better, view, best)
            arg = jnp.where(better, jnp.int8(k), arg)
    return best, (arg, x.shape)


def _max_pool_bwd(res, g: jax.Array):
    arg, shape = res
    h, w = shape[1:3]
    oh, ow = g.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    grad = None
    for k in range(POOL_WINDOW * POOL_WINDOW):
        i, j = divmod(k, POOL_WINDOW)
        part = jnp.where(arg == k, g, zero)
        pads = [(0, 0, 0), (i, h - i - POOL_STRIDE * (oh - 1) - 1, POOL_STRIDE - 1),
                (j, w - j - POOL_STRIDE * (ow - 1) - 1, POOL_STRIDE - 1), (0, 0, 0)]
        part = jax.lax.pad(part, zero, pads)
        grad = part if grad is None else grad + part
    return (grad,)


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


class AlexNet(nn.Module):
    """AlexNet; `apply(variables, images_nhwc, train=bool, rngs={'dropout': key})` returns logits.

    Attributes:
      num_classes: size of fc8.
      variant: 'paper' (2012), 'owt' (torchvision / "one weird trick") or 'small' (28-32 px inputs).
      norm: 'lrn' (paper), 'batchnorm' (after every conv, before ReLU) or 'none'; None = the variant's.
      groups: 2 (paper: conv2/4/5 see only their GPU's maps) or 1; None = the variant's.
      init_scheme: 'paper' (N(0, 0.01) weights, bias 1 in conv2/4/5 and fc6/fc7) or 'he' (He-normal for the
        ReLU layers, LeCun-normal for fc8, zero biases).
      widths / fc_width: override the variant's conv widths and hidden FC width.
      dtype: compute dtype (e.g. bfloat16); parameters stay `param_dtype`, logits are float32.
      mesh / strategy: run on a ('data', 'model') mesh with the paper's split of every layer ('paper'),
        data-parallel convs and split FC layers ('owt') or nothing split ('data_parallel'). Only a
        'model' axis > 1 changes the computation; the parameters and numbers stay those of `mesh=None`.
    """

    num_classes: int = 1000
    variant: str = "paper"
    norm: str | None = None
    groups: int | None = None
    init_scheme: str = "paper"
    dropout_rate: float = 0.5
    widths: tuple[int, ...] | None = None
    fc_width: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    mesh: Mesh | None = None
    strategy: str = "paper"

    @property
    def spec(self) -> Variant:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown AlexNet variant {self.variant!r}; choose one of {sorted(VARIANTS)}")
        return VARIANTS[self.variant]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        spec = self.spec
        norm = spec.default_norm if self.norm is None else self.norm
        groups = spec.default_groups if self.groups is None else self.groups
        widths = tuple(self.widths or spec.widths)
        fc_width = self.fc_width or spec.fc_width
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        if self.init_scheme not in INITS:
            raise ValueError(f"unknown init_scheme {self.init_scheme!r}; choose one of {INITS}")
        if x.ndim != 4:
            raise ValueError(f"AlexNet expects NHWC images, got shape {x.shape}")

        kinit = _kernel_init(self.init_scheme)
        one = nn.initializers.ones if self.init_scheme == "paper" else nn.initializers.zeros
        zero = nn.initializers.zeros
        common = dict(kernel_init=kinit, dtype=self.dtype, param_dtype=self.param_dtype)

        def normalise(y: jax.Array, index: int, lrn: bool) -> jax.Array:
            if norm == "batchnorm":
                y = nn.BatchNorm(
                    use_running_average=not train, momentum=0.9, epsilon=1e-5,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"bn{index}",
                )(y)
            y = nn.relu(y)
            if norm == "lrn" and lrn:
                # conv1's two halves live on different GPUs in the paper, so LRN stays within a group.
                y = local_response_norm(y, groups=groups)
            return y

        x = x.astype(self.dtype)
        k1, s1 = spec.conv1_kernel, spec.conv1_stride
        if spec.conv1_padding == "cuda-convnet":
            ph, pw = conv1_edge_padding(x.shape[1], k1, s1), conv1_edge_padding(x.shape[2], k1, s1)
            pad1 = ((0, ph), (0, pw))
        else:
            p = int(spec.conv1_padding)
            pad1 = ((p, p), (p, p))
        p2 = spec.conv2_kernel // 2
        same3 = ((1, 1), (1, 1))

        def stage(name: str, y: jax.Array) -> jax.Array:
            self.sow("intermediates", name, y, reduce_fn=lambda _, new: new)
            return y

        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        # Model parallelism only at apply time: init's batch of 1 cannot be split, and the parameters
        # (global shapes) are the same either way.
        split = model_axis_size(self.mesh) > 1 and self.strategy != "data_parallel" and not self.is_initializing()
        conv_mesh = self.mesh if split and self.strategy == "paper" else None
        fc_mesh = self.mesh if split else None
        conv = partial(Conv, mesh=conv_mesh, **common)

        with jax.named_scope("conv1"):
            x = stage("conv1_out", conv(widths[0], k1, s1, pad1, 1, bias_init=zero, name="conv1",
                                        split_input=False)(x))
            x = stage("pool1", max_pool(normalise(x, 1, lrn=True)))
        with jax.named_scope("conv2"):
            x = conv(widths[1], spec.conv2_kernel, 1, ((p2, p2), (p2, p2)), groups, bias_init=one, name="conv2")(x)
            x = stage("pool2", max_pool(normalise(stage("conv2_out", x), 2, lrn=True)))
        with jax.named_scope("conv3"):
            x = stage("conv3_out", conv(widths[2], 3, 1, same3, 1, bias_init=zero, name="conv3")(x))
            x = normalise(x, 3, lrn=False)
        with jax.named_scope("conv4"):
            x = stage("conv4_out", conv(widths[3], 3, 1, same3, groups, bias_init=one, name="conv4")(x))
            x = normalise(x, 4, lrn=False)
        with jax.named_scope("conv5"):
            x = stage("conv5_out", conv(widths[4], 3, 1, same3, groups, bias_init=one, name="conv5")(x))
            x = stage("pool5", max_pool(normalise(x, 5, lrn=False)))
            if spec.adaptive_pool:
                x = adaptive_avg_pool(x, spec.adaptive_pool)

        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        dense = partial(Dense, kernel_init=kinit, dtype=self.dtype, param_dtype=self.param_dtype, mesh=fc_mesh)
        # Split FC layers: fc6 and fc7 hold slices of the neurons (fc6 gathers the maps it reads when the
        # convs were split too), fc8 sums the partial products of its rows. Flattening happens inside fc6.
        conv_split = conv_mesh is not None
        if fc_mesh is not None and not conv_split:  # owt: the conv tower ran on every device's own images;
            # gather the batch over 'model' after pool5 (pinning pool5 first keeps the gather off the larger
            # conv5 maps, where the partitioner would otherwise move it).
            with jax.named_scope("fc6"):
                x = jax.lax.with_sharding_constraint(x, NamedSharding(fc_mesh, P((DATA, MODEL))))
                x = jax.lax.with_sharding_constraint(x, NamedSharding(fc_mesh, P(DATA)))
        if fc_mesh is None:
            x = x.reshape(x.shape[0], -1)
        layers = (("fc6", fc_width, "column", conv_split), ("fc7", fc_width, "column", True),
                  ("fc8", self.num_classes, "row", True))
        for name, features, how, split_input in layers:
            with jax.named_scope(name):
                hidden = name != "fc8"
                if hidden and spec.dropout_before_fc:
                    x = dropout(x.reshape(x.shape[0], -1)).reshape(x.shape)
                extra = {}
                if not hidden and self.init_scheme == "he":  # no ReLU after fc8: LeCun scaling keeps the
                    extra["kernel_init"] = nn.initializers.lecun_normal()  # first logits near zero
                x = dense(features, bias_init=one if hidden else zero, name=name, split=how,
                          split_input=split_input, **extra)(x)
                if hidden:
                    x = nn.relu(x)
                    if not spec.dropout_before_fc:
                        x = dropout(x)
        return x.astype(jnp.float32)


def stage_outputs(model: AlexNet, image_shape: tuple[int, int, int]) -> dict[str, jax.ShapeDtypeStruct]:
    """The sown conv (`convN_out`) and pool (`poolN`) outputs for one image, as shapes (`jax.eval_shape`)."""

    def run() -> Any:
        x = jnp.zeros((1, *image_shape))
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
        return state["intermediates"]

    return jax.eval_shape(run)


def feature_shapes(model: AlexNet, image_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of every conv and pool stage (shapes only, no FLOPs spent)."""
    return {name.removesuffix("_out"): tuple(v.shape[1:]) for name, v in stage_outputs(model, image_shape).items()}


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(math.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def forward_macs(model: AlexNet, image_shape: tuple[int, int, int]) -> dict[str, int]:
    """Multiply-adds per image of every conv and FC layer (the paper net with groups: 724.4M in all).

    A conv's count is output positions x its kernel's size (a grouped kernel already holds cin/groups);
    training costs about 3x the forward pass (forward, input gradient, kernel gradient).
    """
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape))))["params"]
    shapes = feature_shapes(model, image_shape)
    out = {}
    for name, p in params.items():
        if "kernel" not in p:  # batchnorm scales and offsets
            continue
        size = int(math.prod(p["kernel"].shape))
        out[name] = size * int(math.prod(shapes[name][:2])) if name.startswith("conv") else size
    return out

