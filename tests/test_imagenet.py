"""ImageNet through tfds's real imagenet2012 builder on a tiny archive of the exact ILSVRC-2012 format, the
paper's augmentations, 10-crop evaluation, stream resumption, and the messages for bad input."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys

import forkserver
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import FAST_COMPILE, examples
from PIL import Image

from alexnet_jax import data as datalib
from alexnet_jax import default_config
from alexnet_jax.data import DataSpec, augment, imagenet, photos, sources
from alexnet_jax.data import stats as statistics
from alexnet_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("make_tiny_imagenet", os.path.join(REPO, "scripts",
                                                                                 "make_tiny_imagenet.py"))
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)


def _config(data_dir: str, **kw) -> ml_collections.ConfigDict:
    c = default_config.get_config()
    c.data_dir = data_dir
    c.batch_size = 8
    c.eval_batch_size = 8
    for k, v in kw.items():
        c[k] = v
    return c


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _keys(n: int) -> tf.Tensor:
    return tf.stack([tf.fill([n], tf.constant(3, tf.int64)), tf.range(n, dtype=tf.int64)], axis=1)


# ---- the real builder and main ---------------------------------------------------------------------------


def test_real_builder_prepares_tiny_archive(prepared):
    data_dir, _ = prepared
    builder = imagenet.open_prepared(data_dir)
    assert builder.info.splits["train"].num_examples == 32
    assert builder.info.splits["validation"].num_examples == 8
    synsets = tiny.validation_labels(8)
    names = builder.info.features["label"].names
    val = examples(builder, "validation")
    by_file = {ex["file_name"].decode(): names[ex["label"]] for ex in val}
    # tfds labels the k-th sorted validation file with its bundled list's k-th synset
    assert [by_file[f"ILSVRC2012_val_{k + 1:08d}.JPEG"] for k in range(8)] == synsets
    train_labels = {names[ex["label"]] for ex in examples(builder, "train")}
    assert train_labels == set(synsets)


def test_main_trains_and_evaluates_on_tiny_imagenet(prepared, tmp_path):
    data_dir, _ = prepared
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "alexnet_jax.main", "--config", os.path.join(REPO, "configs/imagenet.py"),
           "--workdir", str(tmp_path), f"--config.data_dir={data_dir}", "--config.batch_size=4",
           "--config.eval_batch_size=4", "--config.num_train_steps=2", "--config.log_every_steps=1",
           "--config.widths=(8,16,16,16,8)", "--config.fc_width=32"]
    proc = forkserver.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["step"] == 2 and summary["dataset"] == "imagenet2012"
    assert summary["num_eval_examples"] == 8  # every validation image once, with the 10-crop eval of the config

    # The trained run as a user has it (configs/imagenet.py: the per-pixel mean image): `predict` on a JPEG of
    # ImageNet size and a small PNG, and `evaluate` with the same --config.key=value flags as main.
    jpeg, png = tmp_path / "photo.jpg", tmp_path / "small.png"
    jpeg.write_bytes(_jpeg(500, 375, seed=5))
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (131, 97, 3), dtype=np.uint8)).save(png)
    proc = forkserver.run([sys.executable, "-m", "alexnet_jax.predict", "--workdir", str(tmp_path), str(jpeg),
                           str(png)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == str(jpeg) and lines[6] == str(png) and len(lines) == 12  # top-5 for each
    assert all(line.strip().startswith(f"{k}. n") for k, line in zip([1, 2, 3, 4, 5] * 2, lines[1:6] + lines[7:],
                                                                      strict=True))
    proc = forkserver.run([sys.executable, "-m", "alexnet_jax.evaluate", "--workdir", str(tmp_path),
                           f"--config.data_dir={data_dir}", "--config.eval_crops=10", "--config.eval_batch_size=3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] == 8 and result["crops"] == 10 and result["step"] == 2
    assert result["top1"] == pytest.approx(summary["top1_accuracy"])
    assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-4)
    proc = forkserver.run([sys.executable, "-m", "alexnet_jax.evaluate", "--workdir", str(tmp_path),
                           "--config.fc_width=64"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]  # one readable message, not a trace
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last.startswith("alexnet_jax.evaluate: error: --config.fc_width cannot be changed for a trained")


def test_predict_preprocesses_like_the_eval_pipeline(prepared, tmp_path):
    """predict's input for an image file equals the evaluation pipeline's single view of the same JPEG, with the
    paper's per-pixel mean image from the normalisation record (any size: shorter side 300 and 180 here)."""
    from alexnet_jax import predict

    data = datalib.create_data(DataSpec.from_config(_config(prepared[0], normalization="pixel")))
    norm = data.normalisation
    assert norm.kind == "pixel" and norm.mean_image.shape == (256, 256, 3)
    for w, h in ((400, 300), (180, 260)):
        path = tmp_path / f"x{w}.jpg"
        path.write_bytes(_jpeg(w, h, seed=w))
        mean, std = norm.arrays()
        want = augment.eval_image(tf.constant(path.read_bytes()), resize=256, crop=224, crops=1,
                                  normalization="pixel", mean=mean, std=std, method="area").numpy()
        got = predict.preprocess(str(path), (224, 224, 3), norm, "imagenet2012", "area")
        assert got.shape == (224, 224, 3)
        np.testing.assert_allclose(got, want, atol=1e-3)
    # and against PIL/NumPy, sharing no code with either: PIL's decoder, the centre square, a box filter to 256
    # (smooth pictures: resamplers agree to ~1 level there), minus the mean image, the centre 224 crop
    for w, h in ((400, 300), (300, 420)):
        path = tmp_path / f"s{w}.jpg"
        path.write_bytes(_smooth_jpeg(w, h))
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        square = Image.open(path).convert("RGB").crop((left, top, left + side, top + side))
        ref = np.asarray(square.resize((256, 256), Image.Resampling.BOX), np.float64) - norm.mean_image
        ref = ref[16:240, 16:240]
        got = predict.preprocess(str(path), (224, 224, 3), norm, "imagenet2012", "area")
        assert np.abs(got - ref).mean() < 1.5, (w, h)
        assert np.abs(got[:, 4:] - ref[:, :-4]).mean() > 3.0  # (4 px off: far)


