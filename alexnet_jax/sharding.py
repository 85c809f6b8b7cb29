"""Device meshes, where every array lives, multi-host start-up, and the report of who talks to whom.

The mesh has axes ('data', 'model'). Parameters follow the partition rules in `PARTITION_RULES` (one table
for the whole model, one entry per strategy); batches are split on 'data' (and on 'model' too where the
strategy does not split the layers that read them). Strategies:

- 'paper': the 2012 net's two-GPU split generalised to m = |model| devices: each device holds 1/m of the
  kernels of every conv layer and 1/m of the neurons of every FC layer; conv2/conv4/conv5 read only their
  own device's maps, conv3 and fc6-fc8 exchange data (see model/layers.py for how the layers run).
- 'owt': Krizhevsky 2014, "One weird trick": convs data-parallel over every device, FC layers split.
- 'data_parallel': every parameter replicated, the batch split over every device.

`python -m alexnet_jax.sharding --config configs/imagenet.py --mesh 4,2` prints each parameter's partition
spec and per-device bytes and the collectives of the compiled train step (kind, bytes, mesh axis, layer).
On a CPU, simulate devices first: `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
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
    """NamedShardings for every leaf; refuses (UserError) a mesh axis that does not divide a split dimension."""
    specs = tree_specs(tree, strategy)
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree_util.tree_leaves(specs),
                                  strict=True):
        for dim, axis in enumerate(spec):
            size = mesh.shape[axis] if axis else 1
            if leaf.shape[dim] % size:
                raise UserError(
                    f"--config.mesh_shape: the '{axis}' axis ({size} devices) does not divide dimension {dim} "
                    f"of {_path_str(path)} {tuple(leaf.shape)} (sharding={strategy!r}); choose a '{axis}' size "
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


# ---------------------------------------------------------------------------------------------- multi-host
def _multi_process_env() -> bool:
    """Whether the environment describes a job of more than one process (as jax's cluster detection reads it)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts:
        return True
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
    """`jax.distributed.initialize` when the config or the environment asks for it; True if it ran.

    Must run before any other JAX call. `config.distributed`: 'auto' (initialize when a coordinator is
    configured or the environment describes a multi-process job: JAX_COORDINATOR_ADDRESS, a multi-host Cloud
    TPU, SLURM with several tasks, Open MPI), 'on' (always; jax detects TPU pods, SLURM, Open MPI, k8s) or
    'off'. Unset `coordinator_address` / `num_processes` / `process_id` come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID or jax's cluster detection. CPU devices talk over gloo.
    """
    mode = config.get("distributed", "auto")
    if mode not in ("auto", "on", "off"):
        raise UserError(f"--config.distributed={mode!r}: choose 'auto', 'on' or 'off'")
    address = config.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if mode == "off" or (mode == "auto" and address is None and not _multi_process_env()):
        return False
    num = config.get("num_processes", 0) or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0) or None
    pid = config.get("process_id", -1)
    if pid < 0:
        pid = int(os.environ["JAX_PROCESS_ID"]) if os.environ.get("JAX_PROCESS_ID") else None
    jax.config.update("jax_cpu_collectives_implementation", config.get("cpu_collectives", "gloo"))
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"multi-process start-up failed ({e}); set --config.coordinator_address=HOST:PORT, "
                        "--config.num_processes and --config.process_id (or JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --config.distributed=off") from None
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


