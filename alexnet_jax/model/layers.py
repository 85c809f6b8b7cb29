"""The mesh-aware Flax layers: `Conv` and `Dense`, with the parameters of `nn.Conv`/`nn.Dense`.

A grouped kernel has the shape `nn.Conv(feature_group_count=2)` would give it, (kh, kw, cin/groups, cout),
but the convolution is computed as one convolution per group (`ops.grouped_conv`).

Given a `mesh` with a 'model' axis of size > 1, a layer runs as a `jax.shard_map` that says who talks to whom,
as on the paper's two GPUs: each device holds its slice of the layer's kernels (output channels / neurons),
grouped convs read only the maps on their own device (no communication), layers connected across groups
all-gather their input maps over 'model', a row-split dense layer sums its partial products. The SPMD
partitioner alone does not find that pattern (it all-gathers around a sharded grouped conv). The parameters
and the numbers are the same with or without a mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from alexnet_jax.model.ops import grouped_conv

Dtype = Any

# The mesh axes: batch shards over 'data', layer slices over 'model'.
DATA, MODEL = "data", "model"


def model_axis_size(mesh: Mesh | None) -> int:
    """How many devices split each layer (1 without a mesh or without a 'model' axis)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(MODEL, 1))


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
