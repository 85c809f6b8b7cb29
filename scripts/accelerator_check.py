"""What an accelerator user needs to know, measured in one bounded command on a fresh machine with no network:

    PYTHONPATH=. python scripts/accelerator_check.py --out docs/accelerator_check.json   # a GPU/TPU, < 8 minutes
    PYTHONPATH=. python scripts/accelerator_check.py --smoke                              # the same code, CPU, tiny

Needs only jax, flax, optax, orbax-checkpoint, numpy, absl and ml-collections (no TensorFlow, tfds or clu: the
training loop runs on synthetic batches). Writes a JSON file and prints a table:
- the device, versions, measured matmul peaks (bf16; fp32 at default precision, i.e. tf32 where the hardware has
  it) and device memory bandwidth (a large copy);
- the train step for the paper net and owt, bf16 and fp32, kernels 'native' and 'cpu_tuned', batches 512/256/128
  (largest first, as far as `--budget_s` allows): median step ms of >= 10 after warm-up, img/s, MFU against the
  measured peak of that dtype, compile seconds, peak device memory;
- the on-device augmentation's cost per batch (`augment_on_device`) and a uint8 batch's host-to-device rate;
- correctness: logits and every parameter gradient on the accelerator against the CPU backend in float32 for
  the same parameters and batch (max relative error; exit status 1 beyond tf32-level error, 2e-2);
- the real loop (`train.train_and_evaluate`) end to end on synthetic data with an orbax save, then a restore
  (`inference.load`) of the saved step; the loop's host overhead per step (loop ms/step minus the bare step's).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alexnet_jax import default_config, inference, sharding, train  # noqa: E402
from alexnet_jax.data.base import Data, Normalisation  # noqa: E402
from alexnet_jax.flops import forward_macs  # noqa: E402

TOLERANCE = 2e-2  # tf32 keeps 10 mantissa bits (~5e-4 per product); through eight layers ~1e-2


def timed(fn, *args, repeats: int = 10) -> tuple[float, float]:
    """(median seconds of `repeats` calls after one warm-up, the warm-up's seconds), each call synchronised."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times), first


def peaks(n: int, repeats: int) -> dict[str, float]:
    """Matmul TFLOP/s in bf16 and fp32 (default precision) on n x n, and a copy's GB/s."""
    out = {}
    key = jax.random.PRNGKey(0)
    for name, dtype in (("bf16", jnp.bfloat16), ("fp32", jnp.float32)):
        a = jax.random.normal(key, (n, n), dtype)
        b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
        seconds, _ = timed(jax.jit(jnp.matmul), a, b, repeats=repeats)
        out[f"matmul_{name}_tflops"] = 2 * n**3 / seconds / 1e12
    x = jnp.ones((n * n * 8,), jnp.float32)  # 8 n^2 floats: read once, written once
    seconds, _ = timed(jax.jit(lambda v: v * 1.0001), x, repeats=repeats)
    out["copy_gbps"] = 2 * x.size * 4 / seconds / 1e9
    return out


def config_for(variant: str, dtype: str, kernels: str, batch: int, smoke: bool):
    c = default_config.get_config()
    c.dataset = "synthetic"
    c.variant, c.dtype, c.kernels, c.batch_size = variant, dtype, kernels, batch
    c.image_size = 224 if variant == "owt" else 227
    c.num_classes = 1000
    c.mesh_shape = (1, 1)
    c.lr_schedule = "constant"
    c.log_every_steps = 50
    if smoke:  # the same code at a size a CPU runs in seconds
        c.image_size = 67 if variant == "paper" else 64
        c.widths, c.fc_width, c.num_classes = (8, 16, 16, 16, 8), 32, 10
    return c


def step_row(variant: str, dtype: str, kernels: str, batch: int, smoke: bool, peak: dict, repeats: int) -> dict:
    """Time one train step configuration on one device."""
    config = config_for(variant, dtype, kernels, batch, smoke)
    device = jax.devices()[0]
    mesh = sharding.make_mesh((1, 1), devices=[device])
    shape = (config.image_size, config.image_size, 3)
    trainer = train.Trainer(train.RunSpec.from_config(config), mesh, shape, 100, 1000)
    state = trainer.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch_arrays = trainer.global_batch({"image": rng.normal(0, 50, (batch, *shape)).astype(np.float32),
                                         "label": rng.integers(0, config.num_classes, batch).astype(np.int32)})
    t = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def one(b):
        holder["state"], metrics = compiled(holder["state"], b)
        return metrics["loss"]

    one(batch_arrays)
    seconds, _ = timed(one, batch_arrays, repeats=repeats)
    macs = sum(forward_macs(trainer.model, shape).values())
    flops = 3 * 2 * macs * batch  # forward + both gradients
    stats = device.memory_stats() or {}
    return {"variant": variant, "dtype": dtype, "kernels": kernels, "batch": batch, "image_size": shape[0],
            "step_ms": 1000 * seconds, "images_per_s": batch / seconds,
            "mfu": flops / seconds / 1e12 / peak["matmul_bf16_tflops" if dtype == "bfloat16" else "matmul_fp32_tflops"],
            "compile_s": compile_s, "peak_memory_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None}


def augmentation_rows(batch: int, smoke: bool, repeats: int) -> dict:
    """`augment_on_device`'s ms per batch of uint8 squares, and the host-to-device rate of such a batch."""
    from functools import partial

    from alexnet_jax.data.augment_jax import paper_batch_on_device

    size, crop = (72, 64) if smoke else (256, 224)
    rng = np.random.default_rng(0)
    squares = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    mean = np.full((size, size, 3), 120.0, np.float32)
    eig = (np.array([0.2175, 0.0188, 0.0045], np.float32), np.eye(3, dtype=np.float32))
    device = jax.devices()[0]
    host = {"image": squares, "label": np.zeros(batch, np.int32),
            "offset": rng.integers(0, size - crop + 1, (batch, 2)).astype(np.int32),
            "flip": rng.integers(0, 2, batch).astype(bool),
            "lighting": rng.normal(0, 0.1, (batch, 3)).astype(np.float32)}
    on_device = jax.device_put(host, device)
    fn = jax.jit(partial(paper_batch_on_device, crop=crop, flip=True, pca_std=0.1, normalization="pixel", mean=mean,
                         std=np.ones(3, np.float32), pca=eig))
    seconds, _ = timed(fn, on_device, repeats=repeats)
    h2d, _ = timed(lambda: jax.device_put(squares, device), repeats=repeats)
    return {"augment_on_device_ms_per_batch": 1000 * seconds, "batch": batch, "square": size,
            "h2d_uint8_gbps": squares.nbytes / h2d / 1e9, "h2d_images_per_s": batch / h2d}


def correctness(smoke: bool) -> dict:
    """Max relative error of logits and of each parameter gradient, accelerator vs CPU, float32, the same
    parameters and batch."""
    import optax

    from alexnet_jax.model import ModelSpec, create_model

    config = config_for("paper", "float32", "auto", 8, smoke)
    shape = (config.image_size, config.image_size, 3)
    rng = np.random.default_rng(1)
    images = rng.normal(0, 50, (8, *shape)).astype(np.float32)
    labels = rng.integers(0, config.num_classes, 8).astype(np.int32)
    cpu = jax.devices("cpu")[0]
    params = None
    out = {}
    for name, device in (("cpu", cpu), ("device", jax.devices()[0])):
        model = create_model(ModelSpec.from_config(config), sharding.make_mesh((1, 1), devices=[device]))
        if params is None:
            with jax.default_device(cpu):
                params = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)),
                                                   train=False)["params"])

        def loss(p, x, y, model=model):
            logits = model.apply({"params": p}, x, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            jax.device_put(params, device), jax.device_put(images, device), jax.device_put(labels, device))
        out[name] = (np.asarray(logits), jax.device_get(grads))

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))

    ref = dict(jax.tree_util.tree_leaves_with_path(out["cpu"][1]))
    per = {jax.tree_util.keystr(p): rel(np.asarray(g), np.asarray(ref[p]))
           for p, g in jax.tree_util.tree_leaves_with_path(out["device"][1])}
    result = {"logits_rel_err": rel(out["device"][0], out["cpu"][0]), "grad_rel_err_max": max(per.values()),
              "grad_rel_err": per, "tolerance": TOLERANCE}
    result["ok"] = result["logits_rel_err"] <= TOLERANCE and result["grad_rel_err_max"] <= TOLERANCE
    return result


