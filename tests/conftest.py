"""Test set-up: 8 simulated CPU devices (must happen before jax is imported), quiet TensorFlow."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
