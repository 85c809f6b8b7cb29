"""Device meshes and where every array lives: the one owner of placement.

The mesh has axes ('data', 'model'). Parameters follow the partition rules in `PARTITION_RULES` (one table
for the whole model, one entry per strategy); batches are split on 'data' (and on 'model' too where the
strategy does not split the layers that read them). Strategies:

- 'paper': the 2012 net's two-GPU split generalised to m = |model| devices: each device holds 1/m of the
  kernels of every conv layer and 1/m of the neurons of every FC layer; conv2/conv4/conv5 read only their
  own device's maps, conv3 and fc6-fc8 exchange data (see model/layers.py for how the layers run).
- 'owt': Krizhevsky 2014, "One weird trick": convs data-parallel over every device, FC layers split.
- 'data_parallel': every parameter replicated, the batch split over every device.

What the rules compile to (the collectives per layer) is reported by `alexnet_jax.collectives`; multi-host
start-up is `alexnet_jax.distributed`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.errors import UserError
from alexnet_jax.model import DATA, MODEL, STRATEGIES, VARIANTS

AXES = (DATA, MODEL)

# (regex searched in a leaf's full path, PartitionSpec). First match wins; unmatched leaves are replicated.
# Paths are 'params/conv2/kernel', 'opt_state/inner_state/[2]/trace/conv2/kernel', 'batch_stats/bn2/mean':
# a rule written for a parameter also places its optimiser state (momentum) the same way.
_CONV_SPLIT = [
    (r"conv\d/kernel$", P(None, None, None, MODEL)),  # (kh, kw, cin/groups, cout): split the kernels
    (r"conv\d/bias$", P(MODEL)),
    (r"bn\d/(scale|bias|mean|var)$", P(MODEL)),  # norm='batchnorm': statistics of each device's maps
]
_FC_SPLIT = [
    (r"fc[67]/kernel$", P(None, MODEL)),  # (in, out): each device holds a slice of the neurons
    (r"fc[67]/bias$", P(MODEL)),
    (r"fc8/kernel$", P(MODEL, None)),  # the rows that read this device's fc7 neurons; partial sums added
]
PARTITION_RULES: dict[str, list[tuple[str, P]]] = {
    "paper": _CONV_SPLIT + _FC_SPLIT + [(r".*", P())],
    "owt": _FC_SPLIT + [(r".*", P())],
    "data_parallel": [(r".*", P())],
}


def mesh_shape_for(requested: Sequence[int], device_count: int) -> tuple[int, int]:
    """Resolve a (data, model) shape where one entry may be -1 (fill the remaining devices)."""
    shape = [int(s) for s in requested]
    if len(shape) != 2:
        raise UserError(f"--config.mesh_shape={tuple(requested)}: give two sizes (data, model), e.g. (-1, 1)")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(f"--config.mesh_shape={tuple(requested)}: sizes must be positive, at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if device_count % known:
            raise UserError(f"--config.mesh_shape={tuple(requested)}: {device_count} devices do not "
                            f"divide into {known}")
        shape[shape.index(-1)] = device_count // known
    if math.prod(shape) != device_count:
        raise UserError(f"--config.mesh_shape={tuple(requested)} needs {math.prod(shape)} devices but "
                        f"{device_count} are available; use (-1, 1) or a shape whose product is {device_count}"
                        " (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices)")
    return shape[0], shape[1]


def make_mesh(requested: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh; `jax.make_mesh` orders the devices for the interconnect (TPU rings)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape_for(requested, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def strategy_of(config: ml_collections.ConfigDict) -> str:
    strategy = config.get("sharding", "paper")
    if strategy not in STRATEGIES:
        raise UserError(f"--config.sharding={strategy!r}: choose one of {STRATEGIES}")
    return strategy


def path_str(path: Any) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def tree_specs(tree: Any, strategy: str = "data_parallel") -> Any:
    """A PartitionSpec for every leaf of a (train-state) tree, from `PARTITION_RULES[strategy]`."""
    rules = [(re.compile(pattern), spec) for pattern, spec in PARTITION_RULES[strategy]]

    def spec_for(path: Any, _leaf: Any) -> P:
        name = path_str(path)
        if not getattr(_leaf, "ndim", 0):
            return P()
        return next((spec for rx, spec in rules if rx.search(name)), P())

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def tree_shardings(mesh: Mesh, tree: Any, strategy: str = "data_parallel") -> Any:
    """NamedShardings for every leaf; refuses (UserError) a mesh axis that does not divide a split dimension."""
    specs = tree_specs(tree, strategy)
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree_util.tree_leaves(specs),
                                  strict=True):
        for dim, axis in enumerate(spec):
            size = mesh.shape[axis] if axis else 1
            if leaf.shape[dim] % size:
                raise UserError(
                    f"--config.mesh_shape: the '{axis}' axis ({size} devices) does not divide dimension {dim} "
                    f"of {path_str(path)} {tuple(leaf.shape)} (sharding={strategy!r}); choose a '{axis}' size "
                    "that divides every layer width (--config.widths, fc_width), or --config.sharding=owt "
                    "(splits only the FC layers) or data_parallel"
                )
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs)


def batch_axes(strategy: str) -> tuple[str, ...]:
    """Mesh axes the batch is split on: 'data' where the layers are split on 'model', else both."""
    return (DATA,) if strategy == "paper" else (DATA, MODEL)


def batch_sharding(mesh: Mesh, strategy: str = "paper") -> NamedSharding:
    """Images, labels and masks: split the leading (batch) axis."""
    return NamedSharding(mesh, P(batch_axes(strategy)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_mesh(config: ml_collections.ConfigDict, mesh: Mesh, strategy: str) -> None:
    """Batch sizes and group counts the mesh can split, checked before anything is compiled."""
    shards = math.prod(mesh.shape[a] for a in batch_axes(strategy))
    names = " x ".join(f"'{a}' ({mesh.shape[a]})" for a in batch_axes(strategy))
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % shards:
            raise UserError(f"--config.{key}={config[key]} must be divisible by the mesh's {names} = {shards} "
                            f"batch shards (sharding={strategy!r}); try {max(shards, config[key] // shards * shards)}")
    nproc = jax.process_count()
    if shards % nproc:  # each process feeds its own rows, so it must own whole batch shards
        raise UserError(f"--config.mesh_shape={tuple(mesh.shape.values())}: the batch is split into {shards} "
                        f"shards ({names}, sharding={strategy!r}) but {nproc} processes each feed their own rows; "
                        f"use a mesh whose batch shards are a multiple of {nproc}")
    m = mesh.shape[MODEL]
    groups = config.get("groups", 0) or VARIANTS[config.variant].default_groups
    if strategy == "paper" and m > 1 and groups > 1 and groups % m and m % groups:
        raise UserError(f"--config.mesh_shape: a 'model' axis of {m} cannot hold {groups} conv groups; use a "
                        f"divisor or a multiple of {groups}, or --config.sharding=owt")
