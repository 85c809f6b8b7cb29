#!/usr/bin/env python3
"""conv1's kernels as the paper's Figure 3: `python scripts/plot_filters.py --workdir DIR [--step N] [--out PNG]`.

Writes WORKDIR/conv1_filters.png by default: one tile per kernel (min-max scaled), the two groups of the
two-GPU net in separate blocks; grayscale tiles for 1-channel (FashionMNIST) models.
"""

import argparse
import sys

from alexnet_jax import figures
from alexnet_jax.errors import UserError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run's --workdir (holds checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", default=None, help="PNG path (default: WORKDIR/conv1_filters.png)")
    args = p.parse_args()
    try:
        print(figures.plot_filters(args.workdir, args.out, args.step))
    except UserError as e:
        sys.exit(f"plot_filters: error: {e}")


if __name__ == "__main__":
    main()
