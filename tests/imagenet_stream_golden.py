"""The ImageNet stream's fingerprint on the tiny archive, per pipeline: what `tests/test_photos.py` compares the
current code with (`tests/data/imagenet_stream_golden.npz`; regenerate only when the stream is meant to change:
`python tests/imagenet_stream_golden.py OUT.npz`). Written first by the commit before the photos pipeline replaced
the ImageNet-only one; regenerated on 2026-12-02 when the training stream became records read by index (global
batch s = rows of a (seed, epoch) permutation: every training batch changed; the evaluation of the source images
did not, and the prepared squares' evaluation only in its order, square i now being source record i).

For each case: the labels of every row exactly, and every image's pixels on a fixed 7x7 grid of positions and
all channels (float32), for training steps 0-5 (two epochs at batch 8) and the whole evaluation split."""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

CASES = {
    "source": {},
    "source_channel_rrc": {"normalization": "channel", "train_crop": "random_resized", "pca": "published"},
    "source_227_bilinear": {"image_size": 227, "resize_method": "bilinear", "random_flip": False, "seed": 3},
    "eval10": {"eval_crops": 10},
    "prepared_raw": {"prepared": True, "prepared_format": "raw"},
    "prepared_jpeg": {"prepared": True, "prepared_format": "jpeg", "eval_crops": 10},
}
STEPS = 6


def _config(data_dir: str, **kw):
    from alexnet_jax import default_config

    c = default_config.get_config()
    c.data_dir = data_dir
    c.batch_size = 8
    c.eval_batch_size = 8
    for k, v in kw.items():
        c[k] = v
    return c


def _grid(images: np.ndarray) -> np.ndarray:
    h, w = images.shape[-3:-1]
    ys, xs = np.linspace(0, h - 1, 7).astype(int), np.linspace(0, w - 1, 7).astype(int)
    return images[..., ys, :, :][..., :, xs, :].astype(np.float32)


def fingerprints(data_dir: str) -> dict[str, np.ndarray]:
    """{case/what: array} for every case on the prepared tiny archive in `data_dir`."""
    from alexnet_jax import data as datalib
    from alexnet_jax.data import DataSpec, squares

    out = {}
    for name, kw in CASES.items():
        config = _config(data_dir, **kw)
        if kw.get("prepared"):
            squares.prepare(DataSpec.from_config(config))
        data = datalib.create_data(DataSpec.from_config(config))
        train = list(data.train(0, STEPS, 0, 1))
        out[f"{name}/train_labels"] = np.concatenate([b["label"] for b in train])
        out[f"{name}/train_pixels"] = np.concatenate([_grid(b["image"]) for b in train])
        ev = list(data.eval(0, 1))
        out[f"{name}/eval_labels"] = np.concatenate([b["label"] for b in ev])
        out[f"{name}/eval_pixels"] = np.concatenate([_grid(b["image"]) for b in ev])
    return out


def tiny_archive(root: str) -> str:
    """The tiny archive (8 classes, 4 training images each) prepared by tfds into `root/data`."""
    import importlib.util

    from alexnet_jax.data import imagenet

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(repo, "scripts", "make_tiny_imagenet.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    manual, data = os.path.join(root, "manual"), os.path.join(root, "data")
    tiny.write_tiny_imagenet(manual, classes=8, train_per_class=4)
    imagenet.prepare(data, manual)
    return data


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(sys.argv[1], **fingerprints(tiny_archive(tmp)))
