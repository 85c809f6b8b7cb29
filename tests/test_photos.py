"""Photos from any source (issue #20): a folder of the user's images, a tfds dataset by name, ImageNet, through one
pipeline; photos as people have them; unreadable files named before training; ImageNet's stream unchanged."""

from __future__ import annotations

import json
import os

import forkserver
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import FAST_COMPILE, REPO, examples, load_script
from PIL import Image

from alexnet_jax import checkpoint_files, default_config
from alexnet_jax import data as datalib
from alexnet_jax.data import DataSpec, images, records, sources
from alexnet_jax.data import photos as photos_lib
from alexnet_jax.errors import UserError

photo_folder = load_script("make_photo_folder")


def _folder_config(root: str, data_dir: str, **kw):
    """configs/folder.py at a size that trains in seconds on 2 cores (what a user sets for a tiny set)."""
    spec = __import__("importlib.util").util.spec_from_file_location("folder_cfg", os.path.join(REPO, "configs",
                                                                                                "folder.py"))
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.folder, c.data_dir = root, data_dir
    small = dict(variant="small", resize_size=36, image_size=32, widths=(8, 16, 16, 16, 8), fc_width=32,
                 batch_size=16, eval_batch_size=24, num_epochs=8.0, warmup_epochs=1.0, learning_rate=0.02,
                 lr_reference_batch=0, dropout_rate=0.0, log_every_steps=8, eval_every_steps=10_000,
                 holdout_fraction=0.2)
    for k, v in {**small, **kw}.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[str, str]:
    """(root, data_dir): 3 classes x 30 generated photos of every format and mode, in ROOT/<class>/."""
    root = str(tmp_path_factory.mktemp("photos") / "my_photos")
    photo_folder.write_photo_folder(root, classes=3, per_class=30)
    return root, str(tmp_path_factory.mktemp("tfds"))


def test_every_format_and_mode_becomes_rgb(tmp_path):
    """Each kind of file is stored as an RGB JPEG of the same picture: pixel for pixel the array it was written
    from (the gray kinds: PIL's luminance of it), within what the file's own compression and the stored JPEG-95
    lose (mean 2.4-8.6 here; another picture of the class: 20-77), with the source's colours (a CMYK JPEG's are not
    inverted, a 16-bit PNG is scaled to 8 bits, a palette's colours are looked up); and as PIL reads the file."""
    rng = np.random.default_rng(1)
    for kind in photo_folder.KINDS:
        array = photo_folder.pixels(1, 3, (90, 60), rng)
        path = photo_folder.save(array, str(tmp_path / kind), kind)
        stored = tf.io.decode_jpeg(images.stored_bytes(path), channels=3).numpy().astype(np.float64)
        assert stored.shape == (60, 90, 3), kind
        with Image.open(path) as image:
            as_read = np.asarray(images.to_rgb(image), np.float64)
        assert np.abs(stored - as_read).mean() < 5.0, kind  # JPEG-95 of noisy pixels; a wrong picture: ~50
        want = array.astype(np.float64)
        if "gray" in kind:
            want = np.repeat(np.asarray(Image.fromarray(array).convert("L"), np.float64)[..., None], 3, -1)
        assert np.abs(stored - want).mean() < 10.0, kind  # per pixel, against the source array
        np.testing.assert_allclose(stored.mean((0, 1)), want.mean((0, 1)), atol=3.0, err_msg=kind)


def test_folder_trains_to_90_percent_and_counts_held_out_once(photos, tmp_path):
    from alexnet_jax import train

    root, data_dir = photos
    config = _folder_config(root, data_dir)
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    # fc8 has one class per class folder: recorded with the checkpoint, never written back into the config
    assert checkpoint_files.read_saved(str(tmp_path / "run"))[1]["num_classes"] == 3 and config.num_classes == 0
    assert summary["num_eval_examples"] == 18  # 20% of 90 held out, each counted once (10 crops each)
    assert summary["top1_accuracy"] >= 0.9, summary
    meta = json.load(open(tmp_path / "run" / "summary.json"))
    assert meta["dataset"] == "folder"


