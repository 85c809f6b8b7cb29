"""--mode finetune: the train step with the conv layers frozen (`--config.frozen='conv.*'`) against the same step
unfrozen and against PyTorch's frozen step (`requires_grad=False` on the convs), all alternated in one process.

Fine-tuning torchvision's weights is what most users of the 'owt' net do; with frozen convs XLA drops their kernel
gradients and, below the first trained layer, every input gradient, so the frozen step costs what the forward and
the FC layers' backward cost.
"""

from __future__ import annotations

import numpy as np

from bench.common import load_config
from bench.train_step import alternate, jax_step, random_batch, torch_step


def bench_finetune(config_path: str, batch: int, steps: int, overrides: list[str],
                   frozen: str = "conv.*") -> dict[str, object]:
    """Median ms of the frozen, unfrozen and PyTorch-frozen steps and their ratios."""
    unfrozen_config = load_config(config_path, batch, overrides)
    frozen_config = load_config(config_path, batch, [*overrides, f"frozen={frozen}"])
    batch_np = random_batch(unfrozen_config, batch)
    frozen_run, _, trainer = jax_step(frozen_config, batch_np)
    unfrozen_run, _, _ = jax_step(unfrozen_config, batch_np)
    runs = {"jax_frozen": frozen_run, "jax_unfrozen": unfrozen_run,
            "torch_frozen": torch_step(trainer.model, frozen_config, batch_np, frozen_convs=True)}
    times = alternate(runs, steps)
    ms = {name: 1000 * float(np.median(v)) for name, v in times.items()}
    return {"batch": batch, "steps": steps, "variant": unfrozen_config.variant, "frozen": frozen,
            **{f"{name}_ms": v for name, v in ms.items()},
            "frozen_over_unfrozen": ms["jax_frozen"] / ms["jax_unfrozen"],
            "frozen_over_torch_frozen": ms["jax_frozen"] / ms["torch_frozen"],
            **{f"{name}_ms_each": [round(1000 * t, 1) for t in v] for name, v in times.items()}}
