"""--mode forward: the inference forward pass (what `predict`, `features` and `evaluate` wait for) at --batch,
float32 or `--set dtype=bfloat16`, against the same net in PyTorch under `torch.no_grad()` (and
`torch.autocast('cpu', torch.bfloat16)` for bfloat16), alternated in one process.
"""

from __future__ import annotations

import numpy as np

from bench.common import load_config
from bench.train_step import alternate, image_shape


def bench_forward(config_path: str, batch: int, steps: int, overrides: list[str]) -> dict[str, object]:
    """Median ms per forward pass (softmax probabilities back on the host) of JAX and PyTorch, and the ratio."""
    import contextlib

    import jax
    import jax.numpy as jnp

    from alexnet_jax import torch_alexnet
    from alexnet_jax.model import ModelSpec, create_model

    config = load_config(config_path, batch, overrides)
    shape = image_shape(config)
    model = create_model(ModelSpec.from_config(config))
    x = np.random.default_rng(0).normal(0, 1, (batch, *shape)).astype(np.float32)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))()
    forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False).astype(jnp.float32)))
    xj = jnp.asarray(x)
    torch = torch_alexnet.import_torch()
    net = torch_alexnet.build(model, shape).eval()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    bf16 = config.dtype == "bfloat16"

    def ours() -> None:
        np.asarray(forward(variables, xj))

    def theirs() -> None:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext():
            torch.softmax(net(xt).float(), 1).numpy()

    ours(), theirs()  # compile / warm up
    times = alternate({"jax": ours, "torch": theirs}, steps)
    jax_ms, torch_ms = (1000 * float(np.median(times[k])) for k in ("jax", "torch"))
    return {"batch": batch, "steps": steps, "variant": config.variant, "dtype": config.dtype,
            "kernels": config.kernels, "jax_ms": jax_ms, "torch_ms": torch_ms, "jax_over_torch": jax_ms / torch_ms,
            "jax_ms_per_image": jax_ms / batch, "torch_ms_per_image": torch_ms / batch,
            "jax_ms_each": [round(1000 * t, 1) for t in times["jax"]],
            "torch_ms_each": [round(1000 * t, 1) for t in times["torch"]]}
