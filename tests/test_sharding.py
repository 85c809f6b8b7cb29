"""The paper's two-device split with jax.sharding, on 8 simulated CPU devices (tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import sys
from functools import partial

import forkserver
import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE

from alexnet_jax import collectives, default_config, distributed, optim, sharding, train
from alexnet_jax.errors import UserError
from alexnet_jax.model import ModelSpec, create_model

IMAGE = (20, 20, 1)


def tiny_config(**overrides):
    """The small AlexNet (two groups, LRN, dropout) at a size a CPU test step compiles quickly."""
    c = default_config.get_config()
    c.dataset = "fashion_mnist"
    c.variant = "small"
    c.image_size = IMAGE[0]
    c.num_classes = 10
    c.widths = (16, 32, 48, 48, 32)
    c.fc_width = 64
    c.init_scheme = "he"
    c.batch_size = 16
    c.eval_batch_size = 16
    c.learning_rate = 0.05
    c.lr_schedule = "constant"
    c.seed = 3
    for k, v in overrides.items():
        c[k] = v
    return c


def mesh_of(shape):
    n = shape[0] * shape[1]
    return sharding.make_mesh(shape, jax.devices()[:n])


STEPS = 3  # several steps: the momentum and dropout keys of steps 2 and 3 depend on what step 1 wrote


def batches_for(config):
    rng = np.random.default_rng(7)
    return [{"image": rng.normal(size=(config.batch_size, *IMAGE)).astype(np.float32),
             "label": rng.integers(0, config.num_classes, config.batch_size).astype(np.int32)} for _ in range(STEPS)]


_REFERENCES: dict[str, tuple] = {}


def reference_for(kernels: str):
    """The initial state and STEPS train steps on one device, no mesh at all: what every mesh must reproduce."""
    if kernels not in _REFERENCES:
        config = tiny_config(kernels=kernels)
        model = create_model(ModelSpec.from_config(config))
        tx = optim.create_optimizer(optim.OptimizerSpec.from_config(config), 10, 100)
        plateau = optim.create_plateau(optim.OptimizerSpec.from_config(config))
        with jax.default_device(jax.devices()[0]):
            init = jax.jit(partial(train.create_train_state, model=model, tx=tx, plateau=plateau, image_shape=IMAGE))
            state = state0 = init(jax.random.PRNGKey(config.seed))
            step = jax.jit(partial(train.train_step, model, tx))
            losses = []
            for batch in batches_for(config):
                state, metrics = step(state, batch)
                losses.append(float(metrics["loss"]))
        _REFERENCES[kernels] = jax.device_get(state0), jax.device_get(state.params), losses
    return _REFERENCES[kernels]


@pytest.fixture(scope="module")
def reference():
    return reference_for("cpu_tuned")


@pytest.mark.parametrize("shape,strategy,kernels", [
    ((1, 1), "paper", "cpu_tuned"), ((8, 1), "paper", "cpu_tuned"), ((4, 2), "paper", "cpu_tuned"),
    ((2, 2), "paper", "cpu_tuned"), ((2, 4), "paper", "cpu_tuned"), ((4, 2), "owt", "cpu_tuned"),
    ((4, 2), "data_parallel", "cpu_tuned"), ((1, 2), "paper", "native"), ((2, 2), "paper", "native"),
    ((2, 1), "paper", "native"),
])
def test_train_steps_match_single_device(shape, strategy, kernels):
    """Same losses and parameters after 3 steps (dropout included) whatever the mesh, for both kernel choices;
    every leaf within 1e-5 of its largest value (docs/sharding.md: a 1.1e-4 difference in conv1's bias seen on
    FashionMNIST was one ReLU input within float32 rounding of zero, not the split)."""
    config = tiny_config(mesh_shape=shape, sharding=strategy, kernels=kernels)
    trainer = train.Trainer(train.RunSpec.from_config(config), mesh_of(shape), IMAGE, steps_per_epoch=10,
                            total_steps=100)
    state0, ref_params, ref_losses = reference_for(kernels)
    state = jax.device_put(state0, trainer.state_sharding)
    losses = []
    for batch in batches_for(config):
        state, metrics = trainer.train_step(state, trainer.global_batch(batch))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert_same_leaves(jax.device_get(state.params), ref_params, 1e-5)


def assert_same_leaves(got, want, rtol):
    """Every leaf's largest difference relative to the leaf's largest magnitude."""
    for path, w in jax.tree_util.tree_leaves_with_path(want):
        g = np.asarray(_at(got, path))
        worst = float(np.max(np.abs(g - w)) / np.max(np.abs(w)))
        assert worst <= rtol, f"{jax.tree_util.keystr(path)}: {worst:.2e} > {rtol:.0e}"


def test_state_is_created_sharded(reference):
    """Trainer.init builds params and momentum directly in their shardings, equal to the unsharded init."""
    config = tiny_config(mesh_shape=(4, 2))
    trainer = train.Trainer(train.RunSpec.from_config(config), mesh_of((4, 2)), IMAGE, steps_per_epoch=10,
                            total_steps=100)
    state = trainer.init(jax.random.PRNGKey(config.seed))
    kernel = state.params["conv2"]["kernel"]  # (5, 5, 8, 32): 16 of conv2's 32 kernels per device
    assert {s.data.shape for s in kernel.addressable_shards} == {(5, 5, 8, 16)}
    trace = state.opt_state.inner_state[2].trace["fc6"]["kernel"]
    assert trace.sharding == state.params["fc6"]["kernel"].sharding
    assert trace.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert_same_params(jax.device_get(state.params), reference[0].params, rtol=0)


def assert_same_params(got, want, rtol=1e-5):
    for path, w in jax.tree_util.tree_leaves_with_path(want):
        np.testing.assert_allclose(_at(got, path), w, rtol=rtol, atol=1e-7 if rtol else 0,
                                   err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_per_device_parameter_bytes_on_model_2():
    config = default_config.get_config()  # the paper's net on ImageNet, 60,965,224 parameters
    mesh = mesh_of((4, 2))
    trainer = train.Trainer(train.RunSpec.from_config(config), mesh, (224, 224, 3), steps_per_epoch=100,
                            total_steps=1000)
    params = trainer.abstract_state.params
    shardings = trainer.state_sharding.params
    total = sum(p.size * p.dtype.itemsize for p in jax.tree_util.tree_leaves(params))
    local = sum(np.prod(s.shard_shape(p.shape)) * p.dtype.itemsize
                for p, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings), strict=True))
    assert total == 60_965_224 * 4
    assert local / total <= 0.52
    # Momentum follows its parameter.
    trace = trainer.state_sharding.opt_state.inner_state[2].trace
    assert trace["fc6"]["kernel"].spec == shardings["fc6"]["kernel"].spec == jax.sharding.PartitionSpec(None, "model")


def test_owt_splits_only_the_fc_layers():
    config = tiny_config(sharding="owt")
    trainer = train.Trainer(train.RunSpec.from_config(config), mesh_of((4, 2)), IMAGE, 10, 100)
    specs = jax.tree_util.tree_map(lambda s: s.spec, trainer.state_sharding.params)
    assert specs["conv2"]["kernel"] == jax.sharding.PartitionSpec()
    assert specs["fc7"]["kernel"] == jax.sharding.PartitionSpec(None, "model")
    assert trainer.batch_sharding.spec == jax.sharding.PartitionSpec(("data", "model"))


def test_mesh_size_must_match_devices():
    with pytest.raises(UserError, match=r"needs 6 devices but 8 are available"):
        sharding.make_mesh((3, 2))


def test_model_axis_must_divide_widths():
    config = tiny_config(widths=(16, 32, 48, 48, 30), mesh_shape=(2, 4))
    with pytest.raises(UserError, match=r"'model' axis \(4 devices\) does not divide .*conv5"):
        train.Trainer(train.RunSpec.from_config(config), mesh_of((2, 4)), IMAGE, 10, 100)


def test_batch_must_divide_data_axis():
    config = tiny_config(batch_size=6)
    with pytest.raises(UserError, match=r"batch_size=6 must be divisible by the mesh's 'data' \(4\)"):
        train.RunSpec.from_config(config).check_mesh(mesh_of((4, 2)))  # what a run checks before reading data
    # The paper split needs only 'data' to divide the batch; the other strategies split it over both axes.
    train.RunSpec.from_config(tiny_config(batch_size=12, eval_batch_size=12)).check_mesh(mesh_of((4, 2)))
    with pytest.raises(UserError, match=r"'data' \(4\) x 'model' \(2\) = 8 batch shards"):
        train.RunSpec.from_config(tiny_config(batch_size=12, sharding="owt")).check_mesh(mesh_of((4, 2)))


def test_main_rejects_a_bad_mesh_before_compiling(repo, tmp_path):
    env = dict(os.environ, XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = forkserver.run(
        [sys.executable, "-m", "alexnet_jax.main", "--config", "configs/fashion_mnist.py",
         f"--workdir={tmp_path}", "--config.mesh_shape=(3,2)"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "alexnet_jax: error: --config.mesh_shape=(3, 2) needs 6 devices but 8 are available" in out.stderr


def test_report_cli(repo):
    env = dict(os.environ, XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = forkserver.run(
        [sys.executable, "-m", "alexnet_jax.collectives", "--config", "configs/fashion_mnist.py", "--mesh", "4,2",
         "--config.batch_size=16", "--config.widths=(32,64,96,96,64)"],  # pinned: the lines below name them
        cwd=repo, env=env, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "conv2/kernel   (5, 5, 16, 64)       P(None, None, None, 'model')               51,200" in out.stdout
    assert "(50.0%)" in out.stdout
    assert "conv3      forward   all-gather          model             1" in out.stdout


def test_collectives_parser_reads_every_replica_group_spelling():
    mesh = mesh_of((4, 2))
    hlo = "\n".join([
        '  %a = f32[8,4]{1,0} all-gather(%x), replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={1}, '
        'metadata={op_name="jit(f)/jvp(AlexNet)/conv3/conv3/shard_map/all_gather"}',
        '  %b = f32[16]{0} all-reduce(%y), replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add, '
        'metadata={op_name="jit(f)/transpose(jvp(AlexNet))/conv2/conv2/psum"}',
        "  %c = f32[128,10]{1,0} all-gather(%z), replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] "
        "{'axis_0'}, dimensions={0}, metadata={op_name=\"jit(f)/top_k\"}",
        '  %d = (f32[2]{0}, f32[3,3]{1,0}) all-reduce(%p, %q), replica_groups={{0,2,4,6},{1,3,5,7}}, '
        'metadata={op_name="jit(f)/(transpose(jvp(AlexNet))/fc6/fc6/psum:transpose(jvp(AlexNet))/fc7/fc7/psum)"}',
    ])
    got = [(c.kind, c.bytes, c.axes, c.layer, c.pass_) for c in collectives.collectives(hlo, mesh)]
    assert got == [
        ("all-gather", 128, ("model",), "conv3", "forward"),
        ("all-reduce", 64, ("data",), "conv2", "backward"),
        ("all-gather", 5120, ("data",), "top_k", "forward"),
        ("all-reduce", 8, ("data",), "fc6", "backward"),
        ("all-reduce", 36, ("data",), "fc7", "backward"),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_over_gloo_match_one_process(repo, tmp_path):
    """2 processes x 4 CPU devices (gloo, localhost), each reading only its rows, end where 1 x 8 ends."""
    import concurrent.futures

    import forkserver

    worker = os.path.join(repo, "tests", "multiprocess_worker.py")
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}  # each worker adds its share of the 8 devices
    steps, port = 3, _free_port()
    with concurrent.futures.ThreadPoolExecutor(1) as background:  # the 2 processes, forked by the worker script
        group = background.submit(forkserver.run, [sys.executable, worker, "2", str(port), str(tmp_path), str(steps)],
                                  env=env, capture_output=True, text=True, timeout=480)
        sys.path.insert(0, os.path.dirname(worker))
        import multiprocess_worker

        one, full = multiprocess_worker.run(multiprocess_worker.config_for_test(0, 1, 0), 0, 1, steps)  # 1 x 8 here
        r = group.result()
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    labels = [np.load(tmp_path / f"labels_{i}_of_2.npy") for i in range(2)]
    assert labels[0].shape == labels[1].shape == (steps, 8) and full.shape == (steps, 16)
    np.testing.assert_array_equal(np.concatenate(labels, axis=1), full)  # each process read its own half
    two = np.load(tmp_path / "params_2.npz")
    assert sorted(two.files) == sorted(one) and len(one) == 16
    for name, want in one.items():
        np.testing.assert_allclose(two[name], want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_meshes_compute_one_training_in_float64_under_the_entry_points_flags(repo, python, fmnist_data_dir):
    """One device against the paper's split combined with data parallelism (2x2: conv2/4/5 on their own device,
    conv3 and the FC layers gathering, gradients summed over 'data'), 3 steps on the real FashionMNIST under
    exactly the XLA flags and kernels the entry points use (scripts/compare_meshes.py adds them to an empty
    XLA_FLAGS, with the simulated devices), with the CPU's kernels: in float64, where float32 rounding vanishes,
    every leaf and the last loss are within 1e-12 of one device's (relative to the leaf's largest value; the logits
    are float64 too). The in-process tests above cover each mesh shape, strategy and kernel choice in float32."""
    import forkserver

    cmd = [python, "scripts/compare_meshes.py", "--float64", "--steps", "3", "--meshes", "1,1", "2,2",
           "--kernels", "cpu_tuned",
           "--set", "widths=(16,32,32,32,16)", "--set", "fc_width=32", "--set", "batch_size=16",
           "--set", "lr_schedule=constant", "--set", "dropout_rate=0", "--set", f"data_dir={fmnist_data_dir}"]
    r = forkserver.run(cmd, cwd=repo, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("cpu_tuned", "native"))]
    assert len(rows) == 2, r.stdout
    for kernels, *mesh, loss, leaf, worst in rows:
        assert float(worst) <= 1e-12, f"{kernels} {' '.join(mesh)}: {leaf} {worst}"
        ref = float(rows[0][-3])
        assert abs(float(loss) - ref) <= 1e-12 * abs(ref), f"{kernels} {' '.join(mesh)}: loss {loss} against {ref}"


def test_distributed_start_up_follows_config_and_environment(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    config = default_config.get_config()
    # one process: nothing asked for it
    assert distributed.initialize(distributed.DistributedSpec.from_config(config)) is False
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    # a one-task SLURM job is one process
    assert distributed.initialize(distributed.DistributedSpec.from_config(config)) is False
    config.distributed = "sometimes"
    with pytest.raises(UserError, match=r"--config.distributed='sometimes': choose 'auto', 'on' or 'off'"):
        distributed.initialize(distributed.DistributedSpec.from_config(config))
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert distributed._multi_process_env()
