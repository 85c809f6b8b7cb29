"""FashionMNIST through a tfds builder, a deterministic resumable stream, and exact-once evaluation."""

import dataclasses
import gzip
import json
import os
import struct

import numpy as np
import pytest
from conftest import needs_fmnist

from alexnet_jax import data as datalib
from alexnet_jax import default_config
from alexnet_jax.data import DataSpec, small
from alexnet_jax.errors import UserError


def write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_fmnist_images() -> dict[str, np.ndarray]:
    """The images `fake_fmnist` writes, by IDX split name: 96 train and 37 test images of random pixels."""
    rng = np.random.default_rng(0)
    return {split: rng.integers(0, 256, (n, 28, 28)) for split, n in (("train", 96), ("t10k", 37))}


@pytest.fixture
def fake_fmnist(tmp_path):
    """A FashionMNIST folder in the original IDX format: 96 train and 37 test images, labelled arange(n) % 10."""
    src = tmp_path / "fmnist"
    src.mkdir()
    for split, images in fake_fmnist_images().items():
        write_idx(src / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(src / f"{split}-labels-idx1-ubyte.gz", np.arange(len(images)) % 10)
    return src


def small_config(src, tmp_path, **kw):
    c = default_config.get_config()
    c.update(dict(dataset="fashion_mnist", fashion_mnist_dir=str(src), data_dir=str(tmp_path / "tfds"),
                  image_size=28, num_classes=10, batch_size=16, eval_batch_size=16, crop_padding=2,
                  random_flip=True, seed=3))
    c.update(kw)
    return c


def test_builder_prepares_idx_files_into_data_dir(fake_fmnist, tmp_path):
    c = small_config(fake_fmnist, tmp_path)
    train = small.load_in_memory(DataSpec.from_config(c), "train")
    test = small.load_in_memory(DataSpec.from_config(c), "test")
    assert train.images.shape == (96, 28, 28, 1) and test.images.shape == (37, 28, 28, 1)
    np.testing.assert_array_equal(test.labels, np.arange(37) % 10)
    source = fake_fmnist_images()  # the arrays written to the IDX files (not read back by the builder's reader)
    raw = source["train"]
    np.testing.assert_array_equal(train.images[..., 0], raw)
    np.testing.assert_array_equal(test.images[..., 0], source["t10k"])
    assert train.class_names[9] == "Ankle boot"
    assert os.path.isdir(tmp_path / "tfds" / "fashion_mnist_files" / "1.1.0")
    # the records as tfds itself decodes them (not the arrays kept beside them): the IDX files' pixels and labels,
    # in file order
    builder = small.FashionMnistFiles(source_dir=str(fake_fmnist), data_dir=str(tmp_path / "tfds"))
    for split, array in (("train", raw), ("test", source["t10k"])):
        records = small.tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        np.testing.assert_array_equal(records["image"][..., 0], array)
        np.testing.assert_array_equal(records["label"], np.arange(len(array)) % 10)


def test_train_and_eval_splits_take_tfds_syntax(fake_fmnist, tmp_path):
    """--config.train_split / eval_split select rows as tfds would (e.g. a quick evaluation on test[:10])."""
    c = small_config(fake_fmnist, tmp_path, train_split="train[:50%]+test[-7:]", eval_split="test[:10]",
                     eval_batch_size=4)
    raw = fake_fmnist_images()  # the arrays written to the IDX files
    train = small.load_in_memory(DataSpec.from_config(c), c.train_split)
    np.testing.assert_array_equal(train.images[..., 0], np.concatenate([raw["train"][:48], raw["t10k"][30:]]))
    np.testing.assert_array_equal(train.labels, np.concatenate([np.arange(48) % 10, np.arange(30, 37) % 10]))
    data = datalib.create_data(DataSpec.from_config(c))
    assert (data.num_train, data.num_eval) == (55, 10)
    seen = np.concatenate([b["image"][b["mask"] > 0] for b in data.eval(0, 1)])
    assert seen.shape[0] == 10
    for bad, message in (("test[:0]", "holds no images"), ("validation", "it has splits")):
        with pytest.raises(UserError, match=message):
            small.load_in_memory(DataSpec.from_config(c), bad)


def test_decoded_splits_are_kept_and_rebuilt_when_unreadable(fake_fmnist, tmp_path, monkeypatch):
    """The second load reads the arrays kept beside the records (no tfds decoding), equal to the first; a
    truncated array file is decoded again and rewritten."""
    c = small_config(fake_fmnist, tmp_path)
    first = small.load_in_memory(DataSpec.from_config(c), "train")
    folder = tmp_path / "tfds" / "fashion_mnist_files" / "1.1.0"
    assert sorted(p.name for p in folder.glob("*.npy")) == [  # kept when the IDX files were prepared
        "test.images.npy", "test.labels.npy", "train.images.npy", "train.labels.npy"]
    decoded = []
    original = small.tfds.as_numpy
    monkeypatch.setattr(small.tfds, "as_numpy", lambda *a, **k: decoded.append(1) or original(*a, **k))
    again = small.load_in_memory(DataSpec.from_config(c), "train")
    assert decoded == []
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.images.dtype == np.uint8 and again.labels.dtype == np.int32
    (folder / "train.images.npy").write_bytes((folder / "train.images.npy").read_bytes()[:1000])
    rebuilt = small.load_in_memory(DataSpec.from_config(c), "train")
    assert decoded == [1]
    np.testing.assert_array_equal(rebuilt.images, first.images)
    np.testing.assert_array_equal(np.load(folder / "train.images.npy"), first.images)


def test_channel_stats_equal_the_float64_formula():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (500, 9, 9, 3), dtype=np.uint8)
    mean, std = datalib.channel_stats(images)
    x = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_array_equal(mean, x.mean(0).astype(np.float32))
    np.testing.assert_allclose(std, x.std(0).astype(np.float32), rtol=1e-7)

