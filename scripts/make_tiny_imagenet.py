"""Write a tiny ILSVRC-2012 manual-download folder that tfds's real `imagenet2012` builder prepares.

The layout is exactly the one image-net.org ships (REFERENCE.md section 4):

- `ILSVRC2012_img_train.tar`: a tar of per-class tars `n<8 digits>.tar`, each holding `n<8 digits>_<i>.JPEG`;
- `ILSVRC2012_img_val.tar`: flat `ILSVRC2012_val_%08d.JPEG`. tfds labels them with its bundled
  `validation_labels.txt` by sorted position, so the k-th validation member gets that file's k-th label
  whatever the image shows. Two layouts follow from that:
  - default: one validation image per class, the classes being the list's first `classes` labels;
  - `--val-per-class M`: a real 4-class (or C-class) validation set. The C synsets whose M-th validation image
    comes earliest in the list are the classes; their images keep their real ILSVRC file names (so their real
    labels), and every other position up to the last one kept holds an empty directory entry of that name,
    which takes its label in tfds's sorted list but yields no example. A subset of the real validation tar
    needs the same placeholders, or tfds labels it wrongly (docs/imagenet.md).

Images are real baseline JPEGs of varied sizes (ImageNet-like 500x375 and 375x500, smaller and larger ones,
some grayscale; no CMYK) with a class-dependent colour and stripe pattern, so a net can tell classes apart.

Usage: python scripts/make_tiny_imagenet.py MANUAL_DIR [--classes 8] [--train-per-class 4]
           [--val-per-class M] [--corrupt-train N] [--no-train]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from collections.abc import Callable

import numpy as np
from PIL import Image

SIZES = ((500, 375), (375, 500), (320, 240), (640, 480), (256, 256), (200, 150), (300, 400), (180, 260))
# ILSVRC-2012's typical sizes, averaging about 410x370 (the real average is about 400x350): for benchmarks
REALISTIC_SIZES = ((500, 375), (375, 500), (500, 333), (400, 300), (300, 400), (500, 400), (350, 350), (375, 275))


def all_validation_labels() -> list[str]:
    """tfds's bundled validation_labels.txt: the synset of the k-th (sorted) validation member."""
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    with open(os.fspath(path)) as f:
        return f.read().split()


def validation_labels(count: int) -> list[str]:
    """The first `count` synsets of tfds's bundled validation_labels.txt (what tfds will assign)."""
    return all_validation_labels()[:count]


def balanced_validation(classes: int, per_class: int) -> tuple[list[str], dict[str, list[int]]]:
    """The `classes` synsets whose `per_class`-th validation image comes first in tfds's list, and the
    0-based positions of their first `per_class` images (their real ILSVRC2012_val indices minus one)."""
    labels = all_validation_labels()
    where: dict[str, list[int]] = {}
    for k, synset in enumerate(labels):
        where.setdefault(synset, []).append(k)
    chosen = sorted(where, key=lambda s: (where[s][per_class - 1], s))[:classes]
    return chosen, {s: where[s][:per_class] for s in chosen}


def _add_placeholder(tar: tarfile.TarFile, name: str) -> None:
    """An empty directory entry: it takes a position in tfds's sorted label list but yields no example."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def make_jpeg(cls: int, index: int, rng: np.random.Generator, size: tuple[int, int], gray: bool,
              classes: int = 8, quality: int = 85) -> bytes:
    """A JPEG whose mean colour and stripe direction depend on the class, with noise per image; the stripe
    directions of `classes` classes are spread over the half circle (so grayscale images stay separable)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.pi * cls / min(classes, 8)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / (4 + cls))
    base = np.array([(cls * 67) % 256, (cls * 131 + 50) % 256, (cls * 29 + 100) % 256], np.float32)
    image = base * 0.6 + 100 * stripes[..., None] + rng.normal(0, 12, (h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    pil = Image.fromarray(image)
    if gray:
        pil = pil.convert("L")
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
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
                        train: bool = True, val: bool = True, seed: int = 0,
                        val_per_class: int = 0, truncate_train: int = 0,
                        sizes: tuple[tuple[int, int], ...] = SIZES, quality: int = 85,
                        train_image: Callable[[int, int, np.random.Generator], bytes] | None = None
                        ) -> dict[str, int]:
    """Write the archives; returns the number of images per split. Image k of class c is grayscale if
    (c + k) % 5 == 0. `corrupt_train` damages that many training JPEGs (for the bad-input tests);
    `truncate_train` cuts that many (after the corrupted ones) to their first 90%, as an interrupted copy would.
    `sizes`: the (width, height) sizes images cycle through (`REALISTIC_SIZES`: ILSVRC-2012's ~400x350 average);
    `quality`: their JPEG quality (97 on `REALISTIC_SIZES` gives ~110 KB per image, ILSVRC-2012's average).
    `train_image(c, k, rng)`, if given, makes training image k of class c instead (JPEG bytes).
    `val_per_class` > 0: that many validation images of every class, labelled correctly by tfds (see above)."""
    os.makedirs(manual_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    if val_per_class > 0:
        synsets, val_positions = balanced_validation(classes, val_per_class)
    else:
        synsets = validation_labels(classes)
        val_positions = {s: [k] for k, s in enumerate(synsets)}
    counts = {"train": 0, "validation": 0}
    if train:
        with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
            for c, synset in enumerate(synsets):
                inner_buf = io.BytesIO()
                with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                    for k in range(train_per_class):
                        data = train_image(c, k, rng) if train_image else make_jpeg(
                            c, k, rng, sizes[(c + k) % len(sizes)], gray=(c + k) % 5 == 0, classes=classes,
                            quality=quality)
                        if counts["train"] < corrupt_train:
                            data = corrupt(data)
                        elif counts["train"] < corrupt_train + truncate_train:
                            data = data[: len(data) * 9 // 10]
                        _add(inner, f"{synset}_{k + 1}.JPEG", data)
                        counts["train"] += 1
                _add(outer, f"{synset}.tar", inner_buf.getvalue())
    if val:
        class_at = {k: c for c, s in enumerate(synsets) for k in val_positions[s]}
        with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
            for k in range(max(class_at) + 1):
                name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
                if k not in class_at:
                    _add_placeholder(tar, name)
                    continue
                c, i = class_at[k], counts["validation"]
                data = make_jpeg(c, 100 + i, rng, sizes[(3 * i + 1) % len(sizes)], gray=i % 4 == 3,
                                 classes=classes, quality=quality)
                _add(tar, name, data)
                counts["validation"] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manual_dir")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=4)
    p.add_argument("--val-per-class", type=int, default=0,
                   help="validation images per class (0: one per class, the list's first classes)")
    p.add_argument("--corrupt-train", type=int, default=0)
    p.add_argument("--no-train", action="store_true", help="write only the validation tar")
    a = p.parse_args()
    counts = write_tiny_imagenet(a.manual_dir, a.classes, a.train_per_class, a.corrupt_train, train=not a.no_train,
                                 val_per_class=a.val_per_class)
    print(f"wrote {counts} to {a.manual_dir}")


if __name__ == "__main__":
    main()
