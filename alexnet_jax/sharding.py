"""Device meshes and where every array lives.

The mesh has axes ('data', 'model'). Batches are split on 'data'; parameters follow the partition
rules in `PARTITION_RULES` (one table for the whole model).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.errors import UserError

AXES = ("data", "model")

# (regex searched in a leaf's path, PartitionSpec). First match wins; unmatched leaves are replicated.
# Paths are 'params/conv2/kernel', 'opt_state/.../trace/conv2/kernel', ...: a rule written for a parameter
# also places its optimiser state (momentum) the same way.
# Data parallelism: every parameter replicated on every device.
PARTITION_RULES: dict[str, list[tuple[str, P]]] = {
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
                        f"{device_count} are available; use (-1, 1) or a shape whose product is {device_count}")
    return shape[0], shape[1]


def make_mesh(requested: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape_for(requested, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def _path_str(path: Any) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def tree_specs(tree: Any, strategy: str = "data_parallel") -> Any:
    """A PartitionSpec for every leaf of a (train-state) tree, from `PARTITION_RULES[strategy]`."""
    rules = [(re.compile(pattern), spec) for pattern, spec in PARTITION_RULES[strategy]]

    def spec_for(path: Any, _leaf: Any) -> P:
        name = _path_str(path)
        if not getattr(_leaf, "ndim", 0):
            return P()
        return next((spec for rx, spec in rules if rx.search(name)), P())

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def tree_shardings(mesh: Mesh, tree: Any, strategy: str = "data_parallel") -> Any:
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, strategy))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Images, labels and masks: split the leading (batch) axis over 'data'."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
