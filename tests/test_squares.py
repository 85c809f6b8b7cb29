"""ImageNet prepared once as the paper's 256x256 squares (`alexnet_jax.data.squares`, `--config.prepared=True`; a
folder's and a tfds dataset's: tests/test_photos.py): the tfds dataset round-trips, the crops, the stream's
determinism and resumption, exactly-once evaluation, resumed and failed preparations, and `main` on it. Shares the
tiny ILSVRC-format archive of conftest.py."""

from __future__ import annotations

import json
import os
import sys

import forkserver
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import FAST_COMPILE, REPO, examples, load_script

from alexnet_jax import data as datalib
from alexnet_jax import default_config
from alexnet_jax.data import DataSpec, augment, imagenet, sources, squares
from alexnet_jax.errors import UserError


def _config(data_dir: str, **kw) -> ml_collections.ConfigDict:
    c = default_config.get_config()
    c.data_dir = data_dir
    c.batch_size = 8
    c.eval_batch_size = 8
    c.prepared = True
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def squares_of(prepared) -> dict[str, squares.PhotoSquares]:
    """The tiny archive's squares, raw and JPEG (quality 95), prepared through the API."""
    return {fmt: squares.prepare(DataSpec.from_config(_config(prepared[0], prepared_format=fmt)))
            for fmt in squares.FORMATS}


def _by_name(builder, split: str) -> dict[str, dict]:
    """The examples by file name: the source's JPEG bytes; the squares' pixels (JPEG squares decoded by TensorFlow,
    the decoder training uses: PIL's, tfds's in `as_data_source`, rounds differently)."""
    source = builder.name == imagenet.NAME
    jpeg = not source and builder.builder_config.encoding == "jpeg"
    skip = {"image": tfds.decode.SkipDecoding()} if source or jpeg else None
    out = {ex["file_name"].decode(): ex for ex in examples(builder, split, skip)}
    if jpeg:
        out = {k: {**ex, "image": tf.io.decode_jpeg(ex["image"], channels=3).numpy()} for k, ex in out.items()}
    return out


