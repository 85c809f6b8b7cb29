#!/usr/bin/env bash
# The quick start: set up .venv, make sure FashionMNIST is on disk, train the small AlexNet on it.
# Usage: scripts/demo.sh [WORKDIR] [--config.key=value ...]   (default WORKDIR: runs/fashion_mnist)
#        scripts/demo.sh --config.num_epochs=1            (overrides with or without a WORKDIR)
# ALEXNET_DEMO_TRAIN_ONLY=1 prints the training command instead of running anything (what the tests check).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=runs/fashion_mnist
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then  # a first argument that is not a flag is the WORKDIR
  WORKDIR=$1
  shift
fi
PYTHON=${PYTHON:-python3}
TRAIN=(-m alexnet_jax.main --config configs/fashion_mnist.py --workdir "$WORKDIR" "$@")
if [ "${ALEXNET_DEMO_TRAIN_ONLY:-}" = 1 ]; then
  echo "python ${TRAIN[*]}"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "scripts/demo.sh: error: alexnet_jax needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1 || echo missing)." \
         "Install a newer Python and run PYTHON=python3.11 scripts/demo.sh" >&2
    exit 1
  fi
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
.venv/bin/python "${TRAIN[@]}"
# Figures (PNG, no TensorBoard needed): training curves and the conv1 kernels (the paper's Figure 3).
.venv/bin/python scripts/plot_curves.py --workdir "$WORKDIR"
.venv/bin/python scripts/plot_filters.py --workdir "$WORKDIR"
# The paper's Figure 4 (right): test images beside the training images nearest to them in fc7's activations.
.venv/bin/python -m alexnet_jax.features --workdir "$WORKDIR" --neighbours 6 --queries 6 \
  --figure "$WORKDIR/neighbours.png"
