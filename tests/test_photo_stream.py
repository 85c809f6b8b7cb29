"""One stream for photos, read by index (`alexnet_jax.data.records`): the same global batches and parameters whatever
the number of processes (real processes over gloo), a resume onto another process count, a resume that reads nothing
before its step, SIGKILL mid-epoch then bitwise the same run, and the augmentation's statistics against their
definitions."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

import forkserver
import numpy as np
import pytest
import tensorflow as tf
from conftest import COLLECTIVE_TIMEOUT, FAST_COMPILE, REPO, load_script

from alexnet_jax import data as datalib
from alexnet_jax import default_config, inference
from alexnet_jax.data import DataSpec, augment, photos, records, sources

# (processes, devices each): 4 devices in all, one ('data', 'model') mesh; the 2-process group runs first
TOPOLOGIES = ((2, 2), (1, 4), (4, 1))
PROCESSES = {"folder": (1, 2, 4), "imagenet": (1, 2)}  # the process counts each dataset is trained with
STEPS = 6
COMMON = dict(variant="small", resize_size=36, image_size=32, widths=[8, 16, 16, 16, 8], fc_width=32, batch_size=8,
              eval_batch_size=8, num_train_steps=STEPS, learning_rate=0.02, lr_schedule="constant",
              dropout_rate=0.0, mesh_shape=[4, 1], stats_examples=0, log_every_steps=3, eval_every_steps=100_000,
              checkpoint_every_steps=3, num_classes=0)


def _config(overrides: dict):
    c = default_config.get_config()
    for k, v in {**COMMON, **overrides}.items():
        if k != "logged_split":
            c[k] = tuple(v) if isinstance(v, list) else v
    return c


@pytest.fixture(scope="module")
def datasets(prepared, tmp_path_factory) -> dict[str, dict]:
    """{name: config overrides}: a folder of photos (30, 6 held out) and the tiny ILSVRC archive, prepared here with
    their statistics cached (so the runs below read only their streams)."""
    root = str(tmp_path_factory.mktemp("photos") / "photos")
    load_script("make_photo_folder").write_photo_folder(root, classes=3, per_class=10)
    out = {"folder": dict(dataset="folder", folder=root, data_dir=str(tmp_path_factory.mktemp("tfds")),
                          holdout_fraction=0.2, normalization="channel"),
           "imagenet": dict(dataset="imagenet2012", data_dir=prepared[0], num_classes=1000)}
    for overrides in out.values():
        config = _config(overrides)
        datalib.create_data(DataSpec.from_config(config))
        # (what the workers log the reads of)
        overrides["logged_split"] = sources.open_source(DataSpec.from_config(config)).train_split
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(nproc: int, devices: int, runs: list[dict], tmp) -> None:
    """`runs` trained one after the other by `nproc` real processes of `devices` CPU devices each (forked by one
    photo_stream_worker.py process, itself forked from the tests' server: no process imports the libraries)."""
    spec = tmp / f"runs_{nproc}_{_free_port()}.json"
    spec.write_text(json.dumps(runs))
    # a gloo collective between the processes fails after COLLECTIVE_TIMEOUT instead of waiting forever: jaxlib
    # 0.12.1's did, every device thread of the 2 x 2 group in gloo's allreduce (docs/development.md, "Versions")
    env = {**os.environ, "XLA_FLAGS": f"{FAST_COMPILE} {COLLECTIVE_TIMEOUT}".strip()}
    r = forkserver.run([sys.executable, os.path.join(REPO, "tests", "photo_stream_worker.py"), str(nproc),
                        str(_free_port()), str(devices), str(spec)], env=env, capture_output=True, text=True,
                       timeout=800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def _run(name: str, overrides: dict, workdir, log, **kw) -> dict:
    return {"config": {k: v for k, v in {**COMMON, **overrides, **kw}.items() if k != "logged_split"},
            "train_split": overrides["logged_split"], "workdir": str(workdir), "log": str(log)}


def _params(workdir) -> dict[str, np.ndarray]:
    import jax

    loaded = inference.load(str(workdir), mesh=inference.mesh_of_one_device())
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(loaded.variables["params"])}


# A leaf that barely moves from its zero initialisation (conv3's bias: norm 2.4e-8 after the 6 steps) differs between
# process counts by float32 rounding of its tiny gradient sums (2e-10, relative 8e-3): compared with this floor on the
# difference's norm, far below any real error (a process reading other rows moves kernels by ~1e-2 relative).
ABSOLUTE_FLOOR = 1e-8


def _worst_relative(a: dict, b: dict) -> float:
    """The largest per-leaf norm of a - b, relative to b's norm plus `ABSOLUTE_FLOOR` / 1e-5 (a leaf within
    1e-5 relative, or within ABSOLUTE_FLOOR absolute, scores below 1e-5)."""
    assert sorted(a) == sorted(b)
    return max(float(np.linalg.norm(a[k] - b[k]) / (np.linalg.norm(b[k]) + ABSOLUTE_FLOOR / 1e-5)) for k in a)


def test_the_same_batches_and_parameters_for_1_2_and_4_processes(datasets, tmp_path):
    """6 steps of a folder as 1 process x 4 devices, 2 x 2 and 4 x 1, and of the tiny ILSVRC archive as 1 x 4 and
    2 x 2 (both read through the same stream: the 4-process run of the archive would cost four more compilations):
    each process read exactly its rows of the same global batches (record indices), and the parameters agree within
    1e-5; a run of 2 processes stopped at step 3 and resumed as 1 process ends where the uninterrupted 2-process run
    ends (the 2-process runs go first, so the resume rides in the same process groups)."""
    resumed = tmp_path / "resumed"
    extra = {2: _run("folder", datasets["folder"], resumed, tmp_path / "first.log", num_train_steps=3),
             1: _run("folder", datasets["folder"], resumed, tmp_path / "second.log")}
    for nproc, devices in TOPOLOGIES:
        runs = [_run(name, o, tmp_path / f"{name}_{nproc}", tmp_path / f"{name}_{nproc}.log")
                for name, o in datasets.items() if nproc in PROCESSES[name]]
        _train(nproc, devices, runs + ([extra[nproc]] if nproc in extra else []), tmp_path)
    for name, overrides in datasets.items():
        src = sources.open_source(DataSpec.from_config(_config(overrides)))
        spec = DataSpec.from_config(_config(overrides))
        batches = photos.train_indices(src, spec, 0, STEPS)  # (steps, 8): the stream's definition
        for nproc in PROCESSES[name]:
            local = 8 // nproc
            for pid in range(nproc):
                read = json.load(open(tmp_path / f"{name}_{nproc}.log.{pid}.json"))
                want = {tuple(b[pid * local : (pid + 1) * local]) for b in batches.tolist()}
                assert len(read) == STEPS and {tuple(r) for r in read} == want, (name, nproc, pid)
        one = _params(tmp_path / f"{name}_1")
        for nproc in PROCESSES[name][1:]:
            worst = _worst_relative(_params(tmp_path / f"{name}_{nproc}"), one)
            print(f"{name}: {nproc} processes vs 1, parameters' worst relative difference {worst:.2e}")
            assert worst < 1e-5, (name, nproc)

    first, second = (json.load(open(tmp_path / f"{n}.log.0.json")) for n in ("first", "second"))
    assert len(first) == 3 and len(second) == STEPS - 3  # the resumed process read steps 3..5 only
    worst = _worst_relative(_params(resumed), _params(tmp_path / "folder_2"))
    print(f"folder: 2 processes resumed as 1 vs 2 processes throughout: worst relative difference {worst:.2e}")
    assert worst < 1e-5


def test_a_resume_reads_no_record_before_its_step(datasets):
    """Started at step 5 (mid-epoch: 3 steps per epoch), the stream reads step 5's rows first and never a record of
    an earlier step; its batches are the uninterrupted stream's."""
    config = _config({**datasets["folder"], "pca_lighting": 0.0})  # (the Data's lighting PCA is not handed out)
    src = sources.open_source(DataSpec.from_config(config))
    spec = DataSpec.from_config(config)
    data = datalib.create_data(DataSpec.from_config(config))
    norm = data.normalisation
    logged: list[list[int]] = []

    class Counted(records.Records):
        def read(self, indices):
            logged.append([int(i) for i in np.asarray(indices).reshape(-1)])
            return super().read(indices)

    recs = Counted(src.builder, src.train_split)
    full = list(data.train(0, 8, 0, 1))
    ds = photos.train_dataset(src, spec, norm, 5, 8, recs=recs, threads=1)
    # without tf.data's autotuning thread, whose sleep an iterator's destruction could wait out, CPU idle (base.py)
    assert not ds.options().autotune.enabled
    resumed = list(ds.as_numpy_iterator())
    rows = photos.train_indices(src, spec, 0, 8)
    assert recs.reads == 3 * 8 and logged[0] == rows[5].tolist()
    assert {tuple(r) for r in logged} == {tuple(r) for r in rows[5:].tolist()}
    for a, b in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_sigkill_mid_epoch_then_the_same_command_is_bitwise_the_uninterrupted_run(datasets, tmp_path, python):
    """`main` on the folder: killed (SIGKILL) after step 4 of 6 (checkpoint 3 on disk, mid-epoch 2), then the same
    command: the parameters equal those of a run never interrupted, bit for bit."""
    overrides = {k: v for k, v in datasets["folder"].items() if k != "logged_split"}
    flags = [f"--config.{k}={tuple(v) if isinstance(v, list) else v}" for k, v in {**COMMON, **overrides}.items()
             if k not in ("mesh_shape",)] + ["--config.mesh_shape=(1,1)"]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}

    def run(workdir, kill: bool):
        head = [python, os.path.join(REPO, "tests", "signal_after_step.py"), "4", "SIGKILL"] if kill else [
            python, "-m", "alexnet_jax.main"]
        return forkserver.run([*head, "--config", os.path.join(REPO, "configs", "folder.py"), *flags, "--workdir",
                               str(workdir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    whole = run(tmp_path / "whole", kill=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(tmp_path / "killed", kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    again = run(tmp_path / "killed", kill=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step 3" in again.stderr
    a, b = _params(tmp_path / "whole"), _params(tmp_path / "killed")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_augmentation_statistics_of_the_stream_follow_their_definitions(prepared):
    """The source-image stream's draws over 4096 keys of (seed, step, row): crop offsets uniform over all 33 x 33
    positions, reflections half the time, PCA lighting shifts with the covariance 255^2 * V diag(0.1^2 l^2) V^T."""
    rng_keys = tf.stack([tf.fill([4096], tf.constant(7 * photos.KEY_STRIDE, tf.int64)),
                         tf.range(4096, dtype=tf.int64)], axis=1)

    def draws(key):
        k_crop, k_flip, k_pca = tf.unstack(tf.random.experimental.stateless_split(key, 3))
        return (augment.crop_offsets(k_crop, 256, 224), augment.flip_coin(k_flip),
                augment.pca_shift(k_pca, 0.1, augment.PUBLISHED))

    yx, flips, shift = next(tf.data.Dataset.from_tensor_slices(rng_keys).map(draws).batch(4096).as_numpy_iterator())
    counts = np.bincount(yx[:, 0] * 33 + yx[:, 1], minlength=33 * 33)
    assert counts.size == 33 * 33 and yx.min() == 0 and yx.max() == 32
    chi2 = ((counts - 4096 / 1089) ** 2 / (4096 / 1089)).sum()  # 1088 degrees of freedom: mean 1088, sd ~47
    assert chi2 < 1088 + 5 * 47
    assert abs(flips.mean() - 0.5) < 4 * 0.5 / 64
    eigval, eigvec = augment.PUBLISHED
    want = 255.0**2 * eigvec @ np.diag((0.1 * eigval) ** 2) @ eigvec.T
    np.testing.assert_allclose(np.cov(shift.T, bias=True), want, rtol=0.1, atol=0.02 * want.max())
    # and the stream uses exactly these draws: image r of step s is keyed (seed * KEY_STRIDE + s, r)
    config = _config(dict(dataset="imagenet2012", data_dir=prepared[0], num_classes=1000, normalization="channel",
                          channel_mean=(0.0, 0.0, 0.0), channel_std=(1.0, 1.0, 1.0), pca_lighting=0.0, seed=7,
                          resize_size=256, image_size=224, random_flip=True))
    src = sources.open_source(DataSpec.from_config(config))
    data = datalib.create_data(DataSpec.from_config(config))
    batch = next(data.train(0, 1, 0, 1))
    index = photos.train_indices(src, DataSpec.from_config(config), 0, 1)[0]
    parse = sources.parser(src)
    for r, record in enumerate(src.records(src.train_split).read(index)):
        square = augment.decode_square(parse(tf.constant(record))["image"], 256).numpy()

        def error(y, x, flip, square=square, image=batch["image"][r]):
            patch = square[y : y + 224, x : x + 224]
            return np.abs(image - (patch[:, ::-1] if flip else patch)).mean()

        (y, x), flip = yx[r], bool(flips[r])
        drawn = error(y, x, flip)  # (the patch is decoded alone: resampling apart from the square's slice)
        others = [error(y, x, not flip), error(min(y + 3, 32) if y < 29 else y - 3, x, flip)]
        assert drawn < 0.6 * min(others), (r, drawn, others)