@pytest.mark.parametrize("split", ["train", "validation"])
def test_squares_are_the_rescaled_centre_crops_of_their_sources(prepared, squares_of, split):
    """Every stored square equals the source JPEG's centre square resized to 256 and rounded, computed here
    from the whole decoded JPEG, a NumPy slice and TF's area resize (raw: exactly; JPEG 95: up to compression
    error); and the source pipeline's `augment.decode_square` (which decodes only the square) gives the same."""
    source = _by_name(imagenet.open_prepared(prepared[0]), split)
    raw, jpeg = (_by_name(squares_of[f], split) for f in ("raw", "jpeg"))
    assert set(raw) == set(jpeg) == set(source) and len(source) == (32 if split == "train" else 8)
    for name, ex in source.items():
        whole = tf.io.decode_jpeg(ex["image"], channels=3).numpy()
        h, w = whole.shape[:2]
        side = min(h, w)
        centre = whole[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        method = "area" if side >= 256 else "bilinear"  # (area shrinks; a smaller image is enlarged bilinearly)
        want = np.round(np.clip(tf.image.resize(centre, (256, 256), method=method).numpy(), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(
            np.round(augment.decode_square(tf.constant(ex["image"]), 256).numpy()).astype(np.uint8), want)
        assert raw[name]["image"].shape == (256, 256, 3) and raw[name]["image"].dtype == np.uint8
        np.testing.assert_array_equal(raw[name]["image"], want)
        err = np.abs(jpeg[name]["image"].astype(np.float32) - want)
        assert err.mean() < 3.0, name
        assert raw[name]["label"] == jpeg[name]["label"] == ex["label"]


@pytest.mark.parametrize("crop,positions", [(224, 33), (227, 30)])
def test_batch_draws_cover_every_offset_and_reflect_half(crop, positions):
    rows = tf.range(12000)
    yx, flips, alpha = (t.numpy() for t in augment.batch_draws(tf.constant([4, 2], tf.int64), rows, 12000, 256,
                                                               crop, 0.1))
    assert {tuple(p) for p in yx} == {(y, x) for y in range(positions) for x in range(positions)}
    assert abs(flips.mean() - 0.5) < 0.015  # 3.3 sigma
    np.testing.assert_allclose(alpha.std(0), 0.1, rtol=0.05)
    np.testing.assert_allclose(alpha.mean(0), 0.0, atol=0.005)


def test_batch_patches_are_the_drawn_slices_minus_their_mean_reflected():
    """Each row of `paper_batch` is its square's slice at the row's drawn offset, minus the same slice of the mean
    image, reflected when drawn, plus the drawn PCA colour; patches already cut (a JPEG square decodes only its
    patch) give the same; a row's draws depend on its global row index only."""
    rng = np.random.default_rng(0)
    squares_np = rng.integers(0, 256, (24, 256, 256, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, (256, 256, 3)).astype(np.float32)
    key, rows = tf.constant([4, 2], tf.int64), tf.range(100, 124)
    draws = augment.batch_draws(key, rows, 128, 256, 224, 0.1)
    args = dict(crop=224, flip=True, pca_std=0.1, normalization="pixel", mean=mean, std=np.ones(3, np.float32))
    out = augment.paper_batch(tf.constant(squares_np), *draws, **args).numpy()
    yx, flips, alpha = (t.numpy() for t in draws)
    assert 0 < flips.sum() < 24
    for r in range(24):
        (y, x), shift = yx[r], 255 * augment.PCA_EIGVEC @ (alpha[r] * augment.PCA_EIGVAL)
        want = squares_np[r, y : y + 224, x : x + 224].astype(np.float32) - mean[y : y + 224, x : x + 224] + shift
        np.testing.assert_allclose(out[r], want[:, ::-1] if flips[r] else want, atol=1e-3)
    cut = np.stack([squares_np[r, y : y + 224, x : x + 224] for r, (y, x) in enumerate(yx)])
    np.testing.assert_allclose(augment.paper_batch(tf.constant(cut), *draws, **args).numpy(), out, atol=1e-4)
    part = augment.batch_draws(key, rows[8:16], 128, 256, 224, 0.1)  # another process's share of the batch
    for a, b in zip(part, draws, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy()[8:16])


def test_prepared_stream_resumes_and_is_deterministic(prepared, squares_of):
    data = datalib.create_data(DataSpec.from_config(_config(prepared[0])))
    assert data.num_train == 32 and data.normalisation.kind == "pixel"
    stored = np.asarray([ex["image"] for ex in _by_name(squares_of["raw"], "train").values()], np.float64)
    np.testing.assert_allclose(data.normalisation.mean_image, stored.mean(0), atol=1e-3)  # the squares' mean
    full = list(data.train(0, 10, 0, 1))
    resumed = list(data.train(5, 10, 0, 1))
    assert len(full) == 10 and len(resumed) == 5 and full[0]["image"].shape == (8, 224, 224, 3)
    for a, b in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    again = list(datalib.create_data(DataSpec.from_config(_config(prepared[0]))).train(0, 2, 0, 1))
    np.testing.assert_array_equal(again[1]["image"], full[1]["image"])
    epoch0 = np.concatenate([b["label"] for b in full[:4]])
    epoch1 = np.concatenate([b["label"] for b in full[4:8]])
    assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)
    other_seed = next(iter(datalib.create_data(DataSpec.from_config(_config(prepared[0], seed=1))).train(0, 1, 0, 1)))
    assert not np.array_equal(other_seed["image"], full[0]["image"])
    # the JPEG squares give the same stream up to compression error (same records order, same keys)
    jpeg = next(iter(datalib.create_data(DataSpec.from_config(_config(prepared[0], prepared_format="jpeg"))).train(
        0, 1, 0, 1)))
    np.testing.assert_array_equal(jpeg["label"], full[0]["label"])
    assert np.abs(jpeg["image"] - full[0]["image"]).mean() < 3.0
    rows = [next(iter(data.train(0, 1, pid, 2))) for pid in (0, 1)]
    assert not np.array_equal(rows[0]["image"], rows[1]["image"])  # processes read different slices


def test_prepared_stream_rows_are_their_steps_drawn_patches(prepared, squares_of):
    """End to end, without mean or lighting: row r of step s is the patch, at the offset and reflection
    `batch_draws` gives for (seed, s) and row r, of the very record the stream's definition puts there (its index
    in the split, read through tfds's own reader), with that record's label."""
    from alexnet_jax.data import photos

    config = _config(prepared[0], normalization="channel", channel_mean=(0.0, 0.0, 0.0), channel_std=(1.0, 1.0, 1.0),
                     pca_lighting=0.0, seed=3)
    stored = examples(squares_of["raw"], "train")  # in record order
    spec = DataSpec.from_config(config)
    indices = photos.train_indices(sources.open_source(spec), spec, 0, 6)  # (6, 8)
    for step, batch in enumerate(datalib.create_data(spec).train(0, 6, 0, 1)):
        key = tf.constant([3 * 1_000_003 + step, -1], tf.int64)
        yx, flips, _ = (t.numpy() for t in augment.batch_draws(key, tf.range(8), 8, 256, 224, 0.0))
        for r in range(8):
            (y, x), record = yx[r], stored[int(indices[step, r])]
            patch = record["image"][y : y + 224, x : x + 224]
            patch = patch[:, ::-1] if flips[r] else patch
            assert batch["label"][r] == record["label"], (step, r)
            np.testing.assert_array_equal(batch["image"][r], patch.astype(np.float32), err_msg=f"{step}, {r}")
    assert len(set(indices.ravel().tolist())) > 8  # several records, not one repeated


@pytest.mark.parametrize("fmt,normalization", [("raw", "pixel"), ("jpeg", "pixel"), ("raw", "channel")])
def test_on_device_augmentation_gives_the_host_batches(prepared, squares_of, fmt, normalization):
    """`augment_on_device=True`: the stream yields the uint8 squares and their draws (row r's draws those of global
    row r, whatever the process count), and the jitted step's half, run sharded over 8 devices, makes of them
    exactly the batches the host path yields."""
    import jax

    from alexnet_jax import sharding

    kw = dict(prepared_format=fmt, normalization=normalization, seed=5)
    if normalization == "channel":
        kw.update(channel_mean=(120.0, 110.0, 100.0), channel_std=(60.0, 55.0, 50.0))
    host = datalib.create_data(DataSpec.from_config(_config(prepared[0], **kw)))
    device = datalib.create_data(DataSpec.from_config(_config(prepared[0], augment_on_device=True, **kw)))
    assert host.on_device is None and device.image_shape == host.image_shape == (224, 224, 3)
    batch_sharding = sharding.batch_sharding(sharding.make_mesh((8, 1)))
    step = jax.jit(device.on_device, in_shardings=(batch_sharding,))
    whole, flips = list(device.train(0, 3, 0, 1)), 0
    for a, b in zip(host.train(0, 3, 0, 1), whole, strict=True):
        assert b["image"].dtype == np.uint8 and b["image"].shape == (8, 256, 256, 3)
        out = jax.device_get(step(b))
        np.testing.assert_array_equal(out["label"], a["label"])
        np.testing.assert_allclose(out["image"], a["image"], atol=2e-3, rtol=0)
        flips += int(b["flip"].sum())
    assert 0 < flips < 24
    half = next(iter(device.train(0, 1, 1, 2)))  # process 1 of 2: rows 4..7 of the global batch's draws
    for k in ("offset", "flip", "lighting"):
        np.testing.assert_array_equal(half[k], whole[0][k][4:])


@pytest.mark.parametrize("fmt", squares.FORMATS)
@pytest.mark.parametrize("nproc,batch", [(1, 8), (1, 3), (3, 6)])
def test_prepared_eval_counts_every_image_once(prepared, squares_of, fmt, nproc, batch):
    data = datalib.create_data(DataSpec.from_config(_config(prepared[0], prepared_format=fmt, eval_crops=10,
                                                            eval_batch_size=batch)))
    labels, lengths = [], []
    for pid in range(nproc):
        batches = list(data.eval(pid, nproc))
        lengths.append(len(batches))
        for b in batches:
            assert b["image"].shape[1:] == (10, 224, 224, 3)
            labels += list(b["label"][b["mask"] > 0])
    assert len(set(lengths)) == 1
    reference = [ex["label"] for ex in _by_name(squares_of[fmt], "validation").values()]
    assert sorted(labels) == sorted(reference) and len(labels) == 8
    if nproc == 1 and batch == 8:  # the 10 crops are those of the stored square minus the mean image
        stored = {int(ex["label"]): ex["image"].astype(np.float32)
                  for ex in _by_name(squares_of[fmt], "validation").values()}
        b = batches[0]
        mean = data.normalisation.mean_image
        for image, label in zip(b["image"], b["label"], strict=True):
            want = augment.ten_crops(tf.constant(stored[int(label)] - mean), 224).numpy()
            np.testing.assert_allclose(image, want, atol=1e-4)


def test_interrupted_preparation_resumes(prepared, monkeypatch):
    """Stopped after the train shard: the rerun converts only the validation shard, then cleans up."""
    config = _config(prepared[0], prepared_format="jpeg", prepared_quality=80)
    convert, calls = squares.PhotoSquares._convert, []

    def interrupted(self, recs, split, *args):
        calls.append(split)
        if split == "validation" and len(calls) == 2:
            raise KeyboardInterrupt
        return convert(self, recs, split, *args)

    monkeypatch.setattr(squares.PhotoSquares, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        squares.prepare(DataSpec.from_config(config))
    builder = squares.builder_for(DataSpec.from_config(config), sources.open_source(DataSpec.from_config(config)))
    assert not builder.is_prepared() and os.listdir(os.path.join(builder.work_dir(), "train"))
    builder = squares.prepare(DataSpec.from_config(config))
    assert calls == ["train", "validation", "validation"]
    assert builder.info.splits["train"].num_examples == 32 and builder.info.splits["validation"].num_examples == 8
    assert not os.path.exists(builder.work_dir())


def test_truncated_source_jpeg_is_named(tmp_path):
    tiny = load_script("make_tiny_imagenet")
    manual, data = str(tmp_path / "manual"), str(tmp_path / "data")
    tiny.write_tiny_imagenet(manual, classes=2, train_per_class=3, truncate_train=1)
    imagenet.prepare(data, manual, verify=False)  # a copy prepared without the check
    synset = tiny.validation_labels(1)[0]
    with pytest.raises(UserError, match=rf"1 image\(s\) of imagenet2012's train split .* do not decode: "
                                        rf"{synset}_1.JPEG\. Run `python scripts/prepare_imagenet.py --verify_only"):
        squares.prepare(DataSpec.from_config(_config(data)))
    spec = DataSpec.from_config(_config(data))
    assert not squares.builder_for(spec, sources.open_source(spec)).is_prepared()


def test_unprepared_squares_and_bad_values_say_what_to_do(prepared, tmp_path):
    with pytest.raises(UserError, match=r"256px_area_jpeg42 .* is not in .*: run `python -m alexnet_jax.data.prepare "
                                        r"--config configs/imagenet.py --config.data_dir=.*prepared_format=jpeg`"):
        datalib.create_data(DataSpec.from_config(_config(prepared[0], prepared_format="jpeg", prepared_quality=42)))
    with pytest.raises(UserError, match="prepared_format"):
        DataSpec.from_config(_config(prepared[0], prepared_format="png"))
    with pytest.raises(UserError, match="train_crop"):
        DataSpec.from_config(_config(prepared[0], train_crop="random_resized"))
    with pytest.raises(UserError, match=r"--config.augment_on_device=True: needs the prepared .* "
                                        r"--config.prepared=True"):
        DataSpec.from_config(_config(prepared[0], prepared=False, augment_on_device=True))
    DataSpec.from_config(_config(prepared[0], augment_on_device=True))


def test_prepare_command_then_main_trains_and_evaluates(prepared, tmp_path):
    """The one command (progress with images/s), then `main --config configs/imagenet.py --config.prepared=True`
    trains and 10-crop-evaluates every validation image."""
    data_dir, _ = prepared
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    flags = [f"--config.data_dir={data_dir}", "--config.prepared_format=jpeg", "--config.prepared_quality=90"]
    proc = forkserver.run([sys.executable, "-m", "alexnet_jax.data.prepare", "--config",
                           os.path.join(REPO, "configs/imagenet.py"), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-256px_area_jpeg90: 100%" in proc.stderr and "images/s" in proc.stderr
    assert "train: 32 images" in proc.stdout and "validation: 8 images" in proc.stdout
    cmd = [sys.executable, "-m", "alexnet_jax.main", "--config", os.path.join(REPO, "configs/imagenet.py"),
           "--workdir", str(tmp_path / "run"), "--config.prepared=True", *flags, "--config.batch_size=4",
           "--config.eval_batch_size=4", "--config.num_train_steps=2", "--config.log_every_steps=1",
           "--config.widths=(8,16,16,16,8)", "--config.fc_width=32"]
    proc = forkserver.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["step"] == 2 and summary["num_eval_examples"] == 8  # configs/imagenet.py: 10 crops
    # main read the squares: their mean image was computed (and cached) beside them by this run
    jpeg90 = _config(data_dir, prepared_format="jpeg", prepared_quality=90)
    squares_dir = squares.builder_for(DataSpec.from_config(jpeg90), sources.open_source(DataSpec.from_config(jpeg90))
                                      ).data_dir
    assert [f for f in os.listdir(squares_dir) if f.startswith("alexnet_jax_stats_256px_area_32")]
    # resumed for a step with the augmentation in the jitted step, on 2 devices (the uint8 squares sharded): the
    # same batches, so the checkpoint's config allows the switch
    cmd = [*(c for c in cmd if "num_train_steps" not in c), "--config.num_train_steps=3",
           "--config.augment_on_device=True", "--config.eval_crops=1"]
    two_devices = f"{FAST_COMPILE} --xla_force_host_platform_device_count=2"
    proc = forkserver.run(cmd, cwd=REPO, env={**env, "XLA_FLAGS": two_devices}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["step"] == 3 and summary["num_eval_examples"] == 8 and summary["mesh"] == {"data": 2, "model": 1}
