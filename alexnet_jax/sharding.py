"""Device meshes and where every array lives: the one owner of parallelism.

This module owns the mesh axes (`DATA`, `MODEL`), the strategies (`STRATEGIES`), and the one table that says
where each parameter lives under each strategy (`PARTITION_RULES`). Everything else about placement follows
from that table: the train state's shardings (`tree_specs`, `tree_shardings`), the batch's (`batch_axes`,
`batch_sharding`), and how each layer runs on the mesh: `placement(mesh, strategy)` computes, once, a table of
layer name -> `LayerPlacement` (input, kernel, bias and output specs, and whether the batch is gathered first),
which `model.AlexNet` looks its layers up in; the layers in `model/layers.py` only carry out the local
computation those specs imply. Changing a rule therefore changes who talks to whom.

Strategies (the record of each is a `Strategy`):

- 'paper': the 2012 net's two-GPU split generalised to m = |model| devices: each device holds 1/m of the
  kernels of every conv layer and 1/m of the neurons of every FC layer; conv2/conv4/conv5 read only their
  own device's maps, conv3 and fc6-fc8 exchange data.
- 'owt': Krizhevsky 2014, "One weird trick": convs data-parallel over every device, FC layers split; the batch
  is gathered over 'model' where the conv tower meets fc6.
- 'data_parallel': every parameter replicated, the batch split over every device.

What the rules compile to (the collectives per layer) is reported by `alexnet_jax.collectives`; multi-host
start-up is `alexnet_jax.distributed`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.errors import UserError

# The mesh axes: batch shards over 'data', layer slices over 'model'.
DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

# The partition table: (regex searched in a leaf's full path, PartitionSpec); first match wins, unmatched
# leaves are replicated. Paths are 'params/conv2/kernel', 'opt_state/inner_state/[2]/trace/conv2/kernel',
# 'batch_stats/bn2/mean': a rule written for a parameter also places its optimiser state (momentum).
# A layer runs split over 'model' exactly where its kernel is (see `Placement`).
_CONV_SPLIT = [
    (r"conv\d/kernel$", P(None, None, None, MODEL)),  # (kh, kw, cin/groups, cout): each device 1/m of the kernels
    (r"conv\d/bias$", P(MODEL)),  # the biases of those kernels
    (r"bn\d/(scale|bias|mean|var)$", P(MODEL)),  # norm='batchnorm': statistics of each device's maps
]
_FC_SPLIT = [
    (r"fc[67]/kernel$", P(None, MODEL)),  # (in, out), column split: each device holds a slice of the neurons
    (r"fc[67]/bias$", P(MODEL)),  # the biases of those neurons
    (r"fc8/kernel$", P(MODEL, None)),  # row split: the rows that read this device's fc7 neurons; partial sums added
]
_REPLICATE = [(r".*", P())]  # everything else (fc8/bias, scalars, step counters): on every device
PARTITION_RULES: dict[str, list[tuple[str, P]]] = {
    "paper": _CONV_SPLIT + _FC_SPLIT + _REPLICATE,  # Krizhevsky et al. 2012: every layer split
    "owt": _FC_SPLIT + _REPLICATE,  # Krizhevsky 2014: data-parallel convs, split FC layers
    "data_parallel": _REPLICATE,  # nothing split; the batch over every device
}
STRATEGIES = tuple(PARTITION_RULES)

# The layers the rules are written for, in the order the activations flow through them.
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7", "fc8")


def _axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, 'data' or ('data', 'model'))."""
    return tuple(entry) if isinstance(entry, tuple) else (() if entry is None else (entry,))


def model_axis_size(mesh: Mesh) -> int:
    """How many devices split each layer (1 for a mesh without a 'model' axis)."""
    return int(dict(mesh.shape).get(MODEL, 1))


def _split_dims(spec: P) -> tuple[int, ...]:
    """The dimensions `spec` splits over 'model'."""
    return tuple(d for d, entry in enumerate(spec) if MODEL in _axes(entry))


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One strategy's record: its rules (a row of `PARTITION_RULES`) and what they imply for the activations."""

    name: str
    rules: tuple[tuple[str, P], ...]

    def spec(self, path: str) -> P:
        """The rule for a leaf's full path ('params/conv2/kernel'): first match, else replicated."""
        return next((spec for pattern, spec in self.rules if re.search(pattern, path)), P())

    def layer_split(self, layer: str) -> bool:
        """Whether `layer` runs split over 'model': exactly where its kernel is split."""
        return bool(_split_dims(self.spec(f"params/{layer}/kernel")))

    @property
    def conv_split(self) -> bool:
        """Whether the conv tower runs split over 'model' (the paper's two GPUs)."""
        return any(self.layer_split(name) for name in CONV_LAYERS)

    @property
    def fc_split(self) -> bool:
        """Whether the FC layers run split over 'model'."""
        return any(self.layer_split(name) for name in FC_LAYERS)

    @property
    def batch(self) -> tuple[str, ...]:
        """Mesh axes the batch is split on: 'data' where conv1 is split on 'model', else both."""
        return (DATA,) if self.layer_split(CONV_LAYERS[0]) else (DATA, MODEL)

    @property
    def gather_batch_before(self) -> str | None:
        """The layer before which the batch, split on 'model' too, is gathered over 'model' ('fc6' for owt)."""
        first = next((name for name in CONV_LAYERS + FC_LAYERS if self.layer_split(name)), None)
        return first if MODEL in self.batch else None