def synthetic_data(config, count: int) -> Data:
    """Learnable synthetic images (each class a colour offset) through the real loop's `Data` interface."""
    size = config.image_size
    classes = config.num_classes

    def images(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = (rows % classes).astype(np.int32)
        rng = np.random.default_rng(rows[0] if len(rows) else 0)
        x = rng.normal(0, 1, (len(rows), size, size, 3)).astype(np.float32)
        x += (labels[:, None, None, None] - classes / 2) * 0.3
        return x, labels

    def train_batches(start, stop, pid, nproc):
        local = config.batch_size // nproc
        for step in range(start, stop):
            rows = (step * config.batch_size + pid * local + np.arange(local)) % count
            x, y = images(rows)
            yield {"image": x, "label": y}

    def eval_batches(pid, nproc, row_multiple=0):
        local = config.eval_batch_size // nproc
        x, y = images(np.arange(local))
        yield {"image": x, "label": y, "mask": np.ones(local, np.float32)}

    norm = Normalisation("channel", np.zeros(3, np.float32), np.ones(3, np.float32), resize_size=size)
    return Data(count, config.eval_batch_size, (size, size, 3), tuple(f"c{i}" for i in range(classes)),
                train_batches, eval_batches, norm.mean, norm.std, norm)


def loop_row(smoke: bool, steps: int) -> dict:
    """The real training loop on synthetic data: img/s, host overhead per step, an orbax save and restore."""
    config = config_for("owt", "float32" if smoke else "bfloat16", "auto", 8 if smoke else 256, smoke)
    config.num_train_steps, config.log_every_steps, config.eval_batch_size = steps, steps // 4, config.batch_size
    config.checkpoint_every_steps, config.num_classes = 0, 10
    with tempfile.TemporaryDirectory() as workdir:
        data = synthetic_data(config, 50 * config.batch_size)
        t = time.perf_counter()
        summary = train.train_and_evaluate(config, workdir, data=data)
        wall = time.perf_counter() - t
        loaded = inference.load(workdir, None, inference.mesh_of_one_device())
        # the pure step, for the loop's host share: the same compiled step on one resident batch
        trainer = train.Trainer(train.RunSpec.from_config(config), loaded.mesh, (config.image_size,) * 2 + (3,), 50,
                                steps)
        state = trainer.init(jax.random.PRNGKey(0))
        batch = trainer.global_batch(next(data.train(0, 1, 0, 1)))
        holder = {"state": state}

        def one(b):
            holder["state"], m = trainer.train_step(holder["state"], b)
            return m["loss"]

        pure, _ = timed(one, batch, repeats=10)
        per_step_loop = config.batch_size / summary["train_images_per_second"] if summary[
            "train_images_per_second"] else float("nan")
        restored_ok = loaded.step == steps
    return {"steps": steps, "batch": config.batch_size, "wall_s": wall,
            "loop_images_per_s": summary["train_images_per_second"], "loop_ms_per_step": 1000 * per_step_loop,
            "pure_step_ms": 1000 * pure, "host_overhead_ms_per_step": 1000 * (per_step_loop - pure),
            "final_loss_finite": summary["eval_loss"] is not None and bool(np.isfinite(summary["eval_loss"])),
            "restored_step": loaded.step, "restore_ok": restored_ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device (CI, CPU)")
    parser.add_argument("--out", default="accelerator_check.json")
    parser.add_argument("--budget_s", type=float, default=420.0, help="stop adding step rows after this")
    args = parser.parse_args()
    t0 = time.perf_counter()
    device = jax.devices()[0]
    import flax
    import optax
    import orbax.checkpoint

    report = {"device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()},
              "versions": {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
                           "flax": flax.__version__, "optax": optax.__version__,
                           "orbax_checkpoint": orbax.checkpoint.__version__, "python": platform.python_version()},
              "smoke": args.smoke}
    repeats = 3 if args.smoke else 10
    report["peaks"] = peaks(256 if args.smoke else 8192, repeats)
    print(f"device {device.device_kind} ({device.platform}); bf16 {report['peaks']['matmul_bf16_tflops']:.1f}, "
          f"fp32 {report['peaks']['matmul_fp32_tflops']:.1f} TFLOP/s; copy {report['peaks']['copy_gbps']:.0f} GB/s")
    report["correctness"] = correctness(args.smoke)
    report["loop"] = loop_row(args.smoke, 20 if args.smoke else 300)
    report["augmentation"] = augmentation_rows(8 if args.smoke else 256, args.smoke, repeats)
    rows, skipped = [], []
    grid = [(v, d, k, b) for v in ("paper", "owt") for d in ("bfloat16", "float32") for k in ("native", "cpu_tuned")
            for b in (512, 256, 128)]
    if args.smoke:  # every code path once: both variants, dtypes and kernel choices, a tiny batch
        grid = [("paper", "float32", "cpu_tuned", 8), ("owt", "bfloat16", "native", 8)]
    for variant, dtype, kernels, batch in grid:
        if time.perf_counter() - t0 > args.budget_s:
            skipped.append(f"{variant}/{dtype}/{kernels}/{batch}")
            continue
        try:
            rows.append(step_row(variant, dtype, kernels, batch, args.smoke, report["peaks"], repeats))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest batch: record it, go on
            rows.append({"variant": variant, "dtype": dtype, "kernels": kernels, "batch": batch,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    report["steps"], report["skipped_for_time"] = rows, skipped
    report["seconds"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("\n| variant | dtype | kernels | batch | step ms | img/s | MFU | compile s | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['dtype']} | {r['kernels']} | {r['batch']} | {r['error']} |||||")
            continue
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] else "-"
        print(f"| {r['variant']} | {r['dtype']} | {r['kernels']} | {r['batch']} | {r['step_ms']:.1f} | "
              f"{r['images_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['compile_s']:.1f} | {mem} |")
    c, loop, aug = report["correctness"], report["loop"], report["augmentation"]
    print(f"\ncorrectness vs CPU (float32): logits {c['logits_rel_err']:.2e}, gradients max {c['grad_rel_err_max']:.2e}"
          f" (tolerance {TOLERANCE}): {'ok' if c['ok'] else 'FAILED'}")
    print(f"loop: {loop['steps']} steps at batch {loop['batch']}, {loop['loop_images_per_s'] or 0:,.0f} img/s, host "
          f"overhead {loop['host_overhead_ms_per_step']:.2f} ms/step; orbax restore at step {loop['restored_step']}: "
          f"{'ok' if loop['restore_ok'] else 'FAILED'}")
    print(f"augment_on_device: {aug['augment_on_device_ms_per_batch']:.2f} ms per batch of {aug['batch']}; "
          f"host-to-device {aug['h2d_uint8_gbps']:.2f} GB/s ({aug['h2d_images_per_s']:,.0f} squares/s)")
    print(f"wrote {args.out} in {report['seconds']:.0f} s")
    return 0 if c["ok"] and loop["restore_ok"] and loop["final_loss_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
