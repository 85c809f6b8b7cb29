"""The paper's recipe learns (issue #16): the shipped configs/imagenet.py, with only batch size, steps and data_dir
changed, trained through `main` on a generated 4-class ILSVRC-format archive prepared by tfds's real builder.

This is `scripts/check_recipe.py`, the check users run; docs/paper.md has the diagnosis behind it. Before the
batch-size scaling of the learning rate (lr_reference_batch) the paper net ended at chance (top-1 0.25) here.
"""

from __future__ import annotations

import importlib.util
import math
import os

import forkserver
import pytest
from conftest import examples, run_once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("check_recipe", os.path.join(REPO, "scripts", "check_recipe.py"))
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

# 3 epochs of the 160 training images, ~1 minute each on 2 cores. 60 steps are half the shipped check's 120, so the
# bar is lower than its 0.9: on 4 trivially separable classes the trajectory is chaotic (the edge of stability,
# docs/paper.md), and the top-1 at one step moves with the CPU's kernels. Measured 10-crop top-1 at steps 20/40/60:
#   AVX2 (2026-12-02)   paper seed 0 .25 .25 1.00   owt seed 1 .66 .97 .97
#   AVX-512 (12-03)     paper seed 0 .25 .25 .91 (seed 2: .25 .50 .75)
#                       owt seed 1 .66 .97 .75 (seed 0: best .72, seed 2: best .66)
# so the paper net is evaluated once, at the end, and owt once per epoch (it peaks, then spikes), and both must reach
# MIN_TOP1 = 0.6: 20 of the 32 images, against 8 by chance (a binomial tail of ~1e-5). Without the batch-size
# scaling of the learning rate (lr_reference_batch=0) the owt run stops on a NaN loss and its test fails (tried on
# 2026-12-03); the paper net, evaluated per epoch then, was at 0.00 with a NaN loss by step 20 (docs/paper.md).
STEPS, BATCH, MIN_TOP1 = 60, 8, 0.6


@pytest.fixture(scope="module")
def archive() -> tuple[str, str]:
    """(workdir, data_dir): the 4-class archive, prepared once per run of the suite for both recipe checks (each
    writes its run into workdir/run_<variant>)."""
    workdir = run_once("recipe", lambda path: check.prepare(path, runner=forkserver.run))
    return workdir, os.path.join(workdir, "data")


@pytest.mark.parametrize("variant", ["paper"])  # owt: tests/test_recipe_owt.py (its own file: a second xdist worker)
def test_paper_recipe_learns_four_classes(archive, variant, seed: int = 0, eval_every: int = STEPS):
    workdir, data_dir = archive
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    summary = check.run(workdir, data_dir, variant, STEPS, BATCH, env=env, quiet=True, eval_every=eval_every, seed=seed,
                        runner=forkserver.run)  # (a `main` process as users start it, without its imports)
    ok, line = check.verdict(summary, min_top1=MIN_TOP1)
    assert summary["num_eval_examples"] == check.CLASSES * check.VAL_PER_CLASS == 32
    assert summary["variant"] == variant and summary["step"] == STEPS
    assert summary["best_step"] in range(eval_every, STEPS + 1, eval_every)  # one of the evaluations' steps
    assert summary["learning_rate"] == pytest.approx(0.01 * BATCH / 128)  # the paper's 0.01 at batch 128
    assert summary["best_top1_accuracy"] >= MIN_TOP1, line
    assert summary["best_eval_loss"] < math.log(1000) and math.isfinite(summary["eval_loss"]), line
    assert summary["top1_accuracy"] >= 0.5, line  # the last evaluation: twice chance at least
    assert ok, line


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
