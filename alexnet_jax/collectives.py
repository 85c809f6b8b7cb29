"""What the partition rules compile to: every collective of the compiled train step, attributed to a layer.

`python -m alexnet_jax.collectives --config configs/imagenet.py --mesh 4,2` prints each parameter's partition
spec and per-device bytes and the collectives of the compiled train step (kind, bytes, mesh axis, layer).
On a CPU, simulate devices first: `XLA_FLAGS=--xla_force_host_platform_device_count=8`. It sits above `train`
(it compiles the trainer's step); `sharding.py` decides the placement, this module only reads the result.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from alexnet_jax import train
from alexnet_jax.errors import UserError
from alexnet_jax.sharding import AXES, CONV_LAYERS, FC_LAYERS, make_mesh, path_str
from alexnet_jax.specs import RunSpec

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
LAYERS = CONV_LAYERS + FC_LAYERS
SCOPES = (*LAYERS, "loss", "metrics")  # every collective of the train step belongs to one of these
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
    """The AlexNet layer, or the train step's 'loss' / 'metrics' (named scopes) an op belongs to; else the op's
    own name (an op nothing claims: `tests/test_sharding.py` fails on such a row)."""
    layer = next((name for name in SCOPES if re.search(rf"(^|[/(]){name}([/)]|$)", op_name)), "")
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


def compiled_train_step(spec: RunSpec, mesh: Mesh, image_shape: Sequence[int]) -> Any:
    """Lower and compile the trainer's train step for `spec` on `mesh` from shapes only (no data, no init)."""
    batch_size = spec.loop.batch_size
    trainer = train.Trainer(spec, mesh, tuple(image_shape), steps_per_epoch=100, total_steps=1000)
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   trainer.abstract_state, trainer.state_sharding)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *image_shape), np.float32, sharding=trainer.batch_sharding),
        "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=trainer.batch_sharding),
    }
    return trainer, trainer.train_step.lower(state, batch).compile()


def report(spec: RunSpec, mesh: Mesh, image_shape: Sequence[int]) -> dict[str, Any]:
    """Partition spec and bytes per device of every parameter, and the compiled train step's collectives."""
    trainer, compiled = compiled_train_step(spec, mesh, image_shape)
    params = []
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(trainer.abstract_state.params),
                                      jax.tree_util.tree_leaves(trainer.state_sharding.params), strict=True):
        local = sharding.shard_shape(leaf.shape)
        params.append({"name": path_str(path), "shape": list(leaf.shape), "spec": str(sharding.spec),
                       "bytes": int(math.prod(leaf.shape)) * leaf.dtype.itemsize,
                       "bytes_per_device": int(math.prod(local)) * leaf.dtype.itemsize})
    ops = collectives(compiled.as_text(), mesh)
    total = sum(p["bytes"] for p in params)
    per_device = sum(p["bytes_per_device"] for p in params)
    return {
        "mesh": dict(mesh.shape), "strategy": spec.sharding.strategy, "variant": spec.model.variant,
        "image_shape": list(image_shape), "batch_size": spec.loop.batch_size,
        "param_bytes": total, "param_bytes_per_device": per_device, "params": params,
        "collectives": [dataclasses.asdict(c) | {"axes": list(c.axes)} for c in ops],
    }


def report_for(config: ml_collections.ConfigDict, mesh_shape: Sequence[int], channels: int = 0) -> dict[str, Any]:
    """What the command line reports for `config` on a mesh of `mesh_shape` (the tests call this too)."""
    spec = RunSpec.from_config(config)
    if not spec.model.num_classes:
        raise UserError("--config.num_classes=0 (the dataset's count): give the count the report is for, e.g. "
                        "--config.num_classes=1000")
    spec = dataclasses.replace(spec, loop=dataclasses.replace(spec.loop, eval_batch_size=spec.loop.batch_size))
    mesh = make_mesh(mesh_shape)  # only the train step is compiled here: its batch is the one checked
    spec.check_mesh(mesh)
    size = config.image_size
    channels = channels or (1 if config.dataset == "fashion_mnist" else 3)
    return report(spec, mesh, (size, size, channels))


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
    order = {name: i for i, name in enumerate((*SCOPES, "-"))}
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
        mesh_shape = tuple(int(s) for s in f.mesh.split(",")) if f.mesh else tuple(f.config.mesh_shape)
        rep = report_for(f.config, mesh_shape, f.channels)
    except UserError as e:
        raise SystemExit(f"alexnet_jax.collectives: error: {e}") from None
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
