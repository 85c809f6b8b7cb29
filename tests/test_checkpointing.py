"""Checkpoints: resume bitwise after SIGKILL/SIGTERM, restore on other meshes, plain-orbax restore,
unreadable/mismatched checkpoints, crop averaging, evaluate and predict."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time

import forkserver
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, needs_fmnist, require_fashion_mnist

from alexnet_jax import checkpointing, evaluate, predict, sharding, train
from alexnet_jax import config as config_lib
from alexnet_jax import data as datalib
from alexnet_jax.data import small
from alexnet_jax.errors import UserError
from alexnet_jax.model import ModelSpec, create_model
from alexnet_jax.preemption import SavePolicy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")



def _reader(workdir, config, trainer, read_only=True):
    """The run's Checkpointer, restoring onto `trainer`'s mesh."""
    return checkpointing.Checkpointer(workdir, checkpointing.CheckpointSpec.from_config(config),
                                      trainer.abstract_state, trainer.state_sharding, read_only=read_only)

def fashion_mnist_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fashion_mnist_config", os.path.join(REPO, "configs",
                                                                                        "fashion_mnist.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(**overrides):
    c = fashion_mnist_config()
    c.widths, c.fc_width = (8, 16, 16, 16, 8), 32
    c.batch_size, c.eval_batch_size = 16, 16
    c.num_train_steps, c.log_every_steps, c.eval_every_steps = 4, 2, 2
    c.checkpoint_every_steps, c.checkpoint_keep, c.checkpoint_keep_best = 2, 3, 1
    c.lr_schedule, c.plateau_patience = "plateau", 0
    c.learning_rate, c.eval_crops = 0.05, 1  # pinned: the messages below name them
    for k, v in overrides.items():
        c[k] = v
    return c


def synthetic_splits(n_train=64, n_eval=40, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        return datalib.InMemoryData(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                                           rng.integers(0, 10, n).astype(np.int32),
                                           datalib.FASHION_MNIST_CLASSES)

    return split(n_train), split(n_eval)


def synthetic_data(config, normalisation=None, process_index=0, process_count=1) -> datalib.Data:
    """Random uint8 'FashionMNIST' through the real in-memory train/eval pipelines (no files needed)."""
    tr, te = synthetic_splits()
    mean, std = datalib.channel_stats(tr.images)
    return datalib.Data(
        num_train=len(tr), num_eval=len(te), image_shape=(config.image_size, config.image_size, 1),
        class_names=tr.class_names,
        train=lambda s, e, p, n: small.train_batches(tr, config, mean, std, s, e, p, n),
        eval=lambda p, n, rows=0: small.eval_batches(te, config, mean, std, p, n, rows), mean=mean, std=std,
        normalisation=datalib.normalisation_for(config, {"mean": mean, "std": std}))


@pytest.fixture(scope="module")
def run_4x2(tmp_path_factory):
    """A 4-step run on a 4x2 mesh (data 4, model 2) with synthetic data: its workdir and summary."""
    workdir = str(tmp_path_factory.mktemp("run_4x2"))
    config = tiny_config(mesh_shape=(4, 2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datalib, "create_data", synthetic_data)
        summary = train.train_and_evaluate(config, workdir)
    return workdir, config, summary


def _restore_params_plain(step_dir: str, name: str = "params") -> dict:
    """An item as NumPy arrays, the way a user without alexnet_jax would read it."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    item = os.path.join(step_dir, name)
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), ckptr.metadata(item).item_metadata.tree)
    return ckptr.restore(item, target)


# ------------------------------------------------------------------------------------------------- unit
def test_crop_averaging_is_mean_softmax_over_crops():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2 * 2 * 1, 3)).astype(np.float32)
    images = rng.normal(size=(4, 10, 2, 2, 1)).astype(np.float32)  # 4 images, 10 crops each

    def apply_fn(x):
        return x.reshape(x.shape[0], -1) @ w

    got = np.asarray(train.crop_averaged_logits(apply_fn, jnp.asarray(images)))
    logits = images.reshape(40, -1) @ w
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).reshape(4, 10, 3).mean(1)
    np.testing.assert_allclose(np.exp(got), p, rtol=1e-5)
    np.testing.assert_allclose(np.exp(got).sum(-1), np.ones(4), rtol=1e-5)
    flat = jnp.asarray(images[:, 0])
    np.testing.assert_array_equal(train.crop_averaged_logits(apply_fn, flat), apply_fn(flat))  # 1 crop: logits


