"""Time a resumed training stream's first batch: at the first step of an epoch and at its last step.

Writes an ILSVRC-format archive of ILSVRC-2012-sized JPEGs (`--classes` x `--per-class`, quality 97, ~107 KB each),
prepares it with tfds's imagenet2012 builder, then times the first batch of the training stream started at step 0
and at the epoch's last step, twice each. Before records were read by index, a stream resumed at step N read and
skipped N mod steps_per_epoch batches of records first; now it reads step N's records first. The same script runs
on older checkouts (PYTHONPATH=OLD_CHECKOUT: the code before has `imagenet.train_records`), which is how
docs/notes/2026-12.md's before/after figures were taken.

Usage: python scripts/time_resume.py [--classes 16] [--per-class 128] [--batch 32]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--per-class", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "scripts", "make_tiny_imagenet.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    from alexnet_jax import default_config
    from alexnet_jax.data import base, imagenet

    with tempfile.TemporaryDirectory() as tmp:
        manual, data_dir = os.path.join(tmp, "manual"), os.path.join(tmp, "data")
        tiny.write_tiny_imagenet(manual, classes=a.classes, train_per_class=a.per_class, val_per_class=1,
                                 sizes=tiny.REALISTIC_SIZES, quality=97)
        with contextlib.redirect_stdout(sys.stderr):
            builder = imagenet.prepare(data_dir, manual, verify=False)
        config = default_config.get_config()
        config.data_dir, config.batch_size = data_dir, a.batch
        stats = {"mean_image": np.full((256, 256, 3), 115.0, np.float32), "mean": np.full(3, 115.0, np.float32),
                 "std": np.ones(3, np.float32)}
        norm = base.normalisation_for(config, stats)  # (the config reads as a DataSpec here)
        n = builder.info.splits["train"].num_examples
        per_epoch = n // a.batch

        def first_batch(start: int) -> float:
            if hasattr(imagenet, "train_records"):  # the code before records by index
                config.shuffle_buffer = 1000
                ds = imagenet.train_dataset(builder, config, norm, start, start + 1)
            else:
                from alexnet_jax.data import DataSpec, photos, sources

                ds = photos.train_dataset(sources.imagenet_source(builder), DataSpec.from_config(config), norm, start,
                                          start + 1)
            t0 = time.perf_counter()
            next(iter(ds))
            return time.perf_counter() - t0

        first_batch(0)  # (tracing, thread pools, the page cache)
        for start in (0, per_epoch - 1, 0, per_epoch - 1):
            print(f"{n} images, {per_epoch} steps per epoch: the first batch of a stream started at step {start}: "
                  f"{first_batch(start):.3f} s")


if __name__ == "__main__":
    main()
