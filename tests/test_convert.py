"""Torchvision AlexNet weights -> alexnet_jax checkpoint: logits parity with PyTorch, bad input."""

import os
import sys

import forkserver
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import examples

from alexnet_jax import convert
from alexnet_jax.errors import UserError
from alexnet_jax.model import ModelSpec, create_model

sys.path.insert(0, os.path.dirname(__file__))
try:
    import torch
    from torchvision_alexnet import TorchvisionAlexNet
except ImportError:  # every test below then fails through the `torch_lib` fixture, saying what to install
    torch = None


pytestmark = pytest.mark.torch  # every test here needs PyTorch (the `torch_lib` fixture below)


@pytest.fixture(autouse=True)
def _needs_torch(torch_lib):
    """Not a skip: without torch each test of this module fails with conftest's TORCH_MISSING message."""


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _torchvision_like(fc_width: int = 4096):
    torch.manual_seed(0)
    model = TorchvisionAlexNet(num_classes=1000, fc_width=fc_width).eval()
    with torch.no_grad():  # torchvision-like scales so the logits are not ~0 (default init shrinks them)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                m.weight.mul_(2.0)
                m.bias.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def torch_model():
    """torchvision's architecture at full size (61,100,840 parameters): the logits parity tests."""
    return _torchvision_like()