def test_saving_replicated_state_on_8_devices_compiles_no_slices(tmp_path, caplog):
    """orbax would have each of the 8 replicas write a slice of every replicated array, compiling a slicing program
    per array (~100, seconds, in the first save of every run): small arrays are written whole by one replica."""
    config = tiny_config(widths=(8, 16, 16, 16, 24), fc_width=40)  # shapes no other test saves (no cached program)
    trainer = train.Trainer(train.RunSpec.from_config(config), train.sharding.make_mesh((8, 1)), (28, 28, 1), 4, 4)
    state = trainer.init(jax.random.PRNGKey(0))
    ckpt = _reader(str(tmp_path), config, trainer, read_only=False)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("WARNING"):
            # a canary: a program compiled here for the first time must show in the capture
            jax.jit(lambda x: jnp.sin(x) * 3.25 + 1.0)(jnp.ones((7, 13, int(time.time() * 1e6) % 97 + 3)))
            assert ckpt.save(0, state)
            ckpt.close()
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage()[:60] for r in caplog.records if "Compiling" in r.getMessage()]
    assert any("<lambda>" in c for c in compiled), compiled  # the capture works
    assert not [c for c in compiled if "slice" in c], compiled
    restored, _ = _reader(str(tmp_path), config, trainer).restore_or(state)
    _assert_bitwise(jax.tree_util.tree_flatten_with_path(restored.params)[0],
                    jax.tree_util.tree_flatten_with_path(state.params)[0], "saved whole")


def test_config_differences_lists_fields_and_allows_resumable_changes():
    saved = config_lib.config_to_dict(tiny_config())
    now = config_lib.config_to_dict(tiny_config(fc_width=64, num_train_steps=99, mesh_shape=(2, 2)))
    assert config_lib.config_differences(saved, now) == ["fc_width: checkpoint 32, now 64"]


def test_checkpoints_from_before_config_pca_keep_their_lighting():
    """An ImageNet run saved before `pca` existed was lit with the published PCA: it loads as such and a resume
    with today's default ('data') is refused; runs on other datasets (no PCA lighting) are unaffected."""
    old = config_lib.config_to_dict(tiny_config(dataset="imagenet2012"))
    del old["pca"]
    assert config_lib.config_from_dict(old).pca == "published"
    now = config_lib.config_to_dict(tiny_config(dataset="imagenet2012"))
    assert config_lib.config_differences(old, now) == ["pca: checkpoint 'published', now 'data'"]
    assert config_lib.config_differences(old, dict(now, pca="published")) == []
    small = config_lib.config_to_dict(tiny_config())
    del small["pca"]
    assert config_lib.config_from_dict(small).pca == "data"
    assert config_lib.config_differences(small, config_lib.config_to_dict(tiny_config())) == []


# --------------------------------------------------------------------------------------- mesh changes
def test_4x2_checkpoint_restores_on_1_device_and_2x2_with_same_accuracy(run_4x2):
    workdir, config, summary = run_4x2
    assert summary["step"] == 4 and summary["mesh"] == {"data": 4, "model": 2}
    devices = jax.devices()
    results = {}
    for shape, n in (((1, 1), 1), ((2, 2), 4)):
        mesh = sharding.make_mesh(shape, devices=devices[:n])
        out = evaluate.evaluate_checkpoint(workdir, mesh=mesh, data=synthetic_data(config))
        assert out["step"] == 4 and out["count"] == 40
        assert (out["top1"], out["top5"]) == (summary["top1_accuracy"], summary["top5_accuracy"])
        assert out["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
        results[shape] = out
        # the full state lands on the target mesh with the strategy's shardings, values bitwise equal
        trainer = train.Trainer(train.RunSpec.from_config(config), mesh, (28, 28, 1), 4, 4)
        ckpt = _reader(workdir, config, trainer)
        state = ckpt.restore(4).state
        for leaf, target in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_sharding), strict=True):
            assert leaf.sharding.is_equivalent_to(target, leaf.ndim)
        plain = _restore_params_plain(ckpt.step_dir(4))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, plain)
    assert results[(1, 1)]["top1"] == results[(2, 2)]["top1"]


