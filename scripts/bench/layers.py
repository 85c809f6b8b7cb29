"""--mode layers: each convolution timed as the model computes it (XLA's convolution) and as PyTorch's conv2d
does, alternated. XLA's convolution runs on YNNPACK or on Eigen as this process's XLA_FLAGS say (the
benchmark sets what the entry points set: Eigen; run with XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
individual_dot,individual_convolution for YNNPACK's)."""

from __future__ import annotations

import time

import numpy as np

from bench.common import load_config


def conv_calls(model, shape: tuple[int, int, int]) -> dict[str, tuple]:
    """(input shape, kernel shape, strides, padding, groups) of each conv as the model calls it (shapes only)."""
    from alexnet_jax import flops

    return {name: (g.input, g.kernel, g.strides, g.padding, g.groups)
            for name, g in flops.conv_geometry(model, shape).items()}


def _formulations(groups: int, strides: int, padding) -> dict[str, object]:
    """{name: conv(x, k)}: the model's convolution (`ops.grouped_conv`: XLA's, each group on its own, by YNNPACK or
    Eigen as this process's XLA_FLAGS say)."""
    from alexnet_jax.model import grouped_conv

    return {"xla": lambda x, k: grouped_conv(x, k, groups, strides, padding)}


def _conv_work(x_shape, k_shape, strides, padding, groups, *, batch: int, first: bool, torch) -> dict:
    """{formulation: (fn, args)}: one layer's forward and gradients (conv1: no input gradient, as in training)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *x_shape)), jnp.float32)
    k = jnp.asarray(rng.normal(0, 0.01, k_shape), jnp.float32)
    forms = _formulations(groups, strides, padding)
    y_shape = jax.eval_shape(forms["xla"], x, k).shape
    dy = jnp.asarray(rng.normal(size=y_shape), jnp.float32)
    fns = {}
    for name, f in forms.items():
        def work(x, k, dy, f=f):
            if first:
                y, pull = jax.vjp(lambda k: f(x, k), k)
            else:
                y, pull = jax.vjp(f, x, k)
            return y, pull(dy)
        fns[name] = (jax.jit(work), (x, k, dy))
    if torch is not None:
        (pt, pb), (pl, pr) = padding
        tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(not first)
        tk = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy()).requires_grad_(True)
        tdy = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())

        def torch_work():
            y = torch.nn.functional.conv2d(torch.nn.functional.pad(tx, (pl, pr, pt, pb)), tk, None, strides, 0, 1,
                                           groups)
            y.backward(tdy)
            return y
        fns["torch"] = (torch_work, ())
    return fns


def bench_layers(config_path: str, batch: int, steps: int, overrides: list[str]) -> dict[str, dict[str, float]]:
    """Median ms of each conv layer's training work, per formulation (and torch's), alternated."""
    import jax

    from alexnet_jax import sharding, train

    config = load_config(config_path, batch, overrides)
    channels = 1 if config.dataset == "fashion_mnist" else 3
    shape = (config.image_size, config.image_size, channels)
    model = train.Trainer(train.RunSpec.from_config(config), sharding.make_mesh(config.mesh_shape), shape, 1000,
                          100_000).model
    try:
        from alexnet_jax import torch_alexnet

        torch = torch_alexnet.import_torch()
    except Exception:  # noqa: BLE001 - torch is optional here: report JAX's formulations only
        torch = None
    out: dict[str, dict[str, float]] = {}
    for name, geometry in conv_calls(model, shape).items():
        fns = _conv_work(*geometry, batch=batch, first=name == "conv1", torch=torch)
        times: dict[str, list[float]] = {key: [] for key in fns}
        for _ in range(steps + 1):  # the first round compiles / warms up
            for key, (fn, args) in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[key].append(time.perf_counter() - t0)
        out[name] = {f"{key}_ms": 1000 * float(np.median(v[1:])) for key, v in times.items()}
    return out
