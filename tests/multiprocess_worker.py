"""The processes of a multi-process training run on CPU devices (used by test_sharding.py).

Usage: python multiprocess_worker.py NUM_PROCESSES PORT OUT_DIR STEPS
Forks NUM_PROCESSES processes once the libraries are imported (tests/process_group.py). Each process simulates 8 /
NUM_PROCESSES CPU devices, joins the others over gloo on localhost through `distributed.initialize`, reads only its
own rows of every global batch and trains STEPS steps on a ('data', 'model') = (4, 2) mesh spanning all processes.
Process 0 writes the final parameters; every process writes the labels of the rows it read. `run` is also called in-
process for the 1 x 8 reference.
"""

import os
import sys

import numpy as np


def config_for_test(pid: int, nproc: int, port: int):
    from alexnet_jax import default_config

    c = default_config.get_config()
    c.dataset = "fashion_mnist"
    c.variant = "small"
    c.image_size = 20
    c.num_classes = 10
    c.widths = (8, 16, 16, 16, 16)
    c.fc_width = 32
    c.init_scheme = "he"
    c.batch_size = 16
    c.eval_batch_size = 16
    c.learning_rate = 0.05
    c.lr_schedule = "constant"
    c.crop_padding = 2
    c.mesh_shape = (4, 2)
    c.distributed = "auto" if nproc > 1 else "off"
    c.coordinator_address = f"127.0.0.1:{port}" if nproc > 1 else ""
    c.num_processes = nproc
    c.process_id = pid
    return c


def run(config, pid: int, nproc: int, steps: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Train `steps` steps; returns the final parameters (by path) and the labels of the rows this process read."""
    import jax
    from jax.experimental import multihost_utils

    from alexnet_jax import data as datalib
    from alexnet_jax import sharding, train
    from alexnet_jax.data import DataSpec, small

    assert jax.process_count() == nproc and jax.local_device_count() * nproc == 8
    rng = np.random.default_rng(0)  # the same synthetic dataset in every process
    data = datalib.InMemoryData(rng.integers(0, 256, (64, 20, 20, 1), np.uint8),
                                       rng.integers(0, 10, 64).astype(np.int32), tuple(map(str, range(10))))
    mean, std = datalib.channel_stats(data.images)
    mesh = sharding.make_mesh(config.mesh_shape)
    trainer = train.Trainer(train.RunSpec.from_config(config), mesh, (20, 20, 1), steps_per_epoch=4, total_steps=steps)
    state = trainer.init(jax.random.PRNGKey(config.seed))
    seen = []
    for local in small.train_batches(data, DataSpec.from_config(config), mean, std, 0, steps, pid, nproc):
        seen.append(local["label"])
        state, _ = trainer.train_step(state, trainer.global_batch(local))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    return flat, np.stack(seen)


def worker(pid: int, nproc: int, port: int, out_dir: str, steps: int) -> None:
    # the caller's XLA flags (the tests': -O0), this process's share of the 8 devices
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={8 // nproc}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from alexnet_jax import distributed

    config = config_for_test(pid, nproc, port)
    # before any other JAX call
    assert distributed.initialize(distributed.DistributedSpec.from_config(config)) == (nproc > 1)
    params, seen = run(config, pid, nproc, steps)
    np.save(os.path.join(out_dir, f"labels_{pid}_of_{nproc}.npy"), seen)
    if pid == 0:
        np.savez(os.path.join(out_dir, f"params_{nproc}.npz"), **params)
    import jax

    jax.distributed.shutdown()


def main() -> None:
    import process_group

    nproc, port, out_dir, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    import alexnet_jax.train  # noqa: F401 - imported once, before the fork, for every process

    sys.exit(process_group.run_forked(lambda pid: worker(pid, nproc, port, out_dir, steps), nproc))


if __name__ == "__main__":
    main()
