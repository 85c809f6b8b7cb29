"""Evaluate a checkpoint: `python -m alexnet_jax.evaluate --workdir DIR [--step N] [--crops 1|2|10] [--mesh_shape 2,2]`.

Reads the run's config from the checkpoint, restores the parameters onto the requested mesh (any device
count, whatever mesh trained them) and reports top-1/top-5 accuracy and loss over the whole configured
evaluation split. `--ten_crop` sets `config.eval_crops=10`: the dataset's pipeline then yields (B, 10, H, W, C)
crops and the eval step averages the softmax over each image's crops (the paper's test, section 4.1);
`--crops N` sets any of the views (1: the image alone, 2: with its reflection, 10: the paper's).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags (defined on demand, so importing this module never clashes with main's)."""
    flags.DEFINE_string("workdir", None, "The training run's --workdir (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default: the latest readable one.")
    flags.DEFINE_bool("ten_crop", False, "Average the softmax over 10 crops per image (config.eval_crops=10).")
    flags.DEFINE_enum("crops", None, ["1", "2", "10"], "Views averaged per image (config.eval_crops); default: "
                      "the run's.")
    flags.DEFINE_list("mesh_shape", None, "Mesh (data, model) to evaluate on, e.g. 2,2 or -1,1; default: the run's.")
    flags.DEFINE_integer("eval_batch_size", None, "Global evaluation batch size; default: the run's.")
    flags.DEFINE_string("data_dir", None, "Override config.data_dir (where tfds keeps prepared datasets).")


def evaluate_checkpoint(workdir: str, *, step: int | None = None, mesh: Any = None,
                        overrides: dict[str, Any] | None = None, data: Any = None) -> dict[str, Any]:
    """Restore `step` (default latest) of `workdir` onto `mesh` and evaluate it on `data` (default: the
    configured dataset's evaluation split). `overrides` change evaluation-side config keys only."""
    import jax

    from alexnet_jax import checkpointing, sharding, train
    from alexnet_jax import data as datalib
    from alexnet_jax.errors import UserError

    step, saved, _ = checkpointing.read_saved(workdir, step)
    config = checkpointing.config_from_dict(saved)
    for key, value in (overrides or {}).items():
        if key not in checkpointing.RESUMABLE_CHANGES:
            raise UserError(f"{key} cannot be changed when evaluating a checkpoint (it changes the model)")
        config[key] = value
    if config.eval_crops not in (1, 2, 10):
        raise UserError(f"eval_crops={config.eval_crops}: choose 1 (centre), 2 (with its reflection) or 10")
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh_shape)
    if config.eval_batch_size % mesh.shape["data"]:
        raise UserError(f"--eval_batch_size={config.eval_batch_size} must be divisible by the mesh's data axis "
                        f"({mesh.shape['data']})")
    data = data if data is not None else datalib.create_data(config)
    per_epoch = max(1, datalib.steps_per_epoch(data.num_train, config.batch_size))
    total = config.num_train_steps if config.num_train_steps > 0 else int(round(config.num_epochs * per_epoch))
    trainer = train.Trainer(config, mesh, data.image_shape, per_epoch, total)
    ckpt = checkpointing.for_trainer(workdir, config, trainer, read_only=True)
    restored = ckpt.restore(step, template=trainer.init(jax.random.PRNGKey(0)), model_only=True)

    def checked(batches):
        for i, batch in enumerate(batches):
            if i == 0 and config.eval_crops > 1 and batch["image"].ndim != 5:
                raise UserError(f"the {config.dataset} evaluation pipeline does not produce {config.eval_crops} "
                                "crops per image (it yields whole images); evaluate without --ten_crop")
            yield batch

    batches = data.eval(jax.process_index(), jax.process_count(), trainer.eval_row_multiple)
    metrics = trainer.evaluate(restored.state, checked(batches))
    return {**metrics, "step": step, "crops": int(config.eval_crops), "dataset": config.dataset,
            "mesh": dict(mesh.shape), "checkpoint": ckpt.step_dir(step)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from alexnet_jax.errors import UserError

    overrides: dict[str, Any] = {"eval_crops": 10} if FLAGS.ten_crop else {}  # else the run's own views
    if FLAGS.crops is not None:
        if FLAGS.ten_crop and FLAGS.crops != "10":
            sys.exit(f"alexnet_jax.evaluate: error: --ten_crop and --crops={FLAGS.crops} disagree: give one of them")
        overrides["eval_crops"] = int(FLAGS.crops)
    if FLAGS.mesh_shape:
        try:
            overrides["mesh_shape"] = tuple(int(s) for s in FLAGS.mesh_shape)
        except ValueError:
            sys.exit(f"alexnet_jax.evaluate: error: --mesh_shape={','.join(FLAGS.mesh_shape)}: give two integers")
    if FLAGS.eval_batch_size:
        overrides["eval_batch_size"] = FLAGS.eval_batch_size
    if FLAGS.data_dir is not None:
        overrides["data_dir"] = FLAGS.data_dir
    logging.get_absl_handler().use_absl_log_file = False
    try:
        result = evaluate_checkpoint(FLAGS.workdir, step=FLAGS.step, overrides=overrides)
    except UserError as e:
        sys.exit(f"alexnet_jax.evaluate: error: {e}")
    logging.info("step %d, %d crop(s): top1 %.2f%% | top5 %.2f%% | loss %.4f | %d images", result["step"],
                 result["crops"], 100 * result["top1"], 100 * result["top5"], result["loss"], result["count"])
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
