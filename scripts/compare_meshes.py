"""Do the meshes compute the same training? N steps of a config on several meshes, each leaf compared with the
one-device run (docs/sharding.md, "Numbers on one device and on a mesh").

    python scripts/compare_meshes.py --config configs/fashion_mnist.py --steps 3 --set batch_size=32 \\
        --set lr_schedule=constant [--set dropout_rate=0] [--float64] [--kernels cpu_tuned native]

Prints, per kernel choice and mesh, the loss of the last step and the leaf that differs most from mesh (1,1)
(max |difference| / max |value| of the leaf). `--float64` runs the same steps in float64 (params, compute and
LRN), from the float32 initialisation: differences that are float32 rounding vanish there. The simulated CPU
devices are set up here (the largest mesh's count), before JAX starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "fashion_mnist.py"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--meshes", nargs="+", default=["1,1", "2,1", "1,2", "2,2"])
    p.add_argument("--kernels", nargs="+", default=["cpu_tuned", "native"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (Python literal)")
    p.add_argument("--float64", action="store_true")
    a = p.parse_args()
    meshes = [tuple(int(v) for v in m.split(",")) for m in a.meshes]
    from alexnet_jax import cli, xla_flags  # before jax: an XLA flag the running jaxlib lacks would abort the process

    xla_flags.add({"--xla_force_host_platform_device_count": str(max(x * y for x, y in meshes))},
                  {"--xla_force_host_platform_device_count": "one CPU device: the meshes above 1 device fail"})
    cli.set_xla_cpu_flags()  # and the entry points' XLA:CPU flags: the kernels `main` runs
    import ast

    import jax

    if a.float64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, REPO)
    from alexnet_jax import build, sharding, train
    from alexnet_jax import data as datalib
    from alexnet_jax.model import alexnet

    spec = importlib.util.spec_from_file_location("config", a.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for kv in a.set:
        key, value = kv.split("=", 1)
        try:
            config[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            config[key] = value
    data = datalib.create_data(datalib.DataSpec.from_config(config))
    per_epoch = datalib.steps_per_epoch(data.num_train, config.batch_size)
    if a.float64:  # float64 parameters and compute (the LRN follows its input: float64 too)
        create = build.create_model
        build.create_model = lambda *args: create(*args).clone(dtype=jnp.float64, param_dtype=jnp.float64)

    def run(mesh_shape: tuple[int, int], kernels: str) -> tuple[float, dict[str, np.ndarray]]:
        config.kernels, config.mesh_shape = kernels, mesh_shape
        mesh = sharding.make_mesh(mesh_shape, jax.devices()[: mesh_shape[0] * mesh_shape[1]])
        spec = train.RunSpec.from_config(config).with_classes(len(data.class_names))
        trainer = train.Trainer(spec, mesh, data.image_shape, per_epoch, 100, augment=data.on_device)
        with jax.default_device(jax.devices()[0]):  # the float32 initialisation, whatever --float64 says
            init = train.create_train_state(jax.random.PRNGKey(config.seed),
                                            model=create_float32(spec.model), tx=trainer.tx,
                                            plateau=trainer.plateau, image_shape=data.image_shape)
        dtype = np.float64 if a.float64 else np.float32
        init = jax.tree_util.tree_map(lambda v: v.astype(dtype) if v.dtype == np.float32 else v, init)
        state = jax.device_put(init, trainer.state_sharding)
        batches = data.train(0, a.steps, 0, 1)
        for _ in range(a.steps):
            state, metrics = trainer.train_step(state, trainer.global_batch(next(batches)))
        leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
        return float(metrics["loss"]), {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in leaves}

    create_float32 = alexnet.create_model
    print(f"{'kernels':10s} {'mesh':7s} {'loss':>20s}  worst leaf vs (1, 1)")
    for kernels in a.kernels:
        results = {m: run(m, kernels) for m in meshes}
        ref = results[meshes[0]][1]
        for m, (loss, leaves) in results.items():
            worst = max((float(np.max(np.abs(leaves[n] - ref[n])) / np.max(np.abs(ref[n]))), n) for n in ref)
            print(f"{kernels:10s} {str(m):7s} {loss:20.16f}  {worst[1]} {worst[0]:.2e}")


if __name__ == "__main__":
    main()
