"""Per-layer parameters and compute of a configured AlexNet, from the layer shapes alone (no data, no FLOPs run).

`python -m alexnet_jax.flops --config configs/imagenet.py [--config.variant=owt] [--plot table.png]` prints
the table; the paper net gives 60,965,224 parameters and 724.4M multiply-adds per 224 px image, ~92% of the
compute in the convolutions and ~96% of the parameters in the FC layers (Krizhevsky 2014's argument for data
parallelism in the convs and model parallelism in the FC layers).

Multiply-adds (MAC) count the weight products only: a conv layer's H_out*W_out*k*k*(C_in/groups)*C_out, a
dense layer's in*out. Biases, ReLU, LRN and pooling add < 1% and are left out, as in the paper's figures.
A FLOP is 2 MAC; training costs ~3x the forward pass (forward, gradient w.r.t. inputs, w.r.t. weights).

This module owns all shape and cost analysis of a built model (`stage_outputs`, `feature_shapes`,
`count_params`, `forward_macs`, `layer_costs`, `conv_geometry`); the model package only defines the network.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alexnet_jax.model import AlexNet, Conv, create_model

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
FLOAT_BYTES = 4


@dataclasses.dataclass(frozen=True)
class LayerCost:
    name: str
    output: tuple[int, ...]  # per-image output shape (H, W, C) or (features,)
    params: int
    macs: int  # forward multiply-adds per image


def image_shape_of(dataset: str, image_size: int) -> tuple[int, int, int]:
    """The model's input: FashionMNIST is grayscale, the other datasets RGB."""
    channels = 1 if dataset == "fashion_mnist" else 3
    return (int(image_size), int(image_size), channels)


def _abstract_run(model: AlexNet, image_shape: tuple[int, int, int]) -> tuple[Any, Any]:
    """(params, sown intermediates) of init and apply on one image, as shapes (`jax.eval_shape`)."""

    def run() -> Any:
        x = jnp.zeros((1, *image_shape))
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
        return variables["params"], state["intermediates"]

    return jax.eval_shape(run)


def stage_outputs(model: AlexNet, image_shape: tuple[int, int, int]) -> dict[str, jax.ShapeDtypeStruct]:
    """The sown conv (`convN_out`) and pool (`poolN`) outputs for one image, as shapes (`jax.eval_shape`)."""
    return {k: v for k, v in _abstract_run(model, image_shape)[1].items() if not k.startswith("fc")}  # convs, pools


