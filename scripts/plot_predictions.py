#!/usr/bin/env python3
"""Test images with predicted and true labels, and the confusion matrix, for FashionMNIST/CIFAR-10 runs:
`python scripts/plot_predictions.py --workdir DIR [--step N] [--max_images N]`.

Writes WORKDIR/predictions.png (the first 32 test images, titled 'predicted (true)', green when right) and
WORKDIR/confusion.png (counts of true class x predicted class over the test images used).
"""

import argparse
import sys

from alexnet_jax import figures
from alexnet_jax.errors import UserError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run's --workdir (holds checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--max_images", type=int, default=None, help="use only the first N test images (default: all)")
    args = p.parse_args()
    try:
        for path in figures.plot_predictions(args.workdir, args.step, args.max_images):
            print(path)
    except UserError as e:
        sys.exit(f"plot_predictions: error: {e}")


if __name__ == "__main__":
    main()
