"""The one trainer: state, jit-compiled train/eval steps, and the loop with logging and evaluation.

`train_and_evaluate(config, workdir)` is the door: it reads the config once into a `RunSpec` (alexnet_jax.specs)
and everything after it takes specs. The loop's bookkeeping (when to log or evaluate, images/s, ETA) is
`alexnet_jax.loop`'s; the model on its mesh is `alexnet_jax.build`'s, shared with evaluation and inference.
"""

from __future__ import annotations

import collections
import json
import os
import time
from functools import partial
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from alexnet_jax import checkpointing, loop, optim, pretrained, scalars, sharding, xla_cpu
from alexnet_jax import data as datalib
from alexnet_jax.build import Built, build
from alexnet_jax.errors import UserError
from alexnet_jax.model import AlexNet
from alexnet_jax.preemption import SavePolicy
from alexnet_jax.specs import RunSpec
from alexnet_jax.workdir_lock import WriterLock


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    plateau: Any  # optax reduce_on_plateau state, fed the validation error once per evaluation
    rng: jax.Array  # dropout key; each step folds in its own number


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN); the message says what to try."""


def create_train_state(
    rng: jax.Array, model: AlexNet, tx: optax.GradientTransformation, plateau: Any,
    image_shape: tuple[int, int, int],
) -> TrainState:
    init_rng, dropout_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        plateau=plateau.init(params),
        rng=dropout_rng,
    )


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits, ranked as `jax.lax.top_k` ranks them (a tie goes to the
    lower class index): the label's rank is the number of classes ranked before it. Elementwise and a sum over the
    classes, so each device ranks its own rows of a batch-sharded array; `top_k` itself made XLA gather the whole
    batch's logits onto every device (B x classes floats per step). A row with a NaN logit is never correct (every
    comparison with NaN is false, which would otherwise rank its label first)."""
    own = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    before = (logits > own) | ((logits == own) & (jnp.arange(logits.shape[-1]) < labels[:, None]))
    finite = ~jnp.any(jnp.isnan(logits), axis=-1)
    return ((jnp.sum(before, axis=-1) < k) & finite).astype(jnp.float32)


def train_step(
    model: AlexNet, tx: optax.GradientTransformation, state: TrainState, batch: dict[str, jax.Array],
    augment: Any = None, label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch; returns the new state and batch-mean loss / top-1 / top-5. `augment`
    (`Data.on_device`): turns the batch the pipeline yields into the images first, inside the step.
    `label_smoothing` > 0: the targets are one-hot mixed with the uniform distribution (Szegedy et al. 2016), and
    the loss reported is the one minimised."""
    if augment is not None:
        batch = augment(batch)
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    has_bn = bool(state.batch_stats)

    def loss_fn(params):
        variables = {"params": params, **({"batch_stats": state.batch_stats} if has_bn else {})}
        logits, new_vars = model.apply(
            variables, batch["image"], train=True, rngs={"dropout": dropout_rng},
            mutable=["batch_stats"] if has_bn else [],
        )
        with jax.named_scope("loss"):  # the collectives report attributes its traffic to 'loss'
            if label_smoothing:
                targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
                loss = optax.softmax_cross_entropy(logits, targets).mean()
            else:
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, new_vars)

    (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        batch_stats=new_vars["batch_stats"] if has_bn else state.batch_stats,
    )
    with jax.named_scope("metrics"):
        metrics = {
            "loss": loss,
            "top1": topk_correct(logits, batch["label"], 1).mean(),
            "top5": topk_correct(logits, batch["label"], 5).mean(),
            "lr": optim.current_lr(opt_state),
        }
    return new_state, metrics


def crop_averaged_logits(apply_fn: Any, images: jax.Array) -> jax.Array:
    """Logits for (B, H, W, C) images, or for (B, crops, H, W, C) crops of each image: then the log of the
    softmax averaged over an image's crops (the paper's 10-patch test), whatever dataset made the crops."""
    if images.ndim == 4:
        return apply_fn(images)
    b, n = images.shape[:2]
    logits = apply_fn(images.reshape(b * n, *images.shape[2:]))
    probs = jax.nn.softmax(logits.reshape(b, n, -1), axis=-1).mean(axis=1)
    return jnp.log(probs)


def variables_of(state: TrainState) -> dict[str, Any]:
    """The model's variables in a TrainState (or its shardings): params, and BatchNorm statistics if any."""
    return {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}


