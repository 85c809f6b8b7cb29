"""Install alexnet_jax into a runtime that already has TensorFlow, JAX and friends (Colab), replacing nothing.

`pip install -e .` on such a runtime would add `tensorflow-cpu` beside the runtime's `tensorflow` (pyproject.toml
asks for the CPU build on x86_64): two distributions writing one `tensorflow/` package, which a later upgrade or
uninstall breaks; and it could move the runtime's JAX off the version its accelerator plugin was built for. This
script instead:

- installs the package itself with `--no-deps` (editable: the checkout's code);
- leaves every requirement the runtime already satisfies alone; any TensorFlow distribution (`tensorflow`,
  `tensorflow-cpu`, ...) satisfies a TensorFlow requirement;
- stops in one line, installing nothing, when the runtime has a requirement at a version outside the range
  pyproject.toml asks for (which one, which version, what to do);
- installs only what is missing, with every distribution already there pinned to its version (a pip constraints
  file), so pip cannot upgrade or replace one to satisfy the new ones.

Usage: python scripts/runtime_install.py [--extras test] [--dry-run]   (the notebook's install cell runs it)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The distributions that install the `tensorflow` package: one of them satisfies any of them.
TENSORFLOW = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos",
              "tf-nightly", "tf-nightly-cpu")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{canonical name: version} of this interpreter's distributions."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)
    return out


def requirements(extras: list[str]) -> list[str]:
    """pyproject.toml's dependencies (and those of `extras`) whose markers hold on this interpreter."""
    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            sys.exit(f"runtime_install: error: pyproject.toml has no extra {extra!r}")
        wanted += project["optional-dependencies"][extra]
    return [r for r in wanted if (marker := Requirement(r).marker) is None or marker.evaluate()]


def plan(wanted: list[str], have: dict[str, str]) -> tuple[list[str], list[str]]:
    """(requirements to install, one-line problems): a requirement the runtime satisfies is dropped; one it holds
    at a version outside the range is a problem; one it lacks is installed."""
    from packaging.requirements import Requirement

    missing, problems = [], []
    for text in wanted:
        req = Requirement(text)
        name = canonical(req.name)
        present = [n for n in (TENSORFLOW if name in TENSORFLOW else (name,)) if n in have]
        if not present:
            missing.append(text)
            continue
        found = present[0]
        if not req.specifier.contains(have[found], prereleases=True):
            problems.append(f"this runtime has {found} {have[found]}, and alexnet_jax needs {req.name}{req.specifier}"
                            f" (pyproject.toml): install a version in that range first (pip install "
                            f"'{found}{req.specifier}'), restart the runtime, and run this cell again")
    return missing, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--extras", default="", help="comma-separated extras of pyproject.toml, e.g. test")
    parser.add_argument("--dry-run", action="store_true", help="print what would be installed, install nothing")
    args = parser.parse_args()
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    try:
        import packaging.requirements  # noqa: F401  (a runtime with TensorFlow has it: TensorFlow requires it)
    except ImportError:
        subprocess.check_call([*pip, "packaging"])
    have = installed()
    missing, problems = plan(requirements([e for e in args.extras.split(",") if e]), have)
    if problems:
        sys.exit("runtime_install: error: " + problems[0] + (f" ({len(problems) - 1} more such)"
                                                             if len(problems) > 1 else ""))
    print(f"runtime_install: the runtime has what alexnet_jax needs but {len(missing)} distribution(s)"
          + (f": installing {', '.join(missing)}" if missing else "") + "; nothing already here is replaced")
    if args.dry_run:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"{name}=={version}\n" for name, version in sorted(have.items())
                        if name not in ("pip", "setuptools", "wheel", "alexnet-jax")))
        constraints = f.name
    try:
        if missing:
            subprocess.check_call([*pip, "--constraint", constraints, *missing])
        subprocess.check_call([*pip, "--no-deps", "--no-build-isolation", "-e", ROOT] if _has_setuptools(have)
                              else [*pip, "--no-deps", "-e", ROOT])
    except subprocess.CalledProcessError as e:
        sys.exit(f"runtime_install: error: pip failed ({e}); with every package already on the runtime held at its "
                 "version, what is missing could not be installed: the lines above say which one")
    finally:
        os.unlink(constraints)


def _has_setuptools(have: dict[str, str]) -> bool:
    """The build backend is already here (>= 77, pyproject.toml): build without an isolated environment."""
    version = have.get("setuptools", "0")
    return int(version.split(".")[0]) >= 77 if version.split(".")[0].isdigit() else False


if __name__ == "__main__":
    main()