# ------------------------------------------------------------------------------------ what gets compiled
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program: its kind, result bytes per device, mesh axes and layer."""

    kind: str
    bytes: int
    axes: tuple[str, ...]
    layer: str
    pass_: str  # 'forward' or 'backward' (inside a transpose), '' if unknown
    op_name: str


def _shapes(text: str) -> list[int]:
    """Bytes of every array shape in an HLO result type (one entry per tuple element)."""
    return [_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in re.findall(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]", text)]


def _replica_groups(line: str) -> list[list[int]] | None:
    """Device groups of a collective, in any of the HLO spellings (explicit, iota, mesh axes, pairs)."""
    m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if m:
        return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        n, size = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(n, size).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:  # mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0'}: groups vary over the named axes
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, dims = [a for a, _ in axes], [int(d) for _, d in axes]
        inner = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2))]
        outer = [i for i in range(len(dims)) if i not in inner]
        ids = np.arange(math.prod(dims)).reshape(dims).transpose(outer + inner)
        return ids.reshape(-1, math.prod(dims[i] for i in inner) if inner else 1).tolist()
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    return None


def _axes_of(groups: list[list[int]] | None, mesh: Mesh) -> tuple[str, ...]:
    """Which mesh axes a collective's device groups span (logical ids index the mesh's devices in order)."""
    if not groups:
        return AXES if mesh.size > 1 else ()
    coords = np.array(np.unravel_index(np.arange(mesh.size), mesh.devices.shape)).T
    varying: set[str] = set()
    for group in groups:
        c = coords[[g for g in group if g < mesh.size]]
        varying |= {AXES[i] for i in range(len(AXES)) if len(set(c[:, i])) > 1}
    return tuple(a for a in AXES if a in varying)


def _layer(op_name: str) -> str:
    """The AlexNet layer (named scope) an op belongs to; else the op's own name (e.g. metrics' top_k)."""
    layer = next((name for name in LAYERS if re.search(rf"(^|[/(]){name}(/|$)", op_name)), "")
    return layer or op_name.rsplit("/", 1)[-1]


def collectives(hlo_text: str, mesh: Mesh) -> list[Collective]:
    """The collectives of a compiled (post-SPMD) HLO module, attributed to layers by their op_name scope.

    XLA combines small all-reduces (e.g. the data-parallel gradient sums) into one tuple-shaped op whose
    op_name lists its parts as '(a:b:...)'; such an op is reported part by part.
    """
    found = []
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?\S+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        kind, sizes = m.group(2), _shapes(m.group(1))
        if m.group(3) and kind != "all-reduce" and len(sizes) > 1:
            sizes = sizes[-1:]  # async start: (operand, result) tuple; count the result
        op = re.search(r'op_name="([^"]*)"', line)
        op_name = op.group(1) if op else ""
        names = [op_name] * len(sizes)
        parts = re.fullmatch(r"(.*?/)?\((.*)\)", op_name)
        if len(sizes) > 1 and parts:
            split = parts.group(2).split(":")
            if len(split) == len(sizes):
                names = [(parts.group(1) or "") + n for n in split]
        else:
            sizes, names = [sum(sizes)], [op_name]
        axes = _axes_of(_replica_groups(line), mesh)
        for size, name in zip(sizes, names, strict=True):
            pass_ = "backward" if "transpose(" in name else "forward"
            found.append(Collective(kind, size, axes, _layer(name), pass_, name))
    return found


def compiled_train_step(config: ml_collections.ConfigDict, mesh: Mesh, image_shape: Sequence[int]) -> Any:
    """Lower and compile the trainer's train step for `config` on `mesh` from shapes only (no data, no init)."""
    from alexnet_jax import train  # train imports this module

    trainer = train.Trainer(config, mesh, tuple(image_shape), steps_per_epoch=100, total_steps=1000)
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   trainer.abstract_state, trainer.state_sharding)
    batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, *image_shape), np.float32, sharding=trainer.batch_sharding),
        "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32, sharding=trainer.batch_sharding),
    }
    return trainer, trainer.train_step.lower(state, batch).compile()