def collect(it, n):
    return [next(it) for _ in range(n)]


def test_stream_is_a_function_of_seed_and_step(fake_fmnist, tmp_path):
    c = small_config(fake_fmnist, tmp_path)
    data = datalib.create_data(DataSpec.from_config(c))
    full = collect(data.train(0, 12, 0, 1), 12)  # 12 steps = 2 epochs of 6
    resumed = collect(data.train(7, 12, 0, 1), 5)
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # each epoch is a permutation: every example once, in a new order the next epoch
    epoch0 = np.concatenate([b["label"] for b in full[:6]])
    assert sorted(epoch0.tolist()) == sorted((np.arange(96) % 10).tolist())
    other_seed = datalib.create_data(DataSpec.from_config(small_config(fake_fmnist, tmp_path, seed=4)))
    assert not np.array_equal(next(other_seed.train(0, 1, 0, 1))["image"], full[0]["image"])


def test_processes_read_disjoint_rows_of_each_global_batch(fake_fmnist, tmp_path):
    c = small_config(fake_fmnist, tmp_path)
    data = datalib.create_data(DataSpec.from_config(c))
    whole = collect(data.train(0, 3, 0, 1), 3)
    parts = [collect(data.train(0, 3, p, 2), 3) for p in range(2)]
    for step in range(3):
        for key in ("image", "label"):
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])
        assert parts[0][step]["image"].shape == (8, 28, 28, 1)


def test_augmentation_crops_and_flips(fake_fmnist, tmp_path):
    c = small_config(fake_fmnist, tmp_path, crop_padding=0, random_flip=True)
    data = datalib.create_data(DataSpec.from_config(c))
    flipped = same = 0
    plain = datalib.create_data(DataSpec.from_config(small_config(fake_fmnist, tmp_path, crop_padding=0,
                                                                  random_flip=False)))
    for a, b in zip(collect(data.train(0, 6, 0, 1), 6), collect(plain.train(0, 6, 0, 1), 6), strict=True):
        for x, y in zip(a["image"], b["image"], strict=True):
            if np.array_equal(x, y):
                same += 1
            else:
                np.testing.assert_array_equal(x, y[:, ::-1])
                flipped += 1
    assert flipped + same == 96 and 30 <= flipped <= 66  # about half
    padded = datalib.create_data(DataSpec.from_config(small_config(fake_fmnist, tmp_path, crop_padding=2,
                                                                   random_flip=False)))
    shifted = sum(not np.array_equal(x, y) for a, b in zip(collect(padded.train(0, 6, 0, 1), 6),
                                                           collect(plain.train(0, 6, 0, 1), 6), strict=True)
                  for x, y in zip(a["image"], b["image"], strict=True))
    assert shifted > 96 * 0.6  # 24 of 25 offsets move the image