@pytest.fixture(scope="module")
def pth(torch_model, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tv") / "alexnet.pth")
    torch.save(torch_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def narrow_model():
    """The same module tree with fc6/fc7 of 256 neurons: what a checkpoint is written from, evaluated and
    predicted with (the full size's 58M FC parameters made the write and restore ~10x slower for nothing)."""
    return _torchvision_like(fc_width=256)


@pytest.fixture(scope="module")
def narrow_pth(narrow_model, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tv") / "alexnet_narrow.pth")
    torch.save(narrow_model.state_dict(), path)
    return path


def test_full_size_state_dict_is_torchvision_alexnet(pth):
    state = convert.load_state_dict(pth)
    assert convert.check_architecture(state)[:3] == ((64, 192, 384, 256, 256), 4096, 1000)
    assert sum(int(np.prod(v.shape)) for v in state.values()) == 61_100_840


@pytest.fixture(scope="module")
def converted(narrow_pth, tmp_path_factory) -> str:
    """A workdir holding the converted checkpoint (of the narrow model)."""
    workdir = str(tmp_path_factory.mktemp("converted") / "wd")
    out = convert.convert(narrow_pth, workdir)
    assert out["params"] == 2_469_696 + (9216 * 256 + 256) + (256 * 256 + 256) + (256 * 1000 + 1000)  # convs + FC
    assert out["fc_width"] == 256
    return workdir


def _flax_logits(state_dict, images_nhwc: np.ndarray) -> np.ndarray:
    widths, fc_width, classes, _ = convert.check_architecture(state_dict)
    config = convert.torchvision_config(widths, fc_width, classes, images_nhwc.shape[1])
    model = create_model(ModelSpec.from_config(config))
    return np.asarray(model.apply({"params": convert.to_flax_params(state_dict)}, images_nhwc, train=False))


@pytest.mark.parametrize("size", [224, 160])  # 160: pool5 is 4x4 and AdaptiveAvgPool2d upsamples to 6x6
def test_converted_logits_equal_pytorch(torch_model, pth, size):
    images = np.random.RandomState(size).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images)).numpy()
    got = _flax_logits(convert.load_state_dict(pth), images.transpose(0, 2, 3, 1))
    assert got.shape == (2, 1000)
    assert np.std(expected) > 1e-2  # a real signal to compare
    assert _rel_err(got, expected) < 1e-4


def test_convert_writes_a_checkpoint_predict_uses(narrow_model, narrow_pth, converted, tmp_path):
    import tensorflow as tf

    from alexnet_jax import checkpointing, inference, predict

    workdir = converted
    step, config, meta = checkpointing.read_saved(workdir)
    assert step == 0 and config["variant"] == "owt" and config["normalization"] == "channel"
    norm = inference.normalisation_of(meta, 0)
    assert norm.kind == "channel" and norm.resize_size == 256
    np.testing.assert_allclose(norm.mean, [123.675, 116.28, 103.53], rtol=1e-6)
    np.testing.assert_allclose(norm.std, [58.395, 57.12, 57.375], rtol=1e-6)
    assert meta["class_names"][0] == "n01440764"  # tench: torchvision's index 0
    image = np.random.RandomState(1).randint(0, 256, (240, 320, 3), np.uint8)
    path = str(tmp_path / "x.png")
    tf.io.write_file(path, tf.io.encode_png(image))
    (_, top), = predict.predict(workdir, [path], top_k=3)
    # torch on the same preprocessed pixels (torchvision's transforms: resize 256, centre 224 crop, mean/std)
    x = predict.preprocess(path, (224, 224, 3), norm, "imagenet2012", "antialias", torchvision=True)
    with torch.no_grad():
        nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))
        probs = torch.softmax(narrow_model(nchw), -1).numpy()[0]
    expected = np.argsort(-probs)[:3]
    assert [name for name, _ in top] == [meta["class_names"][i] for i in expected]
    np.testing.assert_allclose([p for _, p in top], probs[expected], rtol=1e-4)
    with pytest.raises(UserError, match="already holds checkpoints"):
        convert.convert(narrow_pth, workdir)
    # files that cannot be decoded: a PNG and a JPEG cut short
    for name, data in (("cut.png", tf.io.encode_png(image).numpy()), ("cut.jpg", tf.io.encode_jpeg(image).numpy())):
        bad = tmp_path / name
        bad.write_bytes(data[: len(data) // 3])
        with pytest.raises(UserError, match=rf"{name}: not a readable image .*give JPEG, PNG, WebP, TIFF, GIF, BMP"):
            predict.predict(workdir, [path, str(bad)])


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                   "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = str(tmp_path / "resnet.pth")
    torch.save(resnet_like, path)
    with pytest.raises(UserError, match=r"not a torchvision AlexNet: missing features\.0\.weight.*conv1\.weight"):
        convert.convert(path, str(tmp_path / "a"))
    vgg_like = TorchvisionAlexNet(num_classes=10).state_dict()
    vgg_like["features.0.weight"] = torch.zeros(64, 3, 3, 3)  # same names, other shapes
    torch.save(vgg_like, path)
    with pytest.raises(UserError, match=r"features\.0\.weight has shape \(64, 3, 3, 3\), expected \(out, 3, 11, 11\)"):
        convert.convert(path, str(tmp_path / "b"))


def test_unreadable_and_pickled_model_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a torch file")
    with pytest.raises(UserError, match="not a PyTorch state dict"):
        convert.load_state_dict(str(junk))
    whole = str(tmp_path / "model.pth")
    torch.save(TorchvisionAlexNet(num_classes=10), whole)  # the module pickled, not its state dict
    with pytest.raises(UserError, match=r"torch.save\(model.state_dict\(\), path\)"):
        convert.load_state_dict(whole)
    with pytest.raises(UserError, match="no such file"):
        convert.load_state_dict(str(tmp_path / "missing.pth"))


def test_cli_prints_one_line_error(tmp_path, python, repo):

    path = str(tmp_path / "resnet.pth")
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, path)
    r = forkserver.run([python, "-m", "alexnet_jax.convert", "--torchvision", path, "--workdir", str(tmp_path / "w")],
                       cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "alexnet_jax.convert: error: --torchvision" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_uses_torchvision_normalisation_on_imagenet(narrow_model, converted, tmp_path):
    """The converted checkpoint through `evaluate` on a tiny archive of the ILSVRC-2012 format (tfds's real
    imagenet2012 builder): the pipeline normalises with torchvision's mean/std (not the training set's) and
    the metrics equal torch's on the same pixels."""
    import importlib.util

    from alexnet_jax import checkpointing, evaluate
    from alexnet_jax import config as config_lib
    from alexnet_jax import data as datalib
    from alexnet_jax.data import DataSpec, imagenet

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("make_tiny_imagenet",
                                                  os.path.join(repo, "scripts", "make_tiny_imagenet.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "data")
    tiny.write_tiny_imagenet(manual, classes=8, train_per_class=1)
    imagenet.prepare(data_dir, manual, verify=False)

    workdir = converted
    _, saved, _ = checkpointing.read_saved(workdir)
    config = config_lib.config_from_dict(saved)
    config.data_dir = data_dir
    config.eval_batch_size = 8
    data = datalib.create_data(DataSpec.from_config(config))
    np.testing.assert_allclose(data.mean, [123.675, 116.28, 103.53], rtol=1e-6)
    batches = list(data.eval(0, 1))
    images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    with torch.no_grad():
        logits = narrow_model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels).long()))
    top5 = float(np.mean([y in np.argsort(-row)[:5] for row, y in zip(logits.numpy(), labels, strict=True)]))

    result = evaluate.evaluate_checkpoint(workdir, overrides={"data_dir": data_dir, "eval_batch_size": 8})
    assert result["count"] == len(labels) == 8
    assert result["top5"] == pytest.approx(top5)
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    # against an independent reference: torchvision's transforms on PIL (`_torchvision_transforms`) of the same
    # JPEGs, matched by file name: the normalised pixels (so torchvision's mean *and* std), then torch's top-1
    np.testing.assert_allclose(data.std, [58.395, 57.12, 57.375], rtol=1e-6)
    views = list(data.views("validation", 0, 1))
    mine = {n.decode(): im for b in views for n, im, m in zip(b["file_name"], b["image"], b["mask"], strict=True)
            if m > 0}
    reference = {}
    for ex in examples(imagenet.open_prepared(config.data_dir), "validation", {"image": tfds.decode.SkipDecoding()}):
        path = tmp_path / ex["file_name"].decode()
        path.write_bytes(ex["image"])
        reference[path.name] = _torchvision_transforms(str(path)).transpose(1, 2, 0)
    assert sorted(mine) == sorted(reference) and len(mine) == 8
    names = sorted(mine)
    ours, theirs = np.stack([mine[n] for n in names]), np.stack([reference[n] for n in names])
    assert np.abs(ours - theirs).mean() < 0.06  # in std units (~3.5 levels): TF vs PIL resampling of noisy JPEGs
    assert np.abs(ours.mean((0, 1, 2)) - theirs.mean((0, 1, 2))).max() < 0.02
    assert np.abs(ours.std((0, 1, 2)) / theirs.std((0, 1, 2)) - 1).max() < 0.02
    with torch.no_grad():
        top1 = [narrow_model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).argmax(1).numpy()
                for x in (ours, theirs)]
    np.testing.assert_array_equal(top1[0], top1[1])


