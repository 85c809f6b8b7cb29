"""Test set-up: 8 simulated CPU devices (must happen before jax is imported), quiet TensorFlow."""

import os
import sys

# 8 simulated devices; XLA:CPU's in-process collectives abort when a device thread is 40 s late to a rendezvous,
# which two pytest workers plus a notebook kernel on 2 cores can cause: give them 10 minutes.
# XLA:CPU's LLVM back end at -O0 for the tests' programs (FAST_COMPILE): the suite is mostly compilation of small
# programs, which this makes 2-4x faster (the small net's jitted init: 3.4 s -> 0.8 s; tests/test_sharding.py's
# 11 train-step equivalence tests: 122 s -> 83 s), while the convolutions and matmuls still run XLA's own
# pre-built kernels. And without XLA:CPU's newer (MLIR) fusion emitters, which took most of the rest: the small
# net's 8-device train step compiles in ~1 s of CPU instead of ~4.5 s (-O0) or ~8 s (XLA's defaults);
# tests/test_sharding.py, test_models.py and test_kernels.py took 113 s less CPU together. The elemental emitters
# that replace them are XLA's own, still shipped. The numerical claims are about the math, not how XLA generates
# code, and hold either way; the recipe checks (tests/test_recipe.py) and the real-FashionMNIST run keep XLA's
# defaults, as users run them.
# And convolutions by XLA's own Eigen kernels, matmuls by YNNPACK: what the entry points set (alexnet_jax.xla_cpu), so
# the tests run the kernels users run, in the tests' processes and the subprocesses they start alike (the bitwise
# checks compare an in-process run with a `main` subprocess). The recipe checks and one bitwise resume run with no
# test flags at all, exactly as users do (test_recipe, test_checkpointing).
# Each flag only where the running jaxlib knows it (`xla_flags.add`: an unknown XLA flag aborts every test process;
# jaxlib 0.11 dropped --xla_cpu_use_fusion_emitters). What a missing one costs is time, never a result.
FAST_COMPILE_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false",
                      "--xla_cpu_experimental_ynn_fusion_type": "dot"}
TEST_FLAGS = {**FAST_COMPILE_FLAGS, "--xla_force_host_platform_device_count": "8",
              "--xla_cpu_collective_call_terminate_timeout_seconds": "600",
              "--xla_cpu_collective_call_warn_stuck_timeout_seconds": "120"}
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # alexnet_jax, before it is installed
from alexnet_jax import xla_flags  # noqa: E402  (imports nothing but the standard library)

TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds=300"
# every flag asked of this jaxlib in one process (the calls below read the cached answers)
xla_flags.known([*(f"{k}={v}" for k, v in TEST_FLAGS.items()), TIMEOUT_FLAG])
# quiet: the controller says it once; xdist's workers inherit XLA_FLAGS and find each flag set
xla_flags.add(TEST_FLAGS, quiet="PYTEST_XDIST_WORKER" in os.environ)
# How long a collective between processes (gloo) may wait before it fails instead of hanging (the multi-process
# tests' own subprocesses; tests/test_photo_stream.py), where this jaxlib knows the flag
COLLECTIVE_TIMEOUT = TIMEOUT_FLAG if xla_flags.known([TIMEOUT_FLAG])[TIMEOUT_FLAG] else ""
# For the tests' subprocesses that set XLA_FLAGS themselves: the fast-compile flags this jaxlib knows (cached answers)
FAST_COMPILE = " ".join(f for f, ok in xla_flags.known([f"{k}={v}" for k, v in FAST_COMPILE_FLAGS.items()]).items()
                        if ok)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One folder per run of the suite, made by its first pytest process (xdist's controller, or the only one) before the
# workers start, inherited by them and the subprocesses they start, removed when that process ends. It holds JAX's
# persistent compilation cache (the same network compiled by several files, or by a test and its `main`
# subprocess, compiles once: issue #23's lever for the suite's time) and the prepared FashionMNIST.
_OWNS_RUN_DIR = "ALEXNET_TEST_RUN_DIR" not in os.environ
if _OWNS_RUN_DIR:
    import tempfile

    os.environ["ALEXNET_TEST_RUN_DIR"] = tempfile.mkdtemp(prefix="alexnet_jax_tests_")
RUN_DIR = os.environ["ALEXNET_TEST_RUN_DIR"]
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(RUN_DIR, "jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def pytest_configure(config):
    if getattr(config, "workerinput", None) is None and config.getoption("numprocesses", None):
        return  # xdist's controller runs no test: not TensorFlow's ~8 s start-up before the workers start
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    if os.environ.get("ALEXNET_TEST_CPU_REPORT"):
        import jax

        def compiled(event: str, seconds: float, **_) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                COMPILES["seconds"] += seconds
                COMPILES["count"] += 1

        def hit(event: str, **_) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                COMPILES["hits"] += 1

        jax.monitoring.register_event_duration_secs_listener(compiled)
        jax.monitoring.register_event_listener(hit)


# This process's XLA programs so far: seconds and count of JAX's compile-or-load-from-cache (so the count includes
# the persistent-cache hits, counted beside it), for the CPU report (subprocesses' are not seen here)
COMPILES = {"seconds": 0.0, "count": 0, "hits": 0}


def _cpu_seconds() -> tuple[float, float]:
    import resource

    import forkserver

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime + forkserver.forked_cpu_seconds


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ALEXNET_TEST_CPU_REPORT=FILE: one line per test (set-up and teardown included) appended to FILE: CPU
    seconds of the worker, of the processes it started and waited for (tests/forkserver.py's children included),
    wall seconds, the test, the xdist worker, when the test started (seconds since the epoch: the two workers'
    schedule, and any wait, can be read back), and this process's XLA compile-or-load seconds, programs and how many
    of them came from the persistent cache. On 2 cores the wall times of `--durations` depend on what the other
    worker runs meanwhile; CPU seconds add up (docs/development.md)."""
    path = os.environ.get("ALEXNET_TEST_CPU_REPORT")
    if not path:
        yield
        return
    import faulthandler
    import time

    own, children, start = *_cpu_seconds(), time.time()
    compiles = dict(COMPILES)
    # ALEXNET_TEST_STALL_DUMP=FILE: every thread's Python stack appended to FILE.WORKER each 10 s a test runs, to see
    # where a test waits with its CPU idle (docs/development.md)
    dump, worker = os.environ.get("ALEXNET_TEST_STALL_DUMP"), os.environ.get("PYTEST_XDIST_WORKER", "-")
    dump_file = open(f"{dump}.{worker}", "a") if dump else None
    if dump_file:
        dump_file.write(f"=== {item.nodeid} {start:.1f}\n")
        dump_file.flush()
        faulthandler.dump_traceback_later(10, repeat=True, file=dump_file)
    yield
    if dump_file:
        faulthandler.cancel_dump_traceback_later()
        dump_file.close()
    own_end, children_end = _cpu_seconds()
    with open(path, "a") as f:
        f.write(f"{own_end - own:.1f}\t{children_end - children:.1f}\t{time.time() - start:.1f}\t{item.nodeid}"
                f"\t{worker}\t{start:.1f}\t{COMPILES['seconds'] - compiles['seconds']:.1f}"
                f"\t{COMPILES['count'] - compiles['count']}\t{COMPILES['hits'] - compiles['hits']}\n")


# Why scripts/test.sh leaves out the tests of each marker (`-m "not ..."`): printed with their count at the end of the
# run. pytest-xdist's controller collects nothing and reports no deselection, so each collecting process writes what
# it left out into RUN_DIR and the process that owns RUN_DIR counts it (every worker collects the same tests).
LEFT_OUT_WHY = {
    "torch": "they need PyTorch, which the newest set (Python 3.12) does not install: no CPU build of it for 3.12 "
             "on this machine's disk, PyPI's is a multi-GB CUDA build",
    "runtime": "the emulated Colab runtime (a venv with TensorFlow, ~70 s) runs in the newest set, Python 3.12 as "
               "Colab's: ALEXNET_TEST_SET=newest scripts/test.sh, as CI does",
}


def pytest_deselected(items):
    with open(os.path.join(RUN_DIR, f"deselected.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"), "a") as f:
        for item in items:
            f.write(f"{item.nodeid}\t{','.join(sorted({m.name for m in item.iter_markers()}))}\n")


def pytest_terminal_summary(terminalreporter):
    if not _OWNS_RUN_DIR:
        return
    import glob

    left_out: dict[str, str] = {}
    for path in glob.glob(os.path.join(RUN_DIR, "deselected.*")):
        with open(path) as f:
            left_out.update(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    for marker, why in LEFT_OUT_WHY.items():
        count = sum(marker in markers.split(",") for markers in left_out.values())
        if count:
            terminalreporter.write_line(f"left out: {count} test{'s' * (count > 1)} marked '{marker}': {why}")


def pytest_unconfigure(config):
    if _OWNS_RUN_DIR:
        import shutil

        shutil.rmtree(RUN_DIR, ignore_errors=True)


# The real FashionMNIST files (Debian's dataset-fashion-mnist). Where they are missing the tests that need them skip
# on a developer's machine and fail in CI (`CI` set, as .ci/run does): CI cannot lose its real-data tests silently.
HAVE_FMNIST = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
IN_CI = bool(os.environ.get("CI"))
FMNIST_MISSING = (f"the FashionMNIST files are not in {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist "
                  "(.ci/run does)")


def require_fashion_mnist() -> None:
    """Skip (a developer's machine) or fail (CI) when the real FashionMNIST files are missing."""
    if not HAVE_FMNIST:
        (pytest.fail if IN_CI else pytest.skip)(FMNIST_MISSING + (" - this is CI, so a failure" if IN_CI else ""))


@pytest.fixture
def fashion_mnist_files() -> str:
    """The folder of the real FashionMNIST files (`require_fashion_mnist`)."""
    require_fashion_mnist()
    return FASHION_MNIST_DIR


needs_fmnist = pytest.mark.usefixtures("fashion_mnist_files")


TORCH_MISSING = ("torch is not installed, so this PyTorch-based test cannot run: `scripts/test.sh` installs it "
                 "(`pip install -e '.[test,torch]'`, the CPU build torch==2.13.0); a missing torch is a failure here, "
                 "never a skip")


@pytest.fixture(scope="session")
def torch_lib():
    """PyTorch, or a failure that says how to install it (CI must run the torch tests, not skip them)."""
    try:
        import torch
    except ImportError as e:
        pytest.fail(f"{TORCH_MISSING} ({e})")
    return torch


@pytest.fixture
def repo() -> str:
    return REPO


@pytest.fixture
def python() -> str:
    return sys.executable


def run_once(name: str, make) -> str:
    """RUN_DIR/name, made by `make(path)` once per run of the suite: the first worker to ask makes it while the
    other waits for the lock (instead of making its own copy); a `make` that failed is retried by the next."""
    import fcntl

    path = os.path.join(RUN_DIR, name)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(f"{path}.done"):
            os.makedirs(path, exist_ok=True)
            make(path)
            open(f"{path}.done", "w").close()
    return path


def _prepare_fashion_mnist(path: str) -> None:
    from alexnet_jax import default_config
    from alexnet_jax.data import DataSpec, small

    if small.fashion_mnist_files_present(FASHION_MNIST_DIR):
        config = default_config.get_config()
        config.dataset, config.data_dir, config.fashion_mnist_dir = "fashion_mnist", path, FASHION_MNIST_DIR
        for split in ("train", "test"):
            small.load_in_memory(DataSpec.from_config(config), split)


@pytest.fixture(scope="session")
def fmnist_data_dir() -> str:
    """The tfds data_dir of the real FashionMNIST files, prepared and decoded once per run of the suite (~20 s)."""
    return run_once("tfds", _prepare_fashion_mnist)


def load_script(name: str):
    """A module of scripts/ (they are not a package), e.g. make_tiny_imagenet."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prepare_tiny_imagenet(root: str) -> None:
    from alexnet_jax.data import imagenet

    manual, data = os.path.join(root, "manual"), os.path.join(root, "data")
    load_script("make_tiny_imagenet").write_tiny_imagenet(manual, classes=8, train_per_class=4)
    imagenet.prepare(data, manual)


@pytest.fixture(scope="session")
def prepared() -> tuple[str, str]:
    """(data_dir, manual_dir) with the tiny ILSVRC-format archive prepared by tfds's imagenet2012 builder, once
    per run of the suite (tests/test_imagenet.py, test_squares.py, test_transfer.py share it). Tests that write
    into it (test_squares.py's prepared squares, mean-image caches) must not depend on finding it clean."""
    root = run_once("tiny_imagenet", _prepare_tiny_imagenet)
    return os.path.join(root, "data"), os.path.join(root, "manual")


# The files' cost on 2 cores (CPU seconds, `ALEXNET_TEST_CPU_REPORT`, 2026-11-27), heaviest first: scripts/test.sh
# hands whole files to its workers (`--dist loadfile`, 3 by default) in this order, so the long ones start first
# and only short files are left for the end, where the workers finish together. The recipe checks take ~1-2
# minutes each.
COST_ORDER = ("test_recipe", "test_train", "test_recipe_owt", "test_transfer", "test_photo_stream", "test_sharding",
              "test_performance",
              "test_checkpointing", "test_squares", "test_convert", "test_imagenet", "test_models", "test_kernels",
              "test_failures", "test_communication", "test_folder_as_found", "test_docs", "test_photos", "test_figures",
              "test_accelerator", "test_cifar10")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = os.path.splitext(os.path.basename(str(item.fspath)))[0]
        return COST_ORDER.index(name) if name in COST_ORDER else len(COST_ORDER)

    items[:] = [item for _, _, item in sorted((rank(item), i, item) for i, item in enumerate(items))]
    # The marker by which the newest set (no PyTorch for its Python) leaves a test out is explicit on each test, and
    # every test that asks for PyTorch carries it: none can be left out silently, none can fail for want of it.
    unmarked = [item.nodeid for item in items
                if "torch_lib" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("torch")]
    if unmarked:
        raise pytest.UsageError(f"tests that need PyTorch (torch_lib) without @pytest.mark.torch: {unmarked}")


def examples(builder, split: str, decoders=None) -> list[dict]:
    """A prepared split's examples through tfds's own random-access reader (`as_data_source`; the photo datasets are
    array_record, which `as_dataset` does not read): a reference independent of alexnet_jax's `records`."""
    source = builder.as_data_source(split=split, decoders=decoders)
    return [source[i] for i in range(len(source))]
