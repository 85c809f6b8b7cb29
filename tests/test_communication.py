"""Who talks to whom, layer by layer, at 224 px: the compiled train step of every strategy against the analytic
volume of each collective, and the tables of docs/sharding.md against what their command prints.

The settings are those the docs' commands name: `configs/imagenet.py` (global batch B = 128 of 224x224x3) on a
4x2 mesh (d = 4 'data', m = 2 'model'), so b = B/d = 32 images per 'data' shard, f = 4 bytes (float32). Bytes
are the result of each collective on one device. The analytic volume of each (layer, pass, kind, axes) row:

- a forward all-gather over 'model' of a split layer's input (paper: conv3 reads pool2, fc6 pool5, fc7 fc6's
  neurons; owt: fc6's gather of the batch, which arrives split over 'model' too): b x input features x f;
- its backward reduce-scatter over 'model' (the input gradient, each device its slice): b x input x f / m;
  owt's fc6 sums the whole input gradient instead (all-reduce over 'model'): b x pool5 x f;
- fc8's forward sum of its row halves over 'model': b x classes x f; owt's fc8 backward gathers the logits'
  gradient over the batch's 'model' split: b x classes x f;
- a gradient sum over the batch axes ('data', or 'data'+'model' where the layer is not split): the layer's
  kernel and bias bytes on one device (1/m of them where split);
- metrics: two scalar means (top-1, top-5: 8 bytes; each device ranks its own rows' logits, so no logits are
  gathered: `test_topk_correct_ranks_as_a_stable_descending_sort`); loss: its mean (4 bytes).
Every row must equal that exactly, no row may be missing or extra, and every
collective must belong to a layer, 'loss' or 'metrics' (`collectives.SCOPES`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import jax
import pytest

from alexnet_jax import collectives, flops
from alexnet_jax.model import ModelSpec, create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs", "sharding.md")
MESH = (4, 2)
F = 4  # float32 bytes
# docs/sharding.md: the command above each table, then the table in a ``` block.
COMMAND = (r"python -m alexnet_jax\.collectives --config configs/imagenet\.py --mesh 4,2((?: --config\.\w+=\w+)*)`"
           r"[^`]*?```\n(.*?)```")
# The traffic follows from the layers' shapes and the mesh alone: the convolutions are XLA's own under every
# `kernels` choice, so these are the tables of the CPU's default ('cpu_tuned') and of a GPU or TPU ('native') alike.
SETTINGS = {"paper": "",
            "owt": " --config.sharding=owt --config.variant=owt",
            "data_parallel": " --config.sharding=data_parallel"}


def _imagenet_config():
    spec = importlib.util.spec_from_file_location("imagenet_config", os.path.join(REPO, "configs", "imagenet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _config(overrides: str):
    config = _imagenet_config()
    for key, value in re.findall(r"--config\.(\w+)=(\w+)", overrides):
        config[key] = value
    return config


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    """One compile per strategy (shapes only, ~6 s each), shared by every check below."""
    return {name: collectives.report_for(_config(overrides), MESH) for name, overrides in SETTINGS.items()}


def analytic(config, strategy: str) -> dict[tuple[str, str, str, str], int]:
    """The expected (layer, pass, kind, axes) -> bytes per device of `strategy` (module docstring)."""
    d, m = MESH
    B = config.batch_size
    b = B // d
    model = create_model(ModelSpec.from_config(config))
    params, inter = flops._abstract_run(model, (config.image_size, config.image_size, 3))
    classes, fc_in = config.num_classes, {"fc6": math.prod(inter["pool5"].shape[1:]),
                                           "fc7": params["fc7"]["kernel"].shape[0],
                                           "fc8": params["fc8"]["kernel"].shape[0]}
    pool2 = math.prod(inter["pool2"].shape[1:])

    def grad(layer: str, split: bool) -> int:
        k, n = (math.prod(params[layer][p].shape) * F for p in ("kernel", "bias"))
        if not split:
            return k + n
        return k // m + (n if layer == "fc8" else n // m)  # fc8's bias is replicated (sharding.py)

    want = {}
    if strategy == "paper":
        for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
            want[(layer, "backward", "all-reduce", "data")] = grad(layer, split=True)
        for layer, features in (("conv3", pool2), ("fc6", fc_in["fc6"]), ("fc7", fc_in["fc7"])):
            want[(layer, "forward", "all-gather", "model")] = b * features * F
            want[(layer, "backward", "reduce-scatter", "model")] = b * features * F // m
        want[("fc8", "forward", "all-reduce", "model")] = b * classes * F
        batch = "data"
    elif strategy == "owt":
        for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            want[(layer, "backward", "all-reduce", "data+model")] = grad(layer, split=False)
        for layer in ("fc6", "fc7", "fc8"):
            want[(layer, "backward", "all-reduce", "data")] = grad(layer, split=True)
        want[("fc6", "forward", "all-gather", "model")] = b * fc_in["fc6"] * F  # the batch gather of pool5
        want[("fc6", "backward", "all-reduce", "model")] = b * fc_in["fc6"] * F
        want[("fc7", "forward", "all-gather", "model")] = b * fc_in["fc7"] * F
        want[("fc7", "backward", "reduce-scatter", "model")] = b * fc_in["fc7"] * F // m
        want[("fc8", "forward", "all-reduce", "model")] = b * classes * F
        want[("fc8", "backward", "all-gather", "model")] = b * classes * F
        batch = "data+model"
    else:
        for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
            want[(layer, "backward", "all-reduce", "data+model")] = grad(layer, split=False)
        batch = "data+model"
    want[("metrics", "forward", "all-reduce", batch)] = 2 * F
    want[("loss", "forward", "all-reduce", batch)] = F
    return want


def measured(rep: dict) -> dict[tuple[str, str, str, str], int]:
    got: dict[tuple[str, str, str, str], int] = {}
    for c in rep["collectives"]:
        key = (c["layer"], c["pass_"], c["kind"], "+".join(c["axes"]))
        got[key] = got.get(key, 0) + c["bytes"]
    return got


EXPECTED_MODEL_LAYERS = {  # layers with traffic over 'model' alone (not a gradient sum over every device)
    "paper": {"conv3", "fc6", "fc7", "fc8"},
    "owt": {"fc6", "fc7", "fc8"},  # the batch gather before fc6 and the split FC layers
    "data_parallel": set(),
}


@pytest.mark.parametrize("strategy", list(SETTINGS))
def test_each_layer_communicates_what_its_shapes_imply(reports, strategy):
    rep = reports[strategy]
    assert rep["strategy"] == strategy and rep["image_shape"] == [224, 224, 3] and rep["batch_size"] == 128
    got = measured(rep)
    unclaimed = {c["op_name"] for c in rep["collectives"] if c["layer"] not in collectives.SCOPES}
    assert not unclaimed, f"collectives no layer, loss or metrics claims: {unclaimed}"
    model_layers = {layer for (layer, _, _, axes) in got if axes == "model"}
    assert model_layers == EXPECTED_MODEL_LAYERS[strategy], sorted(k for k in got if k[3] == "model")
    want = analytic(_config(SETTINGS[strategy]), strategy)
    assert set(got) == set(want), f"extra: {sorted(set(got) - set(want))}, missing: {sorted(set(want) - set(got))}"
    off = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not off, f"(measured, analytic) bytes differ: {off}"


@pytest.mark.parametrize("strategy", list(SETTINGS))
def test_parameter_bytes_per_device_are_the_split_implies(reports, strategy):
    """Each parameter's bytes on one device: its bytes / m where its rule splits it over 'model', else all."""
    rep = reports[strategy]
    for p in rep["params"]:
        assert p["bytes"] == math.prod(p["shape"]) * F
        assert p["bytes_per_device"] == p["bytes"] // (MESH[1] if "model" in p["spec"] else 1), p
    assert rep["param_bytes_per_device"] == sum(p["bytes_per_device"] for p in rep["params"])
    if strategy == "paper":  # every layer split but fc8's 1000 biases: 50.0%
        assert rep["param_bytes_per_device"] == (rep["param_bytes"] - 4000) // 2 + 4000