def test_ten_crop_needs_a_pipeline_that_makes_crops(run_4x2):
    workdir, config, _ = run_4x2
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    with pytest.raises(UserError, match="does not produce 10 crops"):
        evaluate.evaluate_checkpoint(workdir, mesh=mesh, data=synthetic_data(config), overrides={"eval_crops": 10})
    with pytest.raises(UserError, match="fc_width cannot be changed"):
        evaluate.evaluate_checkpoint(workdir, mesh=mesh, overrides={"fc_width": 8})


# ------------------------------------------------------------------------------------------ plain orbax
PLAIN_ORBAX = r"""
import json, sys
import jax, numpy as np, orbax.checkpoint as ocp
path = sys.argv[1]
mngr = ocp.CheckpointManager(path)
step = mngr.latest_step()
same_topology = mngr.restore(step)["params"]          # same device count as the run that saved it
ckptr = ocp.StandardCheckpointer()                    # any device count: restore as NumPy
item = f"{path}/{step}/params"
target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), ckptr.metadata(item).item_metadata.tree)
params = ckptr.restore(item, target)
assert not any(m.startswith("alexnet_jax") for m in sys.modules), "alexnet_jax was imported"
leaves = jax.tree_util.tree_flatten_with_path(params)[0]
same = all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same_topology)))
print(json.dumps({"step": step, "same": same, "types": sorted({type(v).__name__ for _, v in leaves}),
                  "tree": {"/".join(k.key for k in p): list(v.shape) for p, v in leaves}}))
"""


