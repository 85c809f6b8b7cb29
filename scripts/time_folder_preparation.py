"""Time the preparation of a folder of photo-sized JPEGs (`--config.dataset=folder`), as a user's first run pays it.

Writes ROOT (once) with `--photos` RGB JPEGs of 500x375 / 375x500 (quality 90, in `--classes` class folders), then
prepares it into a fresh tfds data_dir with `alexnet_jax.data.folder.prepare` and prints the seconds, images/s and
the process's CPU seconds. The same script runs on older checkouts (PYTHONPATH=OLD_CHECKOUT), which is how
docs/notes/2026-12.md's before/after figures were taken.

Usage: python scripts/time_folder_preparation.py ROOT [--photos 2000] [--classes 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np
from PIL import Image


def write_photos(root: str, photos: int, classes: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(photos):
        folder = os.path.join(root, f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        w, h = (500, 375) if i % 2 else (375, 500)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = 128 + 60 * np.sin(xx / (9 + i % 7) + yy / (13 + i % 5))[..., None] * np.array([1.0, 0.7, 0.4])
        pixels = np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"IMG_{i:05d}.jpg"), "JPEG", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=4)
    args = parser.parse_args()
    if not os.path.isdir(args.root):
        write_photos(args.root, args.photos, args.classes)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from alexnet_jax.data import folder

    data_dir = tempfile.mkdtemp(prefix="folder_prep_")
    try:
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        builder, _ = folder.prepare(args.root, data_dir)
        seconds, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        n = builder.info.splits["train"].num_examples
        cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        print(f"prepared {n} images in {seconds:.2f} s ({n / seconds:.0f} images/s), {cpu:.2f} CPU s "
              f"(load {os.getloadavg()[0]:.2f} at the end)")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