def _torchvision_transforms(path: str) -> np.ndarray:
    """The reference: torchvision's ImageNet evaluation transforms as torchvision computes them on PIL
    (`Resize(256)`: shorter side 256, longer int(256 * long / short), `Image.BILINEAR`; `CenterCrop(224)`: offsets
    int(round((size - 224) / 2)); `ToTensor`; `Normalize`), NCHW float32."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        image = image.resize(size, Image.BILINEAR)
        top, left = int(round((image.height - 224) / 2.0)), int(round((image.width - 224) / 2.0))
        x = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    x = (x - np.asarray(convert.TORCHVISION_MEAN, np.float32)) / np.asarray(convert.TORCHVISION_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def test_predict_gives_torchvisions_probabilities(tmp_path):
    """Photos of several sizes through `predict` on a converted checkpoint (a narrow torchvision AlexNet with a
    sharpened classifier): the probabilities of torch's forward of the same weights on torchvision's transforms,
    within 0.1 points (not just the same top-5); the square-first float pipeline is further off."""
    from PIL import Image

    from alexnet_jax import labels, predict

    narrow_model = _torchvision_like(fc_width=256)
    with torch.no_grad():
        narrow_model.classifier[6].weight.mul_(40.0)
    pth = str(tmp_path / "sharp.pth")
    torch.save(narrow_model.state_dict(), pth)
    converted = str(tmp_path / "wd")
    convert.convert(pth, converted)

    rng = np.random.default_rng(3)
    paths = []
    for w, h in ((500, 375), (375, 500), (333, 333), (640, 427), (260, 300)):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([np.sin(xx / 17.0), np.cos(yy / 23.0), np.sin((xx + yy) / 31.0)], -1)
        image = np.clip(128 + 90 * smooth + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(str(tmp_path / f"photo_{w}x{h}.jpg"))
        Image.fromarray(image).save(paths[-1], quality=92)
    results = predict.classify(converted, paths, top_k=1000)
    names = labels.class_names("imagenet2012", {}, 1000)
    with torch.no_grad():
        want = torch.softmax(narrow_model(torch.from_numpy(np.stack([_torchvision_transforms(p) for p in paths]))),
                             -1).numpy()
    assert want.max() > 0.3  # a peaked distribution, so points mean something

    def probabilities(results) -> np.ndarray:
        out = np.zeros((len(results), 1000))
        for row, r in zip(out, results, strict=True):
            for name, prob in r.top:
                row[names.index(name)] = prob
        return out

    points = np.abs(probabilities(results) - want).max() * 100
    print(f"predict vs torchvision's transforms + torch: largest difference {points:.4f} points")
    assert points < 0.1
    # the pipeline of the training run (centre square resized in float) is what the torchvision path replaced
    from alexnet_jax import inference

    loaded = inference.load(converted, None, inference.mesh_of_one_device())
    x = np.stack([predict.preprocess(p, (224, 224, 3), loaded.normalisation, "imagenet2012", "antialias")
                  for p in paths])
    with torch.no_grad():
        square_first = torch.softmax(narrow_model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))),
                                     -1).numpy()
    assert np.abs(square_first - want).max() * 100 > 0.1


def test_predict_cli_ranks_good_files_and_names_bad_ones(converted, tmp_path, python, repo):
    """Eight files of every kind in one call, and a folder: every readable one ranked (ImageNet names beside
    the ids), each unreadable one a one-line error, exit status 1, no traceback."""
    import sys

    sys.path.insert(0, os.path.join(repo, "tests"))
    from conftest import load_script

    kit = load_script("make_photo_folder")
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = [kit.save(kit.pixels(0, 3, (300, 200), rng), str(folder / k), k)
            for k in ("cmyk_jpeg", "gray_jpeg", "rgba_png", "palette_gif", "gray16_png")]
    from PIL import Image

    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(folder / "one_pixel.png")
    good.append(str(folder / "one_pixel.png"))
    data = (folder / "cmyk_jpeg.jpeg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("not an image\n")
    files = sorted(good + [str(folder / "cut.jpg"), str(folder / "notes.jpg")])
    for args in (files, [str(folder)]):
        r = forkserver.run([python, "-m", "alexnet_jax.predict", "--workdir", converted, "--top_k=2", *args],
                           cwd=repo, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        ranked = [line for line in r.stdout.splitlines() if not line.startswith(" ")]
        assert sorted(ranked) == sorted(good)
        lines = r.stdout.splitlines()
        first = lines[lines.index(ranked[0]) + 1]
        assert first.strip().startswith("1. n0") and len(first.split()) >= 4  # "1. n01440764 tench 12.3%"
        errors = [line for line in r.stderr.splitlines() if "error:" in line]
        assert len(errors) == 2 and "cut.jpg: not a readable image (truncated)" in errors[0] + errors[1]
        assert any("notes.jpg: not a readable image" in e for e in errors)