# ---- the stream -----------------------------------------------------------------------------------------


def test_resumed_stream_equals_uninterrupted(prepared):
    data = datalib.create_data(DataSpec.from_config(_config(prepared[0])))
    assert data.num_train == 32  # 4 steps per epoch at batch 8: the stream below crosses two epochs
    full = list(data.train(0, 10, 0, 1))
    resumed = list(data.train(5, 10, 0, 1))
    assert len(full) == 10 and len(resumed) == 5
    for a, b in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # each epoch visits every training image once; epochs differ in order
    epoch0 = np.concatenate([b["label"] for b in full[:4]])
    epoch1 = np.concatenate([b["label"] for b in full[4:8]])
    assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)
    other_seed = list(datalib.create_data(DataSpec.from_config(_config(prepared[0], seed=1))).train(0, 1, 0, 1))
    assert not np.array_equal(other_seed[0]["image"], full[0]["image"])


def test_processes_read_their_rows_of_the_same_global_batches(prepared):
    """Record identities (the archive's file names): global batch s is the same records whatever the process
    count, process p reading rows [pB/P, (p+1)B/P) of it; over an epoch every training image once; each process's
    batches are made of exactly its own records, row for row."""
    config = _config(prepared[0])
    src = sources.imagenet_source(imagenet.open_prepared(config.data_dir))
    spec = DataSpec.from_config(config)
    parse = sources.parser(src)
    recs = src.records("train")

    def names(indices):
        return [parse(r)["file_name"].numpy().decode() for r in recs.read(indices.reshape(-1))]

    steps = 4  # one epoch: 32 images at batch 8
    one = photos.train_indices(src, spec, 0, steps, 0, 1)
    for nproc in (2, 4):
        per_process = [photos.train_indices(src, spec, 0, steps, pid, nproc) for pid in range(nproc)]
        np.testing.assert_array_equal(np.concatenate(per_process, axis=1), one)
    epoch = names(one)
    split = {ex["file_name"].decode() for ex in examples(src.builder, "train")}
    assert len(epoch) == len(set(epoch)) == 32 and set(epoch) == split
    data = datalib.create_data(DataSpec.from_config(_config(prepared[0], pca_lighting=0.0)))
    labels = [int(parse(r)["label"]) for r in recs.read(one.reshape(-1))]
    for pid in (0, 1):
        batches = list(data.train(0, steps, pid, 2))
        assert all(b["image"].shape == (4, 224, 224, 3) for b in batches)
        mine = np.asarray(labels).reshape(steps, 8)[:, pid * 4 : (pid + 1) * 4]
        assert np.concatenate([b["label"] for b in batches]).tolist() == mine.reshape(-1).tolist()


