"""Photos as they are found on a disk: torchvision's folder rules and more (a Mac's and Windows' files passed
over and counted), photos upright by their EXIF orientation, one preparation in a multi-process run, each file
read once."""

from __future__ import annotations

import builtins
import io
import json
import os
import select
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import FAST_COMPILE, REPO, examples, load_script
from PIL import Image, ImageOps

from alexnet_jax.data import images, squares
from alexnet_jax.errors import UserError

photo_folder = load_script("make_photo_folder")
# torchvision's IMG_EXTENSIONS, plus .gif (the rules), written out here rather than taken from the code
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
RULES_EXTENSIONS = TORCHVISION_EXTENSIONS + (".gif",)
OS_NAMES = ("thumbs.db", "desktop.ini")


def _photo(cls: int, size=(64, 48), seed=0) -> np.ndarray:
    return photo_folder.pixels(cls, 3, size, np.random.default_rng(seed))


def _rotated_jpeg(path: str, upright: np.ndarray, orientation: int = 6) -> None:
    """Save `upright` as a phone does a portrait shot: the pixels stored sideways, EXIF orientation 6 (turn 90
    degrees clockwise to view)."""
    stored = np.rot90(upright, 1)  # counter-clockwise: orientation 6 turns it back
    image = Image.fromarray(np.ascontiguousarray(stored))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())


def write_found_folder(root: str) -> None:
    """3 class folders as a user's disk has them (copied from a Mac, used on Windows), one name with a space and
    a non-ASCII letter, nested subfolders, every format torchvision takes, and the files an OS leaves beside."""
    classes = ("cat", "dog café", "bird")
    for c, name in enumerate(classes):
        d = os.path.join(root, name)
        os.makedirs(os.path.join(d, "2019", "trip"), exist_ok=True)
        for k in range(6):
            Image.fromarray(_photo(c, seed=k)).save(os.path.join(d, f"IMG_{k:04d}.JPG"), "JPEG", quality=90)
            with open(os.path.join(d, f"._IMG_{k:04d}.JPG"), "wb") as f:  # AppleDouble: a resource fork
                f.write(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(50))
        for k in range(3):
            Image.fromarray(_photo(c, seed=10 + k)).save(os.path.join(d, "2019", "trip", f"t{k}.jpg"))
        Image.fromarray(_photo(c, seed=20)).save(os.path.join(d, "a.webp"), "WEBP", quality=90)
        Image.fromarray(_photo(c, seed=21)).save(os.path.join(d, "b.tif"))
        frames = [Image.fromarray(_photo(c, seed=22 + i)) for i in range(3)]
        frames[0].save(os.path.join(d, "c.tiff"), save_all=True, append_images=frames[1:])  # multi-frame
        Image.fromarray(_photo(c, seed=25)).save(os.path.join(d, "d.ppm"))
        Image.fromarray(_photo(c, seed=26)).convert("L").save(os.path.join(d, "e.pgm"))
        Image.fromarray(_photo(c, seed=27)).save(os.path.join(d, "f.jpeg"), "JPEG", progressive=True, quality=90)
        _rotated_jpeg(os.path.join(d, "g_rotated.jpg"), _photo(c, (48, 64), seed=28))
        gif = [Image.fromarray(_photo(c, seed=30 + i)).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(2)]
        gif[0].save(os.path.join(d, "h.gif"), save_all=True, append_images=gif[1:])
        Image.fromarray(_photo(c, seed=29)).save(os.path.join(d, "i.PNG"))
        open(os.path.join(d, ".DS_Store"), "wb").write(b"\x00\x00\x00\x01Bud1" + bytes(40))
        open(os.path.join(d, "Thumbs.db"), "wb").write(bytes(64))
        os.makedirs(os.path.join(d, ".thumbnails"), exist_ok=True)  # a hidden folder: its images are not photos
        Image.fromarray(_photo(c, (16, 16))).save(os.path.join(d, ".thumbnails", "x.png"))
    open(os.path.join(root, "cat", "notes.txt"), "w").write("where these were taken\n")
    open(os.path.join(root, "bird", "desktop.ini"), "w").write("[.ShellClassInfo]\n")
    mac = os.path.join(root, "__MACOSX", "cat")
    os.makedirs(mac)
    open(os.path.join(mac, "._IMG_0000.JPG"), "wb").write(bytes(82))
    os.symlink(os.path.join(root, "bird"), os.path.join(root, "bird", "2019", "loop"))  # a link loop


