"""--mode predict: the whole `alexnet_jax.predict` command against the script a PyTorch user writes, alternated.

Both classify the same folder of photo-sized JPEGs (500x375 and 375x500, smooth photo-like content at quality 90)
with the same weights: torchvision's AlexNet with PyTorch's default initialisation, saved as a state dict and
converted with `python -m alexnet_jax.convert` (random weights do the same arithmetic as the published ones). The
timed unit is the whole process, start-up included, as a user waits for it: `python -m alexnet_jax.predict
--workdir W FOLDER` and `python scripts/bench/torch_predict.py W.pth FOLDER` (bench/torch_predict.py). The first
predict runs with an empty compilation cache (reported apart); the timed pairs then find the compiled network in it,
as every later call of a user does. The top-1 class of every file is compared between the two outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import REPO, USER_XLA_FLAGS, load_script

NAMES = os.path.join(REPO, "alexnet_jax", "resources", "imagenet_names.txt")


def write_photos(folder: str, count: int, seed: int = 0) -> None:
    """`count` JPEGs of 500x375 / 375x500 (alternating): low-frequency colour fields plus mild noise, so they
    compress like photos (~40-60 KB) rather than like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32)
        image += rng.normal(0, 6, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.jpg"),
                                                                      quality=90)


def write_weights(tmp: str) -> tuple[str, str]:
    """(W.pth, workdir): torchvision's AlexNet at PyTorch's initialisation, and its alexnet_jax conversion."""
    import torch

    torch.manual_seed(0)
    tv = load_script("torchvision_alexnet", "tests")
    pth, workdir = os.path.join(tmp, "alexnet.pth"), os.path.join(tmp, "converted")
    torch.save(tv.TorchvisionAlexNet().state_dict(), pth)
    run([sys.executable, "-m", "alexnet_jax.convert", "--torchvision", pth, "--workdir", workdir])
    return pth, workdir


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str, str]:
    """(wall seconds, stdout, stderr) of one whole command; an error with its output if it failed."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout, proc.stderr


def top1_of_predict(stdout: str) -> dict[str, int]:
    """path -> class index from predict's printed lines (`PATH`, then `  1. n01440764 tench  12.34%`)."""
    with open(NAMES) as f:
        index = {line.split("\t")[0]: i for i, line in enumerate(f.read().splitlines())}
    out, path = {}, None
    for line in stdout.splitlines():
        if not line.startswith(" "):
            path = line.strip()
        elif line.strip().startswith("1. ") and path is not None:
            out[os.path.abspath(path)] = index[line.split()[1]]
    return out


def top1_of_torch(stdout: str) -> dict[str, int]:
    """path -> class index from torch_predict.py's lines (`PATH c:p c:p ...`)."""
    return {os.path.abspath(line.split()[0]): int(line.split()[1].split(":")[0]) for line in stdout.splitlines()}


def bench_predict(images: int, pairs: int, extra: list[str] | None = None) -> dict[str, object]:
    """Whole-command wall times of predict and the PyTorch script, alternated `pairs` times, and their top-1
    agreement. `extra`: more flags for predict (e.g. ['--batch_size=100'])."""
    torch_script = os.path.join(REPO, "scripts", "bench", "torch_predict.py")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "photos")
        write_photos(folder, images)
        pth, workdir = write_weights(tmp)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "XDG_CACHE_HOME": os.path.join(tmp, "cache")}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env.pop("XLA_FLAGS", None)  # each command sets its own, as from a user's shell
        if USER_XLA_FLAGS is not None:
            env["XLA_FLAGS"] = USER_XLA_FLAGS
        ours = [sys.executable, "-m", "alexnet_jax.predict", "--workdir", workdir, folder, *(extra or [])]
        theirs = [sys.executable, torch_script, pth, folder]
        cold, first, _ = run(ours, env)
        print(f"predict, empty compilation cache: {cold:.2f} s", file=sys.stderr)
        times: dict[str, list[float]] = {"alexnet_jax": [], "pytorch": []}
        outputs = {}
        for k in range(pairs):
            for name, cmd in (("alexnet_jax", ours), ("pytorch", theirs)):
                wall, stdout, _ = run(cmd, env)
                times[name].append(wall)
                outputs[name] = stdout
            print(f"pair {k + 1}/{pairs}: alexnet_jax {times['alexnet_jax'][-1]:.2f} s, pytorch "
                  f"{times['pytorch'][-1]:.2f} s", file=sys.stderr)
        a, b = top1_of_predict(outputs["alexnet_jax"]), top1_of_torch(outputs["pytorch"])
        if sorted(a) != sorted(b) or len(a) != images:
            raise SystemExit(f"error: predict classified {len(a)} files, the PyTorch script {len(b)}, of {images}")
        same = sum(a[p] == b[p] for p in a)
        if top1_of_predict(first) != a:
            raise SystemExit("error: predict's first (compiling) run and a cached run printed different classes")
    ours_s, theirs_s = float(np.median(times["alexnet_jax"])), float(np.median(times["pytorch"]))
    return {"images": images, "pairs": pairs, "first_run_s": cold, "alexnet_jax_s": times["alexnet_jax"],
            "pytorch_s": times["pytorch"], "median_alexnet_jax_s": ours_s, "median_pytorch_s": theirs_s,
            "alexnet_jax_over_pytorch": ours_s / theirs_s, "top1_identical": same, "top1_compared": len(a)}
