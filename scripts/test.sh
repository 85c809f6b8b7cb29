#!/usr/bin/env bash
# Run the test suite: creates .venv if missing, installs alexnet_jax with its test and torch extras (torch's CPU
# build, pinned in pyproject.toml: the conversion parity and yardstick tests need it and fail without it), runs pytest.
# Usage: scripts/test.sh [pytest args]
#
# Two sets of libraries (docs/development.md, "Versions"); CI (.ci/run) runs both:
# - today's (the default): Python 3.11 (python3, or $PYTHON) in .venv, the newest releases that install there
#   (jax 0.10.2: jax 0.11 dropped Python 3.11), PyTorch's CPU build: every test;
# - ALEXNET_TEST_SET=newest: Python 3.12 (python3.12, or $PYTHON) in .venv-newest, set up as a Colab runtime is:
#   the newest TensorFlow (`tensorflow`, not -cpu), tensorflow-datasets, JAX, flax and ipykernel first, then
#   alexnet_jax through the notebook's installer (scripts/runtime_install.py, which adds only what is missing).
#   No PyTorch there (no CPU build of it for 3.12 on this machine's disk; PyPI's is a multi-GB CUDA build): the
#   tests marked `torch` are left out, counted in pytest's "deselected".
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${ALEXNET_TEST_SET:-today}
# A Python 3.12 that runs: python3.12 on PATH (a pyenv shim answers there even where its version is not selected,
# then fails), else pyenv's newest 3.12.x
python312() {
  local candidate
  for candidate in python3.12 $(ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python3 2>/dev/null \
                                | sort -V | tail -1); do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
}
case $SET in
  today) VENV=.venv PYTHON=${PYTHON:-python3} ;;
  newest) VENV=.venv-newest PYTHON=${PYTHON:-$(python312)} ;;
  *) echo "scripts/test.sh: error: ALEXNET_TEST_SET=$SET: use today (the default) or newest" >&2; exit 2 ;;
esac
if [ ! -x $VENV/bin/python ]; then
  if [ -z "$PYTHON" ] || ! "$PYTHON" -c '' >/dev/null 2>&1; then
    echo "scripts/test.sh: error: no working Python for the $SET set (${PYTHON:-python3.12 not found}): install it" \
         "(pyenv install 3.12) or set PYTHON=/path/to/python" >&2
    exit 1
  fi
  "$PYTHON" -m venv $VENV
fi
# --no-compile: no .pyc for every installed file (torch's install took 118 s with them, 27 s without, on the
# 2-core machine); Python compiles the modules the tests import when they are first imported.
PIP=($VENV/bin/python -m pip install --quiet --disable-pip-version-check --no-compile)

# uv installs the same packages as pip (the same versions: `pip freeze` of both venvs is identical here) in ~15 s
# instead of ~75 s on the 2-core machine, fresh caches for both (parallel downloads and unpacking). uv does not
# read pip's configuration, so this machine's (`pip config list`: a constraints file, local indexes, the CPU torch
# wheel in find-links) is passed to it, and it picks the best version across all indexes as pip does.
uv_install() {
  "${PIP[@]}" uv >/dev/null 2>&1 || return 1
  local args=(--quiet --python $VENV/bin/python --index-strategy unsafe-best-match) key value v
  while IFS= read -r line; do
    key=${line%%=*} key=${key##*.} value=${line#*=} value=${value#\'} value=${value%\'}
    case $key in
      constraint|extra-index-url|find-links|index-url) for v in $value; do args+=("--$key" "$v"); done ;;
      cert) export SSL_CERT_FILE=$value ;;  # uv reads the CA bundle from here
    esac
  done < <($VENV/bin/python -m pip config list 2>/dev/null)
  $VENV/bin/uv pip install "${args[@]}" "$@"
}
if [ "$SET" = newest ]; then
  # the runtime as Colab has it, then the notebook's install (which must add no second TensorFlow: tested by
  # tests/test_runtime_install.py in a runtime of its own)
  # jax/jaxlib 0.12.1 left out: its gloo collectives hang a multi-process CPU run (2 processes x 2 devices: every
  # device thread waits in gloo's allreduce; tests/test_photo_stream.py, 3 runs of 3); 0.12.0.1 runs it (docs/development.md, Versions)
  uv_install tensorflow tensorflow-datasets "jax!=0.12.1" "jaxlib!=0.12.1" flax ipykernel
  $VENV/bin/python scripts/runtime_install.py --extras test
  MARK=(-m "not torch")
  echo "scripts/test.sh: the newest set leaves out the tests marked 'torch' (PyTorch is not installed for" \
       "Python 3.12 here): counted at the end" >&2
else
  if ! uv_install -e ".[test,torch]"; then
    echo "note: installing with pip (uv was not available or failed)" >&2
    if ! "${PIP[@]}" -e ".[test,torch]"; then  # e.g. offline with no torch wheel at hand: the rest still runs
      echo "warning: could not install the torch extra (torch==2.13.0, CPU build); the PyTorch-based tests will" \
           "fail saying so" >&2
      "${PIP[@]}" -e ".[test]"
    fi
  fi
  # today's set leaves out the emulated Colab runtime (tests/test_runtime_install.py, marker `runtime`: a venv with
  # TensorFlow and a notebook run, ~70 s): Colab's Python is 3.12, so it runs in the newest set, which CI runs too
  MARK=(-m "not runtime")
  echo "scripts/test.sh: today's set leaves out the test marked 'runtime' (the emulated Colab runtime, run by" \
       "ALEXNET_TEST_SET=newest scripts/test.sh, as CI does): counted at the end" >&2
fi
# This machine's environment sets PYTHONDONTWRITEBYTECODE=1, so every Python process compiled TensorFlow's, JAX's and
# our sources from scratch: `import tensorflow` took 12.5 s of CPU each time instead of 3-5 s, in each of the ~40
# command-line runs the suite starts. Cache the bytecode of what is actually imported (into the gitignored
# __pycache__ folders); the first import pays once.
unset PYTHONDONTWRITEBYTECODE
# Three pytest workers (pytest-xdist), whole files per worker (module fixtures compile once): much of the suite is
# single-threaded compilation, Python, and waiting on the processes a test starts, so on 2 cores two workers kept
# them under half busy (CPU time / wall time, 2 cores). A third finished today's set in 493 s instead of 561 s (2026-12-06,
# 2-core EPYC). PYTEST_WORKERS=2 for the old split; PYTEST_WORKERS=0 runs serially.
# --no-loadscope-reorder: keep tests/conftest.py's heaviest-first file order (xdist otherwise orders files by their
# number of tests, which left the two single-test 2-minute recipe checks running alone at the end).
exec $VENV/bin/python -m pytest -n "${PYTEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "${MARK[@]}" "$@"
