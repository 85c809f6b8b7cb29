"""The trainer end to end: a few real steps, the summary, and one-line errors for bad input."""

import gzip
import importlib.util
import json
import os
import struct
import sys
from collections import Counter

import forkserver
import jax
import numpy as np
import pytest
from conftest import FASHION_MNIST_DIR, FAST_COMPILE, needs_fmnist

from alexnet_jax import default_config, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.widths=(8,16,16,16,8)", "--config.fc_width=32"]


def load_config(path):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_main(workdir, *overrides, config="configs/fashion_mnist.py", timeout=300, xla_flags=FAST_COMPILE,
             record_eval_to=None):
    """`python -m alexnet_jax.main`; `record_eval_to`: an .npz for the rows each evaluation saw
    (tests/recording_main.py)."""
    env = dict(os.environ, XLA_FLAGS=f"{xla_flags} --xla_force_host_platform_device_count=8")
    main = ["-m", "alexnet_jax.main"] if record_eval_to is None else [
        os.path.join(REPO, "tests", "recording_main.py"), str(record_eval_to)]
    cmd = [sys.executable, *main, f"--config={config}", f"--workdir={workdir}", *overrides]
    return forkserver.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@needs_fmnist
def test_trains_on_real_fashion_mnist_and_counts_every_test_image(tmp_path, fmnist_data_dir):
    # The command line at XLA's default optimisation level: 50 full-width steps and 10,000 test images are compute
    # (max-pool and LRN loops are XLA-generated code), which the tests' -O0 (conftest.FAST_COMPILE) makes slower.
    workdir = tmp_path / "run"
    result = run_main(workdir, "--config.num_train_steps=50", "--config.batch_size=128", "--config.log_every_steps=10",
                      "--config.eval_batch_size=1008", "--config.eval_crops=1", f"--config.data_dir={fmnist_data_dir}",
                      "--config.lr_schedule=constant", "--config.learning_rate=0.05", xla_flags="",  # 8 devices
                      record_eval_to=tmp_path / "eval_rows.npz")
    assert result.returncode == 0, result.stderr[-3000:]
    done = [line for line in result.stderr.splitlines() if "] done: {" in line]
    assert len(done) == 1, result.stderr[-3000:]
    summary = json.loads(done[0].split("] done: ", 1)[1])  # what the run reports
    assert summary["num_eval_examples"] == 10000  # 10000 = 9 * 1008 + 928: the padded last batch counts once
    # ... and each test image exactly once, identified by its pixels: every real row the evaluation consumed, its
    # normalisation undone with the training file's mean and std (float64 NumPy; the run's are these in float32)
    # and rounded, is a test record's uint8 pixels; the multiset of (pixels, label) must be the test file's (the
    # count alone would pass with one image twice and another skipped; the file has duplicate images, hence a
    # multiset)
    with np.load(tmp_path / "eval_rows.npz") as rows:
        assert sorted(rows.files) == ["images_0", "labels_0"]  # one evaluation, at the end
        images, labels = rows["images_0"], rows["labels_0"]
    source = {name: _read_idx(os.path.join(FASHION_MNIST_DIR, f"{name}-ubyte.gz"))
              for name in ("train-images-idx3", "t10k-images-idx3", "t10k-labels-idx1")}
    train_pixels = source["train-images-idx3"].astype(np.float64)
    undone = np.round(images.astype(np.float64).reshape(-1, 28, 28) * train_pixels.std() + train_pixels.mean())
    assert np.abs(undone - np.clip(undone, 0, 255)).max() == 0
    got = Counter((row.astype(np.uint8).tobytes(), int(label)) for row, label in zip(undone, labels, strict=True))
    want = Counter((image.tobytes(), int(label)) for image, label in zip(source["t10k-images-idx3"],
                                                                         source["t10k-labels-idx1"], strict=True))
    twice, skipped = sum((got - want).values()), sum((want - got).values())
    assert (twice, skipped) == (0, 0), f"{twice} evaluated rows beyond the test file's, {skipped} records not seen"
    assert summary["step"] == 50 and summary["mesh"] == {"data": 8, "model": 1}
    assert summary["top1_accuracy"] > 0.35  # 50 steps (49% here) already learn far above chance (10%)
    on_disk = json.load(open(workdir / "summary.json"))
    for key in ("top1_accuracy", "top5_accuracy", "num_eval_examples", "step", "train_images_per_second",
                "wall_seconds"):
        assert on_disk[key] == summary[key]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def _read_idx(path: str) -> np.ndarray:
    """An IDX file by its format (not alexnet_jax's reader): a 4-byte magic whose last byte is the rank, one
    big-endian uint32 per dimension, then the uint8 data."""
    with gzip.open(path) as f:
        data = f.read()
    rank = data[3]
    shape = struct.unpack(f">{rank}I", data[4 : 4 + 4 * rank])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(shape)


