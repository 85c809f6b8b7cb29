"""Issue #23: a disk that fills while checkpointing stops the run in one line, keeps what was saved, and the
same command resumes once there is room."""

from __future__ import annotations

import json
import os
import re
import subprocess

import forkserver
import pytest
from conftest import FAST_COMPILE, REPO, load_script

photo_folder = load_script("make_photo_folder")


def _du(path: str) -> int:
    return sum(os.stat(os.path.join(r, f)).st_blocks * 512 for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted in the test's folder (root, as CI runs; unmounted afterwards)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def resize(size: int, remount: bool = False) -> None:
        opts = f"{'remount,' if remount else ''}size={size}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mount)], check=True, capture_output=True)

    yield mount, resize
    subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)


def test_a_full_disk_stops_in_one_line_and_the_run_resumes(tmp_path, small_disk, python):
    root = str(tmp_path / "photos")
    photo_folder.write_photo_folder(root, classes=3, per_class=6)
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}

    def run(workdir: str, steps: int) -> subprocess.CompletedProcess:
        return forkserver.run(
            [python, "-m", "alexnet_jax.main", "--config", os.path.join(REPO, "configs/folder.py"),
             f"--config.folder={root}", f"--config.data_dir={tmp_path / 'tfds'}", "--config.variant=small",
             "--config.image_size=32", "--config.resize_size=36", "--config.widths=(8,16,16,16,8)",
             "--config.fc_width=64", "--config.batch_size=8", "--config.eval_batch_size=8",
             f"--config.num_train_steps={steps}", "--config.checkpoint_every_steps=2", "--config.log_every_steps=2",
             "--config.eval_every_steps=1000", "--config.checkpoint_keep=5", "--config.checkpoint_keep_best=0",
             "--workdir", workdir], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    probe = str(tmp_path / "probe")
    assert run(probe, 2).returncode == 0
    one = _du(os.path.join(probe, "checkpoints", "2"))
    mount, resize = small_disk
    resize(int(2.6 * one) + 64 * 1024)  # room for two checkpoints (and the logs), not three
    workdir = str(mount / "run")
    failed = run(workdir, 8)
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr and "Event loop is closed" not in failed.stderr, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("alexnet_jax: error: saving the checkpoint of step 6 in"), last
    assert "the disk is full. Free space or move --workdir; checkpoints 2, 4 are intact and the same command " \
           "resumes from 4" in last, last
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # no half-written step left
    resize(64 * 1024 * 1024, remount=True)
    resumed = run(workdir, 8)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and f"{os.sep}4: step 4" in resumed.stderr
    assert json.load(open(os.path.join(workdir, "summary.json")))["step"] == 8


def test_training_curves_on_a_full_disk_stop_in_one_line_and_the_run_resumes(small_disk, monkeypatch):
    """TensorBoard's writer hits a real ENOSPC: right after checkpoint 2 is written the disk is filled and no
    checkpoint is saved any more, so the scalars logged every step are the only writes (the events file's last
    page still takes a few steps' scalars). The run stops with one line naming the step, the directory and the
    cause; checkpoint 2 stays intact, and with room again the run resumes from it and finishes."""
    from test_checkpointing import synthetic_data, tiny_config

    from alexnet_jax import data as datalib
    from alexnet_jax import train
    from alexnet_jax.errors import UserError
    from alexnet_jax.preemption import SavePolicy

    mount, resize = small_disk
    resize(64 * 1024 * 1024)
    monkeypatch.setattr(datalib, "create_data", synthetic_data)
    config = tiny_config(num_train_steps=40, log_every_steps=1, eval_every_steps=100, checkpoint_every_steps=2,
                         checkpoint_keep_best=0, lr_schedule="constant")
    original = SavePolicy.after_step
    filler = str(mount / "filler")

    def fill_after_step_2(self, step, state, **kwargs):
        if step > 2:
            return False
        stop = original(self, step, state, **kwargs)
        if step < 2:
            return stop
        self.ckpt.wait_until_finished()  # checkpoint 2 is on disk: take every block left
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        return stop

    monkeypatch.setattr(SavePolicy, "after_step", fill_after_step_2)
    workdir = str(mount / "run")
    with pytest.raises(UserError) as failed:
        train.train_and_evaluate(config, workdir)
    message = re.fullmatch(
        rf"writing the training curves of step (\d+) in {re.escape(workdir)} failed: the disk is full\. Free "
        r"space or move --workdir; checkpoint 2 is intact and the same command resumes from 2\.", str(failed.value))
    assert message and 3 <= int(message[1]) < 40, str(failed.value)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    os.remove(filler)
    monkeypatch.setattr(SavePolicy, "after_step", original)
    summary = train.train_and_evaluate(config, workdir)
    assert summary["step"] == 40


def test_a_collective_that_times_out_ends_in_one_line(python):
    """XLA's LOG(FATAL) line and native stack dump (tried without the filter: 20 lines ending in `Aborted`) become
    our one line; what the run printed before still reaches stderr."""
    from alexnet_jax import cli

    r = forkserver.run([python, os.path.join(REPO, "tests", "stuck_collective.py")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == cli.STUCK_MESSAGE, r.stderr[-3000:]
    assert "before the collective" in lines
    assert "Check failure stack trace" not in r.stderr and "Termination timeout" not in r.stderr, r.stderr[-3000:]
