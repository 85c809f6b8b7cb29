#!/usr/bin/env bash
# The quick start: set up .venv, make sure FashionMNIST is on disk, train the small AlexNet on it.
# Usage: scripts/demo.sh [WORKDIR] [--config.key=value ...]   (default WORKDIR: runs/fashion_mnist)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/fashion_mnist}
shift || true
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo -n")
    echo "Installing Debian's dataset-fashion-mnist (the original FashionMNIST files) ..."
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "No $FMNIST and no usable apt: tfds will download fashion_mnist instead (needs internet)."
  fi
fi
# Where the environment sets PYTHONDONTWRITEBYTECODE (this project's machines do), each of the four commands below
# would compile TensorFlow's Python sources again (~12 s of CPU each): keep the bytecode of what they import.
unset PYTHONDONTWRITEBYTECODE
.venv/bin/python -m alexnet_jax.main --config configs/fashion_mnist.py --workdir "$WORKDIR" "$@"
# Figures (PNG, no TensorBoard needed): training curves and the conv1 kernels (the paper's Figure 3).
.venv/bin/python scripts/plot_curves.py --workdir "$WORKDIR"
.venv/bin/python scripts/plot_filters.py --workdir "$WORKDIR"
# The paper's Figure 4 (right): test images beside the training images nearest to them in fc7's activations.
.venv/bin/python -m alexnet_jax.features --workdir "$WORKDIR" --neighbours 6 --queries 6 \
  --figure "$WORKDIR/neighbours.png"
