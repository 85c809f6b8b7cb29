"""Figures from a tiny FashionMNIST run, the Figure 3 grid layout, and the Colab notebook executed end to end."""

import os

import forkserver
import numpy as np
import pytest
from conftest import needs_fmnist, require_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_filter_grid_puts_the_two_groups_apart():
    from alexnet_jax import figures

    kernel = np.zeros((11, 11, 3, 96), np.float32)
    kernel[..., 48:] = 1.0  # the second group
    kernel[0, 0, :, :] += 0.5  # one brighter pixel per kernel so min-max scaling has a range
    grid = figures.filter_grid(kernel, groups=2)
    rows_per_group = 3 * 12  # 48 kernels: 3 rows of 16 tiles, 11 px + 1 px border
    assert grid.shape == (2 * rows_per_group + 5 + 1, 16 * 12 + 1, 3)
    # the blank band between the groups spans the whole width
    band = grid[1 + rows_per_group:1 + rows_per_group + 5]
    assert np.all(band == 1.0)
    assert np.allclose(grid[2, 2], 0.0) and np.allclose(grid[1, 1], 1.0)  # a tile's body, a tile's bright corner
    gray = figures.filter_grid(np.random.RandomState(0).randn(3, 3, 1, 8), groups=1)
    assert gray.shape == (1 + 4, 8 * 4 + 1, 1) and gray.min() == 0.0 and gray.max() == 1.0


def test_confusion_matrix_counts():
    from alexnet_jax import figures

    m = figures.confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory, fmnist_data_dir):
    """The Colab notebook executed top to bottom with nbclient (12 steps, tiny widths): (notebook, workdir)."""
    require_fashion_mnist()
    import ipykernel  # noqa: F401  (the test extra: an ImportError here is a failure, not a skip)
    import nbclient
    import nbformat
    path = os.path.join(REPO, "notebooks", "alexnet_colab.ipynb")
    nb = nbformat.read(path, as_version=4)
    workdir = str(tmp_path_factory.mktemp("nb") / "run")
    env = {"ALEXNET_NB_STEPS": "12", "ALEXNET_NB_TINY": "1", "ALEXNET_NB_WORKDIR": workdir,
           "ALEXNET_NB_DATA_DIR": fmnist_data_dir, "ALEXNET_NB_TEST_IMAGES": "256"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, workdir


@needs_fmnist
def test_notebook_runs_top_to_bottom(notebook_run):
    nb, workdir = notebook_run
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)  # every cell ran
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # curves, filters, predictions, confusion, FLOP chart
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "test top-1" in text and "checkpoint step 12:" in text and "->" in text
    assert "60,965,224" not in text and "conv1" in text  # the FLOP table of the notebook's own (tiny) model
    for name in ("curves.png", "conv1_filters.png", "predictions.png", "confusion.png", "flops.png"):
        assert os.path.isfile(os.path.join(workdir, name))


@needs_fmnist
def test_scripts_draw_curves_filters_predictions(notebook_run, python, repo):
    from alexnet_jax import figures

    _, workdir = notebook_run
    scalars = figures.read_scalars(workdir)
    assert list(scalars["train/loss"][0]) == [3, 6, 9, 12] and list(scalars["eval/top1"][0]) == [12]
    assert np.all(scalars["train/lr"][1] > 0) and np.all(np.isfinite(scalars["train/loss"][1]))
    for name in ("curves.png", "conv1_filters.png", "predictions.png", "confusion.png"):
        os.remove(os.path.join(workdir, name))
    for script, extra in (("plot_curves.py", []), ("plot_filters.py", []),
                          ("plot_predictions.py", ["--max_images", "64"])):
        r = forkserver.run([python, f"scripts/{script}", "--workdir", workdir, *extra], cwd=repo,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
    w, h = _png_size(os.path.join(workdir, "curves.png"))
    assert w > 1000 and h > 300
    assert _png_size(os.path.join(workdir, "conv1_filters.png"))[0] >= 600
    assert _png_size(os.path.join(workdir, "predictions.png"))[0] > 800
    assert _png_size(os.path.join(workdir, "confusion.png"))[0] > 600


def test_scripts_explain_a_workdir_without_a_run(tmp_path, python, repo):
    r = forkserver.run([python, "scripts/plot_curves.py", "--workdir", str(tmp_path)], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "plot_curves: error: no TensorBoard event files" in r.stderr
    r = forkserver.run([python, "scripts/plot_filters.py", "--workdir", str(tmp_path)], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "plot_filters: error: no checkpoints in" in r.stderr
