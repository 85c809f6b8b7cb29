"""--mode checkpoint: the cost of periodic checkpoints in real training runs, alternated."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from bench.common import REPO


def bench_checkpoint(config_path: str, pairs: int, run_steps: int, every: int,
                     overrides: list[str]) -> dict[str, object]:
    """Train images/s of real runs with and without periodic saves, interleaved: without, with, without, ..."""
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