@pytest.mark.parametrize("batch,processes", [(16, 1), (10, 1), (37, 1), (64, 1), (8, 2), (12, 4)])
def test_eval_counts_every_example_exactly_once(fake_fmnist, tmp_path, batch, processes):
    """Every test image is evaluated exactly once, identified by its pixels: each evaluated row is matched to the
    source image (the array written to the IDX file) it correlates with perfectly; an affine normalisation keeps
    the correlation at 1 whatever its constants, random images correlate near 0. The multiset of matches must be
    the split, each with its own label (labels alone would pass with image 0 twice and image 10 skipped)."""
    c = small_config(fake_fmnist, tmp_path, eval_batch_size=batch)
    data = datalib.create_data(DataSpec.from_config(c))
    test_images = fake_fmnist_images()["t10k"].reshape(37, -1).astype(np.float64)
    centred = test_images - test_images.mean(1, keepdims=True)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    matched, batches = [], []
    for p in range(processes):
        bs = list(data.eval(p, processes))
        batches.append(len(bs))
        for b in bs:
            assert b["image"].shape[0] == batch // processes
            for row, label in zip(b["image"][b["mask"] == 1], b["label"][b["mask"] == 1], strict=True):
                x = row.reshape(-1).astype(np.float64)
                x = (x - x.mean()) / np.linalg.norm(x - x.mean())
                corr = centred @ x
                index = int(np.argmax(corr))
                assert corr[index] > 1 - 1e-6 and np.sort(corr)[-2] < 0.5, np.sort(corr)[-2:]
                assert label == index % 10  # the fixture's labels: arange(37) % 10
                matched.append(index)
    assert len(set(batches)) == 1
    assert sorted(matched) == list(range(37))


def test_eval_batches_have_one_shape(fake_fmnist, tmp_path):
    """One compiled evaluation step: every batch has the same rows (37 images in batches of 16: 3 x 16, the last
    padded); a set that fits in one batch is padded only to the row multiple (37 -> 40 for 8 devices, not 64)."""
    shapes = [b["image"].shape[0]
              for b in datalib.create_data(DataSpec.from_config(small_config(fake_fmnist, tmp_path))).eval(0, 1, 8)]
    assert shapes == [16, 16, 16]
    one = list(datalib.create_data(DataSpec.from_config(small_config(fake_fmnist, tmp_path, eval_batch_size=64))).eval(
        0, 1, 8))
    assert [b["image"].shape[0] for b in one] == [40] and one[0]["mask"].sum() == 37
    assert (datalib.padded_rows(37, 16, 8), datalib.padded_rows(37, 64, 8), datalib.padded_rows(37, 64)) == (48, 40, 64)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((4, 28, 28)))
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(UserError, match="truncated"):
        small.read_idx(str(path))


def test_data_dir_that_is_a_file_is_refused(fake_fmnist, tmp_path):
    bad = tmp_path / "file"
    bad.write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        small.load_in_memory(DataSpec.from_config(small_config(fake_fmnist, tmp_path, data_dir=str(bad))), "train")


@needs_fmnist
def test_real_fashion_mnist_files():
    images = small.read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    labels = small.read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10
    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz") as f:  # the format by hand: a
        np.testing.assert_array_equal(images, np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28))
    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") as f:  # 16 / 8-byte header
        np.testing.assert_array_equal(labels, np.frombuffer(f.read(), np.uint8, offset=8))


def test_eval_with_reflection_yields_image_and_mirror(fake_fmnist, tmp_path):
    c = small_config(fake_fmnist, tmp_path, eval_batch_size=16, eval_crops=2)
    batches = list(datalib.create_data(DataSpec.from_config(c)).eval(0, 1))
    assert batches[0]["image"].shape == (16, 2, 28, 28, 1)
    for b in batches:
        np.testing.assert_array_equal(b["image"][:, 1], b["image"][:, 0, :, ::-1])
    assert sum(int(b["mask"].sum()) for b in batches) == 37
    with pytest.raises(UserError, match="10-crop evaluation is for imagenet2012"):
        datalib.create_data(DataSpec.from_config(small_config(fake_fmnist, tmp_path, eval_crops=10)))


def test_normalisation_is_decided_once_and_survives_json(tmp_path):
    c = small_config(tmp_path, tmp_path)
    stats = {"mean": np.array([33.3, 1.0, 2.0], np.float32), "std": np.array([70.1, 2.0, 3.0], np.float32)}
    spec = DataSpec.from_config(c)
    norm = datalib.normalisation_for(spec, stats)
    assert (norm.kind, norm.resize_size, norm.mean_image) == ("channel", 28, None)
    spec = dataclasses.replace(spec, dataset="imagenet2012", normalization="pixel", resize_size=8)
    mean_image = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32) * 255
    pixel = datalib.normalisation_for(spec, {**stats, "mean_image": mean_image})
    assert pixel.arrays(per_pixel=True)[0] is mean_image and pixel.arrays(per_pixel=False)[0] is pixel.mean
    np.testing.assert_array_equal(pixel.std, np.ones(3, np.float32))
    for n in (norm, pixel):
        back = datalib.Normalisation.from_json(json.loads(json.dumps(n.to_json())))
        assert (back.kind, back.resize_size) == (n.kind, n.resize_size)
        for a, b in zip(back.arrays() + back.arrays(per_pixel=False), n.arrays() + n.arrays(per_pixel=False),
                        strict=True):
            assert a.dtype == np.float32 and a.tobytes() == b.tobytes()  # bit for bit