@pytest.mark.parametrize("nproc,batch", [(1, 4), (3, 6)])
def test_folder_evaluation_counts_each_held_out_photo_once_by_identity(tmp_path, nproc, batch):
    """Each held-out photo is evaluated exactly once, identified by its content: every photo is one flat colour
    whose red value is its own (10 + 9 i), so an evaluated row's mean red over its 10 crops is an affine function
    of that value, the same for all rows (the normalisation). The rows' values must be distinct, as many as the
    held-out photos, and lie on one line against the held-out photos' red values in order: evaluating one photo
    twice and skipping another of its class fails here (labels alone would not see it)."""
    root = tmp_path / "flat"
    red = {}
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for k in range(8):
            i = 8 * c + k
            red[f"class_{c}/img_{k}.png"] = 10 + 9 * i
            pixels = np.empty((40, 50, 3), np.uint8)
            pixels[...] = (10 + 9 * i, 40 + 60 * c, 128)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"img_{k}.png")
    config = _folder_config(str(root), str(tmp_path / "tfds"), eval_crops=10, eval_batch_size=batch,
                            holdout_fraction=0.25)
    data = datalib.create_data(DataSpec.from_config(config))
    src = sources.open_source(DataSpec.from_config(config))
    held = [red[ex["file_name"].decode()] for ex in examples(src.builder, src.eval_split)]
    assert len(held) == data.num_eval == 6
    values, lengths = [], []
    for pid in range(nproc):
        batches = list(data.eval(pid, nproc))
        lengths.append(len(batches))
        for b in batches:
            values += [float(v) for v in b["image"][b["mask"] > 0][..., 0].mean(axis=(1, 2, 3))]
    assert len(set(lengths)) == 1 and len(values) == 6
    assert len(set(np.round(values, 3))) == 6, values  # no photo twice
    slope, offset = np.polyfit(sorted(held), sorted(values), 1)
    # within 3 red levels of the line (the stored JPEG's colour rounding: up to 1.2 here), a third of the spacing
    assert slope > 0 and np.abs(np.polyval([slope, offset], sorted(held)) - sorted(values)).max() < 3 * slope


def test_a_file_gets_its_folders_label_in_sorted_order(tmp_path):
    """Class indices follow the sorted folder names, as torchvision's ImageFolder numbers them
    (`sorted(entry.name for entry in os.scandir(root) if entry.is_dir())`), whatever order the folders were made
    in and whatever their names hold (spaces, non-ASCII): every stored record's label is its folder's index; the
    checkpoint's class names are in that order; and a net trained on the folder ranks each file as its own
    folder's class, by name."""
    from alexnet_jax import checkpointing, predict, train

    root = tmp_path / "labelled"
    made = ["zebra", "Äpfel grün", "apple pie"]  # made in this order; sorted: apple pie, zebra, Äpfel grün
    rng, paths = np.random.default_rng(4), {}
    for i, name in enumerate(made):  # each class its own stripe angle and colour: learnable in a few epochs
        (root / name).mkdir(parents=True)
        paths[name] = [photo_folder.save(photo_folder.pixels(i, 3, (64, 48), rng), str(root / name / f"p{k}"),
                                         "rgb_jpeg") for k in range(16)]
    order = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    assert order == ["apple pie", "zebra", "Äpfel grün"] and order != made
    config = _folder_config(str(root), str(tmp_path / "tfds"), holdout_fraction=0.25, num_epochs=12.0)
    src = sources.open_source(DataSpec.from_config(config))
    labelled = 0
    for split in (src.train_split, src.eval_split):
        for ex in examples(src.builder, split):
            folder = ex["file_name"].decode().split("/")[0]
            assert ex["label"] == order.index(folder), (ex["file_name"], ex["label"])
            labelled += 1
    assert labelled == 48
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(config, workdir)
    _, saved, meta = checkpointing.read_saved(workdir)
    assert list(meta["class_names"]) == order and saved["num_classes"] == 3
    assert summary["top1_accuracy"] == 1.0, summary
    files = [(name, path) for name in made for path in paths[name][::4]]
    for (name, _), (_, top) in zip(files, predict.predict(workdir, [p for _, p in files], top_k=1), strict=True):
        assert top[0][0] == name, (name, top)