def test_plain_orbax_restores_the_parameter_tree(run_4x2, python):
    workdir, config, _ = run_4x2
    out = forkserver.run([python, "-c", PLAIN_ORBAX, checkpointing.checkpoint_dir(workdir)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    model = create_model(ModelSpec.from_config(config))
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"])
    expected = {"/".join(k.key for k in p): list(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    assert got["step"] == 4 and got["same"] and got["types"] == ["ndarray"]
    assert got["tree"] == expected and "conv1/kernel" in expected and "fc8/bias" in expected


# ------------------------------------------------------------------------------- unreadable / mismatched
def _trainer(config):
    return train.Trainer(train.RunSpec.from_config(config), sharding.make_mesh((1, 1), devices=jax.devices()[:1]),
                         (28, 28, 1), 4, 4)


def test_truncated_latest_is_skipped_and_previous_restored(run_4x2, tmp_path, caplog):
    workdir = str(tmp_path / "w")
    shutil.copytree(run_4x2[0], workdir)
    ckdir = checkpointing.checkpoint_dir(workdir)
    assert sorted(int(s) for s in os.listdir(ckdir)) == [2, 4]
    # a half-written save (orbax's temporary directory) and a truncated latest checkpoint
    shutil.copytree(os.path.join(ckdir, "4"), os.path.join(ckdir, "6.orbax-checkpoint-tmp-1234"))
    for root, _, files in os.walk(os.path.join(ckdir, "4", "params")):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 3)
    config = tiny_config(mesh_shape=(1, 1))
    trainer = _trainer(config)
    ckpt = _reader(workdir, config, trainer, read_only=False)
    with caplog.at_level(logging.WARNING):
        state, last_eval = ckpt.restore_or(trainer.init(jax.random.PRNGKey(0)))
    ckpt.close()
    assert int(state.step) == 2 and last_eval["count"] == 40
    assert any("step 4 is unreadable" in r.getMessage() for r in caplog.records)
    assert os.path.isdir(os.path.join(workdir, checkpointing.REJECTED_SUBDIR, "4"))  # set aside, not deleted
    assert 6 not in ckpt.all_steps() and ckpt.all_steps() == [2]
    good = _restore_params_plain(os.path.join(run_4x2[0], "checkpoints", "2"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, good)


def test_checkpoint_of_another_config_is_refused_with_the_differing_fields(run_4x2):
    workdir = run_4x2[0]
    config = tiny_config(mesh_shape=(1, 1), fc_width=48, learning_rate=0.5)
    trainer = _trainer(config)
    ckpt = _reader(workdir, config, trainer)
    with pytest.raises(UserError) as e:
        ckpt.latest(template=trainer.init(jax.random.PRNGKey(0)), set_aside=False)
    assert "fc_width: checkpoint 32, now 48" in str(e.value)
    assert "learning_rate: checkpoint 0.05, now 0.5" in str(e.value)
    assert sorted(ckpt.all_steps()) == [2, 4]  # nothing moved or deleted


# ----------------------------------------------------------------------------------------------- predict
def _reference_logits(run_4x2, images: np.ndarray) -> np.ndarray:
    """The step-4 checkpoint of `run_4x2` applied to uint8 images normalised by hand, as the run's evaluation does:
    minus the training split's mean, over its standard deviation (one channel, 0-255 scale), in NumPy float64."""
    workdir, config, _ = run_4x2
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    trainer = train.Trainer(train.RunSpec.from_config(config), mesh, (28, 28, 1), 4, 4)
    state = _reader(workdir, config, trainer).restore(4).state
    pixels = synthetic_splits()[0].images.astype(np.float64)
    x = ((images.astype(np.float64) - pixels.mean()) / pixels.std()).astype(np.float32)
    return np.asarray(trainer.model.apply({"params": state.params}, x), np.float64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_run_summary_metrics_equal_a_numpy_ranking_of_the_checkpoint(run_4x2):
    """The summary's last evaluation (step 4, all 40 eval images) recomputed independently: the checkpoint's logits
    on the images normalised by hand, top-1 / top-5 by NumPy's ranking of each row (its label among the 1 / 5
    largest logits), the loss as the mean cross-entropy of a float64 log-softmax."""
    _, _, summary = run_4x2
    _, test = synthetic_splits()
    logits = _reference_logits(run_4x2, test.images)
    rank = (logits > logits[np.arange(40), test.labels][:, None]).sum(1)  # classes scoring above the label
    top1, top5 = float(np.mean(rank < 1)), float(np.mean(rank < 5))
    assert 0 < top1 < top5 < 1  # the data make top-1 and top-5 differ, so a swap or a wrong k shows
    assert (summary["num_eval_examples"], summary["step"]) == (40, 4)
    assert summary["top1_accuracy"] == pytest.approx(top1, abs=1e-6)
    assert summary["top5_accuracy"] == pytest.approx(top5, abs=1e-6)
    loss = -np.mean(np.log(_softmax(logits))[np.arange(40), test.labels])
    assert summary["eval_loss"] == pytest.approx(loss, rel=1e-4)


def test_predict_matches_the_eval_pipeline(run_4x2, tmp_path):
    import tensorflow as tf

    workdir, config, _ = run_4x2
    _, test = synthetic_splits()
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"img{i}.png"))
        tf.io.write_file(paths[-1], tf.io.encode_png(test.images[i]))
    results = predict.predict(workdir, paths)
    # the reference: the same checkpoint applied to the images normalised by hand, as the run's evaluation does:
    # minus the training split's mean, over its standard deviation (one channel, 0-255 scale), in NumPy
    probs = _softmax(_reference_logits(run_4x2, test.images[:3]))
    for (path, top), p in zip(results, probs, strict=True):
        assert len(top) == 5 and path.endswith(".png")
        order = np.argsort(-p, kind="stable")[:5]
        assert [name for name, _ in top] == [datalib.FASHION_MNIST_CLASSES[j] for j in order]
        np.testing.assert_allclose([prob for _, prob in top], p[order], rtol=1e-5)


def test_predict_cli_prints_top5(run_4x2, tmp_path, python, repo):
    import tensorflow as tf

    _, test = synthetic_splits()
    image = str(tmp_path / "shoe.png")
    tf.io.write_file(image, tf.io.encode_png(test.images[0]))
    out = forkserver.run([python, "-m", "alexnet_jax.predict", "--workdir", run_4x2[0], image],
                         capture_output=True, text=True, timeout=180, cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == image and len(lines) == 6
    assert all(line.strip().startswith(f"{k}. ") and line.endswith("%") for k, line in enumerate(lines[1:], 1))
    # the printed classes and percentages: the 5 largest of an independent softmax of the checkpoint's logits
    p = _softmax(_reference_logits(run_4x2, test.images[:1]))[0]
    order = np.argsort(-p, kind="stable")[:5]
    assert [line.split(". ", 1)[1].rsplit(" ", 1)[0].strip() for line in lines[1:]] == [
        datalib.FASHION_MNIST_CLASSES[j] for j in order]
    np.testing.assert_allclose([float(line.split()[-1].rstrip("%")) for line in lines[1:]], 100 * p[order],
                               atol=0.0051)  # printed with 2 decimals


# ------------------------------------------------------------------------------- kill / preempt / resume
# Evaluated on the first 512 test images (the claims are about the parameters; evaluating all 10,000 at the tests'
# -O0 cost ~15 s per run).
RESUME_RUN = {"widths": (8, 16, 16, 16, 8), "fc_width": 32, "batch_size": 32, "eval_batch_size": 256,
              "eval_split": "test[:512]", "num_train_steps": 12, "checkpoint_every_steps": 4, "log_every_steps": 4,
              "eval_every_steps": 12}


def _fmnist_args(workdir, data_dir):
    return (["--config", "configs/fashion_mnist.py", "--workdir", workdir, f"--config.data_dir={data_dir}"]
            + [f"--config.{k}={v}" for k, v in RESUME_RUN.items()])


def _final_arrays(workdir, step):
    out = {}
    for item in ("params", "train_state"):
        out[item] = _restore_params_plain(os.path.join(checkpointing.checkpoint_dir(workdir), str(step)), item)
    return jax.tree_util.tree_flatten_with_path(out)[0]


def _assert_bitwise(got, expected, what):
    assert [p for p, _ in got] == [p for p, _ in expected]
    for (path, a), (_, b) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: {jax.tree_util.keystr(path)}")


def test_sigterm_in_process_saves_after_eval_and_resumes_bitwise(run_4x2, tmp_path, monkeypatch):
    """SIGTERM right after step 2's evaluation (the plateau schedule has just been fed): the checkpoint at
    step 3 and the resumed run reproduce the uninterrupted 4x2 run bitwise, plateau state included."""
    workdir, config, summary = run_4x2
    monkeypatch.setattr(datalib, "create_data", synthetic_data)
    original = SavePolicy.after_step

    def after_step(self, step, state, **kwargs):
        stop = original(self, step, state, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return stop

    monkeypatch.setattr(SavePolicy, "after_step", after_step)
    work = str(tmp_path / "w")
    first = train.train_and_evaluate(config, work)
    assert first == {"preempted": True, "step": 3, "checkpoint": os.path.join(work, "checkpoints", "3")}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    monkeypatch.setattr(SavePolicy, "after_step", original)
    second = train.train_and_evaluate(config, work)
    assert second["step"] == 4 and second["top1_accuracy"] == summary["top1_accuracy"]
    _assert_bitwise(_final_arrays(work, 4), _final_arrays(workdir, 4), "resumed at 3")


def _entry_point_run(cmd, python, repo, workdir, data_dir):
    """`cmd` (`-m alexnet_jax.main`, or a script running it) as a user runs it: one CPU device and the XLA flags and
    kernels the entry points choose (an empty XLA_FLAGS: `main` adds its own, alexnet_jax.cli.set_xla_cpu_flags)."""
    return forkserver.run([python, *cmd, *_fmnist_args(workdir, data_dir)], capture_output=True, text=True,
                          timeout=300, cwd=repo, env={**os.environ, "XLA_FLAGS": ""})


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, fmnist_data_dir):
    """An uninterrupted `main` run of RESUME_RUN as a user runs it, started over a stale lock file (a dead run's:
    no OS lock behind it): the workdir every resumed or held run must end equal to."""
    require_fashion_mnist()
    workdir = tmp_path_factory.mktemp("undisturbed")
    stale = {"pid": 2 ** 22 + 7, "host": "gone", "started": "2026-01-01 00:00:00 UTC", "command": ["python"]}
    (workdir / ".writer.lock.0").write_text(json.dumps(stale))
    r = _entry_point_run(["-m", "alexnet_jax.main"], sys.executable, REPO, str(workdir), fmnist_data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((workdir / ".writer.lock.0").read_text())["pid"] != stale["pid"]  # it held the lock itself
    return str(workdir)


@needs_fmnist
def test_sigterm_then_sigkill_then_resume_is_bitwise_identical(tmp_path, python, repo, fmnist_data_dir, undisturbed):
    """The real command line on the real FashionMNIST, as a user runs it: one CPU device and the XLA flags and kernels
    the entry points choose (no test flags). SIGTERM after step 2 (saves step 3, exits 0); the rerun is SIGKILLed
    after step 10 (checkpoints 4 and 8 are on disk, and its lock file, now stale); the third run resumes from 8. Its
    step-12 parameters and optimiser state equal an uninterrupted run's bit for bit."""

    def run(signal_at=None):
        cmd = ["tests/signal_after_step.py", *signal_at] if signal_at else ["-m", "alexnet_jax.main"]
        return _entry_point_run(cmd, python, repo, workdir, fmnist_data_dir)

    workdir = str(tmp_path / "w")
    ckdir = os.path.join(workdir, "checkpoints")
    term = run(("2", "SIGTERM"))
    assert term.returncode == 0, term.stderr[-3000:]
    assert f"preempted after step 3: checkpoint saved in {os.path.join(ckdir, '3')}" in term.stderr
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    kill = run(("10", "SIGKILL"))
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-3000:]
    assert f"resumed from {os.path.join(ckdir, '3')}: step 3" in kill.stderr
    with open(os.path.join(workdir, ".writer.lock.0")) as f:
        killed = json.load(f)["pid"]  # the dead run's lock file is left behind
    last = run()
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"resumed from {os.path.join(ckdir, '8')}: step 8" in last.stderr
    with open(os.path.join(workdir, ".writer.lock.0")) as f:
        assert json.load(f)["pid"] != killed
    _assert_bitwise(_final_arrays(workdir, 12), _final_arrays(undisturbed, 12), "term+kill+resume")
    summaries = []
    for d in (workdir, undisturbed):
        with open(os.path.join(d, "summary.json")) as f:
            summaries.append(json.load(f))
    assert summaries[0]["top1_accuracy"] == summaries[1]["top1_accuracy"]
    assert summaries[1]["mesh"] == {"data": 1, "model": 1}, summaries[1]


@needs_fmnist
def test_a_second_run_on_a_workdir_in_use_stops_in_one_line_and_readers_go_on(tmp_path, python, repo,
                                                                               fmnist_data_dir, undisturbed):
    """Two real `main` processes on one workdir: the first is held after step 8 (checkpoints 4 and 8 on disk, its
    workdir locked). Meanwhile `predict` and `evaluate` read the workdir, and a second `main` on it exits 1 in one
    line naming the first (pid, command) before writing anything. Released, the first finishes, and its checkpoints
    equal an undisturbed run's bit for bit."""
    import subprocess

    from PIL import Image

    env = {**os.environ, "XLA_FLAGS": ""}

    workdir, hold = tmp_path / "w", tmp_path / "hold"
    hold.mkdir()
    # the held run as a plain subprocess: the fork server answers one command at a time
    first = subprocess.Popen([python, "tests/signal_after_step.py", "8", f"PAUSE={hold}",
                              *_fmnist_args(str(workdir), fmnist_data_dir)], cwd=repo, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (hold / "paused").exists():
            assert time.time() < deadline and first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.1)
        holder = json.loads((workdir / ".writer.lock.0").read_text())
        image = str(tmp_path / "shirt.png")
        Image.fromarray(np.full((28, 28), 200, np.uint8)).save(image)
        readers = [forkserver.run([python, "-m", "alexnet_jax.predict", "--workdir", str(workdir), image],
                                  capture_output=True, text=True, timeout=300, cwd=repo, env=env),
                   forkserver.run([python, "-m", "alexnet_jax.evaluate", "--workdir", str(workdir),
                                   f"--config.data_dir={fmnist_data_dir}"],
                                  capture_output=True, text=True, timeout=300, cwd=repo, env=env)]
        for r in readers:
            assert r.returncode == 0, r.stderr[-3000:]
        assert "shirt.png" in readers[0].stdout and "top1" in readers[1].stderr
        before = sorted(os.listdir(workdir / "checkpoints"))
        second = _entry_point_run(["-m", "alexnet_jax.main"], python, repo, str(workdir), fmnist_data_dir)
    finally:
        (hold / "go").touch()
        _, first_err = first.communicate(timeout=300)
    assert second.returncode == 1
    lines = [line for line in second.stderr.splitlines() if "alexnet_jax: error:" in line]
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert (f"--workdir {workdir} is in use by another run (pid {holder['pid']} on {holder['host']}"
            in lines[0]), lines[0]
    assert "signal_after_step.py" in lines[0] and "choose another --workdir" in lines[0]
    assert before == ["4", "8"]  # the second run wrote nothing
    assert first.returncode == 0, first_err[-3000:]
    for step in (4, 8, 12):
        _assert_bitwise(_final_arrays(str(workdir), step), _final_arrays(undisturbed, step), f"step {step}")


# A checkpoint written by the code before orbax's handler registry replaced its deprecated `item_handlers` (commit
# 8b661bd: `main` on FashionMNIST, widths (8,16,16,16,8), fc 32, 3 steps on 1 device) and that code's `predict` of
# four fixed images (expected.json). Restoring it must keep working, whatever changes in how checkpoints are read.
FIXTURE = os.path.join(REPO, "tests", "data", "checkpoint_8b661bd")
FIXTURE_OVERRIDES = ["num_train_steps=3", "widths=(8,16,16,16,8)", "fc_width=32", "eval_split=test[:64]",
                     "eval_batch_size=32", "warmup_epochs=0.0", "checkpoint_every_steps=3",
                     "learning_rate=0.01"]  # the config's rate when the fixture was written


def _fixture_images(folder) -> list[str]:
    from PIL import Image

    rng, paths = np.random.default_rng(0), []
    for i in range(4):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(paths[-1])
    return paths


def test_a_checkpoint_written_before_predicts_what_it_did(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), workdir / "checkpoints")
    step, config, meta = checkpointing.read_saved(str(workdir))
    assert step == 3 and config["widths"] == [8, 16, 16, 16, 8] and meta
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)["top3"]
    got = [[(name, p) for name, p in top] for _, top in predict.predict(str(workdir), _fixture_images(tmp_path),
                                                                          top_k=3)]
    assert [[n for n, _ in top] for top in got] == [[n for n, _ in top] for top in expected]
    np.testing.assert_allclose([[p for _, p in top] for top in got], [[p for _, p in top] for top in expected],
                               atol=2e-6)


@needs_fmnist
def test_a_checkpoint_written_before_resumes(tmp_path, fmnist_data_dir, caplog):
    """Its whole training state restores (parameters, momentum, plateau, step, data position) onto this process's
    8 devices, and training goes on from step 3."""
    from alexnet_jax import cli

    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), workdir / "checkpoints")
    config = cli.load_config(os.path.join(REPO, "configs", "fashion_mnist.py"),
                             [*FIXTURE_OVERRIDES, "num_train_steps=4", f"data_dir={fmnist_data_dir}",
                              "mesh_shape=(-1,1)"])
    with caplog.at_level(logging.INFO):
        summary = train.train_and_evaluate(config, str(workdir))
    assert summary["step"] == 4
    assert any(r.getMessage().startswith("resumed from") and ": step 3 " in r.getMessage() for r in caplog.records)
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [3, 4]
