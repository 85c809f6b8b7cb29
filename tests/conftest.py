"""Test set-up: 8 simulated CPU devices (must happen before jax is imported), quiet TensorFlow."""

import os
import sys

# 8 simulated devices; XLA:CPU's in-process collectives abort when a device thread is 40 s late to a rendezvous,
# which two pytest workers plus a notebook kernel on 2 cores can cause: give them 10 minutes.
# XLA:CPU's LLVM back end at -O0 for the tests' programs (FAST_COMPILE): the suite is mostly compilation of small
# programs, which this makes 2-4x faster (the small net's jitted init: 3.4 s -> 0.8 s; tests/test_sharding.py's
# 11 train-step equivalence tests: 122 s -> 83 s), while the convolutions and matmuls still run XLA's own
# pre-built kernels. The numerical claims are about the math, not the optimiser's level, and hold at both; the recipe
# checks (tests/test_recipe.py) and the multi-host workers keep XLA's default level, as users run it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE} --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=600"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by the pytest workers of one run and the subprocesses they start
# (they inherit the environment): the same network compiled by several files, or by a test and its `main`
# subprocess, compiles once (issue #23's lever for the suite's time).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join("/tmp", f"alexnet_jax_test_jit_cache_{_RUN}"))
# Every program, however small: a `main` run of a tiny net compiles ~86 of them (orbax's per-device slices of each
# saved array, the metrics, the steps), 0.2 s each on 2 cores and mostly under 0.5 s; cached, the same 12-step
# FashionMNIST run took 17 s instead of 40 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def pytest_configure(config):
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")


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


@pytest.fixture(scope="session")
def fmnist_data_dir(tmp_path_factory) -> str:
    """One tfds data_dir per test session, so the real FashionMNIST files are prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))


def load_script(name: str):
    """A module of scripts/ (they are not a package), e.g. make_tiny_imagenet."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> tuple[str, str]:
    """(data_dir, manual_dir) with the tiny ILSVRC-format archive prepared by tfds's imagenet2012 builder, once
    per session (tests/test_imagenet.py and tests/test_squares.py share it)."""
    from alexnet_jax.data import imagenet

    root = tmp_path_factory.mktemp("imagenet")
    manual, data = str(root / "manual"), str(root / "data")
    load_script("make_tiny_imagenet").write_tiny_imagenet(manual, classes=8, train_per_class=4)
    imagenet.prepare(data, manual)
    return data, manual


# The files' cost on 2 cores (seconds, `--durations`, 2026-11-27), heaviest first: scripts/test.sh hands whole files
# to two workers (`--dist loadfile`) in collection order, so sending the long ones first leaves only short files
# for the end and the two workers finish together (alphabetical order left the heaviest for last).
COST_ORDER = ("test_performance", "test_checkpointing", "test_sharding", "test_transfer", "test_train",
              "test_figures", "test_convert", "test_photos", "test_communication", "test_failures", "test_squares",
              "test_recipe", "test_imagenet", "test_recipe_owt", "test_kernels", "test_accelerator", "test_models",
              "test_cifar10")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = os.path.splitext(os.path.basename(str(item.fspath)))[0]
        return COST_ORDER.index(name) if name in COST_ORDER else len(COST_ORDER)

    items[:] = [item for _, _, item in sorted((rank(item), i, item) for i, item in enumerate(items))]
