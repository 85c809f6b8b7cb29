"""The tests' command-line runs, forked from a process that has already imported the libraries (issue #23).

About 45 tests run `python -m alexnet_jax.main` (or `evaluate`, `predict`, a script under scripts/ ...) as a user
would, and each such process spent ~6 s of CPU importing TensorFlow, JAX, flax, optax, orbax and tfds before its
own work: a third of what the tiny runs cost. `run` is `subprocess.run` for those commands, with one difference in
how the process starts: each pytest worker keeps one server process that has imported the libraries, but started
none of their runtimes (no JAX backend, no TensorFlow context: two threads, numpy's BLAS pool included, which
re-initialises after `fork`), and forks one child per command. The child takes the command's environment, working
directory, stdin/stdout/stderr and argv and runs the module or script as `__main__`, then exits through Python's
normal shutdown (atexit, non-daemon threads, flushing): its exit status, signals (a SIGKILL is -9), one-line errors
and files are those of the real process. JAX reads XLA_FLAGS when its backend starts, in the child.

What a process reads while importing (`JAX_*`, `TF_*`, `PYTHON*`, ...) cannot change after the import: a command
whose environment differs from the server's in such a variable runs as a real subprocess, as does anything that is
not `python -m`, `python FILE` or `python -c` (and everything when ALEXNET_TEST_FORK=0).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

# Read at import by the libraries the server imports (or by Python itself): must equal the server's.
IMPORT_TIME_PREFIXES = ("JAX_", "TF_", "TFDS_", "PYTHON", "CUDA", "LD_", "OMP_", "OPENBLAS", "MKL_", "GOTO",
                        "ABSL", "GRPC", "PROTOCOL_BUFFERS", "KERAS", "ML_")
# Imported once by the server: the libraries and the modules of ours that define no command-line flags at import
# (an entry point's flags would be defined a second time when the child runs it as __main__).
PRELOAD = ("numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "tensorflow",
           "tensorflow_datasets", "clu.metric_writers", "ml_collections.config_flags", "absl.app", "PIL.Image",
           "alexnet_jax.cli", "alexnet_jax.train", "alexnet_jax.checkpointing", "alexnet_jax.inference",
           "alexnet_jax.data.small", "alexnet_jax.data.photos", "alexnet_jax.data.imagenet",
           "alexnet_jax.data.squares")
MAX_MESSAGE = 1 << 20

# CPU seconds (user + system) of the commands forked so far by this process's server: they are the server's
# children, not ours, so tests/conftest.py's per-test CPU report adds them.
forked_cpu_seconds = 0.0


def _import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


class _Server:
    def __init__(self) -> None:
        self.env = dict(os.environ)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=self.env)
        theirs.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_server: _Server | None = None


def _get_server() -> _Server:
    global _server
    if _server is None or not _server.alive():
        _server = _Server()
    return _server


def _python_command(cmd: list[str]) -> bool:
    if len(cmd) < 2 or os.path.realpath(cmd[0]) != os.path.realpath(sys.executable):
        return False
    return cmd[1] in ("-m", "-c") and len(cmd) > 2 or not cmd[1].startswith("-")


def _decode(data: bytes) -> str:
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")  # as subprocess's text mode reads it


def run(cmd: list[str], *, cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
        capture_output: bool = False, text: bool = False, timeout: float | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, ...)` for a `python -m MODULE` / `python FILE` / `python -c CODE` command: forked from
    the server when its import-time environment matches, a real subprocess otherwise."""
    global forked_cpu_seconds
    env = dict(os.environ if env is None else env)
    if (os.environ.get("ALEXNET_TEST_FORK", "1") == "0" or not _python_command(cmd)
            or _import_time_env(env) != _import_time_env(_get_server().env)):
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout,
                              check=check)
    server = _get_server()
    with open(os.devnull, "rb") as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        fds = [stdin.fileno(), out.fileno() if capture_output else 1, err.fileno() if capture_output else 2]
        request = pickle.dumps({"argv": list(map(str, cmd[1:])), "env": env,
                                "cwd": os.path.abspath(cwd if cwd is not None else os.getcwd())})
        socket.send_fds(server.sock, [request], fds)
        pid = int(server.sock.recv(64))
        ready, _, _ = select.select([server.sock], [], [], timeout)
        timed_out = not ready
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        reply = server.sock.recv(MAX_MESSAGE)
        if not reply:
            raise RuntimeError("tests/forkserver.py: the server process died (its output is in the test's log)")
        status, cpu = pickle.loads(reply)
        forked_cpu_seconds += cpu
        stdout = stderr = None
        if capture_output:
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
            if text:
                stdout, stderr = _decode(stdout), _decode(stderr)
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    result = subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), stdout, stderr)
    if check:
        result.check_returncode()
    return result


def _serve(sock: socket.socket) -> dict[str, Any]:
    """Fork one child per request; return (in the child) the request it is to run. The server exits when the
    pytest worker closes its end of the socket."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 3)
        except ConnectionError:
            message = b""
        if not message:
            sys.exit(0)
        request = pickle.loads(message)
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            sock.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            return request
        for fd in fds:
            os.close(fd)
        sock.send(str(pid).encode())
        _, status, usage = os.wait4(pid, 0)
        sock.send(pickle.dumps((status, usage.ru_utime + usage.ru_stime)))


def _run_as_main(request: dict[str, Any]) -> None:
    """What `python ARGV...` does with its first arguments, in this (forked) interpreter."""
    import runpy

    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    argv = request["argv"]
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[0] = request["cwd"]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    import gc
    import importlib

    server_socket = socket.socket(fileno=int(sys.argv[1]))
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the children's collections skip the imported modules' objects (no copy-on-write of their pages)
    try:
        _run_as_main(_serve(server_socket))
    except Exception as error:  # noqa: BLE001 - the traceback a real process prints, without this file's frames
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        sys.excepthook(type(error), error.with_traceback(tb), tb)
        sys.exit(1)