def reference_walk(root: str) -> set[str]:
    """The images torchvision's rules select (each class folder walked, links followed), with hidden files and
    folders and the OS's own files left out: written here independently of alexnet_jax.data.images."""
    out = set()
    for cls in os.listdir(root):
        if cls.startswith(".") or cls == "__MACOSX" or not os.path.isdir(os.path.join(root, cls)):
            continue
        seen = set()
        for d, dirs, files in os.walk(os.path.join(root, cls), followlinks=True):
            real = os.path.realpath(d)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            out |= {os.path.relpath(os.path.join(d, f), root) for f in files
                    if f.lower().endswith(RULES_EXTENSIONS) and not f.startswith(".") and f.lower() not in OS_NAMES}
    return out


def _config(root: str, data_dir: str, **kw):
    from test_photos import _folder_config

    return _folder_config(root, data_dir, **kw)


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("as_found") / "photos")
    write_found_folder(root)
    return root


def test_training_counts_what_torchvisions_rules_select_and_predict_ranks_the_same(found, tmp_path, caplog):
    from alexnet_jax import predict, train

    want = reference_walk(found)
    assert len(want) == 3 * 18 and not any("__MACOSX" in p or "/." in p or p.startswith(".") for p in want)
    config = _config(found, str(tmp_path / "tfds"), num_train_steps=1, eval_crops=1, batch_size=8)
    with caplog.at_level("INFO"):
        summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    log = "\n".join(r.getMessage() for r in caplog.records)
    # 3 hidden x (6 AppleDouble + .DS_Store), the __MACOSX folder, 3 Thumbs.db, 1 desktop.ini, 1 notes.txt
    line = next(ln for ln in log.splitlines() if "skipped" in ln)
    assert "21 hidden files (._*, .DS_Store)" in line and "3 hidden folders (.thumbnails)" in line, line
    assert "3 Thumbs.db" in line and "1 desktop.ini" in line and "1 notes.txt" in line, line
    assert "1 folder __MACOSX/" in line, line
    assert summary["num_eval_examples"] == round(0.2 * len(want)), summary  # the held-out 20%, each once
    from alexnet_jax.data import DataSpec, sources

    builder = sources.open_source(DataSpec.from_config(config)).builder
    stored = {ex["file_name"].decode() for ex in examples(builder, "train")}
    assert stored == want
    paths = predict.image_files([found])
    assert {os.path.relpath(p, found) for p in paths} == want
    results = predict.classify(str(tmp_path / "run"), paths)
    assert {os.path.relpath(r.path, found) for r in results if r.top} == want


