"""AlexNet in Flax: the NIPS 2012 network and the variants users ask for.

The default `AlexNet()` is the paper's two-GPU network exactly (Krizhevsky et al. 2012, section 3.5):
conv1 96@11x11/4, local response normalisation with the paper's formula, overlapping 3/2 max-pooling,
conv2/conv4/conv5 split in two groups (each GPU's kernels only see that GPU's maps), conv3 and the FC
layers connected across groups, dropout 0.5 in fc6/fc7 and the paper's initialisation.

Parameters are stored as ordinary Flax trees (`conv1..conv5`, `fc6..fc8`, each `kernel`/`bias`). A grouped
kernel has the shape `nn.Conv(feature_group_count=2)` would give it, (kh, kw, cin/groups, cout), but the
convolution is computed as one convolution per group: XLA:CPU runs that ~3x faster than a
`feature_group_count` convolution, and it is what lets `sharding.py` place each group on its own device.

Given a `placement` (`sharding.placement(mesh, strategy)`), the network asks it, layer by layer, how each
layer runs on the mesh, threading each layer's output placement into the next: with the 'paper' rules every
conv and FC layer runs as a `jax.shard_map` (conv2/conv4/conv5 read only the maps on their own device, conv3
and fc6/fc7 all-gather their input maps over 'model', fc8 sums its halves); with 'owt' (Krizhevsky 2014) the
convs are data-parallel and only the FC layers are split. The parameter tree and the numbers are the same
with or without a placement.

This module owns the network's topology (variants, norms, initialisation) and `create_model`, which builds it
from a config; where anything lives is `alexnet_jax/sharding.py`'s, the kernels are in `ops.py`, the
mesh-aware layers in `layers.py`, the shape and multiply-add analysis in `alexnet_jax/flops.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from alexnet_jax import sharding
from alexnet_jax.model.layers import Conv, Dense, Dtype
from alexnet_jax.model.ops import adaptive_avg_pool, conv1_edge_padding, local_response_norm, pool, resolve_kernels


@dataclasses.dataclass(frozen=True)
class Variant:
    """The shape of one AlexNet family member."""

    widths: tuple[int, int, int, int, int]
    fc_width: int
    conv1_kernel: int
    conv1_stride: int
    conv1_padding: str | int  # 'cuda-convnet' (bottom/right edge, ops.conv1_edge_padding) or symmetric pixels
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

INITS = ("paper", "he")


def _kernel_init(init: str) -> nn.initializers.Initializer:
    if init == "paper":
        return nn.initializers.normal(stddev=0.01)
    return nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He et al. 2015, for ReLU


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
      kernels: the formulation of convolutions, pooling and LRN: 'cpu_tuned', 'native' (XLA's own ops) or
        'auto' (cpu_tuned on the CPU backend, native elsewhere); the same function either way (ops.py).
      placement: where it runs (`sharding.placement(mesh, strategy)`): each layer runs as the partition
        rules of its parameters say. Only a 'model' axis > 1 changes the computation; the parameters and
        numbers stay those of `placement=None`.
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
    kernels: str = "auto"
    placement: sharding.Placement | None = None

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

        kernels = resolve_kernels(self.kernels)
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
                y = local_response_norm(y, groups=groups, kernels=kernels)
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

        # Model parallelism only at apply time: init's batch of 1 cannot be split, and the parameters
        # (global shapes) are the same either way.
        placement = None if self.is_initializing() else self.placement
        x_spec = P() if placement is None else placement.input_spec(x.ndim)  # threaded from layer to layer

        def conv(y: jax.Array, *args: Any, name: str, **kw: Any) -> jax.Array:
            nonlocal x_spec
            place = None if placement is None else placement.conv(name, x_spec)
            if place is not None and place.gather_batch_first:
                y = placement.gather_batch(y)
            x_spec = x_spec if place is None else place.out
            return Conv(*args, name=name, placement=place, kernels=kernels, **common, **kw)(y)

        with jax.named_scope("conv1"):
            x = stage("conv1_out", conv(x, widths[0], k1, s1, pad1, 1, bias_init=zero, name="conv1"))
            x = stage("pool1", pool(normalise(x, 1, lrn=True), kernels))
        with jax.named_scope("conv2"):
            x = conv(x, widths[1], spec.conv2_kernel, 1, ((p2, p2), (p2, p2)), groups, bias_init=one, name="conv2")
            x = stage("pool2", pool(normalise(stage("conv2_out", x), 2, lrn=True), kernels))
        with jax.named_scope("conv3"):
            x = stage("conv3_out", conv(x, widths[2], 3, 1, same3, 1, bias_init=zero, name="conv3"))
            x = normalise(x, 3, lrn=False)
        with jax.named_scope("conv4"):
            x = stage("conv4_out", conv(x, widths[3], 3, 1, same3, groups, bias_init=one, name="conv4"))
            x = normalise(x, 4, lrn=False)
        with jax.named_scope("conv5"):
            x = stage("conv5_out", conv(x, widths[4], 3, 1, same3, groups, bias_init=one, name="conv5"))
            x = stage("pool5", pool(normalise(x, 5, lrn=False), kernels))
            if spec.adaptive_pool:
                x = adaptive_avg_pool(x, spec.adaptive_pool)

        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        # fc6 and fc7 hold slices of the neurons (fc6 gathers the maps it reads when the convs were split too),
        # fc8 sums the partial products of its rows; where the conv tower ran data-parallel over 'model' too
        # (owt), the batch is gathered over 'model' first. A sharded fc6 flattens its (gathered) input itself.
        for name, features in (("fc6", fc_width), ("fc7", fc_width), ("fc8", self.num_classes)):
            with jax.named_scope(name):
                place = None if placement is None else placement.dense(name, x_spec)
                if place is not None and place.gather_batch_first:
                    x = placement.gather_batch(x)
                if place is None or not place.sharded:
                    x = x.reshape(x.shape[0], -1)
                x_spec = x_spec if place is None else place.out
                hidden = name != "fc8"
                if hidden and spec.dropout_before_fc:
                    x = dropout(x.reshape(x.shape[0], -1)).reshape(x.shape)
                extra = {}
                if not hidden and self.init_scheme == "he":  # no ReLU after fc8: LeCun scaling keeps the
                    extra["kernel_init"] = nn.initializers.lecun_normal()  # first logits near zero
                x = Dense(features, bias_init=one if hidden else zero, name=name, placement=place,
                          **dict(common, **extra))(x)
                if hidden:
                    x = stage(f"{name}_out", nn.relu(x))  # the paper's Figure 4 compares images by fc7's
                    if not spec.dropout_before_fc:
                        x = dropout(x)
                elif placement is not None:
                    x = placement.scatter_batch(x)
        return stage("fc8_out", x.astype(jnp.float32))


def create_model(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> AlexNet:
    """The configured AlexNet; with a mesh, its layers run split as `config.sharding` says (sharding.py)."""
    return AlexNet(
        num_classes=config.num_classes,
        variant=config.variant,
        norm=config.norm or None,
        groups=config.groups or None,
        init_scheme=config.init_scheme,
        dropout_rate=config.dropout_rate,
        widths=tuple(config.widths) or None,
        fc_width=config.fc_width or None,
        dtype=jnp.dtype(config.dtype),
        kernels=config.get("kernels", "auto"),
        placement=sharding.placement(mesh, config.get("sharding", "paper")),
    )


def groups_of(config: ml_collections.ConfigDict) -> int:
    """The conv group count a config builds (`sharding.check_mesh` needs it)."""
    return config.get("groups", 0) or VARIANTS[config.variant].default_groups
