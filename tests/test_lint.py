"""The code stays ruff clean (rules in pyproject.toml)."""

import subprocess
import sys


def test_ruff_clean(repo):
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "alexnet_jax", "configs", "tests", "scripts"],
                            cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
