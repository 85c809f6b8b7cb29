"""The paper's recipe, step by step, in JAX and PyTorch side by side on the same batches (issue #16).

Trains `configs/imagenet.py` (or any config) on a prepared imagenet2012 copy for a few steps, and records per
step, for both libraries started from the same parameters and fed the same batches: the training loss, the
logits' standard deviation, every layer's output RMS and every layer's gradient norm. Then it evaluates both
nets on the validation split (centre crop) and writes `diagnosis.json` and `diagnosis.png` into --out.

    python scripts/diagnose_recipe.py --data_dir DIR --out OUT [--steps 80] [--set batch_size=16]
        [--set learning_rate=0.01] [--no-torch]

docs/paper.md shows what it found. PyTorch: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def _set(config, assignments: list[str]) -> None:
    for a in assignments:
        key, value = a.split("=", 1)
        old = config[key]
        config[key] = type(old)(value) if not isinstance(old, tuple | bool) else eval(value)  # noqa: S307


def _norms(tree) -> dict[str, float]:
    return {k: float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(v))))
            for k, v in tree.items()}


def jax_side(trainer, config):
    """An instrumented copy of the train step: loss, logits, per-layer output RMS and gradient norms."""
    model, tx = trainer.model, trainer.tx

    def step(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            logits, inter = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng},
                                        capture_intermediates=True, mutable=["intermediates"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, (logits, inter["intermediates"])

        (loss, (logits, inter)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        rms = {k: jnp.sqrt(jnp.mean(jnp.square(inter[k]["__call__"][0]))) for k in LAYERS}
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
        return new, loss, jnp.std(logits), rms, grads

    return jax.jit(step)


def torch_side(model, params, image_shape, config):
    from alexnet_jax import torch_alexnet

    torch = torch_alexnet.import_torch()
    torch.manual_seed(config.seed)  # torch's dropout masks: reproducible run to run (JAX's are by construction)
    net = torch_alexnet.build(model, image_shape)
    torch_alexnet.load_flax_params(net, params)
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    # The paper's rule with decay on weights only, as optim.decay_mask does (torch's SGD equals it while
    # the learning rate is constant).
    opt = torch.optim.SGD([{"params": weights, "weight_decay": config.weight_decay},
                           {"params": biases, "weight_decay": 0.0}], lr=config.learning_rate_effective,
                          momentum=config.momentum)
    modules = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    outputs: dict[int, object] = {}
    for i, m in enumerate(modules):
        # the RMS at once: the in-place ReLU that follows overwrites the output tensor
        m.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(
            i, float(out.detach().square().mean().sqrt())))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(images, labels):
        net.train()
        opt.zero_grad(set_to_none=True)
        logits = net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
        loss = loss_fn(logits, torch.from_numpy(labels.astype(np.int64)))
        loss.backward()
        rms = {LAYERS[i]: outputs[i] for i in range(len(modules))}
        grads = {LAYERS[i]: float(torch.sqrt(sum(p.grad.square().sum() for p in m.parameters())))
                 for i, m in enumerate(modules)}
        opt.step()
        return float(loss), float(logits.detach().std()), rms, grads

    def predict(images):
        net.eval()
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()

    return step, predict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/imagenet.py")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--set", action="append", default=[], help="key=value config overrides")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--replot", action="store_true", help="only redraw OUT/diagnosis.png from OUT/diagnosis.json")
    a = p.parse_args()
    if a.replot:
        with open(os.path.join(a.out, "diagnosis.json")) as f:
            saved = json.load(f)
        plot(saved.pop("log"), saved, os.path.join(a.out, "diagnosis.png"))
        return

    import importlib.util

    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from alexnet_jax import data as datalib
    from alexnet_jax import sharding, train

    spec = importlib.util.spec_from_file_location("cfg", a.config)
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    config = cfg.get_config()
    config.data_dir = a.data_dir
    config.eval_crops = 1
    _set(config, a.set)
    data = datalib.create_data(datalib.DataSpec.from_config(config))
    per_epoch = datalib.steps_per_epoch(data.num_train, config.batch_size)
    mesh = sharding.make_mesh((1, 1), jax.devices()[:1])
    spec = train.RunSpec.from_config(config).with_classes(len(data.class_names))
    trainer = train.Trainer(spec, mesh, data.image_shape, per_epoch, a.steps)
    state = trainer.init(jax.random.PRNGKey(config.seed))
    config.learning_rate_effective = float(train.optim.current_lr(state.opt_state))
    step = jax_side(trainer, config)
    torch_step = torch_predict = None
    if not a.no_torch:
        torch_step, torch_predict = torch_side(trainer.model, jax.device_get(state.params), data.image_shape, config)

    log: dict[str, list] = {k: [] for k in ("jax_loss", "jax_logit_std", "jax_rms", "jax_grad",
                                            "torch_loss", "torch_logit_std", "torch_rms", "torch_grad")}
    t0 = time.time()
    for i, batch in enumerate(data.train(0, a.steps, 0, 1)):
        state, loss, lstd, rms, grads = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        log["jax_loss"].append(float(loss))
        log["jax_logit_std"].append(float(lstd))
        log["jax_rms"].append({k: float(v) for k, v in rms.items()})
        log["jax_grad"].append(_norms(grads))
        line = f"step {i + 1:3d}  jax loss {float(loss):9.4f}  logit std {float(lstd):8.3f}"
        if torch_step is not None:
            tl, tstd, trms, tgrad = torch_step(batch["image"], batch["label"])
            log["torch_loss"].append(tl)
            log["torch_logit_std"].append(tstd)
            log["torch_rms"].append(trms)
            log["torch_grad"].append(tgrad)
            line += f"  | torch loss {tl:9.4f}  logit std {tstd:8.3f}"
        print(line, f"({time.time() - t0:.0f}s)", flush=True)

    def accuracy(predict) -> tuple[float, float]:
        correct = loss = n = 0.0
        for b in data.eval(0, 1):
            logits = np.asarray(predict(b["image"]), np.float64)
            m = b["mask"]
            logp = logits - logits.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            correct += float(((logits.argmax(1) == b["label"]) * m).sum())
            loss -= float((logp[np.arange(len(m)), b["label"]] * m).sum())
            n += float(m.sum())
        return correct / n, loss / n

    apply = jax.jit(lambda params, x: trainer.model.apply({"params": params}, x, train=False))
    result = {"config": {k: config[k] for k in ("batch_size", "learning_rate", "lr_reference_batch", "init_scheme",
                                                 "variant", "weight_decay", "momentum") if k in config},
              "effective_learning_rate": config.learning_rate_effective, "steps": a.steps,
              "jax_eval_top1_loss": accuracy(lambda x: apply(state.params, x))}
    if torch_predict is not None:
        result["torch_eval_top1_loss"] = accuracy(torch_predict)
    print(json.dumps(result))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "diagnosis.json"), "w") as f:
        json.dump({**result, "log": log}, f)
    plot(log, result, os.path.join(a.out, "diagnosis.png"))


def plot(log: dict, result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = ["jax"] + (["torch"] if log["torch_loss"] else [])
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    for side, style in zip(sides, ("-", "--"), strict=False):
        ax[0].semilogy(log[f"{side}_loss"], style, label=side)
        ax[1].semilogy(log[f"{side}_logit_std"], style, label=side)
        for k, layer in enumerate(LAYERS):
            color = plt.cm.viridis(k / (len(LAYERS) - 1))
            ax[2].semilogy([r[layer] for r in log[f"{side}_rms"]], style, color=color,
                           label=layer if side == "jax" else None)
            ax[3].semilogy([g[layer] for g in log[f"{side}_grad"]], style, color=color,
                           label=layer if side == "jax" else None)
    ax[0].axhline(np.log(1000), color="gray", lw=0.8, ls=":")
    titles = ("training loss (dotted: ln 1000)", "logits' std", "layer output RMS (solid JAX, dashed torch)",
              "gradient norm per layer")
    for a_, t in zip(ax, titles, strict=True):
        a_.set_title(t)
        a_.set_xlabel("step")
    ax[0].legend()
    ax[2].legend(fontsize=7, ncol=2)
    c = result["config"]
    fig.suptitle(f"{c.get('variant')} net, batch {c.get('batch_size')}, lr {result['effective_learning_rate']:.4g}: "
                 f"eval top-1 JAX {result['jax_eval_top1_loss'][0]:.2f}"
                 + (f", torch {result['torch_eval_top1_loss'][0]:.2f}" if "torch_eval_top1_loss" in result else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
