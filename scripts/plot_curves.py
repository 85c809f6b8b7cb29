#!/usr/bin/env python3
"""Training curves: `python scripts/plot_curves.py --workdir DIR [--out PNG]`.

Reads the TensorBoard event files the trainer wrote into WORKDIR and draws loss, top-1/top-5 accuracy (train
and test) and the learning rate against steps, with epochs on the top axis, into WORKDIR/curves.png.
"""

import argparse
import sys

from alexnet_jax import figures
from alexnet_jax.errors import UserError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run's --workdir")
    p.add_argument("--out", default=None, help="PNG path (default: WORKDIR/curves.png)")
    args = p.parse_args()
    try:
        print(figures.plot_curves(args.workdir, args.out))
    except UserError as e:
        sys.exit(f"plot_curves: error: {e}")


if __name__ == "__main__":
    main()
