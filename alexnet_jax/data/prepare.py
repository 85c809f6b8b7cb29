"""Prepare a config's photos as the paper's 256x256 squares, once: `python -m alexnet_jax.data.prepare --config
configs/imagenet.py [--config.data_dir=/data/tfds] [--config.prepared_format=raw|jpeg] [--config.manual_dir=...]`,
or `--config configs/folder.py --config.folder=PHOTOS`, or any tfds dataset (`--config.dataset=NAME`).

Reads the config's prepared source (ImageNet: prepared first from the two ILSVRC-2012 tars in `manual_dir` when
it is not; a folder or a tfds dataset: prepared as training would), writes its `photo_squares` tfds dataset beside
it (alexnet_jax/data/squares.py) with a progress bar (images/s, ETA); rerun the same command after an interruption
and it resumes. Train from it with the same config and `--config.prepared=True` (same `prepared_format` /
`resize_size` / `resize_method` / splits).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from alexnet_jax.data import squares  # noqa: E402
from alexnet_jax.data.spec import DataSpec  # noqa: E402
from alexnet_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/imagenet.py or configs/folder.py",
                                          lock_config=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"alexnet_jax.data.prepare: error: unexpected arguments {argv[1:]}")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    logging.set_verbosity(logging.INFO)
    config = _CONFIG.value
    if config is None:
        sys.exit("alexnet_jax.data.prepare: error: give --config configs/imagenet.py")
    try:
        config.prepared = True  # (what is prepared is what --config.prepared=True reads: its keys are checked)
        builder = squares.prepare(DataSpec.from_config(config))
    except UserError as e:
        sys.exit(f"alexnet_jax.data.prepare: error: {e}")
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} images, {info.num_bytes / max(1, info.num_examples) / 1024:.1f} KiB "
              f"per image, {info.num_shards} shards")
    print(f"prepared {builder.name}/{builder.builder_config.name} in {builder.data_dir}; train with "
          f"--config.prepared=True --config.prepared_format={config.prepared_format}")


if __name__ == "__main__":
    app.run(main)