def test_training_is_deterministic(tmp_path):
    """Two runs with the same seed give bitwise the same parameters (dropout keys included)."""
    from alexnet_jax import sharding

    c = default_config.get_config()
    c.update(dict(variant="small", widths=(8, 16, 16, 16, 8), fc_width=32, num_classes=4, batch_size=16,
                  init_scheme="he", learning_rate=0.05, lr_schedule="constant"))
    rng = np.random.default_rng(0)
    labels = np.arange(16) % 4
    images = rng.normal(size=(16, 28, 28, 1)).astype(np.float32)
    mesh = sharding.make_mesh((1, 1), jax.devices()[:1])
    trainer = train.Trainer(train.RunSpec.from_config(c), mesh, (28, 28, 1), steps_per_epoch=1, total_steps=3)
    results = []
    for _ in range(2):
        state = trainer.init(jax.random.PRNGKey(0))
        for _ in range(3):
            state, m = trainer.train_step(state, trainer.global_batch({"image": images, "label": labels}))
        results.append(jax.device_get(state.params))
    jax.tree.map(np.testing.assert_array_equal, results[0], results[1])
    assert int(state.step) == 3 and np.isfinite(float(m["loss"]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_step_minimises_cross_entropy_with_smoothed_targets(smoothing):
    """The first step's loss is the cross-entropy of the initial model's logits with (1 - s) one-hot + s / K targets,
    computed here in float64 NumPy; s = 0 is the paper's plain cross-entropy."""
    from alexnet_jax import sharding

    c = default_config.get_config()
    c.update(dict(variant="small", widths=(8, 16, 16, 16, 8), fc_width=32, num_classes=4, batch_size=8,
                  init_scheme="he", dropout_rate=0.0, label_smoothing=smoothing))
    rng = np.random.default_rng(1)
    labels = np.arange(8) % 4
    images = rng.normal(size=(8, 28, 28, 1)).astype(np.float32)
    mesh = sharding.make_mesh((1, 1), jax.devices()[:1])
    trainer = train.Trainer(train.RunSpec.from_config(c), mesh, (28, 28, 1), steps_per_epoch=1, total_steps=3)
    state = trainer.init(jax.random.PRNGKey(0))
    logits = np.asarray(trainer.model.apply({"params": state.params}, images), np.float64)
    _, m = trainer.train_step(state, trainer.global_batch({"image": images, "label": labels}))
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    targets = (1 - smoothing) * np.eye(4)[labels] + smoothing / 4
    np.testing.assert_allclose(float(m["loss"]), -(targets * log_p).sum(1).mean(), rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.batch_size=-4"], "batch_size"),
    (["--config.batch_size=12"], "must be divisible by the mesh's 'data' (8)"),
    (["--config.fashion_mnist_dir=/nonexistent", "--config.data_dir=TMP/tfds"], "dataset-fashion-mnist"),
    (["--config.data_dir=TMP/afile"], "not a directory"),
    (["--config.label_smoothing=1.0"], "--config.label_smoothing=1.0: must be in [0, 1)"),
])
def test_bad_input_stops_with_one_clear_message(tmp_path, overrides, message):
    (tmp_path / "afile").write_text("not a folder")
    overrides = [o.replace("TMP", str(tmp_path)) for o in overrides]
    result = run_main(tmp_path / "run", *overrides, *TINY)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
