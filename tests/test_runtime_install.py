"""The notebook's install on a runtime that already has TensorFlow and JAX (Colab): scripts/runtime_install.py adds
only what is missing, replaces nothing (above all, no `tensorflow-cpu` beside the runtime's `tensorflow`), and stops
in one line where the runtime holds a requirement at a version outside pyproject.toml's range."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_script, needs_fmnist

runtime_install = load_script("runtime_install")
# What Colab's runtime brings that alexnet_jax needs (and ipykernel, to run the notebook in it)
RUNTIME = ("tensorflow", "tensorflow-datasets", "jax", "flax", "ipykernel")


def test_plan_keeps_the_runtimes_tensorflow_and_installs_only_what_is_missing():
    wanted = ["tensorflow-cpu>=2.21,<2.22", "jax>=0.10.2,<1", "clu>=0.0.12", "ml_dtypes>=0.6"]
    have = {"tensorflow": "2.21.0", "jax": "0.12.0.1", "ml-dtypes": "0.7.0"}
    assert runtime_install.plan(wanted, have) == (["clu>=0.0.12"], [])


def test_plan_refuses_a_runtime_package_out_of_range_in_one_line():
    missing, problems = runtime_install.plan(["tensorflow-cpu>=2.21,<2.22", "jax>=0.10.2,<1"],
                                             {"tensorflow": "2.19.0", "jax": "0.12.0.1"})
    assert missing == [] and len(problems) == 1
    assert "tensorflow 2.19.0" in problems[0] and ">=2.21" in problems[0] and "restart the runtime" in problems[0]


def _pip_list(python: str) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return {runtime_install.canonical(d["name"]): d["version"] for d in json.loads(out)}


@pytest.mark.runtime
@needs_fmnist
def test_notebook_on_a_runtime_with_tensorflow_and_jax(tmp_path, fmnist_data_dir):
    """A venv set up as Colab's runtime (`tensorflow`, not -cpu, tfds, jax, flax, ipykernel), then the notebook top to
    bottom in it, at its test settings: its install cell runs scripts/runtime_install.py. Afterwards no second
    TensorFlow distribution, every package the runtime had at its version, alexnet_jax installed, every cell run."""
    import nbclient
    import nbformat

    venv = tmp_path / "runtime"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    uv = os.path.join(os.path.dirname(sys.executable), "uv")  # scripts/test.sh installs it; its cache is warm
    install = ([uv, "pip", "install", "--quiet", "--python", python] if os.path.exists(uv)
               else [python, "-m", "pip", "install", "--quiet"])
    subprocess.run([*install, *RUNTIME], check=True, timeout=900)
    subprocess.run([python, "-m", "ipykernel", "install", "--prefix", str(venv), "--name", "runtime"], check=True,
                   capture_output=True)
    before = _pip_list(python)
    assert "tensorflow" in before and "tensorflow-cpu" not in before and "alexnet-jax" not in before

    path = os.path.join(REPO, "notebooks", "alexnet_colab.ipynb")
    nb = nbformat.read(path, as_version=4)
    env = {"ALEXNET_NB_STEPS": "4", "ALEXNET_NB_TINY": "1", "ALEXNET_NB_WORKDIR": str(tmp_path / "run"),
           "ALEXNET_NB_DATA_DIR": fmnist_data_dir, "ALEXNET_NB_TEST_IMAGES": "64",
           "JUPYTER_PATH": str(venv / "share" / "jupyter")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="runtime",
                                resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    after = _pip_list(python)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    install_out = "".join(o.get("text", "") for o in code[1].outputs)
    assert "runtime_install:" in install_out and "nothing already here is replaced" in install_out, install_out
    assert "tensorflow-cpu" not in after
    changed = {name: (v, after.get(name)) for name, v in before.items() if after.get(name) != v}
    assert not changed, f"the install replaced or removed what the runtime had: {changed}"
    added = set(after) - set(before)
    assert {"alexnet-jax", "clu"} <= added, sorted(added)  # (flax brings optax and orbax, tfds array-record)
