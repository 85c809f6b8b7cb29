"""--mode train_step: the jitted train step (compile, ms/step, memory, FLOP/s), optionally beside PyTorch."""

from __future__ import annotations

import time

import numpy as np

from bench.common import cost_flops, load_config, peak_rss_mib


def bench_train_step(config_path: str, batch: int, steps: int, overrides: list[str],
                     vs_torch: bool = False) -> dict[str, float]:
    """Median train-step time after warm-up, device-synchronised; with `vs_torch` the equivalent PyTorch step
    alternates with it in the same process (both see the same machine load) and the ratio is reported."""
    import jax

    from alexnet_jax import flops, sharding, train

    config = load_config(config_path, batch, overrides)
    if vs_torch:
        from alexnet_jax import torch_alexnet

        torch = torch_alexnet.import_torch()  # always float32: with --set dtype=bfloat16 it is a load yardstick
    mesh = sharding.make_mesh(config.mesh_shape)
    channels = 1 if config.dataset == "fashion_mnist" else 3
    shape = (config.image_size, config.image_size, channels)
    trainer = train.Trainer(config, mesh, shape, 1000, 100_000)
    state = trainer.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch_np = {"image": rng.normal(0, 50, (batch, *shape)).astype(np.float32),
                "label": rng.integers(0, config.num_classes, batch).astype(np.int32)}
    device_batch = trainer.global_batch(batch_np)  # data already on the device: the step alone is timed
    t0 = time.perf_counter()
    lowered = trainer.train_step.lower(state, device_batch)
    t1 = time.perf_counter()
    step_fn = lowered.compile()
    t2 = time.perf_counter()
    state, m = step_fn(state, device_batch)  # warm-up
    jax.block_until_ready((state, m))
    macs = flops.forward_macs(trainer.model, shape)
    train_flop = 3 * 2 * sum(macs.values()) * batch  # forward + input gradient + kernel gradient
    mem = step_fn.memory_analysis()
    out: dict[str, float] = {
        "batch": batch, "steps": steps, "devices": jax.device_count(), "backend": jax.default_backend(),
        "dtype": config.dtype, "image_size": config.image_size, "variant": config.variant,
        "trace_lower_s": t1 - t0, "compile_s": t2 - t1,
        "forward_mmac_per_image": sum(macs.values()) / 1e6,
        "analytic_train_gflop_per_step": train_flop / 1e9,
    }
    xla_flop = cost_flops(step_fn)
    if xla_flop:
        out["xla_cost_gflop_per_step"] = xla_flop / 1e9
    if mem is not None:
        out["xla_temp_mib"] = mem.temp_size_in_bytes / 2**20
        out["xla_args_mib"] = mem.argument_size_in_bytes / 2**20
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    out["process_peak_rss_mib"] = peak_rss_mib()  # before torch is built: JAX's own footprint

    torch_step = None
    if vs_torch:
        net = torch_alexnet.build(trainer.model, shape)
        opt = torch_alexnet.make_optimizer(net, config.learning_rate, config.momentum, config.weight_decay)
        torch_step = torch_alexnet.make_train_step(net, opt)
        images = torch.from_numpy(batch_np["image"].transpose(0, 3, 1, 2).copy())
        labels = torch.from_numpy(batch_np["label"].astype(np.int64))
        torch_step(images, labels)  # warm-up
        out["torch_threads"] = torch.get_num_threads()
    jax_times, torch_times = [], []
    for _ in range(steps):
        s0 = time.perf_counter()
        state, m = step_fn(state, device_batch)
        jax.block_until_ready((state, m))
        jax_times.append(time.perf_counter() - s0)
        if torch_step:
            s0 = time.perf_counter()
            torch_step(images, labels)
            torch_times.append(time.perf_counter() - s0)
    dt = float(np.median(jax_times))
    out.update({"ms_per_step": 1000 * dt, "images_per_s": batch / dt,
                "analytic_tflop_per_s": train_flop / dt / 1e12,
                "jax_ms_each": [round(1000 * t, 1) for t in jax_times]})
    if torch_step:
        tt = float(np.median(torch_times))
        out.update({"torch_ms_per_step": 1000 * tt, "torch_images_per_s": batch / tt,
                    "jax_over_torch": dt / tt, "torch_ms_each": [round(1000 * t, 1) for t in torch_times]})
    return out