@pytest.mark.parametrize("crops", [1, 10])
@pytest.mark.parametrize("nproc,batch", [(1, 8), (1, 3), (3, 6)])
def test_eval_counts_every_image_once(prepared, crops, nproc, batch):
    data = datalib.create_data(DataSpec.from_config(_config(prepared[0], eval_crops=crops, eval_batch_size=batch)))
    labels, lengths = [], []
    for pid in range(nproc):
        batches = list(data.eval(pid, nproc))
        lengths.append(len(batches))
        for b in batches:
            assert b["image"].shape[1:] == ((224, 224, 3) if crops == 1 else (10, 224, 224, 3))
            labels += list(b["label"][b["mask"] > 0])
    assert len(set(lengths)) == 1  # processes step together
    builder = imagenet.open_prepared(prepared[0])
    reference = [ex["label"] for ex in examples(builder, "validation")]
    assert sorted(labels) == sorted(reference) and len(labels) == 8


# ---- the augmentations ----------------------------------------------------------------------------------


def _draw(fn, n: int) -> np.ndarray:
    """fn(key) for n stateless keys, through tf.data (fast, and the same graph mode as the pipeline)."""
    return next(tf.data.Dataset.from_tensor_slices(_keys(n)).map(fn).batch(n).as_numpy_iterator())


def test_crop_offsets_cover_all_33x33_positions():
    pairs = {tuple(p) for p in _draw(lambda k: augment.crop_offsets(k, 256, 224), 12000)}
    assert pairs == {(y, x) for y in range(33) for x in range(33)}


