"""The mesh-aware Flax layers: `Conv` and `Dense`, with the parameters of `nn.Conv`/`nn.Dense`.

A grouped kernel has the shape `nn.Conv(feature_group_count=2)` would give it, (kh, kw, cin/groups, cout),
but the convolution is computed as one convolution per group (`ops.grouped_conv`).

This module owns the local computation of a layer on one device, not where anything lives: a layer is given a
`sharding.LayerPlacement` (its row of the table `sharding.placement` computes once per mesh and strategy) and, when
that placement is `sharded`, runs as a `jax.shard_map` with its specs, computing what they imply, as on the paper's
two GPUs: a device holding a slice of the kernels (output channels / neurons) computes that slice; grouped convs
whose groups are on their own device read only the maps there (no communication); a layer whose input arrives split
but which reads across groups all-gathers it over 'model'; a row-split dense layer sums its partial products. The
SPMD partitioner alone does not find that pattern (it all-gathers around a sharded grouped conv). The parameters and
the numbers are the same with or without one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alexnet_jax.model.ops import grouped_conv
from alexnet_jax.sharding import MODEL, LayerPlacement

Dtype = Any


def _this_device(x: jax.Array, m: int, axis: int) -> jax.Array:
    """This device's 1/m slice of `x` along `axis` (inside a shard_map over 'model')."""
    n = x.shape[axis] // m
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(MODEL) * n, n, axis=axis)


class Conv(nn.Module):
    """A 2-D convolution whose `groups` are computed as separate convolutions on channel slices.

    The parameters are those of `nn.Conv(features, feature_group_count=groups)`. Given a sharded `placement`,
    each device computes its features/m output channels in a `shard_map`: from its own input maps when those
    are all its kernels read (groups divisible by m), else from the maps its kernels read, all-gathered over
    'model' first when they arrive split. A kernel replicated over 'model' reads the whole input (gathered where
    the `shard_map` begins) and computes every output channel.
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
    placement: LayerPlacement | None = None

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
        place = self.placement
        if place is None or not place.sharded:
            return grouped_conv(x, kernel, self.groups, self.strides, self.padding) + bias
        return jax.shard_map(self._local, mesh=place.mesh, in_specs=(place.x, place.kernel, place.bias),
                             out_specs=place.out)(x, kernel, bias)

    def _local(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """One device's share: its output channels, from the input maps they are connected to."""
        place = self.placement
        assert place is not None
        m, groups = place.model_size, self.groups
        if not place.split_out:  # kernel replicated over 'model': every output channel, from the whole input
            return grouped_conv(x, kernel, groups, self.strides, self.padding) + bias
        if place.split_in and groups % m == 0:  # the paper's grouped layers: this device's maps are all it reads
            local_groups = groups // m
        else:  # connected across devices (conv3; or a group spread over several devices); conv1: whole image
            if place.split_in:
                x = jax.lax.all_gather(x, MODEL, axis=3, tiled=True)
            local_groups = 1
            if groups > 1 and groups % m == 0:  # whole input, groups on their own devices: keep this device's
                x, local_groups = _this_device(x, m, axis=3), groups // m
            elif groups > 1:  # m is a multiple of groups (sharding.check_mesh): keep this device's group
                per = x.shape[-1] // groups
                group = jax.lax.axis_index(MODEL) // (m // groups)
                x = jax.lax.dynamic_slice_in_dim(x, group * per, per, axis=3)
        return grouped_conv(x, kernel, local_groups, self.strides, self.padding) + bias


class Dense(nn.Module):
    """`nn.Dense` (same parameters, same numbers) that runs as its sharded `placement` says.

    Kernel split by columns: each device holds a slice of the neurons and all-gathers its input first when the
    input arrives split; by rows: each device holds the rows that read its slice of the input and the partial
    products are summed over 'model'; replicated: every device computes every neuron from the whole input
    (gathered where the `shard_map` begins). Inputs of rank > 2 are flattened (after the gather: the feature
    order is the layer's).
    """

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    placement: LayerPlacement | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = math.prod(x.shape[1:])
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        place = self.placement
        if place is None or not place.sharded:
            return jnp.dot(x.reshape(x.shape[0], -1), kernel) + bias
        if place.row_split and x.ndim > 2:
            raise ValueError(f"{self.name}: a row-split layer reads a flat input, got rank {x.ndim}")
        return jax.shard_map(self._rows if place.row_split else self._columns, mesh=place.mesh,
                             in_specs=(place.x, place.kernel, place.bias), out_specs=place.out)(x, kernel, bias)

    def _rows(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """Row split: this device's rows read its slice of the input; the partial products are summed."""
        place = self.placement
        assert place is not None
        if not place.split_in:  # the whole input arrived: keep the features these rows read
            x = _this_device(x, place.model_size, axis=1)
        return jax.lax.psum(jnp.dot(x, kernel), MODEL) + bias

    def _columns(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """Column split (or replicated): this device's neurons, from the whole (gathered) input."""
        place = self.placement
        assert place is not None
        if place.split_in:
            x = jax.lax.all_gather(x, MODEL, axis=x.ndim - 1, tiled=True)
        return jnp.dot(x.reshape(x.shape[0], -1), kernel) + bias