@pytest.mark.parametrize("nproc,batch", [(1, 8), (3, 6)])
def test_folder_ten_crop_eval_counts_every_held_out_image_once(photos, nproc, batch):
    root, data_dir = photos
    config = _folder_config(root, data_dir, eval_crops=10, eval_batch_size=batch)
    data = datalib.create_data(DataSpec.from_config(config))
    src = sources.open_source(DataSpec.from_config(config))
    assert (src.train_split, src.eval_split) == ("train[:72]", "train[72:]")
    assert data.class_names == ("class_a", "class_b", "class_c") and data.num_eval == 18
    labels, lengths = [], []
    for pid in range(nproc):
        batches = list(data.eval(pid, nproc))
        lengths.append(len(batches))
        for b in batches:
            assert b["image"].shape[1:] == (10, 32, 32, 3)
            labels += list(b["label"][b["mask"] > 0])
    assert len(set(lengths)) == 1
    held = [int(ex["label"]) for ex in examples(src.builder, "train[72:]")]
    train = {ex["file_name"] for ex in examples(src.builder, "train[:72]")}
    held_names = {ex["file_name"] for ex in examples(src.builder, "train[72:]")}
    assert sorted(labels) == sorted(held) and len(labels) == 18
    assert not train & held_names and len(train | held_names) == 90  # disjoint, and every photo in one of them


def test_split_folders_and_a_changed_folder(tmp_path):
    """ROOT/train + ROOT/val: the val folder is the evaluation split; adding a photo prepares a new copy."""
    root = str(tmp_path / "split")
    photo_folder.write_photo_folder(root, classes=2, per_class=8, split_dirs=True, val_per_class=3)
    config = _folder_config(root, str(tmp_path / "tfds"), batch_size=8)
    data = datalib.create_data(DataSpec.from_config(config))
    assert (data.num_train, data.num_eval) == (16, 6)
    photo_folder.save(photo_folder.pixels(0, 2, (50, 40), np.random.default_rng(0)),
                      os.path.join(root, "train", "class_a", "extra"), "rgb_jpeg")
    assert datalib.create_data(DataSpec.from_config(config)).num_train == 17