def eval_step(model: AlexNet, variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the real (mask == 1) rows, so padded rows never count."""
    logits = crop_averaged_logits(partial(model.apply, variables, train=False), batch["image"])
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
        "top5": jnp.sum(topk_correct(logits, batch["label"], 5) * mask),
        "count": jnp.sum(mask),
    }


class Evaluator:
    """The jit-compiled evaluation step on a mesh, for a model's variables alone (no optimizer): used by the
    training loop and by `alexnet_jax.evaluate` on restored parameters."""

    def __init__(self, built: Built, variables_sharding: Any):
        self.built = built
        self.step = jax.jit(partial(eval_step, built.model), in_shardings=(variables_sharding, built.batch_sharding),
                            out_shardings=sharding.replicated(built.mesh))

    def __call__(self, variables: dict[str, Any], batches) -> dict[str, float]:
        """Loss, top-1, top-5 over every real row of `batches` (this process's share of them), and the count."""
        totals = None
        for local in batches:
            out = self.step(variables, self.built.global_batch(local))
            totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
        totals = jax.device_get(totals)
        n = float(totals["count"])
        return {"loss": float(totals["loss"]) / n, "top1": float(totals["top1"]) / n,
                "top5": float(totals["top5"]) / n, "count": int(round(n))}


class Trainer:
    """The compiled steps of one run on one mesh: `spec`'s model (`build`) with its optimizer."""

    def __init__(self, spec: RunSpec, mesh: jax.sharding.Mesh, image_shape, steps_per_epoch, total_steps,
                 augment: Any = None):
        self.spec, self.mesh = spec, mesh
        self.built = build(spec.model, mesh, spec.sharding.strategy, image_shape)
        self.model, self.image_shape = self.built.model, self.built.image_shape
        self.global_batch = self.built.global_batch
        self.tx = optim.create_optimizer(spec.optimizer, steps_per_epoch, total_steps)
        self.plateau = optim.create_plateau(spec.optimizer)
        init = partial(create_train_state, model=self.model, tx=self.tx, plateau=self.plateau,
                       image_shape=self.image_shape)
        self.abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
        self.state_sharding = self.built.shardings(self.abstract_state)
        self.batch_sharding = self.built.batch_sharding
        self.evaluator = Evaluator(self.built, variables_of(self.state_sharding))
        self.init = jax.jit(init, out_shardings=self.state_sharding)
        self.train_step = jax.jit(
            partial(train_step, self.model, self.tx, augment=augment,
                    label_smoothing=spec.optimizer.label_smoothing),
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, sharding.replicated(mesh)),
            donate_argnums=0,
        )

    def evaluate(self, state: TrainState, batches) -> tuple[TrainState, dict[str, float]]:
        """Evaluate, then feed the validation error to the plateau schedule (the paper's divide-by-10) when it
        is the one in use: the state to go on with, and the metrics."""
        metrics = self.evaluator(variables_of(state), batches)
        if self.spec.optimizer.lr_schedule == "plateau":
            plateau, opt_state = optim.plateau_step(self.plateau, state.plateau, state.opt_state,
                                                    1.0 - metrics["top1"])
            state = state.replace(plateau=plateau, opt_state=opt_state)
        return state, metrics


def prefetch(batches: Any, put: Any, depth: int = 2) -> Any:
    """`put(batch)` (the host-to-device transfer, asynchronous) run `depth` batches ahead of the one yielded, so
    the next batch is on the device before the current step ends (flax's examples prefetch 2 on GPUs)."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def run_metadata(spec: RunSpec, data: datalib.Data) -> dict[str, Any]:
    """What a checkpoint records beside the arrays so inference needs no training set: the input shape, the
    class names and the normalisation (the whole record: predict preprocesses exactly like evaluation)."""
    norm = data.normalisation
    return {
        "dataset": spec.loop.dataset,
        "image_shape": list(data.image_shape),
        "class_names": list(data.class_names),
        "normalisation": None if norm is None else norm.to_json(),
        "num_train": data.num_train,
        "num_eval": data.num_eval,
        "steps_per_epoch": datalib.steps_per_epoch(data.num_train, spec.loop.batch_size),
    }


def summary(spec: RunSpec, mesh: Any, step: int, per_epoch: int, last_eval: dict[str, Any],
            best_eval: dict[str, Any], meter: loop.Meter, t_start: float) -> dict[str, Any]:
    """`summary.json`: the last and the best evaluation, the run's length, throughput and setting."""
    return {
        "top1_accuracy": last_eval.get("top1"),
        "top5_accuracy": last_eval.get("top5"),
        "top1_error": None if not last_eval else 1 - last_eval["top1"],
        "top5_error": None if not last_eval else 1 - last_eval["top5"],
        "eval_loss": last_eval.get("loss"),
        "best_top1_accuracy": best_eval.get("top1"),  # the kept best checkpoint (checkpoint_keep_best)
        "best_eval_loss": best_eval.get("loss"),
        "best_step": best_eval.get("step"),
        "num_eval_examples": last_eval.get("count"),
        "step": step,
        "epochs": step / per_epoch,
        "train_images_per_second": meter.images_per_second,
        "wall_seconds": time.time() - t_start,
        "dataset": spec.loop.dataset,
        "variant": spec.model.variant,
        "batch_size": spec.loop.batch_size,
        "learning_rate": spec.optimizer.base_learning_rate,
        "mesh": dict(mesh.shape),
    }


def write_summary(workdir: str, result: dict[str, Any]) -> None:
    """`WORKDIR/summary.json`, written whole or not at all (process 0)."""
    path = os.path.join(workdir, "summary.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}): free space or make {workdir} writable; training "
                        f"finished and its checkpoint (step {result['step']}) is saved: rerunning the same "
                        "command writes the summary") from None


def log_train(spec: RunSpec, writer: scalars.Scalars, done: int, total: int, per_epoch: int,
              fetched: list[dict[str, Any]], rate: float, eta: float) -> None:
    """The interval's mean loss and accuracy in the log and TensorBoard; a NaN loss stops the run in one line."""
    means = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "top1", "top5")}
    if not np.isfinite(means["loss"]):
        raise TrainingError(
            f"the training loss became {means['loss']} by step {done}: lower --config.learning_rate (now "
            f"{spec.optimizer.learning_rate}, {spec.optimizer.base_learning_rate:.4g} at batch "
            f"{spec.loop.batch_size}) or check the input data (docs/paper.md)")
    lr = float(fetched[-1]["lr"])
    logging.info("step %d/%d (epoch %.2f) | loss %.4f | top1 %.2f%% | top5 %.2f%% | lr %.4g | %.0f img/s | ETA %s",
                 done, total, done / per_epoch, means["loss"], 100 * means["top1"], 100 * means["top5"], lr, rate,
                 loop.format_seconds(eta))
    writer.write(done, {"train/loss": means["loss"], "train/top1": means["top1"], "train/top5": means["top5"],
                        "train/lr": lr, "train/images_per_second": rate})