def test_an_empty_class_folder_stops_before_anything_is_prepared(tmp_path):
    from alexnet_jax.data import folder

    root = tmp_path / "p"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(_photo(0)).save(root / name / "x.jpg")
    (root / "empty" / "sub").mkdir(parents=True)
    (root / "empty" / "notes.txt").write_text("no photos here")
    with pytest.raises(UserError, match=r"1 class folder\(s\) hold no images: .*/empty/ "):
        folder.prepare(str(root), str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists() or not os.listdir(tmp_path / "tfds")


def test_exif_orientation_matches_pil_for_all_eight():
    """images.orient_array (NumPy) and squares.upright (TensorFlow) against PIL's ImageOps.exif_transpose."""
    stored = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for value in range(1, 9):
        image = Image.fromarray(stored)
        exif = image.getexif()
        exif[0x0112] = value
        buf = io.BytesIO()
        image.save(buf, "PNG", exif=exif.tobytes())
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
        np.testing.assert_array_equal(images.orient_array(stored, value), want, err_msg=str(value))
        np.testing.assert_array_equal(squares.upright(tf.constant(stored), tf.constant(value, tf.int64)).numpy(),
                                      want, err_msg=str(value))


def test_a_rotated_phone_photo_is_prepared_and_predicted_upright(tmp_path):
    from alexnet_jax import predict
    from alexnet_jax.data import folder

    yy, xx = np.mgrid[0:80, 0:48]  # 80 high, 48 wide: a portrait shot, brighter red downwards, green rightwards
    upright = np.stack([yy * 3, xx * 5, np.full_like(yy, 90)], -1).astype(np.uint8)
    path = str(tmp_path / "IMG_0001.jpg")
    _rotated_jpeg(path, upright)
    assert Image.open(path).size == (80, 48)  # stored sideways
    # the file's own JPEG error: its pixels as stored (sideways) against what was saved
    jpeg_error = np.abs(np.asarray(Image.open(path), np.float64) - np.rot90(upright, 1)).mean()
    record = tf.io.decode_jpeg(images.stored_bytes(path), channels=3).numpy().astype(np.float64)
    assert record.shape == upright.shape
    assert np.abs(record - upright).mean() < jpeg_error + 1.5  # + one JPEG-95 4:4:4 round trip
    assert np.abs(record - upright[::-1, ::-1]).mean() > 3 * jpeg_error  # (upside down: far off)
    as_read = predict.pixels(path).astype(np.float64)
    assert as_read.shape == upright.shape and np.abs(as_read - upright).mean() < jpeg_error + 1.5
    # the prepared squares of a source JPEG (ImageNet's): the centre square of the upright picture
    square = squares.square_of_jpeg(tf.constant(open(path, "rb").read()), 48, "area").numpy().astype(np.float64)
    np.testing.assert_allclose(square, as_read[16:64], atol=1.0)
    # an upright JPEG is stored byte for byte
    plain = str(tmp_path / "plain.jpg")
    Image.fromarray(upright).save(plain, "JPEG", quality=90)
    assert images.stored_bytes(plain) == open(plain, "rb").read()
    # and a whole folder: the record of the rotated photo is upright
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "f" / cls)
        Image.fromarray(_photo(1)).save(tmp_path / "f" / cls / "x.jpg")
    os.replace(path, tmp_path / "f" / "a" / "IMG_0001.jpg")
    builder, _ = folder.prepare(str(tmp_path / "f"), str(tmp_path / "tfds"))
    ex = next(e for e in examples(builder, "train")
              if e["file_name"].decode().endswith("IMG_0001.jpg"))
    assert ex["image"].shape == upright.shape
    assert np.abs(ex["image"] - upright.astype(np.float64)).mean() < jpeg_error + 1.5


def test_the_preparation_opens_each_file_once(tmp_path, monkeypatch):
    from alexnet_jax.data import folder

    root = str(tmp_path / "p")
    photo_folder.write_photo_folder(root, classes=2, per_class=8)
    open(os.path.join(root, "class_a", ".DS_Store"), "wb").write(bytes(8))
    opened: list[str] = []
    real_open, real_pil_open = builtins.open, Image.open

    def counting_open(file, *a, **kw):
        if isinstance(file, str) and file.startswith(root):
            opened.append(file)
        return real_open(file, *a, **kw)

    def counting_pil_open(fp, *a, **kw):
        if isinstance(fp, str | os.PathLike) and os.fspath(fp).startswith(root):
            opened.append(os.fspath(fp))
        return real_pil_open(fp, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(Image, "open", counting_pil_open)
    builder, _ = folder.prepare(root, str(tmp_path / "tfds"))
    monkeypatch.undo()
    files = images.walk(root)
    assert len(files) == 16 and builder.info.splits["train"].num_examples == 16
    assert sorted(opened) == sorted(files)  # each image once; the .DS_Store never


WORKER = """
import json, sys, time
from absl import logging
from alexnet_jax import data as datalib, default_config
logging.set_verbosity(logging.INFO)
config = default_config.get_config()
spec = json.loads(sys.argv[1])
for k, v in spec["config"].items():
    config[k] = v
start = time.time()
try:
    d = datalib.create_data(datalib.DataSpec.from_config(config), None, spec["pid"], 2)
    print(json.dumps({"num_train": d.num_train, "num_eval": d.num_eval, "s": time.time() - start}))
except Exception as e:
    print(f"error: {e}", file=sys.stderr)
    print(json.dumps({"error": str(e), "s": time.time() - start}))
    sys.exit(1)
"""


def _start(pid: int, config: dict) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps({"pid": pid, "config": config})], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(config: dict) -> tuple[list[dict], list[str]]:
    """Process 1 started first (it must wait), process 0 once process 1 is waiting."""
    one = _start(1, config)
    deadline = time.time() + 120
    lines = []
    while time.time() < deadline and select.select([one.stderr], [], [], deadline - time.time())[0]:
        line = one.stderr.readline()
        lines.append(line)
        if "waiting for process 0" in line or not line:
            break
    else:
        one.kill()
        pytest.fail("process 1 did not start waiting within 120 s: " + "".join(lines)[-2000:])
    zero = _start(0, config)
    out0, err0 = zero.communicate(timeout=300)
    out1, err1 = one.communicate(timeout=300)
    return [json.loads(out0.strip().splitlines()[-1]), json.loads(out1.strip().splitlines()[-1])], \
        [err0, "".join(lines) + err1]


