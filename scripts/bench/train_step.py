"""--mode train_step: the jitted train step (compile, ms/step, memory, FLOP/s), optionally beside PyTorch.

The pieces `--mode finetune` reuses: `jax_step` (a compiled step of a config on a fixed batch already on the
device), `torch_step` (the same net in PyTorch, optionally with frozen conv layers and bfloat16 autocast) and
`alternate` (the two timed turn about, so both see the same machine load).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from bench.common import cost_flops, load_config, peak_rss_mib


def image_shape(config) -> tuple[int, int, int]:
    from alexnet_jax import flops

    return flops.image_shape_of(config.dataset, config.image_size)


def random_batch(config, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"image": rng.normal(0, 50, (batch, *image_shape(config))).astype(np.float32),
            "label": rng.integers(0, config.num_classes, batch).astype(np.int32)}


def jax_step(config, batch_np: dict[str, np.ndarray]) -> tuple[Callable[[], None], dict[str, object], object]:
    """(run one step, compile facts, trainer): `config`'s jitted train step on `batch_np` already on the device,
    compiled and warmed up; each call runs one step and waits for it."""
    import jax

    from alexnet_jax import sharding, train

    trainer = train.Trainer(train.RunSpec.from_config(config), sharding.make_mesh(config.mesh_shape),
                            image_shape(config), 1000, 100_000)
    state = trainer.init(jax.random.PRNGKey(0))
    device_batch = trainer.global_batch(batch_np)  # data already on the device: the step alone is timed
    t0 = time.perf_counter()
    lowered = trainer.train_step.lower(state, device_batch)
    t1 = time.perf_counter()
    step_fn = lowered.compile()
    t2 = time.perf_counter()
    box = [state]

    def run() -> None:
        box[0], m = step_fn(box[0], device_batch)
        jax.block_until_ready((box[0], m))

    run()  # warm-up
    info: dict[str, object] = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1}
    xla_flop = cost_flops(step_fn)
    if xla_flop:
        info["xla_cost_gflop_per_step"] = xla_flop / 1e9
    mem = step_fn.memory_analysis()
    if mem is not None:
        info["xla_temp_mib"] = mem.temp_size_in_bytes / 2**20
        info["xla_args_mib"] = mem.argument_size_in_bytes / 2**20
    return run, info, trainer


def torch_step(model, config, batch_np: dict[str, np.ndarray], *, frozen_convs: bool = False,
               bfloat16: bool = False) -> Callable[[], None]:
    """The same net in PyTorch (`alexnet_jax.torch_alexnet`), one SGD step per call on `batch_np`: with
    `frozen_convs` the conv layers have requires_grad=False (what a PyTorch user fine-tuning writes), with
    `bfloat16` the forward and loss run under torch.autocast('cpu', torch.bfloat16)."""
    from alexnet_jax import torch_alexnet

    torch = torch_alexnet.import_torch()
    net = torch_alexnet.build(model, image_shape(config))
    if frozen_convs:
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.requires_grad_(False)
    opt = torch_alexnet.make_optimizer(net, config.learning_rate, config.momentum, config.weight_decay)
    step = torch_alexnet.make_train_step(net, opt, bfloat16=bfloat16)
    images = torch.from_numpy(batch_np["image"].transpose(0, 3, 1, 2).copy())
    labels = torch.from_numpy(batch_np["label"].astype(np.int64))

    def run() -> None:
        step(images, labels)

    run()  # warm-up
    return run


def alternate(runs: dict[str, Callable[[], None]], steps: int) -> dict[str, list[float]]:
    """Seconds of each run, `steps` rounds, the runs taking turns within each round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_train_step(config_path: str, batch: int, steps: int, overrides: list[str],
                     vs_torch: bool = False, against: list[str] | None = None) -> dict[str, object]:
    """Median train-step time after warm-up, device-synchronised; with `vs_torch` the equivalent PyTorch step
    alternates with it in the same process (both see the same machine load) and the ratio is reported; with
    `--set dtype=bfloat16` PyTorch's step runs under torch.autocast(bfloat16), the side-by-side bf16 figure.
    `against`: overrides added for a second JAX step alternated with the first (e.g. ['kernels=native']): which
    setting is faster on this machine, in one process."""
    import jax

    from alexnet_jax import flops

    config = load_config(config_path, batch, overrides)
    if vs_torch:
        from alexnet_jax import torch_alexnet

        torch = torch_alexnet.import_torch()
    batch_np = random_batch(config, batch)
    run, info, trainer = jax_step(config, batch_np)
    shape = image_shape(config)
    macs = flops.forward_macs(trainer.model, shape)
    train_flop = 3 * 2 * sum(macs.values()) * batch  # forward + input gradient + kernel gradient
    out: dict[str, object] = {
        "batch": batch, "steps": steps, "devices": jax.device_count(), "backend": jax.default_backend(),
        "dtype": config.dtype, "image_size": config.image_size, "variant": config.variant, **info,
        "forward_mmac_per_image": sum(macs.values()) / 1e6,
        "analytic_train_gflop_per_step": train_flop / 1e9,
    }
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    out["process_peak_rss_mib"] = peak_rss_mib()  # before torch is built: JAX's own footprint
    runs = {"jax": run}
    if vs_torch:
        runs["torch"] = torch_step(trainer.model, config, batch_np, bfloat16=config.dtype == "bfloat16")
        out["torch_threads"] = torch.get_num_threads()
        out["torch_autocast"] = "bfloat16" if config.dtype == "bfloat16" else "none (float32)"
    if against:
        # a key in both replaces --set's value (ml_collections would append a repeated tuple override to the first)
        merged = list({o.split("=", 1)[0]: o for o in [*overrides, *against]}.values())
        runs["against"], against_info, _ = jax_step(load_config(config_path, batch, merged), batch_np)
        out["against_xla_cost_gflop_per_step"] = against_info.get("xla_cost_gflop_per_step")
    times = alternate(runs, steps)
    dt = float(np.median(times["jax"]))
    out.update({"ms_per_step": 1000 * dt, "images_per_s": batch / dt,
                "analytic_tflop_per_s": train_flop / dt / 1e12,
                "jax_ms_each": [round(1000 * t, 1) for t in times["jax"]]})
    if vs_torch:
        tt = float(np.median(times["torch"]))
        out.update({"torch_ms_per_step": 1000 * tt, "torch_images_per_s": batch / tt,
                    "jax_over_torch": dt / tt, "torch_ms_each": [round(1000 * t, 1) for t in times["torch"]]})
    if against:
        ta = float(np.median(times["against"]))
        out.update({"against": " ".join(against), "against_ms_per_step": 1000 * ta, "ms_over_against": dt / ta,
                    "against_ms_each": [round(1000 * t, 1) for t in times["against"]]})
    return out