def test_docs_tables_are_what_their_commands_print(reports):
    """Every table in docs/sharding.md is the output of the command written above it, for the same settings."""
    with open(DOCS) as f:
        tables = re.findall(COMMAND, f.read(), flags=re.S)
    assert sorted(overrides for overrides, _ in tables) == sorted(SETTINGS.values())
    by_overrides = {overrides: name for name, overrides in SETTINGS.items()}
    for overrides, table in tables:
        assert table.strip() == collectives.format_report(reports[by_overrides[overrides]]).strip(), overrides
    assert jax.device_count() == 8


def test_default_mesh_moves_only_gradients():
    """The default mesh (-1, 1) under 'paper' on 8 devices is data parallelism: every layer's only traffic is its
    gradient sum over 'data' (while conv1's matmuls moved the batch off the leading axis, conv1 all-gathered
    669 MB per step)."""
    config = _imagenet_config()
    rep = collectives.report_for(config, (8, 1))
    got = measured(rep)
    layers = {k for k in got if k[0] not in ("loss", "metrics")}
    assert layers == {(layer, "backward", "all-reduce", "data") for layer in collectives.LAYERS}, sorted(layers)
    assert got[("conv1", "backward", "all-reduce", "data")] == (11 * 11 * 3 * 96 + 96) * F  # kernel, bias


def test_topk_correct_ranks_as_a_stable_descending_sort():
    """The train and eval steps' top-k counts (elementwise, so no gather of the batch's logits) against NumPy's
    stable sort of the negated logits (a tie goes to the lower class, as `jax.lax.top_k` orders them), on logits
    of few distinct values: ties everywhere, k up to past the number of classes."""
    import numpy as np

    from alexnet_jax.train import topk_correct

    rng = np.random.default_rng(0)
    for _ in range(50):
        n, c = rng.integers(1, 17), rng.integers(1, 9)
        logits, labels = rng.integers(-2, 3, size=(n, c)).astype(np.float32), rng.integers(0, c, size=n)
        rank = np.argsort(np.argsort(-logits, axis=-1, kind="stable"), axis=-1)[np.arange(n), labels]
        for k in (1, 2, 5, 10):
            np.testing.assert_array_equal(np.asarray(topk_correct(logits, labels, k)), (rank < k).astype(np.float32))


def test_topk_correct_counts_a_row_with_a_nan_logit_as_wrong():
    """A diverged model's NaN logits compare false with everything, which ranked the label first: 4 NaN rows of
    4 classes read as top-1 1.0 (seen on a diverging recipe run). A row with any NaN is wrong at every k."""
    import numpy as np

    from alexnet_jax.train import topk_correct

    logits = np.array([[np.nan] * 4, [0.0, np.nan, 1.0, 2.0], [3.0, 0.0, 1.0, 2.0], [np.nan, 5.0, 0.0, 0.0]],
                      np.float32)
    labels = np.array([0, 3, 0, 1])
    for k in (1, 2, 4):
        np.testing.assert_array_equal(np.asarray(topk_correct(logits, labels, k)), [0.0, 0.0, 1.0, 0.0])