STRATEGY_RECORDS: dict[str, Strategy] = {name: Strategy(name, tuple(rules)) for name, rules in PARTITION_RULES.items()}


@dataclasses.dataclass(frozen=True)
class LayerPlacement:
    """How one conv or dense layer runs on the mesh: a row of `Placement`'s table.

    `sharded` layers run as a `jax.shard_map` with in_specs (x, kernel, bias) and out_specs `out`; the others run
    the plain code on global arrays (the SPMD partitioner splits their batch). `out` is what the next layer reads.
    """

    mesh: Mesh
    x: P  # the input: batch over 'data' (when sharded), features split over 'model' or whole
    kernel: P  # the kernel's rule
    bias: P  # the bias's rule
    out: P  # the output: features split over 'model' where the kernel's output channels / columns are
    sharded: bool
    gather_batch_first: bool  # the batch arrives split on 'model' too (owt's pool5): gathered over 'model' first
    batch_after: P | None  # the logits' layout after the layer (fc8: the images' batch layout), or None

    @property
    def model_size(self) -> int:
        return model_axis_size(self.mesh)

    @property
    def split_in(self) -> bool:
        """The input's features arrive split over 'model' (the previous layer's output was)."""
        return self.x[-1] == MODEL

    @property
    def split_out(self) -> bool:
        """Each device computes its slice of the output features (kernel split on its last dimension)."""
        return self.out[-1] == MODEL

    @property
    def row_split(self) -> bool:
        """Dense kernel split by rows: each device's partial products are summed over 'model'."""
        return _split_dims(self.kernel) == (0,)

    def gather_batch(self, x: jax.Array) -> jax.Array:
        """The input with its batch gathered over 'model' where `gather_batch_first`, else unchanged. Pinning it
        split over both axes first keeps the gather on this activation (owt: pool5), where the partitioner would
        otherwise move it onto the larger conv5 maps."""
        if not self.gather_batch_first:
            return x
        x = jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P((DATA, MODEL))))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(DATA)))

    def scatter_batch(self, logits: jax.Array) -> jax.Array:
        """fc8's logits back on the images' batch layout (owt: split over 'model' too, as the labels are), inside
        fc8: the gradient's gather over 'model' is then fc8's, not an unattributed op of the loss."""
        if self.batch_after is None:
            return logits
        return jax.lax.with_sharding_constraint(logits, NamedSharding(self.mesh, self.batch_after))


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and a strategy, and the table they imply: layer name -> `LayerPlacement`, computed once here.

    Each layer's row follows from its parameters' rules and the previous layer's output, in the order the
    activations flow (`CONV_LAYERS` then `FC_LAYERS`); `model.AlexNet` looks its layers up (`placement[name]`).
    """

    mesh: Mesh
    strategy: Strategy
    layers: tuple[tuple[str, LayerPlacement], ...]

    def __getitem__(self, layer: str) -> LayerPlacement:
        return dict(self.layers)[layer]

    @property
    def model_size(self) -> int:
        return model_axis_size(self.mesh)


def _input_spec(strategy: Strategy, ndim: int) -> P:
    """The images (or the logits) as they arrive: batch split on `Strategy.batch`."""
    return P(strategy.batch, *([None] * (ndim - 1)))


# Per kind of layer: which split dimensions of its kernel it can run with, and whether each splits its output.
# A conv not split over 'model' is left to the SPMD partitioner (batch-parallel). Running it as a `shard_map` over
# the batch instead gave the same traffic but broke the bitwise equality of a resumed run with an uninterrupted one.
_CONV_KERNEL_SPLITS = {(): False, (3,): True}  # (kh, kw, cin/groups, cout): output channels
_DENSE_KERNEL_SPLITS = {(): False, (1,): True, (0,): False}  # (in, out): columns (neurons) or rows


def _layer_placement(mesh: Mesh, strategy: Strategy, name: str, x: P) -> LayerPlacement:
    """Layer `name` reading an activation placed as `x`."""
    conv = name in CONV_LAYERS
    split_out_of, out_ndim = (_CONV_KERNEL_SPLITS, 4) if conv else (_DENSE_KERNEL_SPLITS, 2)
    kernel, bias = strategy.spec(f"params/{name}/kernel"), strategy.spec(f"params/{name}/bias")
    dims = _split_dims(kernel)
    if dims not in split_out_of:
        raise ValueError(f"{name}: no layer runs with its kernel placed as {kernel}; split the output channels "
                         f"(conv: dimension 3; dense: 1) or the rows of a dense kernel (0)")
    m = model_axis_size(mesh)
    split_out, arrives_split = split_out_of[dims], x[-1] == MODEL
    sharded = m > 1 and (arrives_split or bool(dims))
    # A replicated kernel reads the whole input: one that arrives split is gathered where the shard_map begins.
    split_in = arrives_split and bool(dims)
    if m > 1 and _split_dims(bias) != ((0,) if split_out else ()):
        raise ValueError(f"{name}: the bias rule {bias} does not match the kernel's {kernel}; place the bias "
                         f"as the kernel's output {'channels' if conv else 'columns'}")
    batch = DATA if sharded else x[0]  # a split layer's batch is on 'data' only
    return LayerPlacement(
        mesh=mesh,
        x=P(batch, *([None] * (len(x) - 2)), MODEL if split_in else None),
        kernel=kernel,
        bias=bias,
        out=P(batch, *([None] * (out_ndim - 2)), MODEL if split_out and sharded else None),
        sharded=sharded,
        gather_batch_first=sharded and MODEL in _axes(x[0]),
        batch_after=_input_spec(strategy, 2) if name == FC_LAYERS[-1] else None,
    )


def placement(mesh: Mesh | None, strategy: str) -> Placement | None:
    """The placement `model.AlexNet` runs under (None without a mesh: the plain single-device code): the table of
    every layer's `LayerPlacement`, each reading the previous one's output."""
    if strategy not in STRATEGY_RECORDS:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}")
    if mesh is None:
        return None
    record, rows, x = STRATEGY_RECORDS[strategy], [], _input_spec(STRATEGY_RECORDS[strategy], 4)
    for name in CONV_LAYERS + FC_LAYERS:
        rows.append((name, _layer_placement(mesh, record, name, x)))
        x = rows[-1][1].out
    return Placement(mesh, record, tuple(rows))


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


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
    """The parallelism part of the config, read once: the requested mesh shape and the strategy."""

    mesh_shape: tuple[int, ...] = (-1, 1)
    strategy: str = "paper"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ShardingSpec:
        strategy = config.get("sharding", "paper")
        if strategy not in STRATEGIES:
            raise UserError(f"--config.sharding={strategy!r}: choose one of {STRATEGIES}")
        return cls(tuple(config.mesh_shape), strategy)

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        return make_mesh(self.mesh_shape, devices)


def path_str(path: Any) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def tree_specs(tree: Any, strategy: str = "data_parallel") -> Any:
    """A PartitionSpec for every leaf of a (train-state) tree, from `PARTITION_RULES[strategy]`."""
    record = STRATEGY_RECORDS[strategy]

    def spec_for(path: Any, leaf: Any) -> P:
        return record.spec(path_str(path)) if getattr(leaf, "ndim", 0) else P()

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
    return STRATEGY_RECORDS[strategy].batch


def batch_sharding(mesh: Mesh, strategy: str = "paper") -> NamedSharding:
    """Images, labels and masks: split the leading (batch) axis."""
    return NamedSharding(mesh, P(batch_axes(strategy)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_mesh(mesh: Mesh, strategy: str, *, groups: int, batch_sizes: dict[str, int]) -> None:
    """Batch sizes (`batch_sizes`: config key -> global batch) and conv group counts (`groups`, the model's) the
    mesh can split, checked before compiling."""
    shards = math.prod(mesh.shape[a] for a in batch_axes(strategy))
    names = " x ".join(f"'{a}' ({mesh.shape[a]})" for a in batch_axes(strategy))
    for key, size in batch_sizes.items():
        if size % shards:
            raise UserError(f"--config.{key}={size} must be divisible by the mesh's {names} = {shards} "
                            f"batch shards (sharding={strategy!r}); try {max(shards, size // shards * shards)}")
    nproc = jax.process_count()
    if shards % nproc:  # each process feeds its own rows, so it must own whole batch shards
        raise UserError(f"--config.mesh_shape={tuple(mesh.shape.values())}: the batch is split into {shards} "
                        f"shards ({names}, sharding={strategy!r}) but {nproc} processes each feed their own rows; "
                        f"use a mesh whose batch shards are a multiple of {nproc}")
    m = mesh.shape[MODEL]
    if STRATEGY_RECORDS[strategy].conv_split and m > 1 and groups > 1 and groups % m and m % groups:
        raise UserError(f"--config.mesh_shape: a 'model' axis of {m} cannot hold {groups} conv groups; use a "
                        f"divisor or a multiple of {groups}, or --config.sharding=owt")
