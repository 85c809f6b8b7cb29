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
  gradients) at --batch, timed alone as XLA's convolution, as the formulation used while YNNPACK has the
  convolutions (conv1 as matmuls, Winograd) and, with torch installed, PyTorch's conv2d (groups), alternately in
  one process: which formulation wins on this machine, layer by layer.
--mode predict: the whole `python -m alexnet_jax.predict` command on --images (default 400) photo-sized JPEGs
  against the script a PyTorch user writes for the same job (bench/torch_predict.py), alternated --pairs times,
  whole-process wall times, the top-1 class of every file compared; the first predict (empty compilation cache)
  is reported apart.
--mode finetune: the train step with the conv layers frozen (`frozen='conv.*'`) against the unfrozen step and
  PyTorch's frozen step (requires_grad=False), alternated in one process.
--mode forward: the inference forward pass at --batch against PyTorch's under no_grad, alternated; with
  `--set dtype=bfloat16` PyTorch runs under torch.autocast('cpu', torch.bfloat16) (and --mode train_step
  --vs-torch does the same for the train step): bfloat16 side by side.
--mode checkpoint: the cost of periodic checkpoints in real training. Runs `alexnet_jax.main` --pairs times
  with checkpoints every --every steps and as often without (only the final save), alternately so both see the
  same machine load, each --run-steps steps of --config (the FashionMNIST quick start by default) with no
  evaluation, and compares their `train_images_per_second` (save time included, compilation excluded).

Every run sets the XLA:CPU flags the entry points set (`cli.set_xla_cpu_flags`: convolutions by XLA's Eigen
kernels, not YNNPACK; flags already in XLA_FLAGS win) and reports XLA_FLAGS and the machine's 1-minute load
average at start and end (`load_avg_start`, `load_avg_end`) beside
the core count: a figure taken while other work ran is not a measurement of this code (torch's OpenMP threads
stall on a busy machine). `--record` appends the train-step result as a row of docs/benchmarks.md's results
table (between its `results:begin`/`results:end` markers), and refuses, printing the figure with a warning,
when either load average was above the core count.

Usage: python scripts/benchmark.py [--mode pipeline|train_step|all] [--images 256] [--threads 1] [--json]
       python scripts/benchmark.py --mode checkpoint --pairs 3 --run-steps 1000 --every 100
       python scripts/benchmark.py --vs-torch --set image_size=227 --batch 32 --steps 5     # paper net
       python scripts/benchmark.py --vs-torch --config configs/fashion_mnist.py --batch 128  # quick start
       python scripts/benchmark.py --mode predict --pairs 3                                 # vs PyTorch's script
       python scripts/benchmark.py --mode finetune --set variant=owt --batch 32 --steps 5
       python scripts/benchmark.py --mode forward --set variant=owt --set dtype=bfloat16 --batch 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]  # bench/ (also when loaded by path, as the tests do); the repo

from bench.checkpoint import bench_checkpoint  # noqa: E402
from bench.common import REPO, RESULTS_BEGIN, RESULTS_END, is_quiet, record  # noqa: E402, F401
from bench.finetune import bench_finetune  # noqa: E402
from bench.forward import bench_forward  # noqa: E402
from bench.layers import bench_layers, conv_calls  # noqa: E402, F401
from bench.pipeline import ACCELERATORS, MFU, SOURCE_PATHS, bench_pipeline, bench_sources  # noqa: E402
from bench.predict import bench_predict  # noqa: E402
from bench.train_step import bench_train_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="pipeline", choices=("pipeline", "train_step", "all", "checkpoint", "layers",
                                                          "predict", "finetune", "forward"))
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
    p.add_argument("--against", action="append", default=[], metavar="KEY=VALUE",
                   help="train_step: also time the step with these overrides added, alternated with it in one "
                        "process (e.g. --against kernels=native); repeatable")
    p.add_argument("--set", action="append", default=[], help="config override key=value, spelled as "
                   "--config.key=value is for alexnet_jax.main (parsed by the same code)")
    p.add_argument("--pairs", type=int, default=3, help="checkpoint: runs with and without saves, each; predict: "
                   "alternated pairs of whole commands")
    p.add_argument("--run-steps", type=int, default=1000, help="checkpoint: train steps per run")
    p.add_argument("--every", type=int, default=100, help="checkpoint: save every this many steps")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--record", action="store_true",
                   help="train_step: append the result to docs/benchmarks.md's results table (refused when the "
                        "load average was above the core count)")
    a = p.parse_args()
    if a.single_thread:  # before jax is imported
        # One core for the whole process: XLA:CPU's convolution/matmul library (YNNPACK) keeps its own thread
        # pool whatever the Eigen flags say, so only the affinity mask makes the JAX side single-core.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        from alexnet_jax import xla_flags  # (the standard library only: jax is not imported yet)

        xla_flags.add({"--xla_cpu_multi_thread_eigen": "false"},
                      {"--xla_cpu_multi_thread_eigen": "Eigen's kernels may use threads beyond the one core"})
        if a.vs_torch:
            from alexnet_jax import torch_alexnet

            torch_alexnet.import_torch().set_num_threads(1)
    from alexnet_jax import cli

    cli.set_xla_cpu_flags()  # the XLA:CPU flags every entry point sets (before jax starts its backend)
    out_flags = os.environ.get("XLA_FLAGS", "")
    if a.vs_torch and a.mode == "pipeline":
        a.mode = "train_step"
    out: dict[str, object] = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
                              "xla_flags": out_flags}
    if a.mode == "checkpoint":
        config = a.config if a.config != p.get_default("config") else "configs/fashion_mnist.py"
        out["checkpoint"] = bench_checkpoint(config, a.pairs, a.run_steps, a.every, a.set)
    if a.mode == "predict":
        out["predict"] = bench_predict(a.images if a.images != p.get_default("images") else 400, a.pairs)
    if a.mode == "finetune":
        out["finetune"] = bench_finetune(a.config, a.batch, a.steps, a.set)
    if a.mode == "forward":
        out["forward"] = bench_forward(a.config, a.batch, a.steps, a.set)
    if a.mode == "layers":
        out["layers"] = bench_layers(a.config, a.batch, a.steps, a.set)
    if a.mode in ("pipeline", "all"):
        out["pipeline"] = bench_pipeline(a.images, a.threads, a.repeats)
        out["sources"] = bench_sources(a.classes, a.train_per_class, a.threads, a.repeats, quality=a.source_quality)
    if a.mode in ("train_step", "all"):
        from alexnet_jax.errors import UserError  # imports jax: only after --single-thread set XLA_FLAGS

        try:
            out["train_step"] = bench_train_step(a.config, a.batch, a.steps, a.set, a.vs_torch, a.against)
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
        record(out, sys.argv[1:], os.path.join(REPO, "docs", "benchmarks.md"))
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
        if section in ("train_step", "checkpoint", "predict", "finetune", "forward"):
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
