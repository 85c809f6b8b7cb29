"""One run per workdir: the writer lock a training run holds for as long as it writes there.

Two runs writing into one workdir interleave their checkpoints, metrics and `summary.json`, and race on orbax's
renames; whichever saved last decides what a resume restores. So every process of a run that writes a workdir
(`main`, `convert`) holds `WORKDIR/.writer.lock.<process index>` for the whole run, and a second run on that
workdir stops before touching anything, in one line naming the run that holds it. Readers (`evaluate`, `predict`,
`features`) take no lock and work while training runs.

The lock is the operating system's (`fcntl.lockf`, a POSIX record lock): it is released when its holder dies,
however it dies (SIGKILL, a reboot, a preempted VM), so a stale lock file never blocks; the file only says who held
it last. POSIX locks are not inherited by forked children (a data-loading worker outliving the run cannot keep it).
On local disks the guarantee is the kernel's. On NFS (v4, or v3 with lockd) the lock is held by the server, which
releases a dead client's locks when its lease expires (about 90 s by default): a run restarted on another machine
right after a crash may be refused for that long, and says so. Filesystems without POSIX locks (some FUSE and object
store mounts) refuse `lockf`: the run then goes on with a warning that nothing stops a second run.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from types import TracebackType

from absl import logging

from alexnet_jax.errors import UserError

# errno values of a lock another process holds (EACCES on some systems, EAGAIN on Linux)
_HELD = (errno.EACCES, errno.EAGAIN)
_HELD_HERE: set[str] = set()  # lock files this process holds: POSIX locks do not conflict within one process


def lock_path(workdir: str, process_index: int = 0) -> str:
    return os.path.join(workdir, f".writer.lock.{process_index}")


def _describe(path: str) -> str:
    """Who holds (or last held) the lock at `path`, from what it wrote there."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return (f"pid {holder['pid']} on {holder['host']} since {holder['started']}: "
                f"{' '.join(holder['command'])}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has not written its details yet"


class WriterLock:
    """`with WriterLock(workdir, process_index):` the run's exclusive right to write `workdir` (made if missing); a
    UserError in one line when another live run holds it or the workdir cannot be made."""

    def __init__(self, workdir: str, process_index: int = 0) -> None:
        self.workdir, self.path = workdir, lock_path(workdir, process_index)
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as e:
            raise UserError(f"--workdir {self.workdir!r} cannot be created: {e.strerror}") from None
        key = os.path.realpath(self.path)
        if key in _HELD_HERE:
            raise UserError(f"--workdir {self.workdir} is in use by another run in this same process; wait for it "
                            "to finish or choose another --workdir")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in _HELD:
                raise UserError(
                    f"--workdir {self.workdir} is in use by another run ({_describe(self.path)}); wait for it to "
                    "finish or stop it, or choose another --workdir. A run that died has released it already (on "
                    "NFS, once the server's lease of a crashed machine expires, ~90 s)") from None
            logging.warning("the filesystem of %s cannot lock files (%s): nothing stops a second run from writing "
                            "into this workdir at the same time", self.workdir, e.strerror)
            return self
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": [sys.executable, *sys.argv],
                  "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        _HELD_HERE.add(key)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is None:
            return
        _HELD_HERE.discard(os.path.realpath(self.path))
        os.close(self._fd)  # closing releases the POSIX lock; the file stays, saying who held it last
        self._fd = None
