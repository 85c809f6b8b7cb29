"""The paper's recipe learns (issue #16), in two checks.

1. `test_paper_recipe_learns_over_seeds` / test_recipe_owt.py: the claim. configs/imagenet.py's optimizer, learning
   rate with its batch-size scaling, weight decay, schedule, initialisation, dropout and net, read as `main` reads
   them (`RunSpec.from_config`), with only batch 8, 131 px inputs and 4 classes changed, trained by `train.Trainer`
   (the step `main` runs) on the 4 classes of the archive (each its own colour and stripe direction plus noise,
   `make_tiny_imagenet.make_jpeg`), at three seeds: `scripts/check_recipe.py --quick`, which users run too. The
   MEDIAN top-1 of the LAST evaluation must reach 0.9.
2. `test_shipped_recipe_command_runs_through_main_smoke`: a smoke test of the command users run
   (scripts/check_recipe.py: `main` on the tfds-prepared ILSVRC-format archive with the paper's augmentations and
   10-crop test), checking that it runs, evaluates all 32 images, scales the learning rate and ends with finite
   losses; 20 steps are too few for it to learn, so it does not judge learning.

Where the numbers come from (measured on the 2-core AVX2 EPYC, 2026-12-06, with `scripts/check_recipe.py --quick`):
- The bar, 0.9, is scripts/check_recipe.py's MIN_TOP1, set for issue #16 before any run was measured; 29 of 32
  right by chance (4 classes) has probability ~1e-15. The median of three seeds means two of them must reach it,
  and the last evaluation counts, not the best.
- The steps (paper 100, owt 60) and the input size (131 px: 3x3 maps after pool5, a third of 227 px's compute)
  were chosen on seeds 0-2 only. At 131 px and 100 steps, seeds 0-2 ended at top-1 1.0, 1.0, 1.0 (paper) and owt
  at 60 steps 1.0, 1.0, 1.0. The seeds the tests use (QUICK_SEEDS = 3, 4, 5) were run only once that choice was
  made: paper 1.0, 1.0, 1.0 (at step 60 they were at 0.5, 0.25, 0.5), owt 1.0, 1.0, 1.0.
- What it catches (seeds 0-2): the paper net at half the learning rate ends at 0.5, 0.75, 0.5 (median 0.5: fails);
  without the batch-size scaling (16x) at 0.5, NaN, 0.25 (fails). What it cannot catch: the paper net at twice
  the rate (1.0, 1.0, 0.5: passes), owt at half the rate (learns by step 40 either way), or anything in the input
  pipeline (other tests own that).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys

import forkserver
import pytest
from conftest import examples, run_once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("check_recipe", os.path.join(REPO, "scripts", "check_recipe.py"))
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

SMOKE_STEPS, BATCH = 20, 8
# No test flags: the kernels `main` runs (as a user starts the check)
USERS_ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}


def judge(variant: str) -> None:
    """scripts/check_recipe.py --quick for `variant` at its default seeds and steps, and its verdict."""
    proc = forkserver.run([sys.executable, os.path.join(REPO, "scripts", "check_recipe.py"), "--quick", "--variant",
                           variant, "--json"], cwd=REPO, env=USERS_ENV, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    results = json.loads(lines[-1])
    ok, line = check.quick_verdict(variant, check.QUICK_STEPS[variant], results)
    assert [r["seed"] for r in results] == list(check.QUICK_SEEDS) == [3, 4, 5]
    assert all(r["count"] == check.CLASSES * check.VAL_PER_CLASS == 32 for r in results), line
    assert statistics.median(r["top1"] for r in results) >= check.MIN_TOP1 == 0.9, line
    assert ok and proc.returncode == 0, line


def test_paper_recipe_learns_over_seeds():
    judge("paper")  # owt: tests/test_recipe_owt.py (its own file: another xdist worker)


@pytest.fixture(scope="module")
def archive() -> tuple[str, str]:
    """(workdir, data_dir): the 4-class archive, prepared once per run of the suite."""
    workdir = run_once("recipe", lambda path: check.prepare(path, runner=forkserver.run))
    return workdir, os.path.join(workdir, "data")


def test_shipped_recipe_command_runs_through_main_smoke(archive):
    workdir, data_dir = archive
    summary = check.run(workdir, data_dir, "paper", SMOKE_STEPS, BATCH, env=USERS_ENV, quiet=True,
                        eval_every=SMOKE_STEPS, runner=forkserver.run)  # (a `main` process as users start it)
    _, line = check.verdict(summary)
    assert summary["num_eval_examples"] == check.CLASSES * check.VAL_PER_CLASS == 32
    assert summary["variant"] == "paper" and summary["step"] == summary["best_step"] == SMOKE_STEPS
    assert summary["learning_rate"] == pytest.approx(0.01 * BATCH / 128)  # the paper's 0.01 at batch 128
    assert math.isfinite(summary["eval_loss"]) and summary["eval_loss"] < check.MAX_LOSS, line


def test_balanced_validation_split_is_labelled_by_content(tmp_path):
    """tfds labels validation images by sorted position: the generator's placeholders make the kept images get
    the class they show (without them the 8 images would get the list's first 8, mostly untrained, labels)."""
    import tensorflow_datasets as tfds

    tiny = check._tiny()
    manual, data = str(tmp_path / "manual"), str(tmp_path / "data")
    counts = tiny.write_tiny_imagenet(manual, classes=4, train_per_class=1, val_per_class=2)
    assert counts == {"train": 4, "validation": 8}
    synsets, positions = tiny.balanced_validation(4, 2)
    drawn = {f"ILSVRC2012_val_{k + 1:08d}.JPEG": s for s in synsets for k in positions[s]}
    builder = tfds.builder("imagenet2012", data_dir=data)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual),
                                 file_format="array_record")  # (as alexnet_jax prepares it)
    names = builder.info.features["label"].names
    got = {ex["file_name"].decode(): names[ex["label"]]
           for ex in examples(builder, "validation")}
    assert got == drawn and len(set(got.values())) == 4
    train = {names[ex["label"]] for ex in examples(builder, "train")}
    assert train == set(synsets)
