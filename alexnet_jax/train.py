"""The one trainer: state, jit-compiled train/eval steps, and the loop with logging and evaluation."""

from __future__ import annotations

import collections
import json
import math
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

from alexnet_jax import checkpointing, optim, pretrained, scalars, sharding, xla_cpu
from alexnet_jax import data as datalib
from alexnet_jax.config import check_config
from alexnet_jax.errors import UserError
from alexnet_jax.model import AlexNet, create_model, groups_of
from alexnet_jax.preemption import SavePolicy
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
    batch's logits onto every device (B x classes floats per step)."""
    own = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    before = (logits > own) | ((logits == own) & (jnp.arange(logits.shape[-1]) < labels[:, None]))
    return (jnp.sum(before, axis=-1) < k).astype(jnp.float32)


def train_step(
    model: AlexNet, tx: optax.GradientTransformation, state: TrainState, batch: dict[str, jax.Array],
    augment: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch; returns the new state and batch-mean loss / top-1 / top-5. `augment`
    (`Data.on_device`): turns the batch the pipeline yields into the images first, inside the step."""
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

    def __init__(self, model: AlexNet, mesh: jax.sharding.Mesh, strategy: str, variables_sharding: Any):
        self.batch_sharding = sharding.batch_sharding(mesh, strategy)
        # A process's evaluation batch need only be a multiple of its share of the batch shards.
        shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(strategy))
        self.row_multiple = max(1, shards // jax.process_count())
        self.step = jax.jit(partial(eval_step, model), in_shardings=(variables_sharding, self.batch_sharding),
                            out_shardings=sharding.replicated(mesh))

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble the global batch from this process's rows."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def __call__(self, variables: dict[str, Any], batches) -> dict[str, float]:
        """Loss, top-1, top-5 over every real row of `batches` (this process's share of them), and the count."""
        totals = None
        for local in batches:
            out = self.step(variables, self.global_batch(local))
            totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
        totals = jax.device_get(totals)
        n = float(totals["count"])
        return {"loss": float(totals["loss"]) / n, "top1": float(totals["top1"]) / n,
                "top5": float(totals["top5"]) / n, "count": int(round(n))}


class Trainer:
    """Holds the compiled steps for one config and mesh."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, image_shape, steps_per_epoch,
                 total_steps, augment: Any = None):
        self.config, self.mesh = config, mesh
        strategy = sharding.strategy_of(config)
        sharding.check_mesh(config, mesh, strategy, groups=groups_of(config))
        self.model = create_model(config, mesh)
        self.tx = optim.create_optimizer(config, steps_per_epoch, total_steps)
        self.plateau = optim.create_plateau(config)
        self.image_shape = tuple(image_shape)
        init = partial(create_train_state, model=self.model, tx=self.tx, plateau=self.plateau,
                       image_shape=self.image_shape)
        self.abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
        self.state_sharding = sharding.tree_shardings(mesh, self.abstract_state, strategy)
        self.batch_sharding = sharding.batch_sharding(mesh, strategy)
        self.evaluator = Evaluator(self.model, mesh, strategy, variables_of(self.state_sharding))
        self.eval_row_multiple = self.evaluator.row_multiple
        rep = sharding.replicated(mesh)
        self.init = jax.jit(init, out_shardings=self.state_sharding)
        self.train_step = jax.jit(
            partial(train_step, self.model, self.tx, augment=augment),
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, rep),
            donate_argnums=0,
        )

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble the global batch from this process's rows."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def evaluate(self, state: TrainState, batches) -> dict[str, float]:
        return self.evaluator(variables_of(state), batches)


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


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_metadata(config: ml_collections.ConfigDict, data: datalib.Data) -> dict[str, Any]:
    """What a checkpoint records beside the arrays so inference needs no training set: the input shape, the
    class names and the normalisation (the whole record: predict preprocesses exactly like evaluation)."""
    norm = data.normalisation
    return {
        "dataset": config.dataset,
        "image_shape": list(data.image_shape),
        "class_names": list(data.class_names),
        "normalisation": None if norm is None else norm.to_json(),
        "num_train": data.num_train,
        "num_eval": data.num_eval,
        "steps_per_epoch": datalib.steps_per_epoch(data.num_train, config.batch_size),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data: datalib.Data | None = None
                       ) -> dict[str, Any]:
    """Train, evaluate every `eval_every_steps` (default: each epoch) and write `workdir/summary.json`.
    `data`: the dataset to use instead of the configured one (e.g. the accelerator check's synthetic batches)."""
    t_start = time.time()
    check_config(config, jax.process_count())
    mesh = sharding.make_mesh(config.mesh_shape)
    sharding.check_mesh(config, mesh, sharding.strategy_of(config), groups=groups_of(config))
    if jax.default_backend() == "cpu" and xla_cpu.convolutions_in_ynnpack(os.environ.get("XLA_FLAGS", "")):
        logging.warning(xla_cpu.SLOW_CONVOLUTIONS)
    with WriterLock(workdir, jax.process_index()):  # makes the workdir; a second run on it stops here, in one line
        return _train_and_evaluate(config, workdir, data, mesh, t_start)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data: datalib.Data | None, mesh: Any,
                        t_start: float) -> dict[str, Any]:
    pre, normalisation = pretrained.for_run(config, workdir)
    if data is None:  # process 0 prepares what is missing, the others wait for it
        data = datalib.create_data(datalib.DataSpec.from_config(config), normalisation, jax.process_index(),
                                   jax.process_count())
    if config.num_classes == 0:  # the dataset's count (a folder's class folders); saved with the checkpoint
        config.num_classes = len(data.class_names)
    per_epoch = datalib.steps_per_epoch(data.num_train, config.batch_size)
    if per_epoch == 0:
        raise UserError(f"--config.batch_size={config.batch_size} exceeds the {data.num_train} training images")
    total = config.num_train_steps if config.num_train_steps > 0 else int(round(config.num_epochs * per_epoch))
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else per_epoch

    trainer = Trainer(config, mesh, data.image_shape, per_epoch, total, augment=data.on_device)
    state = trainer.init(jax.random.PRNGKey(config.seed))
    # --- checkpointing: resume from WORKDIR/checkpoints if there is a checkpoint (alexnet_jax.checkpointing)
    ckpt = checkpointing.Checkpointer(workdir, config, trainer.abstract_state, trainer.state_sharding,
                                      metadata=run_metadata(config, data))
    state, restored_eval = ckpt.restore_or(state)
    # --- end checkpointing
    start = int(state.step)
    if pre is not None and start == 0:  # fine-tuning starts from the pretrained weights; a resumed run does not
        state = pretrained.load_into(state, pre, trainer.state_sharding)
    if config.frozen:
        logging.info("frozen (no update, no weight decay, no optimizer state): %s",
                     ", ".join(optim.frozen_paths(config.frozen, state.params)))
    logging.info("%s on %s: %d train / %d test images, %d steps (%.2f epochs of %d), batch %d, learning rate "
                 "%.4g, mesh %s", config.variant, config.dataset, data.num_train, data.num_eval, total,
                 total / per_epoch, per_epoch, config.batch_size, optim.base_learning_rate(config),
                 dict(mesh.shape))

    # TensorBoard scalars (process 0), or WORKDIR/metrics.jsonl without TensorFlow; a failed write stops the run
    writer = scalars.Scalars(workdir, on_error=ckpt.stop_after)
    pid, nproc = jax.process_index(), jax.process_count()
    batches = prefetch(data.train(start, total, pid, nproc), trainer.global_batch)
    pending: list[dict[str, jax.Array]] = []
    train_seconds, timed_images, last_eval = 0.0, 0, restored_eval
    best_eval: dict[str, Any] = {}  # the highest validation top-1 of this run's evaluations, and its step
    t_interval, interval_steps = time.time(), 0
    with SavePolicy(ckpt, config) as policy:  # saves when due; SIGTERM: save, stop (alexnet_jax.preemption)
        for step in range(start, total):
            state, metrics = trainer.train_step(state, next(batches))
            pending.append(metrics)
            interval_steps += 1
            done = step + 1
            step_eval = None
            if done % config.log_every_steps == 0 or done == total:
                fetched = jax.device_get(pending)
                now = time.time()
                elapsed = now - t_interval
                if step + 1 - interval_steps > start:  # not the first interval: it includes compilation
                    train_seconds += elapsed
                    timed_images += interval_steps * config.batch_size
                means = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "top1", "top5")}
                if not np.isfinite(means["loss"]):
                    raise TrainingError(
                        f"the training loss became {means['loss']} by step {done}: lower --config.learning_rate "
                        f"(now {config.learning_rate}, {optim.base_learning_rate(config):.4g} at batch "
                        f"{config.batch_size}) or check the input data (docs/recipe.md)"
                    )
                lr = float(fetched[-1]["lr"])
                rate = interval_steps * config.batch_size / max(elapsed, 1e-9)
                eta = (total - done) * config.batch_size / rate
                logging.info("step %d/%d (epoch %.2f) | loss %.4f | top1 %.2f%% | top5 %.2f%% | lr %.4g | "
                             "%.0f img/s | ETA %s", done, total, done / per_epoch, means["loss"],
                             100 * means["top1"], 100 * means["top5"], lr, rate, _fmt_seconds(eta))
                writer.write(done, {"train/loss": means["loss"], "train/top1": means["top1"],
                                    "train/top5": means["top5"], "train/lr": lr, "train/images_per_second": rate})
                pending.clear()
                interval_steps, t_interval = 0, time.time()
            if done % eval_every == 0 or done == total:
                jax.block_until_ready(state)  # queued train steps are training time, not evaluation time
                t_eval = time.time()
                last_eval = step_eval = trainer.evaluate(state, data.eval(pid, nproc, trainer.eval_row_multiple))
                if last_eval["top1"] > best_eval.get("top1", -1.0):
                    best_eval = {**last_eval, "step": done}
                if config.lr_schedule == "plateau":
                    plateau, opt_state = optim.plateau_step(
                        trainer.plateau, state.plateau, state.opt_state, 1.0 - last_eval["top1"])
                    state = state.replace(plateau=plateau, opt_state=opt_state)
                logging.info("eval at step %d: top1 %.2f%% | top5 %.2f%% | loss %.4f | %d images | %.1fs",
                             done, 100 * last_eval["top1"], 100 * last_eval["top5"], last_eval["loss"],
                             last_eval["count"], time.time() - t_eval)
                writer.write(done, {"eval/top1": last_eval["top1"], "eval/top5": last_eval["top5"],
                                    "eval/loss": last_eval["loss"]})
                t_interval += time.time() - t_eval  # evaluation time is not training time
            # --- checkpointing: save per policy; on SIGTERM/preemption save and stop
            if policy.after_step(done, state, final=done == total, eval_metrics=step_eval, last_eval=last_eval):
                break
    ckpt.close()
    writer.close()
    if policy.preempted_at is not None:
        return {"preempted": True, "step": policy.preempted_at, "checkpoint": ckpt.step_dir(policy.preempted_at)}
    # --- end checkpointing

    summary = {
        "top1_accuracy": last_eval.get("top1"),
        "top5_accuracy": last_eval.get("top5"),
        "top1_error": None if not last_eval else 1 - last_eval["top1"],
        "top5_error": None if not last_eval else 1 - last_eval["top5"],
        "eval_loss": last_eval.get("loss"),
        "best_top1_accuracy": best_eval.get("top1"),  # the kept best checkpoint (checkpoint_keep_best)
        "best_eval_loss": best_eval.get("loss"),
        "best_step": best_eval.get("step"),
        "num_eval_examples": last_eval.get("count"),
        "step": int(state.step),
        "epochs": int(state.step) / per_epoch,
        "train_images_per_second": timed_images / train_seconds if train_seconds else None,
        "wall_seconds": time.time() - t_start,
        "dataset": config.dataset,
        "variant": config.variant,
        "batch_size": config.batch_size,
        "learning_rate": optim.base_learning_rate(config),
        "mesh": dict(mesh.shape),
    }
    if jax.process_index() == 0:
        path = os.path.join(workdir, "summary.json")
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(path + ".tmp", path)
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror}): free space or make {workdir} writable; training "
                            f"finished and its checkpoint (step {summary['step']}) is saved: rerunning the same "
                            "command writes the summary") from None
    logging.info("done: %s", json.dumps(summary))
    return summary
