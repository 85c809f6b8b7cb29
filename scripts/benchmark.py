"""Throughput measurements on this machine.

--mode pipeline (default): input-pipeline images/s on ImageNet-sized JPEGs (500x375 and 375x500, generated in
  memory), for the paper's training augmentation and the 10-crop evaluation, with tf.data (alexnet_jax.data.augment,
  the same functions alexnet_jax.data.imagenet maps over the records) beside a plain PIL + NumPy implementation of
  the same steps, measured in the same run. "Per core" = images / CPU-seconds of this process (all threads),
  so a pipeline allowed several threads is not credited for them; --threads sets tf.data's thread pool.
  Then [sources] (issue #14): the real training stream and 10-crop evaluation (alexnet_jax.data.imagenet's
  train_dataset / eval_dataset: records read, shuffled, parsed, augmented, batched) on a generated ILSVRC-format
  archive of realistic image sizes and bytes (--classes x --train-per-class, ~410x370 and ~110 KB on average
  at --source-quality 97), prepared by tfds's
  imagenet2012 builder and then as 256x256 squares (alexnet_jax.data.squares, raw and JPEG 95), for today's
  source-JPEG path and both preparations side by side, in turns in one run, with the host's part of
  --config.augment_on_device=True (raw squares; the uint8 squares and their draws go to the step) and the
  step's added cost (ms per batch of 32 / 128, jitted on this machine's JAX device); the stored bytes per
  image; and the host cores each path needs per accelerator (its train step's images/s at 40% of its bf16 peak).
--mode train_step: the jit-compiled train step (configs/imagenet.py's net unless --config is given, random
  batches already on the device): trace and compile time, the median of --steps timed steps after a warm-up
  (device-synchronised), images/s, XLA's memory analysis and the process's peak RSS, and FLOP/s from the
  model's analytic multiply-add count (x3 for training) beside XLA's own cost analysis. With --vs-torch the
  same net in PyTorch (alexnet_jax.torch_alexnet: same shapes, groups, LRN, pooling, dropout, SGD) is timed
  step for step alternately with it and the ratio printed. Runs unchanged on a GPU/TPU backend.
--mode layers: each convolution of --config's net (conv1 forward + kernel gradient, conv2-5 forward + both
  gradients) at --batch, timed alone for kernels='cpu_tuned' and 'native' and, with torch installed, PyTorch's
  conv2d (groups) alternately in one process: which formulation wins on this machine, layer by layer.
--mode checkpoint: the cost of periodic checkpoints in real training. Runs `alexnet_jax.main` --pairs times
  with checkpoints every --every steps and as often without (only the final save), alternately so both see the
  same machine load, each --run-steps steps of --config (the FashionMNIST quick start by default) with no
  evaluation, and compares their `train_images_per_second` (save time included, compilation excluded).

Every run reports the machine's 1-minute load average at start and end (`load_avg_start`, `load_avg_end`) beside
the core count: a figure taken while other work ran is not a measurement of this code (torch's OpenMP threads
stall on a busy machine). `--record` appends the train-step result as a row of docs/performance.md's results
table (between its `results:begin`/`results:end` markers), and refuses, printing the figure with a warning,
when either load average was above the core count.

Usage: python scripts/benchmark.py [--mode pipeline|train_step|all] [--images 256] [--threads 1] [--json]
       python scripts/benchmark.py --mode checkpoint --pairs 3 --run-steps 1000 --every 100
       python scripts/benchmark.py --vs-torch --set image_size=227 --batch 32 --steps 5     # paper net
       python scripts/benchmark.py --vs-torch --config configs/fashion_mnist.py --batch 128  # quick start
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """ImageNet-sized JPEGs (the ILSVRC-2012 average is about 400x350; most are 500x375 or 375x500)."""
    tiny = _load_script("make_tiny_imagenet")
    rng = np.random.default_rng(seed)
    return [tiny.make_jpeg(i % 8, i, rng, (500, 375) if i % 3 else (375, 500), gray=False) for i in range(count)]


# ---- plain PIL + NumPy, the same steps ------------------------------------------------------------------


def pil_square(jpeg: bytes, size: int):
    from PIL import Image

    im = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # The filter tf's 'area' resize uses when shrinking (a box filter), bilinear when enlarging.
    im = im.crop((left, top, left + side, top + side)).resize(
        (size, size), Image.BOX if side >= size else Image.BILINEAR)
    return np.asarray(im, np.float32)


def pil_train(jpeg: bytes, rng: np.random.Generator, mean_image: np.ndarray, crop: int = 224,
              resize: int = 256) -> np.ndarray:
    from alexnet_jax.data.augment import PCA_EIGVAL, PCA_EIGVEC

    x = pil_square(jpeg, resize) - mean_image
    y0, x0 = rng.integers(0, resize - crop + 1, 2)
    x = x[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < 0.5:
        x = x[:, ::-1]
    alpha = rng.normal(0, 0.1, 3).astype(np.float32)
    return np.ascontiguousarray(x + 255.0 * PCA_EIGVEC @ (alpha * PCA_EIGVAL))


def pil_ten_crop(jpeg: bytes, mean_image: np.ndarray, crop: int = 224, resize: int = 256) -> np.ndarray:
    from alexnet_jax.data.augment import corner_offsets

    x = pil_square(jpeg, resize) - mean_image
    five = [x[y : y + crop, o : o + crop] for y, o in corner_offsets(resize, crop)]
    return np.stack(five + [p[:, ::-1] for p in five])


def _timed(fn, warmup_fn=None) -> dict[str, float]:
    if warmup_fn:
        warmup_fn()
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"images": n, "wall_s": wall, "cpu_s": cpu, "images_per_s": n / wall, "images_per_cpu_s": n / cpu}


def bench_pipeline(images: int, threads: int, repeats: int = 2, batch: int = 32) -> dict[str, dict[str, float]]:
    import tensorflow as tf

    from alexnet_jax.data import augment

    tf.config.set_visible_devices([], "GPU")
    jpegs = make_jpegs(images)
    mean_image = np.full((256, 256, 3), 115.0, np.float32)
    opts = tf.data.Options()
    opts.deterministic = True
    opts.threading.private_threadpool_size = threads
    opts.threading.max_intra_op_parallelism = 1

    def tf_train_ds():
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(jpegs)).enumerate()
        ds = ds.map(lambda i, j: augment.paper_train_image(
            j, tf.stack([tf.constant(7, tf.int64), i]), resize=256, crop=224, flip=True, pca_std=0.1,
            normalization="pixel", mean=mean_image, std=np.ones(3, np.float32)),
            num_parallel_calls=threads, deterministic=True)
        return ds.batch(batch).prefetch(2).with_options(opts)

    def tf_eval_ds():
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(jpegs))
        ds = ds.map(lambda j: augment.eval_image(j, resize=256, crop=224, crops=10, normalization="pixel",
                                                 mean=mean_image, std=np.ones(3, np.float32)),
                    num_parallel_calls=threads, deterministic=True)
        return ds.batch(batch).prefetch(2).with_options(opts)

    def consume(ds):
        # The dataset is built (traced) once; each pass iterates it again, as training does epoch after epoch.
        return lambda: sum(len(b) for _ in range(repeats) for b in ds.as_numpy_iterator())

    def pil(fn):
        return lambda: sum(len([fn(j) for j in jpegs]) for _ in range(repeats))

    rng = np.random.default_rng(0)
    train_ds, eval_ds = tf_train_ds(), tf_eval_ds()
    results = {}
    # One untimed pass each first (tracing, thread pools, caches); implementations alternate so that both
    # see the same machine load.
    results["tf_train"] = _timed(consume(train_ds), lambda: list(train_ds.as_numpy_iterator()))
    results["pil_train"] = _timed(pil(lambda j: pil_train(j, rng, mean_image)),
                                  lambda: [pil_train(j, rng, mean_image) for j in jpegs])
    results["tf_eval_10crop"] = _timed(consume(eval_ds), lambda: list(eval_ds.as_numpy_iterator()))
    results["pil_eval_10crop"] = _timed(pil(lambda j: pil_ten_crop(j, mean_image)),
                                        lambda: [pil_ten_crop(j, mean_image) for j in jpegs])
    results["speedup_train_per_core"] = {
        "x": results["tf_train"]["images_per_cpu_s"] / results["pil_train"]["images_per_cpu_s"]}
    results["speedup_eval_per_core"] = {
        "x": results["tf_eval_10crop"]["images_per_cpu_s"] / results["pil_eval_10crop"]["images_per_cpu_s"]}
    return results


# Published dense bf16 peaks (TFLOP/s per device) for the host-cores table; the step is assumed to reach 40% of it.
ACCELERATORS = {"A100": 312.0, "H100 SXM": 989.0, "TPU v4 chip": 275.0, "TPU v5e chip": 197.0}
MFU = 0.4


def bench_sources(classes: int, train_per_class: int, threads: int, repeats: int = 3,
                  batch: int = 32, quality: int = 97) -> dict[str, object]:
    """The real training and 10-crop evaluation pipelines (`alexnet_jax.data.imagenet.train_dataset` /
    `eval_dataset`: records read, shuffled, parsed, augmented, batched) on an ILSVRC-format archive of realistic
    image sizes, for today's source JPEGs and the prepared 256x256 squares (JPEG and raw), measured in turns in
    one run so all three see the same machine load; with the images per second an accelerator's train step
    consumes at 40% of its bf16 peak and the host cores that takes."""
    import contextlib
    import tempfile

    import tensorflow as tf

    from alexnet_jax import default_config
    from alexnet_jax.data import base, imagenet, squares

    tf.config.set_visible_devices([], "GPU")
    tiny = _load_script("make_tiny_imagenet")
    mean_image = np.full((256, 256, 3), 115.0, np.float32)
    stats = {"mean_image": mean_image, "mean": np.full(3, 115.0, np.float32), "std": np.ones(3, np.float32)}
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manual, data_dir = os.path.join(tmp, "manual"), os.path.join(tmp, "data")
        tiny.write_tiny_imagenet(manual, classes=classes, train_per_class=train_per_class, val_per_class=4,
                                 sizes=tiny.REALISTIC_SIZES, quality=quality)
        with contextlib.redirect_stdout(sys.stderr):  # tfds prints its progress: keep --json's stdout clean
            source = imagenet.prepare(data_dir, manual, verify=False)
        config = default_config.get_config()
        config.update(dict(data_dir=data_dir, batch_size=batch, eval_batch_size=batch, eval_crops=10,
                           shuffle_buffer=1000, seed=0))
        norm = base.normalisation_for(config, stats)
        builders = {"today": (source, (None, None))}
        sizes = {"today": source.info.splits["train"].num_bytes / source.info.splits["train"].num_examples}
        for fmt in squares.FORMATS:
            config.prepared_format = fmt
            with contextlib.redirect_stdout(sys.stderr):
                b = squares.prepare(config)
            builders[f"prepared_{fmt}"] = (b, squares.pipelines(config, norm, b))
            sizes[f"prepared_{fmt}"] = b.info.splits["train"].num_bytes / b.info.splits["train"].num_examples
        steps = source.info.splits["train"].num_examples // batch  # one epoch per pass
        datasets = {}
        for name, (b, (train, evaluation)) in builders.items():
            datasets[f"{name}_train"] = imagenet.train_dataset(b, config, norm, 0, steps, threads=threads,
                                                               squares=train)
            datasets[f"{name}_eval_10crop"] = imagenet.eval_dataset(b, config, norm, threads=threads,
                                                                    squares=evaluation)
        # Issue #14 item 3: --config.augment_on_device=True, the host's part (raw squares to the uint8 squares of
        # the batch and their draws; crop, reflection, mean image and lighting in the jitted step), and, measured
        # only, a middle way: uint8 224 patches (crop and reflection on the host, the rest in the step).
        raw = builders["prepared_raw"][0]
        config.prepared_format, config.augment_on_device = "raw", True
        datasets["prepared_raw_on_device_train"] = imagenet.train_dataset(
            raw, config, norm, 0, steps, threads=threads, squares=squares.pipelines(config, norm, raw)[0])
        on_device = squares.on_device(config, norm)
        config.augment_on_device = False
        datasets["prepared_raw_uint8_patches_host_part_train"] = imagenet.train_dataset(
            raw, config, norm, 0, steps, threads=threads, squares=_uint8_patches(config, raw))
        totals = {k: [0, 0.0, 0.0] for k in datasets}
        for ds in datasets.values():  # warm-up: tracing, XLA compilation, thread pools, file caches
            list(ds.as_numpy_iterator())
        # Passes in turns, so every path sees the same load; each pass is a fresh iterator of the same dataset
        # (a new epoch's iterator), so no path's background prefetching runs in another path's timed turn.
        for _ in range(repeats):
            for k, ds in datasets.items():
                w0, c0 = time.perf_counter(), time.process_time()
                totals[k][0] += sum(len(b["label"]) for b in ds.as_numpy_iterator())
                totals[k][1] += time.perf_counter() - w0
                totals[k][2] += time.process_time() - c0
        for k, (n, wall, cpu) in totals.items():
            out[k] = {"images": n, "images_per_s": n / wall, "images_per_cpu_s": n / cpu}
        for k in ("train", "eval_10crop"):
            for fmt in squares.FORMATS:
                out[f"speedup_prepared_{fmt}_{k}_per_core"] = {
                    "x": out[f"prepared_{fmt}_{k}"]["images_per_cpu_s"] / out[f"today_{k}"]["images_per_cpu_s"]}
        for k in ("prepared_raw_on_device_train", "prepared_raw_uint8_patches_host_part_train"):
            out[f"speedup_{k}_per_core"] = {"x": out[k]["images_per_cpu_s"] / out["today_train"]["images_per_cpu_s"]}
        example = next(datasets["prepared_raw_on_device_train"].as_numpy_iterator())
        out["on_device_augmentation_ms"] = _device_augment_ms(on_device, example)
        out["bytes_per_train_image"] = sizes
        widths, heights = zip(*tiny.REALISTIC_SIZES, strict=True)
        out["archive"] = {"train_images": source.info.splits["train"].num_examples,
                          "validation_images": source.info.splits["validation"].num_examples,
                          "mean_size": f"{np.mean(widths):.0f}x{np.mean(heights):.0f}", "jpeg_quality": quality,
                          "threads": threads}
    out["host_cores_needed"] = _cores_needed({k: out[f"{k}_train"]["images_per_cpu_s"]
                                              for k in SOURCE_PATHS})
    return out


SOURCE_PATHS = ("today", "prepared_jpeg", "prepared_raw", "prepared_raw_on_device")


def _device_augment_ms(on_device, example: dict, repeats: int = 20) -> dict[str, float]:
    """The jitted step's extra work with --config.augment_on_device=True (`augment.paper_batch_on_device`) on this
    machine's default JAX device: the median ms per batch of 32 and of 128 uint8 squares (the example batch's
    rows repeated), after a compiled warm-up."""
    import jax

    step = jax.jit(on_device)
    out = {}
    for batch in (32, 128):
        reps = -(-batch // len(example["label"]))
        b = jax.device_put({k: np.concatenate([v] * reps)[:batch] for k, v in example.items()})
        jax.block_until_ready(step(b))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(step(b))
            times.append(time.perf_counter() - t0)
        out[f"batch_{batch}"] = 1e3 * float(np.median(times))
    out["device"] = jax.devices()[0].device_kind
    return out


def _uint8_patches(config, builder):
    """A `squares=` hook that stops at uint8 patches (crop and reflection gathered in one XLA function), with the
    step's lighting draws beside them."""
    import tensorflow as tf

    from alexnet_jax.data import augment, squares

    size = builder.builder_config.size

    @tf.function(jit_compile=True)
    def cut(images, yx, flips):
        cols = tf.where(flips[:, None], 223 - tf.range(224)[None], tf.range(224)[None])
        ys, xs = yx[:, :1] + tf.range(224)[None], yx[:, 1:] + cols
        return tf.gather(tf.gather(images, ys, axis=1, batch_dims=1), xs, axis=2, batch_dims=1)

    def hook(records, key, rows):
        ex = tf.io.parse_example(records, squares._SPEC)
        yx, flips, alpha = augment.batch_draws(key, rows, int(config.batch_size), size, 224, 0.1)
        images = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), (-1, size, size, 3))
        return {"image": cut(images, yx, flips), "lighting": alpha, "label": ex["label"]}

    return hook