def feature_shapes(model: AlexNet, image_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of every conv and pool stage (shapes only, no FLOPs spent)."""
    return {name.removesuffix("_out"): tuple(v.shape[1:]) for name, v in stage_outputs(model, image_shape).items()}


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """One convolution as the model calls it: per-image input (H, W, C), kernel (kh, kw, C/groups, out)."""

    input: tuple[int, int, int]
    kernel: tuple[int, int, int, int]
    strides: int
    padding: tuple[tuple[int, int], tuple[int, int]]
    groups: int


def conv_geometry(model: AlexNet, image_shape: tuple[int, int, int]) -> dict[str, ConvGeometry]:
    """Every conv layer's geometry in `model.apply` on one image, read off the `Conv` modules as they are called
    (Flax's `nn.intercept_methods`; shapes only, nothing computed): what a per-layer benchmark needs to time
    each convolution alone."""
    found: dict[str, ConvGeometry] = {}

    def spy(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, Conv) and context.method_name == "__call__":
            x = args[0]
            k = module.kernel_size
            found[module.name] = ConvGeometry(tuple(x.shape[1:]), (k, k, x.shape[-1] // module.groups,
                                                                   module.features), module.strides,
                                              tuple(map(tuple, module.padding)), module.groups)
        return next_fun(*args, **kwargs)

    def run() -> Any:
        x = jnp.zeros((1, *image_shape))
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        with nn.intercept_methods(spy):
            return model.apply(variables, x, train=False)

    jax.eval_shape(run)
    return found


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(math.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def layer_costs(model: AlexNet, image_shape: tuple[int, int, int]) -> list[LayerCost]:
    """One row per conv/FC layer; shapes come from `jax.eval_shape` of init and apply (nothing is computed)."""
    params, inter = _abstract_run(model, image_shape)
    rows = []
    for name in LAYERS:
        kernel, bias = params[name]["kernel"].shape, params[name]["bias"].shape
        n = math.prod(kernel) + math.prod(bias)
        if name.startswith("conv"):
            out = tuple(inter[f"{name}_out"].shape[1:])
            macs = out[0] * out[1] * math.prod(kernel)  # kh*kw*(cin/groups)*cout per output position
        else:
            out = (kernel[1],)
            macs = math.prod(kernel)
        rows.append(LayerCost(name, out, n, macs))
    return rows


def forward_macs(model: AlexNet, image_shape: tuple[int, int, int]) -> dict[str, int]:
    """Multiply-adds per image of every conv and FC layer (the paper net with groups: 724.4M in all).

    A conv's count is output positions x its kernel's size (a grouped kernel already holds cin/groups);
    training costs about 3x the forward pass (forward, input gradient, kernel gradient).
    """
    return {r.name: r.macs for r in layer_costs(model, image_shape)}


def activation_floats(model: AlexNet, image_shape: tuple[int, int, int]) -> int:
    """Floats per image in the layer outputs a training step keeps for the backward pass (conv outputs,
    their ReLU/LRN/pool results and the FC outputs): a lower bound on activation memory."""
    inter = stage_outputs(model, image_shape)
    total = 0
    for name, v in inter.items():
        size = math.prod(v.shape[1:])
        # each conv output is kept twice more (after ReLU, and after LRN where there is one); pools once
        total += 2 * size if name.endswith("_out") else size
    return total + sum(r.output[0] for r in layer_costs(model, image_shape) if r.name.startswith("fc")) * 2


def format_table(rows: list[LayerCost]) -> str:
    """The table as text, with totals and the conv/FC split."""
    p_total = sum(r.params for r in rows)
    m_total = sum(r.macs for r in rows)
    lines = [f"{'layer':<6} {'output':>14} {'params':>12} {'% params':>9} {'MAC/image':>14} {'% MAC':>7}"]
    for r in rows:
        shape = "x".join(map(str, r.output))
        lines.append(f"{r.name:<6} {shape:>14} {r.params:>12,} {100 * r.params / p_total:>8.1f}% "
                     f"{r.macs:>14,} {100 * r.macs / m_total:>6.1f}%")
    conv = [r for r in rows if r.name.startswith("conv")]
    fc = [r for r in rows if r.name.startswith("fc")]
    lines.append(f"{'total':<6} {'':>14} {p_total:>12,} {'':>9} {m_total:>14,}")
    for label, part in (("convs", conv), ("FC", fc)):
        lines.append(f"{label:<6} {'':>14} {sum(r.params for r in part):>12,} "
                     f"{100 * sum(r.params for r in part) / p_total:>8.1f}% {sum(r.macs for r in part):>14,} "
                     f"{100 * sum(r.macs for r in part) / m_total:>6.1f}%")
    lines.append(f"forward {2 * m_total / 1e9:.3f} GFLOP/image; training ~{6 * m_total / 1e9:.2f} GFLOP/image (3x)")
    return "\n".join(lines)


def plot_table(rows: list[LayerCost], path: str, title: str = "") -> str:
    """Bar chart: share of parameters and of multiply-adds per layer (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    p_total = sum(r.params for r in rows)
    m_total = sum(r.macs for r in rows)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, [100 * r.params / p_total for r in rows], 0.4, label=f"parameters ({p_total / 1e6:.1f}M)")
    ax.bar(x + 0.2, [100 * r.macs / m_total for r in rows], 0.4, label=f"multiply-adds ({m_total / 1e6:.1f}M/image)")
    ax.set_xticks(x, [r.name for r in rows])
    ax.set_ylabel("% of the network")
    conv_m = 100 * sum(r.macs for r in rows if r.name.startswith("conv")) / m_total
    fc_p = 100 * sum(r.params for r in rows if r.name.startswith("fc")) / p_total
    ax.set_title(title or f"convs: {conv_m:.0f}% of the compute; FC layers: {fc_p:.0f}% of the parameters")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = flags.FLAGS.config
    from alexnet_jax.errors import UserError
    from alexnet_jax.specs import RunSpec

    try:
        spec = RunSpec.from_config(config)  # every key checked, as a training run would
    except UserError as e:
        sys.exit(f"alexnet_jax.flops: error: {e}")
    model = create_model(spec.model.with_classes(1000))  # num_classes=0 (the dataset's): counted at 1000
    shape = image_shape_of(config.dataset, config.image_size)
    rows = layer_costs(model, shape)
    groups = model.groups or model.spec.default_groups
    print(f"{config.variant} AlexNet, input {'x'.join(map(str, shape))}, {model.num_classes} classes, "
          f"{groups} group(s) in conv2/4/5")
    print(format_table(rows))
    act = activation_floats(model, shape)
    params = sum(r.params for r in rows)
    print(f"memory: parameters {params * FLOAT_BYTES / 2**20:.0f} MiB (x3 with gradients and momentum: "
          f"{3 * params * FLOAT_BYTES / 2**20:.0f} MiB); kept activations >= {act * FLOAT_BYTES / 2**20:.2f} MiB/image "
          f"({act * FLOAT_BYTES * config.batch_size / 2**30:.2f} GiB at batch {config.batch_size})")
    if flags.FLAGS.plot:
        print("wrote", plot_table(rows, flags.FLAGS.plot))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override keys with --config.key=value.")
    flags.DEFINE_string("plot", None, "Also draw the table as a bar chart into this PNG.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
