"""The benchmark's FLOP count and torch yardstick are right, and its modes run."""

import json
import os
import sys

import forkserver
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE, needs_fmnist

from alexnet_jax.flops import count_params, forward_macs
from alexnet_jax.model import AlexNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_forward_macs_are_the_papers():
    macs = forward_macs(AlexNet(), (224, 224, 3))
    assert sum(macs.values()) == 724_406_816  # REFERENCE.md: 724.4M with groups
    assert macs["conv1"] == 55 * 55 * 11 * 11 * 3 * 96 and macs["conv2"] == 27 * 27 * 5 * 5 * 48 * 256
    assert sum(forward_macs(AlexNet(groups=1), (224, 224, 3)).values()) == 1_135_256_096  # 1.135G without


@pytest.mark.parametrize("variant,shape,kw", [
    ("small", (28, 28, 1), dict(num_classes=10, widths=(8, 16, 16, 16, 8), fc_width=32)),
    ("paper", (224, 224, 3), dict(num_classes=7, widths=(8, 16, 16, 16, 8), fc_width=16)),
])
@pytest.mark.torch
def test_torch_yardstick_computes_the_same_function(variant, shape, kw, torch_lib):
    torch = torch_lib
    from alexnet_jax import torch_alexnet

    model = AlexNet(variant=variant, **kw)
    x = np.random.default_rng(2).normal(0, 50, (3, *shape)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.asarray(x))["params"]
    net = torch_alexnet.build(model, shape)
    torch_alexnet.load_flax_params(net, params)
    assert sum(p.numel() for p in net.parameters()) == count_params(params)
    net.eval()
    with torch.no_grad():
        theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x), theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.torch
def test_benchmark_train_step_reports_json(torch_lib):
    torch_args = ["--vs-torch"]  # torch_lib: fails, not skips, where torch is missing
    cmd = [sys.executable, "scripts/benchmark.py", "--mode", "train_step", "--config", "configs/fashion_mnist.py",
           "--batch", "8", "--steps", "2", "--set", "widths=(8,16,16,16,8)", "--set", "fc_width=32", "--json",
           "--against", "widths=(16,16,16,16,8)", *torch_args]
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    res = forkserver.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)["train_step"]
    assert out["batch"] == 8 and len(out["jax_ms_each"]) == 2 and out["ms_per_step"] > 0
    assert out["images_per_s"] == pytest.approx(8000 / out["ms_per_step"])
    macs = sum(forward_macs(AlexNet(num_classes=10, variant="small", widths=(8, 16, 16, 16, 8), fc_width=32),
                            (28, 28, 1)).values())
    assert out["analytic_train_gflop_per_step"] == pytest.approx(6 * macs * 8 / 1e9)
    assert out["compile_s"] > 0 and out["process_peak_rss_mib"] > 0
    if torch_args:
        assert out["jax_over_torch"] == pytest.approx(out["ms_per_step"] / out["torch_ms_per_step"])
    # the --against step is the same config with its overrides added: here a wider conv1, more work by XLA's count
    assert out["against"] == "widths=(16,16,16,16,8)" and len(out["against_ms_each"]) == 2
    assert out["ms_over_against"] == pytest.approx(out["ms_per_step"] / out["against_ms_per_step"])
    assert out["against_xla_cost_gflop_per_step"] > out["xla_cost_gflop_per_step"]


