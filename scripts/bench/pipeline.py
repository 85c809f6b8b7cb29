"""--mode pipeline: the input pipeline (tf.data beside PIL + NumPy) and the sources' streams, per core."""

from __future__ import annotations

import io
import os
import sys
import time

import numpy as np

from bench.common import load_config, load_script, timed


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """ImageNet-sized JPEGs (the ILSVRC-2012 average is about 400x350; most are 500x375 or 375x500)."""
    tiny = load_script("make_tiny_imagenet")
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


def bench_pipeline(images: int, threads: int, repeats: int = 2, batch: int = 32) -> dict[str, dict[str, float]]:
    import tensorflow as tf

    from alexnet_jax.data import augment
    from alexnet_jax.data.base import data_options

    tf.config.set_visible_devices([], "GPU")
    jpegs = make_jpegs(images)
    mean_image = np.full((256, 256, 3), 115.0, np.float32)
    opts = data_options(threads)  # the package's pipelines' options, ...
    opts.threading.max_intra_op_parallelism = 1  # ... each op on one thread at any pool size (per-core figures)

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
    results["tf_train"] = timed(consume(train_ds), lambda: list(train_ds.as_numpy_iterator()))
    results["pil_train"] = timed(pil(lambda j: pil_train(j, rng, mean_image)),
                                  lambda: [pil_train(j, rng, mean_image) for j in jpegs])
    results["tf_eval_10crop"] = timed(consume(eval_ds), lambda: list(eval_ds.as_numpy_iterator()))
    results["pil_eval_10crop"] = timed(pil(lambda j: pil_ten_crop(j, mean_image)),
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
    """The real training and 10-crop evaluation pipelines (`alexnet_jax.data.photos.train_dataset` /
    `eval_dataset`: records read by index, parsed, augmented, batched) on an ILSVRC-format archive of realistic
    image sizes, for today's source JPEGs and the prepared 256x256 squares (JPEG and raw), measured in turns in
    one run so all three see the same machine load; with the images per second an accelerator's train step
    consumes at 40% of its bf16 peak and the host cores that takes."""
    import contextlib
    import dataclasses
    import tempfile

    import tensorflow as tf

    from alexnet_jax import default_config
    from alexnet_jax.data import DataSpec, base, imagenet, photos, sources, square_batches, squares

    tf.config.set_visible_devices([], "GPU")
    tiny = load_script("make_tiny_imagenet")
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
        config.update(dict(data_dir=data_dir, batch_size=batch, eval_batch_size=batch, eval_crops=10, seed=0))
        spec = DataSpec.from_config(config)
        norm = base.normalisation_for(spec, stats)
        srcs = {"today": sources.imagenet_source(source)}
        sizes = {"today": source.info.splits["train"].num_bytes / source.info.splits["train"].num_examples}
        stored = {}
        config.prepared = True
        for fmt in squares.FORMATS:
            config.prepared_format = fmt
            with contextlib.redirect_stdout(sys.stderr):
                stored[fmt] = srcs[f"prepared_{fmt}"] = squares.source_of(squares.prepare(DataSpec.from_config(config)))
            b = stored[fmt].builder
            sizes[f"prepared_{fmt}"] = b.info.splits["train"].num_bytes / b.info.splits["train"].num_examples
        steps = source.info.splits["train"].num_examples // batch  # one epoch per pass
        datasets = {}
        for name, src in srcs.items():
            datasets[f"{name}_train"] = photos.train_dataset(src, spec, norm, 0, steps, threads=threads)
            datasets[f"{name}_eval_10crop"] = photos.eval_dataset(src, spec, norm, threads=threads)
        # Issue #14 item 3: --config.augment_on_device=True, the host's part (raw squares to the uint8 squares of
        # the batch and their draws; crop, reflection, mean image and lighting in the jitted step), and, measured
        # only, a middle way: uint8 224 patches (crop and reflection on the host, the rest in the step).
        raw = stored["raw"]
        device_spec = dataclasses.replace(spec, augment_on_device=True)
        datasets["prepared_raw_on_device_train"] = photos.train_dataset(raw, device_spec, norm, 0, steps,
                                                                        threads=threads)
        on_device = square_batches.on_device(device_spec, norm)
        datasets["prepared_raw_uint8_patches_host_part_train"] = _whole_batches(
            raw, spec, steps, threads, _uint8_patches(spec, raw.square))
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


def _whole_batches(src, spec, steps: int, threads: int, batch_fn):
    """`photos.train_dataset`'s stream of stored squares (one process) with `batch_fn(records, key, rows)` in place
    of its augmentation."""
    import tensorflow as tf

    from alexnet_jax.data import base, photos, records

    recs = src.records(src.train_split)
    stream = records.train_steps(len(recs), spec.batch_size, spec.seed, 0, steps, 0, 1)

    def whole_batch(step, indices, rows):
        key = tf.stack([tf.constant(spec.seed, tf.int64) * photos.KEY_STRIDE + step, tf.constant(-1, tf.int64)])
        return batch_fn(recs.read_tf(indices), key, rows)

    ds = stream.map(whole_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(base.data_options(threads))


def _uint8_patches(spec, size: int):
    """A batch function that stops at uint8 patches (crop and reflection gathered in one XLA function), with the
    step's lighting draws beside them."""
    import tensorflow as tf

    from alexnet_jax.data import augment, square_batches

    @tf.function(jit_compile=True)
    def cut(images, yx, flips):
        cols = tf.where(flips[:, None], 223 - tf.range(224)[None], tf.range(224)[None])
        ys, xs = yx[:, :1] + tf.range(224)[None], yx[:, 1:] + cols
        return tf.gather(tf.gather(images, ys, axis=1, batch_dims=1), xs, axis=2, batch_dims=1)

    def hook(records, key, rows):
        ex = tf.io.parse_example(records, square_batches.RECORD_SPEC)
        yx, flips, alpha = augment.batch_draws(key, rows, spec.batch_size, size, 224, 0.1)
        images = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), (-1, size, size, 3))
        return {"image": cut(images, yx, flips), "lighting": alpha, "label": ex["label"]}

    return hook


def _cores_needed(per_core: dict[str, float]) -> dict[str, dict[str, float]]:
    """Images/s a device's train step takes at MFU of its bf16 peak (configs/imagenet.py's net, training FLOP =
    3 x forward), and the host cores each pipeline needs to keep up."""
    from alexnet_jax import flops
    from alexnet_jax.model import ModelSpec, create_model

    config = load_config("configs/imagenet.py", 128, [])
    flop = 6 * sum(flops.forward_macs(create_model(ModelSpec.from_config(config)), (224, 224, 3)).values())
    table = {}
    for device, peak in ACCELERATORS.items():
        demand = MFU * peak * 1e12 / flop
        table[device] = {"train_images_per_s": demand, **{f"cores_{k}": demand / v for k, v in per_core.items()}}
    table["train_gflop_per_image"] = {"x": flop / 1e9}
    return table