def log_eval(writer: scalars.Scalars, done: int, metrics: dict[str, Any], seconds: float) -> None:
    logging.info("eval at step %d: top1 %.2f%% | top5 %.2f%% | loss %.4f | %d images | %.1fs", done,
                 100 * metrics["top1"], 100 * metrics["top5"], metrics["loss"], metrics["count"], seconds)
    writer.write(done, {"eval/top1": metrics["top1"], "eval/top5": metrics["top5"], "eval/loss": metrics["loss"]})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data: datalib.Data | None = None
                       ) -> dict[str, Any]:
    """Train, evaluate every `eval_every_steps` (default: each epoch) and write `workdir/summary.json`.
    `data`: the dataset to use instead of the configured one (e.g. the accelerator check's synthetic batches).
    The config is read here, once, into specs: a bad value stops the run before data or devices are touched."""
    t_start = time.time()
    spec = RunSpec.from_config(config, jax.process_count())
    mesh = spec.sharding.make_mesh()
    spec.check_mesh(mesh)  # the batches and conv groups it can split, before any data is read
    if jax.default_backend() == "cpu" and xla_cpu.convolutions_in_ynnpack(os.environ.get("XLA_FLAGS", "")):
        logging.warning(xla_cpu.SLOW_CONVOLUTIONS)
    with WriterLock(workdir, jax.process_index()):  # makes the workdir; a second run on it stops here, in one line
        return run(spec, workdir, mesh, data, t_start)


