"""Write a tiny ILSVRC-2012 manual-download folder that tfds's real `imagenet2012` builder prepares.

The layout is exactly the one image-net.org ships (REFERENCE.md section 4):

- `ILSVRC2012_img_train.tar`: a tar of per-class tars `n<8 digits>.tar`, each holding `n<8 digits>_<i>.JPEG`;
- `ILSVRC2012_img_val.tar`: flat `ILSVRC2012_val_%08d.JPEG`. tfds labels them with its bundled
  `validation_labels.txt` by sorted file name, so the k-th validation image gets that file's k-th label; the
  classes written here are those labels, so every validation image's class also has training images.

Images are real baseline JPEGs of varied sizes (ImageNet-like 500x375 and 375x500, smaller and larger ones,
some grayscale; no CMYK) with a class-dependent colour and stripe pattern, so a net can tell classes apart.

Usage: python scripts/make_tiny_imagenet.py MANUAL_DIR [--classes 8] [--train-per-class 4]
           [--corrupt-train N] [--no-train]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile

import numpy as np
from PIL import Image

SIZES = ((500, 375), (375, 500), (320, 240), (640, 480), (256, 256), (200, 150), (300, 400), (180, 260))


def validation_labels(count: int) -> list[str]:
    """The first `count` synsets of tfds's bundled validation_labels.txt (what tfds will assign)."""
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    with open(os.fspath(path)) as f:
        return f.read().split()[:count]


def make_jpeg(cls: int, index: int, rng: np.random.Generator, size: tuple[int, int], gray: bool) -> bytes:
    """A JPEG whose mean colour and stripe direction depend on the class, with noise per image."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.pi * cls / 8
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / (4 + cls))
    base = np.array([(cls * 67) % 256, (cls * 131 + 50) % 256, (cls * 29 + 100) % 256], np.float32)
    image = base * 0.6 + 100 * stripes[..., None] + rng.normal(0, 12, (h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    pil = Image.fromarray(image)
    if gray:
        pil = pil.convert("L")
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def corrupt(data: bytes) -> bytes:
    """Keep the JPEG header, cut the entropy-coded data short and fill the rest with garbage."""
    cut = len(data) // 3
    return data[:cut] + bytes(range(256)) * 4


def write_tiny_imagenet(manual_dir: str, classes: int = 8, train_per_class: int = 4, corrupt_train: int = 0,
                        train: bool = True, val: bool = True, seed: int = 0) -> dict[str, int]:
    """Write the archives; returns the number of images per split. Image k of class c is grayscale if
    (c + k) % 5 == 0. `corrupt_train` damages that many training JPEGs (for the bad-input tests)."""
    os.makedirs(manual_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    synsets = validation_labels(classes)
    counts = {"train": 0, "validation": 0}
    if train:
        with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
            for c, synset in enumerate(synsets):
                inner_buf = io.BytesIO()
                with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                    for k in range(train_per_class):
                        data = make_jpeg(c, k, rng, SIZES[(c + k) % len(SIZES)], gray=(c + k) % 5 == 0)
                        if counts["train"] < corrupt_train:
                            data = corrupt(data)
                        _add(inner, f"{synset}_{k + 1}.JPEG", data)
                        counts["train"] += 1
                _add(outer, f"{synset}.tar", inner_buf.getvalue())
    if val:
        with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
            for k in range(classes):
                data = make_jpeg(k, 100 + k, rng, SIZES[(3 * k + 1) % len(SIZES)], gray=k % 4 == 3)
                _add(tar, f"ILSVRC2012_val_{k + 1:08d}.JPEG", data)
                counts["validation"] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manual_dir")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=4)
    p.add_argument("--corrupt-train", type=int, default=0)
    p.add_argument("--no-train", action="store_true", help="write only the validation tar")
    a = p.parse_args()
    counts = write_tiny_imagenet(a.manual_dir, a.classes, a.train_per_class, a.corrupt_train, train=not a.no_train)
    print(f"wrote {counts} to {a.manual_dir}")


if __name__ == "__main__":
    main()
