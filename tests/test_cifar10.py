"""CIFAR-10 through tfds's own `cifar10` builder, fed a tiny archive in the real binary format."""

import io
import json
import os
import sys
import tarfile

import forkserver
import numpy as np
import pytest
from conftest import FAST_COMPILE
from tensorflow_datasets.core.download import checksums
from tensorflow_datasets.image_classification import cifar

from alexnet_jax import data as datalib
from alexnet_jax import default_config
from alexnet_jax.data import DataSpec, small
from alexnet_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PER_FILE, NUM_TEST = 8, 10


def _records(rng: np.random.Generator, n: int, first_label: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """`n` records of <1 label byte><1024 R><1024 G><1024 B>, and the (label, HWC bytes) each decodes to."""
    labels = (np.arange(n) + first_label) % 10
    planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    raw = b"".join(bytes([label]) + p.tobytes() for label, p in zip(labels, planes, strict=True))
    return raw, [(int(label), p.transpose(1, 2, 0).tobytes()) for label, p in zip(labels, planes, strict=True)]


def write_archive(path: str, seed: int = 0) -> dict[str, list[tuple[int, bytes]]]:
    """A `cifar-10-binary.tar.gz` laid out as the real one (5 train batches, a test batch, the label names)."""
    rng = np.random.default_rng(seed)
    members, expected = {}, {"train": [], "test": []}
    for k in range(5):
        raw, ex = _records(rng, TRAIN_PER_FILE, k)
        members[f"data_batch_{k + 1}.bin"] = raw
        expected["train"] += ex
    members["test_batch.bin"], expected["test"] = _records(rng, NUM_TEST, 0)
    members["batches.meta.txt"] = ("\n".join(datalib.CIFAR10_CLASSES) + "\n\n").encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return expected


def _config(data_dir: str, manual_dir: str = "") -> default_config.ml_collections.ConfigDict:
    c = default_config.get_config()
    c.update(dict(dataset="cifar10", data_dir=data_dir, manual_dir=manual_dir, image_size=32, num_classes=10))
    return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """tfds's cifar10 builder prepares the tiny archive from the manual folder, as it would the real one.

    Only the checksum tfds registers for the real download is swapped for the tiny archive's.
    """
    root = tmp_path_factory.mktemp("cifar")
    manual = root / "manual"
    manual.mkdir()
    archive = manual / small.CIFAR10_ARCHIVE
    expected = write_archive(str(archive))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cifar.Cifar10, "url_infos", {small.CIFAR10_URL: checksums.compute_url_info(archive)})
        mp.setattr(small, "_reachable", lambda url: False)  # never the network
        train = small.load_in_memory(DataSpec.from_config(_config(str(root / "tfds"), str(manual))), "train")
    return str(root / "tfds"), expected, train


def test_real_builder_prepares_archive_from_manual_dir(prepared):
    data_dir, expected, train = prepared
    assert train.images.shape == (5 * TRAIN_PER_FILE, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.class_names == datalib.CIFAR10_CLASSES
    got = sorted((int(label), image.tobytes()) for label, image in zip(train.labels, train.images, strict=True))
    assert got == sorted(expected["train"])  # every record once, planes decoded to HWC
    test = small.load_in_memory(DataSpec.from_config(_config(data_dir)), "test")  # prepared: no archive needed any more
    got = sorted((int(lb), im.tobytes()) for lb, im in zip(test.labels, test.images, strict=True))
    assert got == sorted(expected["test"])


def test_main_trains_and_evaluates_on_cifar10(prepared, tmp_path):
    data_dir, _, _ = prepared
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "alexnet_jax.main", "--config", os.path.join(REPO, "configs/cifar10.py"),
           "--workdir", str(tmp_path), f"--config.data_dir={data_dir}", "--config.batch_size=8",
           "--config.eval_batch_size=4", "--config.num_train_steps=3", "--config.log_every_steps=1",
           "--config.widths=(8,16,16,16,8)", "--config.fc_width=32"]
    proc = forkserver.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["dataset"] == "cifar10" and summary["step"] == 3
    assert summary["num_eval_examples"] == NUM_TEST  # 10 = two full batches of 4 and one padded, counted once


def test_archive_with_another_checksum_is_refused(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_archive(str(manual / small.CIFAR10_ARCHIVE))  # not the real file: tfds's checksum differs
    with pytest.raises(UserError, match="checksum differs") as e:
        small.load_in_memory(DataSpec.from_config(_config(str(tmp_path / "tfds"), str(manual))), "train")
    assert small.CIFAR10_URL in str(e.value)
    assert not (tmp_path / "tfds" / "cifar10").exists() or not any((tmp_path / "tfds" / "cifar10").rglob("*.tfrecord*"))


def test_missing_archive_offline_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(small, "_reachable", lambda url: False)
    with pytest.raises(UserError) as e:
        small.load_in_memory(DataSpec.from_config(_config(str(tmp_path / "tfds"))), "train")
    message = str(e.value)
    assert "unreachable" in message and small.CIFAR10_URL in message
    assert os.path.join(str(tmp_path / "tfds"), "downloads", "manual") in message  # tfds's default manual folder
