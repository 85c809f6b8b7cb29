"""Write a folder of generated photos as people have them, for `--config.dataset=folder` (tests, README demo).

`ROOT/<class>/*` (one training split; `--split-dirs` writes `ROOT/train/<class>/*` and `ROOT/val/<class>/*`),
classes `class_a`, `class_b`, ... Each image shows its class's stripe direction and colour, with noise, at a
size drawn from photo-like sizes; its file format and mode cycle through RGB JPEG, CMYK JPEG, grayscale JPEG,
RGBA PNG, 16-bit grayscale PNG, palette GIF, BMP and 8-bit RGB PNG, so every conversion path is exercised.
`--bad` adds one truncated JPEG and one text file named `.jpg` to the first class.

Usage: python scripts/make_photo_folder.py ROOT [--classes 3] [--per-class 30] [--split-dirs] [--bad]
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
from PIL import Image

SIZES = ((120, 90), (90, 120), (160, 120), (100, 100), (75, 60), (200, 150), (64, 96), (140, 105))
KINDS = ("rgb_jpeg", "cmyk_jpeg", "gray_jpeg", "rgba_png", "gray16_png", "palette_gif", "bmp", "rgb_png")


def pixels(cls: int, classes: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint8: stripes at the class's angle in the class's colour, plus noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.pi * cls / classes
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3.0 + phase)
    colour = np.array([(cls * 97 + 40) % 256, (cls * 151 + 90) % 256, (cls * 53 + 160) % 256], np.float32)
    image = colour * (0.4 + 0.6 * stripes[..., None]) + rng.normal(0, 12, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def save(array: np.ndarray, path_stem: str, kind: str) -> str:
    """Save in the kind's format and mode; returns the path written."""
    image = Image.fromarray(array)
    if kind == "rgb_jpeg":
        path = path_stem + ".jpg"
        image.save(path, "JPEG", quality=90)
    elif kind == "cmyk_jpeg":
        path = path_stem + ".jpeg"
        image.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "gray_jpeg":
        path = path_stem + ".JPG"
        image.convert("L").save(path, "JPEG", quality=90)
    elif kind == "rgba_png":
        path = path_stem + ".png"
        rgba = np.concatenate([array, np.full(array.shape[:2] + (1,), 200, np.uint8)], axis=-1)
        Image.fromarray(rgba, "RGBA").save(path)
    elif kind == "gray16_png":
        path = path_stem + ".png"
        gray = np.asarray(image.convert("L"), np.uint16) * 257
        Image.fromarray(gray).save(path)  # uint16: mode I;16
    elif kind == "palette_gif":
        path = path_stem + ".gif"
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
    elif kind == "bmp":
        path = path_stem + ".bmp"
        image.save(path)
    else:
        path = path_stem + ".png"
        image.save(path)
    return path


def write_photo_folder(root: str, classes: int = 3, per_class: int = 30, split_dirs: bool = False,
                       val_per_class: int = 5, bad: bool = False, seed: int = 0) -> dict[str, list[str]]:
    """Write the folder; returns {kind: [paths]} (kinds of `KINDS`, plus 'bad' with `bad=True`)."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[str]] = {}
    splits = {"train": per_class, "val": val_per_class} if split_dirs else {"": per_class}
    for split, count in splits.items():
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{chr(ord('a') + c)}")
            os.makedirs(folder, exist_ok=True)
            for k in range(count):
                kind = KINDS[(c + k) % len(KINDS)]
                size = SIZES[int(rng.integers(len(SIZES)))]
                path = save(pixels(c, classes, size, rng), os.path.join(folder, f"img_{k:04d}"), kind)
                written.setdefault(kind, []).append(path)
    if bad:
        first = os.path.join(root, "train" if split_dirs else "", "class_a")
        buf = io.BytesIO()
        Image.fromarray(pixels(0, classes, (120, 90), rng)).save(buf, "JPEG", quality=90)
        truncated = os.path.join(first, "truncated.jpg")
        with open(truncated, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        text = os.path.join(first, "notes.jpg")
        with open(text, "w") as f:
            f.write("not a photo: a text file someone named .jpg\n")
        written["bad"] = [truncated, text]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--split-dirs", action="store_true")
    parser.add_argument("--bad", action="store_true")
    args = parser.parse_args()
    written = write_photo_folder(args.root, args.classes, args.per_class, args.split_dirs, bad=args.bad)
    print(f"wrote {sum(len(v) for v in written.values())} files under {args.root}: "
          + ", ".join(f"{k} {len(v)}" for k, v in written.items()))


if __name__ == "__main__":
    main()