def _cores_needed(per_core: dict[str, float]) -> dict[str, dict[str, float]]:
    """Images/s a device's train step takes at MFU of its bf16 peak (configs/imagenet.py's net, training FLOP =
    3 x forward), and the host cores each pipeline needs to keep up."""
    from alexnet_jax import flops
    from alexnet_jax.model import create_model

    config = _load_config("configs/imagenet.py", 128, [])
    flop = 6 * sum(flops.forward_macs(create_model(config), (224, 224, 3)).values())
    table = {}
    for device, peak in ACCELERATORS.items():
        demand = MFU * peak * 1e12 / flop
        table[device] = {"train_images_per_s": demand, **{f"cores_{k}": demand / v for k, v in per_core.items()}}
    table["train_gflop_per_image"] = {"x": flop / 1e9}
    return table


def _load_config(config_path: str, batch: int, overrides: list[str]):
    from ml_collections import config_flags  # noqa: F401  (absl flags parse the config file below)

    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(REPO, config_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.batch_size = batch
    for item in overrides:
        key, value = item.split("=", 1)
        current = config[key]
        parsed = eval(value, {}, {}) if not isinstance(current, str) else value  # noqa: S307 - own command line
        config[key] = type(current)(parsed)
    return config


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def bench_train_step(config_path: str, batch: int, steps: int, overrides: list[str],
                     vs_torch: bool = False) -> dict[str, float]:
    """Median train-step time after warm-up, device-synchronised; with `vs_torch` the equivalent PyTorch step
    alternates with it in the same process (both see the same machine load) and the ratio is reported."""
    import jax

    from alexnet_jax import flops, sharding, train

    config = _load_config(config_path, batch, overrides)
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
    xla_flop = _cost_flops(step_fn)
    if xla_flop:
        out["xla_cost_gflop_per_step"] = xla_flop / 1e9
    if mem is not None:
        out["xla_temp_mib"] = mem.temp_size_in_bytes / 2**20
        out["xla_args_mib"] = mem.argument_size_in_bytes / 2**20
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    out["process_peak_rss_mib"] = _peak_rss_mib()  # before torch is built: JAX's own footprint

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


def conv_calls(model, shape: tuple[int, int, int]) -> dict[str, tuple]:
    """(input shape, kernel shape, strides, padding, groups) of each conv as the model calls it (shapes only)."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax.model import layers

    calls, original = [], layers.grouped_conv

    def spy(x, kernel, groups, strides, padding, kernels="cpu_tuned"):
        calls.append((tuple(x.shape[1:]), tuple(kernel.shape), strides, tuple(map(tuple, padding)), groups))
        return original(x, kernel, groups, strides, padding, kernels)

    layers.grouped_conv = spy
    try:
        x = jnp.zeros((1, *shape))
        jax.eval_shape(lambda: model.apply(model.init(jax.random.PRNGKey(0), x), x))
    finally:
        layers.grouped_conv = original
    return dict(zip(("conv1", "conv2", "conv3", "conv4", "conv5"), calls[-5:], strict=True))  # apply's calls


def _conv_work(x_shape, k_shape, strides, padding, groups, *, batch: int, first: bool, torch) -> dict:
    """{formulation: (fn, args)}: one layer's forward and gradients (conv1: no input gradient, as in training)."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax.model import grouped_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *x_shape)), jnp.float32)
    k = jnp.asarray(rng.normal(0, 0.01, k_shape), jnp.float32)
    y_shape = jax.eval_shape(lambda x, k: grouped_conv(x, k, groups, strides, padding, "native"), x, k).shape
    dy = jnp.asarray(rng.normal(size=y_shape), jnp.float32)
    fns = {}
    for kernels in ("cpu_tuned", "native"):
        def work(x, k, dy, kernels=kernels):
            def f(x, k):
                return grouped_conv(x, k, groups, strides, padding, kernels)
            if first:
                y, pull = jax.vjp(lambda k: f(x, k), k)
            else:
                y, pull = jax.vjp(f, x, k)
            return y, pull(dy)
        fns[kernels] = (jax.jit(work), (x, k, dy))
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

    config = _load_config(config_path, batch, overrides)
    channels = 1 if config.dataset == "fashion_mnist" else 3
    shape = (config.image_size, config.image_size, channels)
    model = train.Trainer(config, sharding.make_mesh(config.mesh_shape), shape, 1000, 100_000).model
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


def bench_checkpoint(config_path: str, pairs: int, run_steps: int, every: int,
                     overrides: list[str]) -> dict[str, object]:
    """Train images/s of real runs with and without periodic saves, interleaved: without, with, without, ..."""
    import subprocess
    import tempfile

    rates: dict[str, list[float]] = {"without": [], "with": []}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(pairs):
            for name, each in (("without", 0), ("with", every)):
                workdir = os.path.join(tmp, f"{name}{k}")
                cmd = [sys.executable, "-m", "alexnet_jax.main", "--config", config_path, "--workdir", workdir,
                       f"--config.num_train_steps={run_steps}", "--config.eval_every_steps=1000000000",
                       f"--config.checkpoint_every_steps={each}", "--config.checkpoint_keep_best=0",
                       *(f"--config.{o}" for o in overrides)]
                proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
                with open(os.path.join(workdir, "summary.json")) as f:
                    rates[name].append(float(json.load(f)["train_images_per_second"]))
                print(f"run {k + 1}/{pairs} {name:7s} checkpoints: {rates[name][-1]:.1f} train img/s",
                      file=sys.stderr)
    without, with_ = float(np.median(rates["without"])), float(np.median(rates["with"]))
    return {"config": config_path, "run_steps": run_steps, "every": every, "saves_per_run": run_steps // every,
            "images_per_s_without": rates["without"], "images_per_s_with": rates["with"],
            "median_without": without, "median_with": with_, "overhead_percent": 100.0 * (1.0 - with_ / without)}


RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"


def results_row(out: dict, argv: list[str]) -> str:
    """One markdown row: date, command, load at start/end, JAX and torch ms per step, the ratio."""
    ts = out["train_step"]
    args = " ".join(x for x in argv if x != "--record")
    torch_ms = f"{ts['torch_ms_per_step']:.0f}" if "torch_ms_per_step" in ts else "-"
    ratio = f"**{ts['jax_over_torch']:.2f}**" if "jax_over_torch" in ts else "-"
    return (f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | `{args}` | {out['load_avg_start']:.2f} / "
            f"{out['load_avg_end']:.2f} | {ts['ms_per_step']:.0f} | {torch_ms} | {ratio} |")


def is_quiet(out: dict) -> bool:
    """Neither load average (start, end) above the core count."""
    return max(out["load_avg_start"], out["load_avg_end"]) <= (out["cpu_count"] or 1)


def record(out: dict, argv: list[str], path: str) -> bool:
    """Append the result to `path`'s results table, unless the machine was busy (then say so and keep the file)."""
    row = results_row(out, argv)
    if not is_quiet(out):
        print(f"warning: not recorded in {path}: load average above the {out['cpu_count']} cores\n{row}",
              file=sys.stderr)
        return False
    record_row(path, row)
    print(f"recorded in {path}:\n{row}", file=sys.stderr)
    return True


def record_row(path: str, row: str) -> None:
    """Append `row` to the table between the results markers of `path` (the table's header stays first)."""
    with open(path) as f:
        text = f.read()
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise SystemExit(f"error: {path} has no {RESULTS_BEGIN} ... {RESULTS_END} section to record into")
    head, rest = text.split(RESULTS_BEGIN, 1)
    table, tail = rest.split(RESULTS_END, 1)
    with open(path, "w") as f:
        f.write(head + RESULTS_BEGIN + table.rstrip("\n") + "\n" + row + "\n" + RESULTS_END + tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("pipeline", "train_step", "all", "checkpoint", "layers"), default="pipeline")
    p.add_argument("--pipeline", action="store_const", const="pipeline", dest="mode", help="= --mode pipeline")
    p.add_argument("--images", type=int, default=256, help="JPEGs per measured pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the JPEGs")
    p.add_argument("--threads", type=int, default=1, help="tf.data threads (1: one core)")
    p.add_argument("--classes", type=int, default=16, help="pipeline: classes of the archive (4 validation "
                   "images each)")
    p.add_argument("--train-per-class", type=int, default=16, help="pipeline: training images per class")
    p.add_argument("--source-quality", type=int, default=97, help="pipeline: JPEG quality of the archive's "
                   "images (97: ~110 KB each, ILSVRC-2012's average; 85: ~43 KB)")
    p.add_argument("--config", default="configs/imagenet.py", help="train_step: the config file")
    p.add_argument("--batch", type=int, default=32, help="train_step: global batch")
    p.add_argument("--steps", type=int, default=5, help="train_step: timed steps after warm-up (median)")
    p.add_argument("--vs-torch", action="store_true",
                   help="train_step: time the equivalent PyTorch step alternately in the same run (needs torch)")
    p.add_argument("--single-thread", action="store_true",
                   help="one core (affinity) and one intra-op thread for XLA:CPU and torch: the per-core comparison")
    p.add_argument("--set", action="append", default=[], help="train_step: config override key=value")
    p.add_argument("--pairs", type=int, default=3, help="checkpoint: runs with and without saves, each")
    p.add_argument("--run-steps", type=int, default=1000, help="checkpoint: train steps per run")
    p.add_argument("--every", type=int, default=100, help="checkpoint: save every this many steps")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--record", action="store_true",
                   help="train_step: append the result to docs/performance.md's results table (refused when the "
                        "load average was above the core count)")
    a = p.parse_args()
    if a.single_thread:  # before jax is imported
        # One core for the whole process: XLA:CPU's convolution/matmul library (YNNPACK) keeps its own thread
        # pool whatever the Eigen flags say, so only the affinity mask makes the JAX side single-core.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
        if a.vs_torch:
            from alexnet_jax import torch_alexnet

            torch_alexnet.import_torch().set_num_threads(1)
    if a.vs_torch and a.mode == "pipeline":
        a.mode = "train_step"
    out: dict[str, object] = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
    if a.mode == "checkpoint":
        config = a.config if a.config != p.get_default("config") else "configs/fashion_mnist.py"
        out["checkpoint"] = bench_checkpoint(config, a.pairs, a.run_steps, a.every, a.set)
    if a.mode == "layers":
        out["layers"] = bench_layers(a.config, a.batch, a.steps, a.set)
    if a.mode in ("pipeline", "all"):
        out["pipeline"] = bench_pipeline(a.images, a.threads, a.repeats)
        out["sources"] = bench_sources(a.classes, a.train_per_class, a.threads, a.repeats, quality=a.source_quality)
    if a.mode in ("train_step", "all"):
        from alexnet_jax.errors import UserError  # imports jax: only after --single-thread set XLA_FLAGS

        try:
            out["train_step"] = bench_train_step(a.config, a.batch, a.steps, a.set, a.vs_torch)
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
    out["load_avg_end"] = os.getloadavg()[0]
    if not is_quiet(out):
        print(f"warning: load average {out['load_avg_start']:.2f} at start, {out['load_avg_end']:.2f} at end, above "
              f"the {out['cpu_count']} cores: other work ran, so these figures are not a measurement of this code "
              "alone (re-run on a quiet machine).", file=sys.stderr)
    if a.record:
        if "train_step" not in out:
            raise SystemExit("error: --record records a train-step result: add --mode train_step or --vs-torch")
        record(out, sys.argv[1:], os.path.join(REPO, "docs", "performance.md"))
    if a.json:
        print(json.dumps(out, indent=2))
        return
    for section, rows in out.items():
        if not isinstance(rows, dict):
            print(f"{section}: {rows}")
            continue
        if section == "layers":
            print("[layers] median ms, forward + gradients (conv1: kernel gradient only)")
            for name, row in rows.items():
                print(f"  {name:6s} " + "  ".join(f"{k}={v:.1f}" for k, v in row.items()))
            continue
        if section in ("train_step", "checkpoint"):
            print(f"[{section}]")
            for k, v in rows.items():
                print(f"  {k:32s} {v:.3f}" if isinstance(v, float) else f"  {k:32s} {v}")
            continue
        print(f"[{section}]")
        for name, row in rows.items():
            print(f"  {name:22s} " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in (row.items() if isinstance(row, dict) else [])))
    if "sources" in out:
        table = out["sources"]["host_cores_needed"]
        paths = SOURCE_PATHS
        print(f"host cores per device at {MFU:.0%} of bf16 peak ({table['train_gflop_per_image']['x']:.2f} GFLOP "
              "per training image): " + ", ".join(
                  f"{d} {row['train_images_per_s']:.0f} img/s: " + "/".join(f"{row['cores_' + p]:.0f}" for p in paths)
                  for d, row in table.items() if d in ACCELERATORS) + f" ({' / '.join(paths)})")
    if "pipeline" in out and "train_step" in out:
        pipe = out["pipeline"]["tf_train"]["images_per_cpu_s"]
        step = out["train_step"]["images_per_s"]
        print(f"pipeline on one core / train step consumption: {pipe:.0f} / {step:.1f} = {pipe / step:.1f}x")


if __name__ == "__main__":
    main()
