"""Issue #22: the trainer, model, sharding, optimizer, checkpointing and inference import where TensorFlow does
not (an accelerator image), and `scripts/accelerator_check.py --smoke` runs there end to end."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import FAST_COMPILE, REPO

CORE = ("alexnet_jax.train", "alexnet_jax.model", "alexnet_jax.sharding", "alexnet_jax.optim",
        "alexnet_jax.checkpointing", "alexnet_jax.inference", "alexnet_jax.pretrained", "alexnet_jax.data")


def _without_tensorflow(tmp_path) -> dict[str, str]:
    """An environment where `import tensorflow` (and tfds, clu) fails, as on the GPU image."""
    blocker = tmp_path / "blocked"
    for name in ("tensorflow", "tensorflow_datasets", "clu"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    return {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}", "XLA_FLAGS": FAST_COMPILE,
            "JAX_PLATFORMS": "cpu"}


def test_core_modules_import_without_tensorflow(tmp_path, python):
    code = ("import importlib, sys\n"
            f"for m in {CORE!r}: importlib.import_module(m)\n"
            "assert 'tensorflow' not in sys.modules or sys.modules['tensorflow'] is None\n"
            "print('imported')\n")
    r = subprocess.run([python, "-c", code], cwd=REPO, env=_without_tensorflow(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr[-3000:]


def test_accelerator_check_smoke_runs_without_tensorflow(tmp_path, python):
    out = tmp_path / "check.json"
    r = subprocess.run([python, "scripts/accelerator_check.py", "--smoke", "--out", str(out)], cwd=REPO,
                       env=_without_tensorflow(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    report = json.loads(out.read_text())
    assert report["device"]["platform"] == "cpu" and report["peaks"]["matmul_fp32_tflops"] > 0
    assert [(s["variant"], s["dtype"], s["kernels"]) for s in report["steps"]] == [
        ("paper", "float32", "cpu_tuned"), ("owt", "bfloat16", "native")]
    assert all(s["step_ms"] > 0 and s["images_per_s"] > 0 and s["compile_s"] > 0 for s in report["steps"])
    assert report["correctness"]["ok"] and report["correctness"]["logits_rel_err"] < 1e-5
    assert len(report["correctness"]["grad_rel_err"]) == 16  # every kernel and bias of the 8 layers
    loop = report["loop"]
    assert loop["restore_ok"] and loop["restored_step"] == 20 and loop["final_loss_finite"]
    assert loop["loop_images_per_s"] > 0 and "host_overhead_ms_per_step" in loop
    assert report["augmentation"]["augment_on_device_ms_per_batch"] > 0
    assert "| paper | float32 | cpu_tuned | 8 |" in r.stdout and "metrics.jsonl" in r.stderr


def test_predict_gives_the_cpu_matmuls_to_eigen_and_main_to_ynnpack(python):
    """The XLA_FLAGS each command line's process runs with (printed as it exits, after its --helpshort): `main`
    keeps YNNPACK's matmuls (`...ynn_fusion_type=dot`), `predict`'s passes of <= 50 images take none of YNNPACK
    (`...ynn_fusion_type=`, nothing: Eigen's matmuls are 2.3x faster at 50 rows, docs/notes/2026-12.md)."""
    import forkserver

    seen = {}
    for module in ("alexnet_jax.main", "alexnet_jax.predict"):
        code = ("import atexit, os, runpy, sys\n"
                "atexit.register(lambda: print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', '')))\n"
                f"sys.argv = [{module!r}, '--helpshort']\n"
                f"runpy.run_module({module!r}, run_name='__main__')\n")
        env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
        r = forkserver.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        line = next(x for x in r.stdout.splitlines() if x.startswith("XLA_FLAGS="))
        seen[module] = [f for f in line.removeprefix("XLA_FLAGS=").split() if "ynn_fusion_type" in f]
    assert seen == {"alexnet_jax.main": ["--xla_cpu_experimental_ynn_fusion_type=dot"],
                    "alexnet_jax.predict": ["--xla_cpu_experimental_ynn_fusion_type="]}, seen


def test_entry_points_set_the_xla_cpu_flags(monkeypatch):
    """The tests' XLA:CPU rendezvous timeouts for every command line on the CPU backend (a loaded machine's
    simulated devices no longer abort at XLA's 40 s), kept where the user set them, not added for a GPU."""
    from alexnet_jax import cli

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                                    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=30")
    cli.set_xla_cpu_flags()
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=600" in flags
    assert "--xla_cpu_collective_call_warn_stuck_timeout_seconds=30" in flags and len(flags) == 4
    assert "--xla_cpu_experimental_ynn_fusion_type=dot" in flags  # convolutions by XLA's Eigen kernels
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("XLA_FLAGS", "")
    cli.set_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == ""


def test_the_model_is_one_program_whatever_xla_flags_say(monkeypatch):
    """One kernel path: the network traces to the same program (XLA's convolutions) under XLA's default flags, the
    entry points' (convolutions by Eigen) and YNNPACK's convolutions alike; which library runs a convolution is
    XLA's choice, not a second formulation in the model."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax.model import AlexNet

    model = AlexNet(num_classes=10, variant="small", widths=(32, 32, 32, 32, 32), fc_width=16)
    x = jnp.zeros((2, 28, 28, 1))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

    def program() -> str:
        return str(jax.make_jaxpr(jax.grad(lambda p: model.apply(p, x).sum()))(params))

    programs = set()
    for flags in ("", "--xla_cpu_experimental_ynn_fusion_type=dot",
                  "--xla_cpu_experimental_ynn_fusion_type=dot,individual_convolution"):
        monkeypatch.setenv("XLA_FLAGS", flags)
        programs.add(program())
    assert len(programs) == 1
    assert programs.pop().count("conv_general_dilated") >= 5 * 3  # every conv: forward and its gradients


def test_library_use_without_the_entry_points_flags_is_told_what_it_costs(monkeypatch, caplog, tmp_path):
    """A run in a process whose XLA_FLAGS leave the convolutions to YNNPACK (a script or notebook that did not call
    `cli.set_xla_cpu_flags`) logs one warning saying what to call; under the entry points' flags, none."""
    import logging

    import pytest

    from alexnet_jax import default_config, train, xla_cpu
    from alexnet_jax.errors import UserError

    assert xla_cpu.convolutions_in_ynnpack("") and xla_cpu.convolutions_in_ynnpack(
        "--xla_cpu_experimental_ynn_fusion_type=dot,individual_convolution")
    assert not xla_cpu.convolutions_in_ynnpack("--xla_force_host_platform_device_count=8 "
                                               "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert not xla_cpu.convolutions_in_ynnpack("--xla_cpu_experimental_ynn_fusion_type=")
    (tmp_path / "file").write_text("")
    for flags, warned in (("", True), ("--xla_cpu_experimental_ynn_fusion_type=dot", False)):
        monkeypatch.setenv("XLA_FLAGS", flags)
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="cannot be created"):
            train.train_and_evaluate(default_config.get_config(), str(tmp_path / "file" / "w"))  # stops right after
        assert any("cli.set_xla_cpu_flags()" in r.getMessage() for r in caplog.records) is warned, flags