def test_patch_is_the_square_slice_and_flips_half_the_time():
    jpeg = tf.constant(_jpeg(256, 256))  # a 256 square: the paper's stored image, no resampling
    square = augment.decode_square(jpeg, 256).numpy()
    np.testing.assert_array_equal(square, tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(np.float32))
    zero = np.zeros((256, 256, 3), np.float32)
    flips = 0
    for i in range(200):
        key = tf.constant([5, i], tf.int64)
        y, x = augment.crop_offsets(tf.unstack(tf.random.experimental.stateless_split(key, 3))[0], 256, 224).numpy()
        patch = augment.paper_train_image(jpeg, key, resize=256, crop=224, flip=True, pca_std=0.0,
                                          normalization="pixel", mean=zero, std=np.ones(3, np.float32)).numpy()
        want = square[y : y + 224, x : x + 224]
        if np.array_equal(patch, want[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(patch, want)
    assert 75 <= flips <= 125  # Binomial(200, 0.5): 5 sigma
    coins = _draw(augment.flip_coin, 4000)
    assert abs(coins.mean() - 0.5) < 0.03


def _smooth_jpeg(w: int, h: int) -> bytes:
    """A photo-like (smooth) picture whose content moves with any offset: resamplers agree on it to ~1 level."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0), 128 + 50 * np.sin((xx + yy) / 31.0),
                  yy * 200.0 / h + 20], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500)])
def test_square_and_patch_of_a_non_square_image_match_pil(w, h):
    """Against PIL (its own decoder; the centre square cropped, then box-filter (area) resized to 256): the square
    and a patch at a known offset within 1.5 levels on average; a patch 4 px off is far from it."""
    data = _smooth_jpeg(w, h)
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    pil = Image.open(io.BytesIO(data)).convert("RGB").crop((left, top, left + side, top + side))
    ref = np.asarray(pil.resize((256, 256), Image.Resampling.BOX), np.float64)
    square = augment.decode_square(tf.constant(data), 256).numpy()
    assert square.shape == (256, 256, 3) and np.abs(square - ref).mean() < 1.5
    patch = augment.decode_patch(tf.constant(data), tf.constant([32, 0]), 256, 224).numpy()
    assert np.abs(patch - ref[32:256, 0:224]).mean() < 1.5
    assert np.abs(patch[:220] - ref[36:256, 0:224]).mean() > 4.0


def test_patch_of_a_256_square_is_an_exact_slice():
    """With nothing to resize, a patch is the decoded pixels at its offset, bit for bit (TF's own decoder)."""
    data = _smooth_jpeg(256, 256)
    pixels = tf.io.decode_jpeg(data, channels=3).numpy().astype(np.float32)
    for y, x in ((32, 0), (0, 32), (17, 5)):
        patch = augment.decode_patch(tf.constant(data), tf.constant([y, x]), 256, 224).numpy()
        np.testing.assert_array_equal(patch, pixels[y : y + 224, x : x + 224])


def test_patch_of_a_large_image_matches_resize_then_crop():
    jpeg = tf.constant(_jpeg(500, 375, seed=1))
    square = augment.decode_square(jpeg, 256).numpy()
    patch = augment.decode_patch(jpeg, tf.constant([32, 0]), 256, 224).numpy()
    # the same view up to resampling: a smooth image would match closely; noise allows a loose bound
    assert patch.shape == (224, 224, 3)
    assert np.abs(patch - square[32:256, 0:224]).mean() < np.abs(patch - square[0:224, 32:256]).mean()


# fb.resnet.torch (facebookarchive/fb.resnet.torch, datasets/imagenet.lua, `pca`): ImageNet's RGB PCA on [0, 1]
# pixels, copied here from the source so that a change to augment.py's copy fails the tests below.
FB_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
FB_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def test_pca_lighting_has_the_paper_covariance():
    np.testing.assert_array_equal(augment.PCA_EIGVAL, FB_EIGVAL.astype(np.float32))  # 'published' is theirs
    np.testing.assert_array_equal(augment.PCA_EIGVEC, FB_EIGVEC.astype(np.float32))
    v, lam = np.diag([1.0, -1.0, 1.0]) @ FB_EIGVEC, FB_EIGVAL[::-1] * [3, 2, 1]  # any (eigval, eigvec) is used
    for pca, (vec, val) in ((augment.PUBLISHED, (FB_EIGVEC, FB_EIGVAL)), ((lam, v), (v, lam))):
        shifts = _draw(lambda k, pca=pca: augment.pca_shift(k, 0.1, pca), 20000)
        want = 255.0**2 * vec @ np.diag((0.1 * val) ** 2) @ vec.T
        np.testing.assert_allclose(np.cov(shifts.T), want, atol=0.05 * np.abs(want).max())
        np.testing.assert_allclose(shifts.mean(0), 0, atol=0.05 * np.sqrt(np.abs(want).max()))
        # per eigen-direction: the shift's projection on eigenvector i is 255 alpha_i lambda_i, variance
        # (255 * 0.1 * lambda_i)^2 each (the 2nd and 3rd carry 3% and 0.75% of the total: checked one by one)
        proj = shifts @ vec / 255.0
        np.testing.assert_allclose(proj.var(0), (0.1 * val) ** 2, rtol=0.05)
        corr = np.corrcoef(proj.T)
        assert np.abs(corr - np.eye(3)).max() < 0.03  # independent alphas
        # and exactly, from the same stateless keys: 255 V (alpha * lambda), alpha ~ N(0, 0.1) drawn here
        keys = _keys(64)
        got = _draw(lambda k, pca=pca: augment.pca_shift(k, 0.1, pca), 64)
        alpha = np.stack([tf.random.stateless_normal([3], seed=k, stddev=0.1).numpy() for k in keys])
        np.testing.assert_allclose(got, 255.0 * (alpha * val) @ vec.T, rtol=1e-4, atol=1e-3)
    # the shift is one colour per image, added to every pixel
    jpeg = tf.constant(_jpeg(300, 260))
    args = dict(resize=256, crop=224, flip=False, normalization="channel", mean=np.zeros(3, np.float32),
                std=np.ones(3, np.float32))
    key = tf.constant([9, 9], tf.int64)
    diff = (augment.paper_train_image(jpeg, key, pca_std=0.1, **args)
            - augment.paper_train_image(jpeg, key, pca_std=0.0, **args)).numpy()
    np.testing.assert_allclose(diff, np.broadcast_to(diff[0, 0], diff.shape), atol=1e-3)
    assert np.abs(diff[0, 0]).max() > 0


def _block_jpeg(colours: np.ndarray) -> bytes:
    """A 256 px square of 16x16 flat blocks (aligned with JPEG's 8x8 DCT blocks, no chroma subsampling, quality
    100), one colour per block: decoding gives back each block's colour to within a level."""
    image = np.repeat(np.repeat(colours.reshape(16, 16, 3), 16, 0), 16, 1)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=100, subsampling=0)
    return buf.getvalue()


def test_data_pca_recovers_a_known_colour_covariance(tmp_path):
    """`config.pca='data'`: the training pixels' RGB covariance, computed with the mean image in one pass, on a
    synthetic archive whose colours have a known covariance (eigenvalues 1:0.2:0.05, a rotated basis)."""
    rng = np.random.default_rng(5)
    basis = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    colour_cov = basis @ np.diag([45.0, 20.0, 10.0]) ** 2 @ basis.T  # 0-255 scale
    written = []

    def image(c: int, k: int, _: np.random.Generator) -> bytes:
        colours = rng.multivariate_normal([128, 120, 110], colour_cov, 256).round().clip(0, 255).astype(np.uint8)
        written.append(colours)
        return _block_jpeg(colours)

    manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
    tiny.write_tiny_imagenet(manual, classes=2, train_per_class=4, train_image=image)
    builder = imagenet.prepare(data_dir, manual, verify=False)
    stats = statistics.dataset_stats(sources.imagenet_source(builder), 256, 0)
    pixels = np.concatenate(written).astype(np.float64) / 255.0  # every block is the same number of pixels
    known = np.cov(pixels.T, bias=True)
    val, vec = np.linalg.eigh(known)
    val, vec = val[::-1], vec[:, ::-1]
    got_val, got_vec = stats["pca_eigval"], stats["pca_eigvec"]
    np.testing.assert_allclose(got_val, val, rtol=0.01)
    np.testing.assert_allclose(np.abs(np.sum(got_vec * vec, 0)), 1.0, atol=1e-3)  # same axes, up to sign
    np.testing.assert_allclose(got_vec @ np.diag(got_val) @ got_vec.T, known, atol=0.01 * val[0])
    np.testing.assert_allclose(stats["mean"], pixels.mean(0) * 255, atol=0.5)
    # the pipeline lights images with the PCA its config names: the same key draws the same alpha, so
    # the 'data' shift is V_data (alpha * l_data) where the 'published' one is V_pub (alpha * l_pub)
    shifts = {}
    for pca in ("data", "published"):
        lit, dark = (next(iter(datalib.create_data(DataSpec.from_config(_config(
            data_dir, pca=pca, pca_lighting=std, image_size=32, random_flip=False, normalization="channel")
        )).train(0, 1, 0, 1))) for std in (0.1, 0.0))
        shifts[pca] = (lit["image"] - dark["image"])[:, 0, 0] * stats["std"]  # undo the channel std
    # alpha of row r of step 0, drawn here from the stream's key (seed * 1_000_003 + step, row), split as
    # (crop, flip, lighting): not solved from the shifts, so a lighting that drops a component fails
    seed = int(_config(data_dir).seed)
    alpha = np.stack([tf.random.stateless_normal([3], seed=tf.random.experimental.stateless_split(
        tf.constant([seed * 1_000_003, r], tf.int64), 3)[2], stddev=0.1).numpy() for r in range(8)])
    assert np.abs(alpha).max() > 0.02  # alpha ~ N(0, 0.1): the lighting is on
    np.testing.assert_allclose(shifts["published"], 255.0 * (alpha * FB_EIGVAL) @ FB_EIGVEC.T, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(shifts["data"], 255.0 * (alpha * got_val) @ got_vec.T, rtol=1e-3, atol=2e-3)


def test_ten_crops_are_corners_centre_and_reflections():
    jpeg = tf.constant(_jpeg(256, 256, seed=2))
    square = augment.decode_square(jpeg, 256).numpy()
    crops = augment.eval_image(jpeg, resize=256, crop=224, crops=10, normalization="channel",
                               mean=np.zeros(3, np.float32), std=np.ones(3, np.float32)).numpy()
    assert crops.shape == (10, 224, 224, 3)
    for i, (y, x) in enumerate([(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]):
        np.testing.assert_array_equal(crops[i], square[y : y + 224, x : x + 224])
        np.testing.assert_array_equal(crops[i + 5], square[y : y + 224, x : x + 224][:, ::-1])
    assert len({c.tobytes() for c in crops}) == 10
    centre = augment.eval_image(jpeg, resize=256, crop=224, crops=1, normalization="channel",
                                mean=np.zeros(3, np.float32), std=np.ones(3, np.float32)).numpy()
    np.testing.assert_array_equal(centre, crops[4])


def test_crop_averaged_logits_average_softmax():
    import jax
    import jax.numpy as jnp

    from alexnet_jax.train import crop_averaged_logits

    logits = np.random.default_rng(0).normal(0, 3, (2, 10, 5)).astype(np.float32)
    images = jnp.asarray(logits).reshape(2, 10, 5, 1, 1)  # "images" whose model output is their own values
    out = crop_averaged_logits(lambda x: x.reshape(x.shape[0], 5), images)
    want = np.log(np.asarray(jax.nn.softmax(logits, -1)).mean(1))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5)


def test_random_resized_crop_is_deterministic_and_sized():
    jpeg = tf.constant(_jpeg(500, 375, seed=3))
    args = dict(crop=224, area_range=(0.08, 1.0), aspect_range=(0.75, 4 / 3), flip=True, pca_std=0.1,
                normalization="channel", mean=np.zeros(3, np.float32), std=np.ones(3, np.float32))
    a = augment.random_resized_crop(jpeg, tf.constant([1, 2], tf.int64), **args).numpy()
    b = augment.random_resized_crop(jpeg, tf.constant([1, 2], tf.int64), **args).numpy()
    c = augment.random_resized_crop(jpeg, tf.constant([1, 3], tf.int64), **args).numpy()
    assert a.shape == (224, 224, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _drawn_boxes(area_range, aspect_range, draws: int, size=(240, 320), crop=32) -> np.ndarray:
    """(area fraction, aspect w/h) of `draws` random-resized crops of an image whose pixels are their own
    coordinates (R = column, G = row, lossless PNG), read back from each patch: its first and last columns and rows
    hold the box's edges (as area-averaged by the resize, half a patch pixel inside each edge)."""
    h, w = size
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([cols * 255.0 / (w - 1), rows * 255.0 / (h - 1), np.zeros((h, w))], -1)
    png = tf.io.encode_png(np.round(image).astype(np.uint8))
    args = dict(crop=crop, area_range=area_range, aspect_range=aspect_range, flip=False, pca_std=0.0,
                normalization="channel", mean=np.zeros(3, np.float32), std=np.ones(3, np.float32), is_jpeg=False)
    fn = tf.function(lambda key: augment.random_resized_crop(png, key, **args))
    out = []
    for i in range(draws):
        patch = fn(tf.constant([7, i], tf.int64)).numpy()
        x0, x1 = patch[:, 0, 0].mean() * (w - 1) / 255, patch[:, -1, 0].mean() * (w - 1) / 255
        y0, y1 = patch[0, :, 1].mean() * (h - 1) / 255, patch[-1, :, 1].mean() * (h - 1) / 255
        bw, bh = (x1 - x0) * crop / (crop - 1) + 1, (y1 - y0) * crop / (crop - 1) + 1  # centres -> edges
        out.append((bw * bh / (h * w), bw / bh))
    return np.asarray(out)


def test_random_resized_crop_draws_boxes_as_its_ranges_say():
    """The random-resized crop against its definition: over 1500 draws with a non-default area range 25-50% and
    aspect 1/2-2, every box read back from its patch lies in the ranges (give or take the pixel rounding of the
    box and of the patch), and they spread over them: a quarter below 31% area, a quarter above 44% (uniform:
    31.25% and 43.75%), a third with aspect below 1 (TF draws the aspect uniformly; torchvision log-uniformly).
    A crop that ignored `area_range` (the default
    8-100%) or `aspect_range` fails here."""
    boxes = _drawn_boxes((0.25, 0.5), (0.5, 2.0), 1500)
    area, aspect = boxes[:, 0], boxes[:, 1]
    assert area.min() > 0.25 - 0.02 and area.max() < 0.5 + 0.02, (area.min(), area.max())
    assert aspect.min() > 0.5 * 0.93 and aspect.max() < 2.0 / 0.93, (aspect.min(), aspect.max())
    q1, q3 = np.quantile(area, [0.25, 0.75])
    assert abs(q1 - 0.3125) < 0.03 and abs(q3 - 0.4375) < 0.03, (q1, q3)
    assert abs(np.mean(aspect < 1) - 1 / 3) < 0.05  # TF's sampler: aspect uniform on [1/2, 2], so 1/3 below 1
    wide = _drawn_boxes((0.08, 1.0), (0.75, 4 / 3), 400)  # the defaults reach well below 25% and above 50%
    assert wide[:, 0].min() < 0.15 and wide[:, 0].max() > 0.8


def test_a_random_resized_patch_is_the_crop_and_resize_of_its_box():
    """One patch equals PIL's crop of the drawn box resized to the patch (box filter, as TF's 'area'), within the
    resize's rounding: the box comes from TF's sampler with the same key, the pixels from PIL."""
    from PIL import Image

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)  # smooth at the patch's scale: 8 px per noise pixel
    image = np.asarray(Image.fromarray(image).resize((160, 120), Image.Resampling.BILINEAR))
    png = tf.io.encode_png(image)
    key = tf.constant([3, 4], tf.int64)
    patch = augment.random_resized_crop(png, key, crop=24, area_range=(0.3, 0.6), aspect_range=(0.75, 4 / 3),
                                        flip=False, pca_std=0.0, normalization="channel",
                                        mean=np.zeros(3, np.float32), std=np.ones(3, np.float32),
                                        is_jpeg=False).numpy()
    k_box = tf.unstack(tf.random.experimental.stateless_split(key, 3))[0]
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.constant([120, 160, 3]), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=k_box,
        min_object_covered=0.0, aspect_ratio_range=(0.75, 4 / 3), area_range=(0.3, 0.6), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    (top, left), (bh, bw) = begin.numpy()[:2], size.numpy()[:2]
    assert 0.3 <= bh * bw / (120 * 160) <= 0.6 + 0.01
    box = Image.fromarray(image[top: top + bh, left: left + bw])
    want = np.asarray(box.resize((24, 24), Image.Resampling.BOX), np.float64)
    # TF's 'area' and PIL's box filter weigh the box's fractional edge pixels differently: mean 1.6, max 8.5 here;
    # the box moved down by one patch pixel (5 px) differs by more than twice that bound
    assert np.abs(patch - want).mean() < 2.5 and np.abs(patch - want).max() < 12, np.abs(patch - want).max()
    shifted = np.asarray(Image.fromarray(image[top + 5: top + 5 + bh, left: left + bw]).resize(
        (24, 24), Image.Resampling.BOX), np.float64)
    assert np.abs(patch - shifted).mean() > 2.5 * 2


def test_mean_image_is_the_training_mean(prepared):
    builder = imagenet.open_prepared(prepared[0])
    stats = statistics.dataset_stats(sources.imagenet_source(builder), 256, 0)
    squares = [augment.decode_square(tf.constant(ex["image"]), 256).numpy() for ex in
               examples(builder, "train", {"image": tfds.decode.SkipDecoding()})]
    squares = np.asarray(squares, np.float64)
    np.testing.assert_allclose(stats["mean_image"], squares.mean(0), atol=1e-3)
    np.testing.assert_allclose(stats["std"], squares.std(axis=(0, 1, 2)), rtol=1e-4)
    batch = next(iter(datalib.create_data(DataSpec.from_config(_config(prepared[0], pca_lighting=0.0))).train(
        0, 1, 0, 1)))
    assert abs(batch["image"].mean()) < 20  # mean-subtracted pixels centre on zero


# ---- bad input ------------------------------------------------------------------------------------------


def test_corrupt_jpeg_in_archive_is_named_and_never_trained_on(tmp_path):
    manual, data = str(tmp_path / "manual"), str(tmp_path / "data")
    tiny.write_tiny_imagenet(manual, classes=2, train_per_class=3, corrupt_train=1)
    synset = tiny.validation_labels(1)[0]
    with pytest.raises(UserError, match=rf"1 JPEG\(s\) in .*ILSVRC2012_img_train.tar do not decode: {synset}_1"):
        imagenet.prepare(data, manual)
    assert not imagenet.open_builder(data).is_prepared()  # the prepared copy was removed
    # prepared without the check (e.g. by tfds directly): training stops with a message, no black example
    imagenet.prepare(data, manual, verify=False)
    c = _config(data, batch_size=2)
    with pytest.raises(UserError, match="does not decode"):  # computing the mean image meets it first
        datalib.create_data(DataSpec.from_config(c))
    src = sources.imagenet_source(imagenet.open_prepared(c.data_dir))
    norm = datalib.normalisation_for(DataSpec.from_config(c), {"mean_image": np.zeros((256, 256, 3), np.float32),
                                         "mean": np.zeros(3, np.float32), "std": np.ones(3, np.float32)})
    batches = sources.guard(tfds.as_numpy(photos.train_dataset(src, DataSpec.from_config(c), norm, 0, 3)), src,
                            "train")
    with pytest.raises(UserError, match="does not decode.*prepare_imagenet.py --verify_only"):
        list(batches)


def test_only_validation_tar_names_the_missing_file(tmp_path):
    manual = str(tmp_path / "manual")
    tiny.write_tiny_imagenet(manual, classes=2, train=False)
    with pytest.raises(UserError, match=r"ILSVRC2012_img_train.tar not found in .*manual.*image-net.org.*"
                                        r"prepare_imagenet.py"):
        imagenet.prepare(str(tmp_path / "data"), manual)


def test_unprepared_dataset_says_what_to_do(tmp_path):
    c = _config(str(tmp_path / "data"), manual_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"not prepared.*ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar not "
                                        r"found in .*nowhere.*scripts/prepare_imagenet.py"):
        datalib.create_data(DataSpec.from_config(c))


def test_unknown_dataset_and_bad_values_are_rejected(tmp_path):
    with pytest.raises(UserError, match=r"dataset='imagenet' is unknown; choose one of"):
        datalib.create_data(DataSpec.from_config(_config(str(tmp_path), dataset="imagenet")))
    with pytest.raises(UserError, match="eval_crops"):
        DataSpec.from_config(_config(str(tmp_path), eval_crops=5))
    with pytest.raises(UserError, match="train_crop"):
        DataSpec.from_config(_config(str(tmp_path), train_crop="inception"))


def test_a_tfrecord_copy_is_refused_in_one_line_then_converted_by_the_script(tmp_path):
    """ImageNet prepared by tfds in TFRecord (its default: a copy made before records were read by index): training
    says to run scripts/prepare_imagenet.py, which converts it beside its files without the archives; then the
    records read by index are the TFRecord's, in order."""
    manual, data = str(tmp_path / "manual"), str(tmp_path / "data")
    tiny.write_tiny_imagenet(manual, classes=2, train_per_class=3)
    builder = imagenet.open_builder(data)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    before = [r for fi in builder.info.splits["train"].file_instructions
              for r in tf.data.TFRecordDataset(fi.filename).as_numpy_iterator()]
    with pytest.raises(UserError, match=r"stored as TFRecord only.*run `python scripts/prepare_imagenet.py"):
        datalib.create_data(DataSpec.from_config(_config(data, manual_dir=manual)))
    os.rename(manual, manual + "_gone")  # the conversion needs no archive
    proc = forkserver.run([sys.executable, os.path.join(REPO, "scripts", "prepare_imagenet.py"), "--data_dir", data,
                           "--manual_dir", manual, "--skip_verify"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    src = sources.imagenet_source(imagenet.open_prepared(data, manual))
    assert list(src.records("train").read(np.arange(len(before)))) == before
