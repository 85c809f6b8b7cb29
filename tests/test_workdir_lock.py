"""The writer lock (alexnet_jax.workdir_lock): held by a live run, refused to a second one in one line, released
when its holder dies however it dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO

from alexnet_jax.errors import UserError
from alexnet_jax.workdir_lock import WriterLock, lock_path

HOLDER = ("import sys; sys.path.insert(0, sys.argv[2])\n"
          "from alexnet_jax.workdir_lock import WriterLock\n"
          "with WriterLock(sys.argv[1]):\n"
          "    print('held', flush=True)\n"
          "    sys.stdin.read()\n")


def _holder(workdir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), REPO], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_run_is_refused_until_the_first_dies_by_sigkill(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(UserError) as e, WriterLock(str(tmp_path)):
            pass
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"--workdir {tmp_path} is in use by another run (pid "
                                                          f"{proc.pid} on ")
        assert f"{sys.executable} -c {tmp_path} {REPO})" in message and "choose another --workdir" in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open(lock_path(str(tmp_path))) as f:
        assert json.load(f)["pid"] == proc.pid  # the dead holder's file is still there: stale, and no obstacle
    with WriterLock(str(tmp_path)):
        with open(lock_path(str(tmp_path))) as f:
            assert json.load(f)["pid"] == os.getpid()


def test_one_process_cannot_take_its_own_lock_twice_and_takes_it_again_after(tmp_path):
    with WriterLock(str(tmp_path)), pytest.raises(UserError, match="in use by another run in this same process"), \
            WriterLock(str(tmp_path)):
        pass
    with WriterLock(str(tmp_path)):  # released on exit
        pass


def test_each_process_index_has_its_own_lock(tmp_path):
    with WriterLock(str(tmp_path), 0), WriterLock(str(tmp_path), 1):
        assert sorted(os.listdir(tmp_path)) == [".writer.lock.0", ".writer.lock.1"]