def test_unreadable_files_stop_before_training_in_one_line(tmp_path, python):
    root = str(tmp_path / "bad_photos")
    written = photo_folder.write_photo_folder(root, classes=3, per_class=4, bad=True)
    truncated, text = written["bad"]
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = forkserver.run([python, "-m", "alexnet_jax.main", "--config", os.path.join(REPO, "configs/folder.py"),
                           f"--config.folder={root}", f"--config.data_dir={tmp_path / 'tfds'}", "--workdir",
                           str(workdir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert truncated in last and text in last and "(truncated)" in last and "(not an image)" in last, last
    assert not (workdir / "checkpoints").exists()  # nothing trained
    assert not os.path.exists(tmp_path / "tfds" / "image_folder_photos")  # nothing prepared


def test_folder_errors_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="needs --config.folder"):
        sources.open_source(DataSpec.from_config(_folder_config("", str(tmp_path))))
    with pytest.raises(UserError, match="is not a directory"):
        sources.open_source(DataSpec.from_config(_folder_config(str(tmp_path / "nowhere"), str(tmp_path))))
    one = tmp_path / "one_class" / "cats"
    one.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one / "a.png")
    with pytest.raises(UserError, match="at least 2"):
        sources.open_source(DataSpec.from_config(_folder_config(str(tmp_path / "one_class"), str(tmp_path))))


class LocalTestPhotos(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset prepared from a local source (no download): PNG images (not JPEG), only a train split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(None, None, 3)),  # PNG: the non-JPEG decoding path
            "kind": tfds.features.ClassLabel(names=["stripes_a", "stripes_b"]),
        }), supervised_keys=("picture", "kind"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(24):
            size = photo_folder.SIZES[i % len(photo_folder.SIZES)]
            yield i, {"picture": photo_folder.pixels(i % 2, 2, size, rng), "kind": i % 2}


def test_a_tfds_dataset_by_name_with_split_keys(tmp_path, python):
    data_dir = str(tmp_path / "tfds")
    LocalTestPhotos(data_dir=data_dir).download_and_prepare()
    config = default_config.get_config()
    for k, v in dict(dataset="local_test_photos", data_dir=data_dir, train_split="train[:16]",
                     eval_split="train[16:]", num_classes=0, image_size=32, resize_size=36, batch_size=8,
                     eval_batch_size=8, eval_crops=10).items():
        config[k] = v
    src = sources.open_source(DataSpec.from_config(config))
    assert (src.image_key, src.label_key, src.is_jpeg) == ("picture", "kind", False)
    data = datalib.create_data(DataSpec.from_config(config))
    assert (data.num_train, data.num_eval, data.class_names) == (16, 8, ("stripes_a", "stripes_b"))
    batch = next(data.train(0, 1, 0, 1))
    assert batch["image"].shape == (8, 32, 32, 3) and np.isfinite(batch["image"]).all()
    # the command line, in a process where the builder class is unknown: tfds reads the prepared copy by name
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = forkserver.run([python, "-m", "alexnet_jax.main", "--config", os.path.join(REPO, "configs/folder.py"),
                           "--config.dataset=local_test_photos", f"--config.data_dir={data_dir}",
                           "--config.train_split=train[:16]", "--config.eval_split=train[16:]",
                           "--config.variant=small", "--config.image_size=32", "--config.resize_size=36",
                           "--config.widths=(8,8,8,8,8)", "--config.fc_width=16", "--config.batch_size=8",
                           "--config.eval_batch_size=8", "--config.num_train_steps=2", "--workdir",
                           str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["dataset"] == "local_test_photos" and summary["num_eval_examples"] == 8 and summary["step"] == 2
    with pytest.raises(UserError, match="split 'nope' of local_test_photos"):
        sources.open_source(DataSpec.from_config(_with(config, eval_split="nope")))


def _with(config, **kw):
    c = config.copy_and_resolve_references()
    for k, v in kw.items():
        c[k] = v
    return c


def test_imagenet_stream_is_unchanged(prepared):
    """The tiny archive's batches (training, 10-crop evaluation, prepared squares raw/JPEG) equal the golden file's
    (tests/data/imagenet_stream_golden.npz: its evaluation batches those of the ImageNet-only pipeline before the
    photos pipeline, its training batches those of the by-index stream)."""
    golden_module = load_script_from_tests("imagenet_stream_golden")
    now = golden_module.fingerprints(prepared[0])
    with np.load(os.path.join(REPO, "tests", "data", "imagenet_stream_golden.npz")) as before:
        assert sorted(before) == sorted(now)
        for key in before:
            if key.endswith("labels"):
                np.testing.assert_array_equal(now[key], before[key], err_msg=key)
            else:
                np.testing.assert_allclose(now[key], before[key], atol=1e-3, err_msg=key)


def load_script_from_tests(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tests", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _centre_square(picture: np.ndarray, resize: int, size: int) -> np.ndarray:
    """The reference evaluation view of a source picture, by PIL (not the pipelines' TensorFlow): the shorter side
    rescaled to `resize`, the centre `resize` square, its centre `size` square; float64."""
    h, w = picture.shape[:2]
    scale = resize / min(h, w)
    image = Image.fromarray(picture).resize((max(resize, round(w * scale)), max(resize, round(h * scale))),
                                            Image.BILINEAR, reducing_gap=None)
    x = np.asarray(image, np.float64)
    top, left = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
    return x[top : top + size, left : left + size]


def _standardised(x: np.ndarray) -> np.ndarray:
    """Each channel to mean 0, norm 1 (over the image): what any per-channel affine normalisation leaves."""
    x = x - x.mean((-3, -2), keepdims=True)
    return x / np.sqrt((x**2).sum((-3, -2), keepdims=True))


def _counted_once(data, pictures: list[np.ndarray], labels: list[int], nproc: int = 2, resize: int = 36) -> None:
    """Every held-out record evaluated exactly once, each identified by its pixels: an evaluated row (any of its
    crops) is matched to the source picture whose reference view (`_centre_square`) it is nearest to, after a
    per-channel standardisation of both; the match must be clear (half the runner-up's distance at most; 0.17 at
    worst here) and carry the record's label, and the multiset of matches must be the split (labels alone would
    pass with one record twice and another of its class skipped)."""
    matched, lengths = [], []
    for pid in range(nproc):
        batches = list(data.eval(pid, nproc))
        lengths.append(len(batches))
        for b in batches:
            size = b["image"].shape[-2]
            refs = _standardised(np.stack([_centre_square(p, resize, size) for p in pictures]))
            for row, label in zip(b["image"][b["mask"] > 0], b["label"][b["mask"] > 0], strict=True):
                crops = _standardised(np.asarray(row, np.float64).reshape(-1, size, size, row.shape[-1]))
                dist = ((crops[:, None] - refs[None]) ** 2).sum((-3, -2, -1)).min(0)  # (references,)
                first, second = np.sort(dist)[:2]
                assert first < 0.5 * second, (first, second)
                matched.append(int(np.argmin(dist)))
                assert int(label) == labels[matched[-1]]
    assert len(set(lengths)) == 1 and sorted(matched) == list(range(len(pictures)))


def test_a_folder_prepared_as_squares_by_the_command_trains_on_host_and_device(photos, tmp_path, python):
    """`python -m alexnet_jax.data.prepare --config configs/folder.py --config.folder=...` prepares the folder's
    squares (train and held-out); `prepared=True` trains from them (the squares of the very same records, in the
    same batches as the source stream), `augment_on_device=True` yields their uint8 squares and draws, which the
    jitted half turns into the host's batch; evaluation counts each held-out photo once."""
    import jax

    root, data_dir = photos
    data_dir = str(tmp_path / "tfds")  # (a fresh data_dir: the command prepares the folder and its squares)
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = forkserver.run([python, "-m", "alexnet_jax.data.prepare", "--config",
                           os.path.join(REPO, "configs/folder.py"), f"--config.folder={root}",
                           f"--config.data_dir={data_dir}", "--config.resize_size=36", "--config.image_size=32",
                           "--config.holdout_fraction=0.2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 72 images" in proc.stdout and "validation: 18 images" in proc.stdout
    source_config = _folder_config(root, data_dir)
    src = sources.open_source(DataSpec.from_config(source_config))
    host = datalib.create_data(DataSpec.from_config(_folder_config(root, data_dir, prepared=True)))
    device = datalib.create_data(DataSpec.from_config(_folder_config(root, data_dir, prepared=True,
                                                                     augment_on_device=True)))
    assert host.num_train == 72 and host.num_eval == 18 and host.on_device is None and device.on_device is not None
    source_labels = [int(ex["label"]) for ex in examples(src.builder, src.train_split)]
    rows = photos_lib.train_indices(src, DataSpec.from_config(source_config), 0, 3)
    on_device = jax.jit(device.on_device)
    for step, (a, b) in enumerate(zip(host.train(0, 3, 0, 1), device.train(0, 3, 0, 1), strict=True)):
        assert a["image"].shape == (16, 32, 32, 3) and b["image"].shape == (16, 36, 36, 3)
        assert a["label"].tolist() == [source_labels[i] for i in rows[step]]  # square i is source record i
        out = jax.device_get(on_device(b))
        np.testing.assert_array_equal(out["label"], a["label"])
        np.testing.assert_allclose(out["image"], a["image"], atol=2e-3, rtol=0)
    held_out = examples(src.builder, src.eval_split)
    _counted_once(host, [tf.io.decode_image(ex["image"], channels=3).numpy() if isinstance(ex["image"], bytes)
                         else ex["image"] for ex in held_out], [int(ex["label"]) for ex in held_out])


def test_a_tfds_dataset_prepared_in_tfrecord_is_read_by_index_and_squared(tmp_path):
    """A tfds dataset someone prepared before in TFRecord (tfds's default): converted once to array_record beside
    its files (the records the same, in the same order), then its squares prepared by a training run
    (`prepared=True`), with the augmentation on the device too; evaluation counts each image once."""
    data_dir = str(tmp_path / "tfds")
    builder = LocalTestPhotos(data_dir=data_dir)
    builder.download_and_prepare()
    tfrecords = [r for r in tf.data.TFRecordDataset(sorted(str(p) for p in tf.io.gfile.glob(
        os.path.join(os.fspath(builder.data_dir), "*.tfrecord-*")))).as_numpy_iterator()]
    config = default_config.get_config()
    for k, v in dict(dataset="local_test_photos", data_dir=data_dir, train_split="train[:16]",
                     eval_split="train[16:]", num_classes=0, image_size=32, resize_size=36, batch_size=8,
                     eval_batch_size=8, normalization="channel").items():
        config[k] = v
    src = sources.open_source(DataSpec.from_config(config))
    assert src.builder.info.file_format == records.ARRAY_RECORD
    assert list(records.Records(src.builder, "train").read(np.arange(24))) == tfrecords
    for kw in (dict(prepared=True), dict(prepared=True, augment_on_device=True)):
        c = _with(config, **kw)
        data = datalib.create_data(DataSpec.from_config(c))
        batch = next(data.train(0, 1, 0, 1))
        assert batch["image"].shape == ((8, 36, 36, 3) if kw.get("augment_on_device") else (8, 32, 32, 3))
        assert (data.num_train, data.num_eval) == (16, 8)
        held_out = examples(src.builder, "train[16:]")
        _counted_once(data, [ex["picture"] for ex in held_out], [int(ex["kind"]) for ex in held_out])
