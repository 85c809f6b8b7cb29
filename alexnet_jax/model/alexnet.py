"""AlexNet in Flax: the NIPS 2012 network and the variants users ask for.

The default `AlexNet()` is the paper's two-GPU network exactly (Krizhevsky et al. 2012, section 3.5):
conv1 96@11x11/4, local response normalisation with the paper's formula, overlapping 3/2 max-pooling,
conv2/conv4/conv5 split in two groups (each GPU's kernels only see that GPU's maps), conv3 and the FC
layers connected across groups, dropout 0.5 in fc6/fc7 and the paper's initialisation.

Parameters are stored as ordinary Flax trees (`conv1..conv5`, `fc6..fc8`, each `kernel`/`bias`). A grouped
kernel has the shape `nn.Conv(feature_group_count=2)` would give it, (kh, kw, cin/groups, cout), but the
convolution is computed as one convolution per group: XLA:CPU runs that ~3x faster than a
`feature_group_count` convolution, and it is what lets `sharding.py` place each group on its own device.

`AlexNet.__call__` reads as the paper's Figure 2: five conv blocks (`conv_block`: conv, ReLU, LRN and pooling where
the paper has them) and three FC layers (`fc`), each layer's shape from the variant (`conv_layers`). Given a
`placement` (`sharding.placement(mesh, strategy)`, a table computed once per mesh and strategy), each layer looks
up its own row there: with the 'paper' rules every
conv and FC layer runs as a `jax.shard_map` (conv2/conv4/conv5 read only the maps on their own device, conv3
and fc6/fc7 all-gather their input maps over 'model', fc8 sums its halves); with 'owt' (Krizhevsky 2014) the
convs are data-parallel and only the FC layers are split. The parameter tree and the numbers are the same
with or without a placement.

This module owns the network's topology (variants, norms, initialisation), its part of the config (`ModelSpec`)
and `create_model`, which builds it from that spec; where anything lives is `alexnet_jax/sharding.py`'s, the
kernels are in `ops.py`, the mesh-aware layers in `layers.py`, the shape and multiply-add analysis in
`alexnet_jax/flops.py`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from alexnet_jax import sharding
from alexnet_jax.errors import UserError
from alexnet_jax.model.layers import Conv, Dense, Dtype
from alexnet_jax.model.ops import (
    KERNELS,
    adaptive_avg_pool,
    conv1_edge_padding,
    local_response_norm,
    resolve_kernels,
)
from alexnet_jax.model.ops import pool as max_pool


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


def _bias_init(init: str, one: bool) -> nn.initializers.Initializer:
    """The paper's bias 1 where `one` (conv2/4/5, fc6/fc7: their ReLUs start in their linear part), else 0."""
    return nn.initializers.ones if one and init == "paper" else nn.initializers.zeros