def run(spec: RunSpec, workdir: str, mesh: Any, data: datalib.Data | None, t_start: float) -> dict[str, Any]:
    """The training loop of `train_and_evaluate`, once the specs are read, the mesh made and the workdir ours."""
    pid, nproc = jax.process_index(), jax.process_count()
    pre, normalisation = pretrained.for_run(spec.transfer, workdir)
    if data is None:  # process 0 prepares what is missing, the others wait for it
        data = datalib.create_data(spec.data, normalisation, pid, nproc)
    spec = spec.with_classes(len(data.class_names))
    per_epoch = datalib.steps_per_epoch(data.num_train, spec.loop.batch_size)
    if per_epoch == 0:
        raise UserError(f"--config.batch_size={spec.loop.batch_size} exceeds the {data.num_train} training images")
    total, eval_every = spec.loop.total_steps(per_epoch), spec.loop.eval_every(per_epoch)
    trainer = Trainer(spec, mesh, data.image_shape, per_epoch, total, augment=data.on_device)
    ckpt = checkpointing.Checkpointer(workdir, spec.checkpoint, trainer.abstract_state, trainer.state_sharding,
                                      metadata=run_metadata(spec, data))
    state, last_eval = ckpt.restore_or(trainer.init(jax.random.PRNGKey(spec.loop.seed)))  # resume if saved
    start = int(state.step)
    if pre is not None and start == 0:  # fine-tuning starts from the pretrained weights; a resumed run does not
        state = pretrained.load_into(state, pre, trainer.state_sharding)
    log_start(spec, data, mesh, state, total, per_epoch)
    writer = scalars.Scalars(workdir)  # TensorBoard (or metrics.jsonl), process 0
    batches = prefetch(data.train(start, total, pid, nproc), trainer.global_batch)
    meter, pending, best_eval = loop.Meter(spec.loop.batch_size, total), [], {}
    with SavePolicy(ckpt, spec.checkpoint) as policy:  # saves when due; SIGTERM: save, stop (preemption.py)
        for done in range(start + 1, total + 1):
            state, metrics = trainer.train_step(state, next(batches))
            pending.append(metrics)
            meter.step()
            if loop.periodic(done, spec.loop.log_every_steps, total):
                log_train(spec, writer, done, total, per_epoch, jax.device_get(pending), *meter.report(done))
                pending.clear()
                meter.restart()  # the log and TensorBoard writes are not training time
            step_eval = None
            if loop.periodic(done, eval_every, total):
                jax.block_until_ready(state)  # queued train steps are training time, not evaluation time
                t_eval = time.time()
                state, step_eval = trainer.evaluate(state, data.eval(pid, nproc, trainer.built.row_multiple))
                last_eval, best_eval = step_eval, max(best_eval, {**step_eval, "step": done},
                                                      key=lambda e: e.get("top1", -1.0))
                log_eval(writer, done, step_eval, time.time() - t_eval)
                meter.exclude(time.time() - t_eval)
            if policy.after_step(done, state, final=done == total, eval_metrics=step_eval, last_eval=last_eval):
                break
    ckpt.close()
    writer.close()
    if policy.preempted_at is not None:
        return {"preempted": True, "step": policy.preempted_at, "checkpoint": ckpt.step_dir(policy.preempted_at)}
    result = summary(spec, mesh, int(state.step), per_epoch, last_eval, best_eval, meter, t_start)
    if pid == 0:
        write_summary(workdir, result)
    logging.info("done: %s", json.dumps(result))
    return result


def log_start(spec: RunSpec, data: datalib.Data, mesh: Any, state: TrainState, total: int, per_epoch: int) -> None:
    if spec.optimizer.frozen:
        logging.info("frozen (no update, no weight decay, no optimizer state): %s",
                     ", ".join(optim.frozen_paths(spec.optimizer.frozen, state.params)))
    logging.info("%s on %s: %d train / %d test images, %d steps (%.2f epochs of %d), batch %d, learning rate "
                 "%.4g, mesh %s", spec.model.variant, spec.loop.dataset, data.num_train, data.num_eval, total,
                 total / per_epoch, per_epoch, spec.loop.batch_size, spec.optimizer.base_learning_rate,
                 dict(mesh.shape))