def report(config: ml_collections.ConfigDict, mesh: Mesh, image_shape: Sequence[int]) -> dict[str, Any]:
    """Partition spec and bytes per device of every parameter, and the compiled train step's collectives."""
    trainer, compiled = compiled_train_step(config, mesh, image_shape)
    params = []
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(trainer.abstract_state.params),
                                      jax.tree_util.tree_leaves(trainer.state_sharding.params), strict=True):
        local = sharding.shard_shape(leaf.shape)
        params.append({"name": _path_str(path), "shape": list(leaf.shape), "spec": str(sharding.spec),
                       "bytes": int(math.prod(leaf.shape)) * leaf.dtype.itemsize,
                       "bytes_per_device": int(math.prod(local)) * leaf.dtype.itemsize})
    ops = collectives(compiled.as_text(), mesh)
    total = sum(p["bytes"] for p in params)
    per_device = sum(p["bytes_per_device"] for p in params)
    return {
        "mesh": dict(mesh.shape), "strategy": strategy_of(config), "variant": config.variant,
        "image_shape": list(image_shape), "batch_size": config.batch_size,
        "param_bytes": total, "param_bytes_per_device": per_device, "params": params,
        "collectives": [dataclasses.asdict(c) | {"axes": list(c.axes)} for c in ops],
    }


def format_report(rep: dict[str, Any]) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in rep["mesh"].items())
    lines = [f"AlexNet '{rep['variant']}', sharding '{rep['strategy']}', mesh {mesh}, global batch "
             f"{rep['batch_size']} of {'x'.join(map(str, rep['image_shape']))}", "",
             f"{'parameter':<14} {'shape':<20} {'spec':<36} {'per device':>12}"]
    for p in rep["params"]:
        lines.append(f"{p['name']:<14} {str(tuple(p['shape'])):<20} {p['spec']:<36} {p['bytes_per_device']:>12,}")
    lines.append(f"{'total':<71} {rep['param_bytes_per_device']:>12,} of {rep['param_bytes']:,} bytes "
                 f"({100 * rep['param_bytes_per_device'] / rep['param_bytes']:.1f}%)")
    lines += ["", "collectives in the compiled train step (result bytes per device):",
              f"{'layer':<10} {'pass':<9} {'kind':<19} {'axes':<13} {'count':>5} {'bytes':>14}"]
    table: dict[tuple, list[int]] = {}
    for c in rep["collectives"]:
        key = (c["layer"] or "-", c["pass_"] or "-", c["kind"], "+".join(c["axes"]) or "-")
        table.setdefault(key, []).append(c["bytes"])
    order = {name: i for i, name in enumerate((*LAYERS, "-"))}
    for key in sorted(table, key=lambda k: (order.get(k[0], 99), k[1] != "forward", k[2], k[3])):
        layer, pass_, kind, axes = key
        lines.append(f"{layer:<10} {pass_:<9} {kind:<19} {axes:<13} {len(table[key]):>5} {sum(table[key]):>14,}")
    if not table:
        lines.append("(none: every device computes on its own)")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    import json

    from absl import flags

    del argv
    f = flags.FLAGS
    try:
        config = f.config
        config.eval_batch_size = config.batch_size  # only the train step is compiled here
        mesh_shape = tuple(int(s) for s in f.mesh.split(",")) if f.mesh else tuple(config.mesh_shape)
        mesh = make_mesh(mesh_shape)
        strategy = strategy_of(config)
        check_mesh(config, mesh, strategy)
        size = config.image_size
        channels = f.channels or (1 if config.dataset == "fashion_mnist" else 3)
        rep = report(config, mesh, (size, size, channels))
    except UserError as e:
        raise SystemExit(f"alexnet_jax.sharding: error: {e}") from None
    print(json.dumps(rep, indent=1) if f.json else format_report(rep))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override keys with --config.key=value.")
    flags.DEFINE_string("mesh", "", "data,model sizes, e.g. 4,2 (default: the config's mesh_shape).")
    flags.DEFINE_integer("channels", 0, "Image channels (default: 1 for fashion_mnist, else 3).")
    flags.DEFINE_bool("json", False, "Print the report as JSON.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