def _kernel_init(init: str) -> nn.initializers.Initializer:
    if init == "paper":
        return nn.initializers.normal(stddev=0.01)
    return nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He et al. 2015, for ReLU


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One conv layer of Figure 2: its kernels and how the layers around it treat its output."""

    features: int
    kernel: int
    stride: int
    padding: str | int  # 'cuda-convnet' (bottom/right edge, ops.conv1_edge_padding) or symmetric pixels
    bias_one: bool  # the paper's init: bias 1 where the layer's input is a ReLU's (conv2/4/5), else 0


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
      dtype: compute dtype (e.g. bfloat16); parameters stay `param_dtype`, logits float32 (float64 runs: float64).
      kernels: how LRN and pooling are differentiated: 'cpu_tuned', 'native' (XLA's own ops) or 'auto'
        (cpu_tuned on the CPU backend, native elsewhere); the same function either way (ops.py).
      placement: where it runs (`sharding.placement(mesh, strategy)`): each layer looks up its row of that
        table. Only a 'model' axis > 1 changes the computation; the parameters and numbers stay those of
        `placement=None`.
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

    def __post_init__(self) -> None:
        """The arguments are checked once, here, when the model is built (Flax rebuilds it per apply: cheap)."""
        for name, value, choices in (("variant", self.variant, tuple(VARIANTS)), ("norm", self.norm, (*NORMS, None)),
                                     ("init_scheme", self.init_scheme, INITS), ("kernels", self.kernels, KERNELS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(c for c in choices if c)}")
        if self.widths is not None and len(self.widths) != 5:
            raise ValueError(f"widths: give the five conv layers' widths, got {tuple(self.widths)}")
        super().__post_init__()

    @property
    def spec(self) -> Variant:
        return VARIANTS[self.variant]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Figure 2: five conv layers, response-normalised and pooled after conv1 and conv2, pooled after conv5;
        conv2, conv4 and conv5 split in `groups` (the paper's two GPUs); then three FC layers, dropout in fc6/fc7."""
        if x.ndim != 4:
            raise ValueError(f"AlexNet expects NHWC images, got shape {x.shape}")
        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)  # one module: each use draws its own key
        x, groups = x.astype(self.dtype), self.conv_groups
        x = self.conv_block(x, "conv1", train, lrn=True, pool=True)
        x = self.conv_block(x, "conv2", train, groups=groups, lrn=True, pool=True)
        x = self.conv_block(x, "conv3", train)
        x = self.conv_block(x, "conv4", train, groups=groups)
        x = self.conv_block(x, "conv5", train, groups=groups, pool=True)
        if self.spec.adaptive_pool:  # torchvision's AdaptiveAvgPool2d((6, 6)) (owt)
            x = adaptive_avg_pool(x, self.spec.adaptive_pool)
        x = self.fc(x, "fc6", dropout)
        x = self.fc(x, "fc7", dropout)
        x = self.fc(x, "fc8", dropout)
        return self.stage("fc8_out", x.astype(jnp.promote_types(x.dtype, jnp.float32)))  # float32 at least

    @property
    def conv_groups(self) -> int:
        """The group count of conv2/4/5 and of conv1's LRN (the variant's unless `groups` is given)."""
        return self.spec.default_groups if self.groups is None else self.groups

    @property
    def conv_layers(self) -> dict[str, ConvLayer]:
        """conv1..conv5's kernels as this model builds them (the variant's, with `widths` applied)."""
        v, widths = self.spec, tuple(self.widths or self.spec.widths)
        return {"conv1": ConvLayer(widths[0], v.conv1_kernel, v.conv1_stride, v.conv1_padding, False),
                "conv2": ConvLayer(widths[1], v.conv2_kernel, 1, v.conv2_kernel // 2, True),
                "conv3": ConvLayer(widths[2], 3, 1, 1, False),
                "conv4": ConvLayer(widths[3], 3, 1, 1, True),
                "conv5": ConvLayer(widths[4], 3, 1, 1, True)}

    def layer_placement(self, name: str) -> sharding.LayerPlacement | None:
        """Layer `name`'s row of the placement table; None at init (a batch of 1 cannot be split, and the
        parameters, global shapes, are the same either way) and without a mesh."""
        return None if self.placement is None or self.is_initializing() else self.placement[name]

    def stage(self, name: str, y: jax.Array) -> jax.Array:
        """`y`, sown as intermediate `name` (what `features` and `flops` read)."""
        self.sow("intermediates", name, y, reduce_fn=lambda _, new: new)
        return y

    def conv_block(self, x: jax.Array, name: str, train: bool, groups: int = 1, lrn: bool = False,
                   pool: bool = False) -> jax.Array:
        """Conv layer `name` (`groups` > 1: each group's kernels read only that group's maps), its norm (batchnorm
        before the ReLU, LRN after it, within the groups of conv2) and the 3x3/2 max-pooling."""
        layer, kernels = self.conv_layers[name], resolve_kernels(self.kernels)
        norm = self.spec.default_norm if self.norm is None else self.norm
        if layer.padding == "cuda-convnet":
            h, w = (conv1_edge_padding(size, layer.kernel, layer.stride) for size in x.shape[1:3])
            padding = ((0, h), (0, w))
        else:
            padding = ((layer.padding, layer.padding),) * 2
        with jax.named_scope(name):
            place = self.layer_placement(name)
            x = x if place is None else place.gather_batch(x)
            x = Conv(layer.features, layer.kernel, layer.stride, padding, groups, name=name, placement=place,
                     kernel_init=_kernel_init(self.init_scheme), bias_init=_bias_init(self.init_scheme, layer.bias_one),
                     dtype=self.dtype, param_dtype=self.param_dtype)(x)
            x = self.stage(f"{name}_out", x)
            if norm == "batchnorm":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"bn{name[-1]}")(x)
            x = nn.relu(x)
            if lrn and norm == "lrn":  # conv1's halves live on different GPUs in the paper: LRN stays in a group
                x = local_response_norm(x, groups=self.conv_groups, kernels=kernels)
            return self.stage(f"pool{name[-1]}", max_pool(x, kernels)) if pool else x

    def fc(self, x: jax.Array, name: str, dropout: nn.Dropout) -> jax.Array:
        """FC layer `name`: ReLU and dropout after fc6 and fc7 (torchvision: dropout before them); fc8's logits.

        Placed on a mesh, fc6 and fc7 hold slices of the neurons (fc6 gathers the maps it reads when the convs
        were split too) and fc8 sums the partial products of its rows; a sharded layer flattens its (gathered)
        input itself."""
        hidden, before = name != "fc8", self.spec.dropout_before_fc
        features = (self.fc_width or self.spec.fc_width) if hidden else self.num_classes
        kernel_init = _kernel_init(self.init_scheme)
        if not hidden and self.init_scheme == "he":  # no ReLU after fc8: LeCun scaling keeps the first logits
            kernel_init = nn.initializers.lecun_normal()  # near zero
        with jax.named_scope(name):
            place = self.layer_placement(name)
            x = x if place is None else place.gather_batch(x)
            if place is None or not place.sharded:
                x = x.reshape(x.shape[0], -1)
            if hidden and before:
                x = dropout(x.reshape(x.shape[0], -1)).reshape(x.shape)
            x = Dense(features, name=name, placement=place, kernel_init=kernel_init,
                      bias_init=_bias_init(self.init_scheme, hidden), dtype=self.dtype, param_dtype=self.param_dtype)(x)
            if not hidden:
                return x if place is None else place.scatter_batch(x)
            x = self.stage(f"{name}_out", nn.relu(x))  # the paper's Figure 4 compares images by fc7's
            return x if before else dropout(x)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model's part of the config, read once (`from_config`): what `create_model` builds."""

    num_classes: int = 1000  # 0: the dataset's class count, set with `with_classes` once the data is open
    variant: str = "paper"
    norm: str | None = None  # None: the variant's own
    groups: int | None = None  # None: the variant's own
    init_scheme: str = "paper"
    dropout_rate: float = 0.5
    widths: tuple[int, ...] | None = None
    fc_width: int | None = None
    dtype: str = "float32"
    kernels: str = "auto"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ModelSpec:
        """The model keys of a config, each refused in one line naming the flag when it cannot be built."""
        def fail(key: str, msg: str) -> None:
            raise UserError(f"--config.{key}={config.get(key)!r}: {msg}")

        if not 0 <= config.dropout_rate < 1:
            fail("dropout_rate", "must be in [0, 1)")
        if config.variant not in VARIANTS:
            fail("variant", f"choose one of {tuple(VARIANTS)}")
        if config.norm and config.norm not in NORMS:
            fail("norm", f"choose one of {NORMS} (or '' for the variant's own)")
        if config.groups not in (0, 1, 2):
            fail("groups", "choose 1, 2 (the paper's two-GPU split) or 0 for the variant's own")
        if config.init_scheme not in INITS:
            fail("init_scheme", f"choose one of {INITS}")
        if config.dtype not in ("float32", "bfloat16", "float16"):
            fail("dtype", "choose 'float32' or 'bfloat16'")
        if config.get("kernels", "auto") not in KERNELS:
            fail("kernels", f"choose one of {KERNELS} ('auto': cpu_tuned on CPU, native on GPU/TPU)")
        if config.widths and len(config.widths) != 5:
            fail("widths", "give five conv widths, e.g. (96, 256, 384, 384, 256)")
        if config.num_classes < 2 and config.num_classes != 0:
            fail("num_classes", "must be at least 2 (or 0: the dataset's class count)")
        return cls(num_classes=config.num_classes, variant=config.variant, norm=config.norm or None,
                   groups=config.groups or None, init_scheme=config.init_scheme, dropout_rate=config.dropout_rate,
                   widths=tuple(config.widths) or None, fc_width=config.fc_width or None, dtype=config.dtype,
                   kernels=config.get("kernels", "auto"))

    @property
    def conv_groups(self) -> int:
        """The conv group count this builds (`sharding.check_mesh` needs it before the model exists)."""
        return self.groups or VARIANTS[self.variant].default_groups

    def with_classes(self, count: int) -> ModelSpec:
        """This spec with fc8 sized for `count` classes where the config left it to the dataset (0)."""
        return self if self.num_classes else dataclasses.replace(self, num_classes=count)


def create_model(spec: ModelSpec, mesh: Mesh | None = None, strategy: str = "paper") -> AlexNet:
    """The specified AlexNet; with a mesh, its layers run split as `strategy` says (sharding.py)."""
    if not spec.num_classes:
        raise ValueError("num_classes=0 is the dataset's class count: call spec.with_classes(count) first")
    return AlexNet(
        num_classes=spec.num_classes, variant=spec.variant, norm=spec.norm, groups=spec.groups,
        init_scheme=spec.init_scheme, dropout_rate=spec.dropout_rate, widths=spec.widths, fc_width=spec.fc_width,
        dtype=jnp.dtype(spec.dtype), kernels=spec.kernels, placement=sharding.placement(mesh, strategy),
    )
