"""Prepare ILSVRC-2012 for training: tfds's own `imagenet2012` builder on the manually downloaded archives.

1. Register at https://image-net.org/download-images and download ILSVRC2012_img_train.tar (138 GB) and
   ILSVRC2012_img_val.tar (6.3 GB) into one folder, the manual dir.
2. python scripts/prepare_imagenet.py --manual_dir /path/to/that/folder [--data_dir /where/prepared/goes]
   (--data_dir means what it means to tfds.load and to --config.data_dir; unset: tfds's default,
   ~/tensorflow_datasets). Afterwards every JPEG is decoded once so a damaged archive is reported by file name.
3. python -m alexnet_jax.main --config configs/imagenet.py --workdir runs/imagenet [--config.data_dir ...]

`--verify_only` lists the JPEGs of an already prepared copy that do not decode.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alexnet_jax.data import imagenet, records  # noqa: E402
from alexnet_jax.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manual_dir", default="", help="folder holding ILSVRC2012_img_train.tar and "
                   "ILSVRC2012_img_val.tar (default: tfds's <data_dir>/downloads/manual)")
    p.add_argument("--data_dir", default="", help="where tfds keeps prepared datasets (default: tfds's)")
    p.add_argument("--skip_verify", action="store_true", help="do not decode every image after preparing")
    p.add_argument("--verify_only", action="store_true", help="only list the prepared JPEGs that do not decode")
    a = p.parse_args(argv)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    data_dir = os.path.expanduser(a.data_dir) if a.data_dir else None
    try:
        if a.verify_only:
            builder = imagenet.open_builder(data_dir)
            if not builder.is_prepared():
                raise UserError(f"{imagenet.NAME} is not prepared in {builder.data_dir_root}: run without "
                                "--verify_only first")
            builder = records.random_access(builder)  # (a TFRecord copy: its array_record copy written first)
            bad = {s: imagenet.find_undecodable(builder, s) for s in builder.info.splits}
            for split, names in bad.items():
                print(f"{split}: {len(names)} JPEG(s) do not decode" + (": " + ", ".join(names) if names else ""))
            return 1 if any(bad.values()) else 0
        builder = imagenet.prepare(data_dir, a.manual_dir, verify=not a.skip_verify)
    except UserError as e:
        print(f"prepare_imagenet: error: {e}", file=sys.stderr)
        return 2
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f"{imagenet.NAME} prepared in {builder.data_dir}: {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