@needs_fmnist
def test_benchmark_checkpoint_overhead_reports_json(fmnist_data_dir):
    cmd = [sys.executable, "scripts/benchmark.py", "--mode", "checkpoint", "--pairs", "1", "--run-steps", "4",
           "--every", "2", "--set", f"data_dir={fmnist_data_dir}", "--set", "widths=(8,16,16,16,8)",
           "--set", "fc_width=32", "--set", "batch_size=8", "--set", "log_every_steps=1",
           "--set", "eval_split=test[:64]", "--set", "eval_batch_size=64", "--json"]  # the end's evaluation: 64 images
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    res = forkserver.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)["checkpoint"]
    assert out["config"] == "configs/fashion_mnist.py" and out["saves_per_run"] == 2
    assert len(out["images_per_s_without"]) == len(out["images_per_s_with"]) == 1
    assert out["overhead_percent"] == pytest.approx(100 * (1 - out["median_with"] / out["median_without"]))
    assert "run 1/1 with    checkpoints" in res.stderr


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(REPO, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_records_only_quiet_runs(tmp_path):
    """--record appends a row with the load averages; a run above the core count is printed, not recorded."""
    bench = _benchmark_module()
    doc = tmp_path / "performance.md"
    doc.write_text(f"# t\n\n{bench.RESULTS_BEGIN}\n| date | command | load | JAX | torch | ratio |\n|-|-|-|-|-|-|\n"
                   f"{bench.RESULTS_END}\n\nafter\n")
    out = {"cpu_count": 2, "load_avg_start": 0.4, "load_avg_end": 1.9,
           "train_step": {"ms_per_step": 1076.4, "torch_ms_per_step": 1389.0, "jax_over_torch": 0.775}}
    assert bench.record(out, ["--vs-torch", "--record"], str(doc))
    text = doc.read_text()
    assert "| `--vs-torch` | 0.40 / 1.90 | 1076 | 1389 | **0.78** |" in text
    assert text.index("1076") < text.index(bench.RESULTS_END) < text.index("after")
    busy = dict(out, load_avg_end=2.5)
    assert not bench.record(busy, ["--vs-torch"], str(doc))
    assert doc.read_text() == text


@pytest.mark.torch
def test_benchmark_layers_times_every_conv_against_torch(torch_lib):
    bench = _benchmark_module()
    out = bench.bench_layers("configs/fashion_mnist.py", 8, 1, ["widths=(8,16,16,16,8)", "fc_width=16"])
    assert list(out) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    for row in out.values():
        assert "xla_ms" in row and "torch_ms" in row and all(v > 0 for v in row.values())
    assert all(sorted(row) == ["torch_ms", "xla_ms"] for row in out.values()), out
    calls = bench.conv_calls(AlexNet(num_classes=10), (227, 227, 3))
    assert calls["conv1"] == ((227, 227, 3), (11, 11, 3, 96), 4, ((0, 0), (0, 0)), 1)
    assert calls["conv2"] == ((27, 27, 96), (5, 5, 48, 256), 1, ((2, 2), (2, 2)), 2)
    assert calls["conv5"] == ((13, 13, 384), (3, 3, 192, 256), 1, ((1, 1), (1, 1)), 2)


@pytest.mark.torch
def test_benchmark_finetune_and_forward_time_both_sides(torch_lib):
    """--mode finetune freezes the convs on both sides (JAX: no conv update; torch: requires_grad=False) and times
    the three steps alternated; --mode forward times both forwards. Tiny nets: the harness, not the speed."""
    bench = _benchmark_module()
    small = ["widths=(8,16,16,16,8)", "fc_width=16"]
    out = bench.bench_finetune("configs/fashion_mnist.py", 8, 2, small)
    assert out["frozen"] == "conv.*" and len(out["jax_frozen_ms_each"]) == len(out["torch_frozen_ms_each"]) == 2
    assert out["frozen_over_unfrozen"] == pytest.approx(out["jax_frozen_ms"] / out["jax_unfrozen_ms"])
    assert out["frozen_over_torch_frozen"] == pytest.approx(out["jax_frozen_ms"] / out["torch_frozen_ms"])
    fwd = bench.bench_forward("configs/fashion_mnist.py", 8, 2, [*small, "dtype=bfloat16"])
    assert fwd["dtype"] == "bfloat16" and fwd["jax_over_torch"] == pytest.approx(fwd["jax_ms"] / fwd["torch_ms"])


def test_benchmark_set_is_parsed_as_the_command_line_parses_config_overrides():
    bench = _benchmark_module()
    from bench.common import load_config

    config = load_config("configs/imagenet.py", 16, ["variant=owt", "mesh_shape=(1,1)", "frozen=conv.*"])
    assert (config.variant, config.mesh_shape, config.frozen, config.batch_size) == ("owt", (1, 1), "conv.*", 16)
    with pytest.raises(SystemExit, match="unknown config key 'no_such_key'"):
        load_config("configs/imagenet.py", 16, ["no_such_key=1"])
    with pytest.raises(SystemExit, match="learning_rate"):
        load_config("configs/imagenet.py", 16, ["learning_rate=fast"])
    assert bench.bench_predict  # the predict mode is wired into the dispatcher


def test_benchmark_predict_reads_the_top1_of_both_outputs(tmp_path):
    """The predict mode compares the two commands' top-1 per file from their printed lines."""
    import importlib

    _benchmark_module()
    predict_bench = importlib.import_module("bench.predict")
    ours = ("photos/0000.jpg\n  1. n01443537 goldfish                  12.50%\n  2. n01440764 tench   3.00%\n"
            "photos/0001.jpg\n  1. n15075141 toilet tissue              9.00%\n")
    theirs = "photos/0000.jpg 1:0.1250 0:0.0300\nphotos/0001.jpg 999:0.0900 3:0.0100\n"
    a, b = predict_bench.top1_of_predict(ours), predict_bench.top1_of_torch(theirs)
    assert a == b == {os.path.abspath("photos/0000.jpg"): 1, os.path.abspath("photos/0001.jpg"): 999}
    predict_bench.write_photos(str(tmp_path), 2)
    from PIL import Image

    assert [Image.open(tmp_path / f).size for f in sorted(os.listdir(tmp_path))] == [(500, 375), (375, 500)]