def _folder_spec(root: str, data_dir: str, **kw) -> dict:
    return {"dataset": "folder", "folder": root, "data_dir": data_dir, "image_size": 32, "resize_size": 36,
            "num_classes": 0, "batch_size": 8, "eval_batch_size": 8, "holdout_fraction": 0.25, **kw}


def test_two_processes_prepare_a_folder_once(tmp_path):
    root = str(tmp_path / "p")
    photo_folder.write_photo_folder(root, classes=2, per_class=12)
    (results, errs) = _two_processes(_folder_spec(root, str(tmp_path / "tfds")))
    assert results[0] == {**results[0], "num_train": 18, "num_eval": 6}
    assert (results[1]["num_train"], results[1]["num_eval"]) == (18, 6), errs[1][-2000:]
    both = errs[0] + errs[1]
    assert both.count("preparing the images of") == 1 and "preparing the images of" in errs[0], both[-3000:]
    assert "process 1: waiting for process 0 to prepare the images of" in errs[1]
    assert both.count("computing the training mean image") == 1, both[-3000:]  # the statistics cache too


def test_when_process_0_fails_the_other_stops_in_one_line_within_its_bound(tmp_path):
    root = str(tmp_path / "p")
    written = photo_folder.write_photo_folder(root, classes=2, per_class=4, bad=True)
    results, errs = _two_processes(_folder_spec(root, str(tmp_path / "tfds"), prepare_wait_s=60.0))
    assert "cannot be read as images" in results[0]["error"]
    message = results[1]["error"]
    assert message.startswith("process 0 could not prepare the images of") and written["bad"][0] in message
    assert results[1]["s"] < 60 and "Traceback" not in errs[1], errs[1][-2000:]


def test_a_waiting_process_stops_when_process_0_is_gone_or_never_starts(tmp_path):
    """The bounds of `once`, in this process (process 1 of 2): a state file whose heartbeat stopped (process 0
    killed), none at all within wait_s, 'done' with nothing visible (data_dir not shared), an earlier run's."""
    from alexnet_jax.data import once

    state = str(tmp_path / "state.json")
    wait = once.Processes(1, 2, wait_s=1.0)

    def never():
        raise AssertionError("process 1 must not prepare")

    start = time.time()
    with pytest.raises(UserError, match=r"waited 1 s for process 0 to prepare X and gave up: it never started"):
        once.prepare_once("X", lambda: False, never, state, wait)
    assert time.time() - start < 3
    now = time.time()
    json.dump({"state": "preparing", "pid": 7, "host": "h", "started": now, "beat": now - 61}, open(state, "w"))
    with pytest.raises(UserError, match=r"process 0 \(pid 7 on h\) stopped preparing X: no sign of it for 6\d s"):
        once.prepare_once("X", lambda: False, never, state, once.Processes(1, 2, wait_s=30.0))
    old_failure = {"state": "failed", "error": "an old failure", "started": now - 3600, "time": now - 3600}
    json.dump(old_failure, open(state, "w"))
    with pytest.raises(UserError, match="gave up: it never started"):  # an earlier run's state is not this run's
        once.prepare_once("X", lambda: False, never, state, wait)
    json.dump({"state": "done", "started": now, "beat": now, "time": now}, open(state, "w"))
    old, once.DONE_BUT_MISSING_S = once.DONE_BUT_MISSING_S, 0.3
    try:
        with pytest.raises(UserError, match="this process does not see it in .*same --config.data_dir"):
            once.prepare_once("X", lambda: False, never, state, once.Processes(1, 2, wait_s=30.0))
    finally:
        once.DONE_BUT_MISSING_S = old
    made = []
    once.prepare_once("X", lambda: bool(made), lambda: made.append(1), state, once.Processes(0, 2))
    assert made == [1] and json.load(open(state))["state"] == "done"
