"""Evaluate a checkpoint: `python -m alexnet_jax.evaluate --workdir DIR [--step N] [--config.key=value ...]`.

Reads the run's config from the checkpoint, restores only the parameters (`alexnet_jax.inference`) onto the
mesh the config asks for (any device count, whatever mesh trained them) and reports top-1/top-5 accuracy and
loss over the whole configured evaluation split, normalised by the checkpoint's normalisation record (the
training set is not read for it). The same `--config.key=value` overrides as `main`, for the keys
that do not change the model: `--config.eval_crops=10` (the paper's 10-patch test: the pipeline yields
(B, 10, H, W, C) and the eval step averages each image's softmax; 1: centre, 2: with its reflection),
`--config.data_dir`, `--config.mesh_shape='(2,2)'`, `--config.eval_batch_size`.
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
    from alexnet_jax import cli

    flags.DEFINE_string("workdir", None, "The training run's --workdir (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default: the latest readable one.")
    cli.define_config_overrides()


def evaluate_checkpoint(workdir: str, *, step: int | None = None, mesh: Any = None,
                        overrides: dict[str, Any] | None = None, data: Any = None) -> dict[str, Any]:
    """Restore `step` (default latest) of `workdir` onto `mesh` and evaluate it on `data` (default: the
    configured dataset's evaluation split). `overrides` change evaluation-side config keys only."""
    import jax

    from alexnet_jax import data as datalib
    from alexnet_jax import inference, train
    from alexnet_jax.errors import UserError

    saved = inference.read_config(workdir, step, overrides)
    # the configured data's keys are checked here, before anything is restored (a caller's `data` needs none)
    data_spec = datalib.DataSpec.from_config(saved[1]) if data is None else None
    loaded = inference.load(workdir, step, mesh, overrides, saved=saved)
    config = loaded.config
    if data is None:  # normalised as the checkpoint's images were (its record; only a checkpoint without one: the data)
        data = datalib.create_data(data_spec, inference.recorded_normalisation(loaded.meta), jax.process_index(),
                                   jax.process_count())
    evaluator = train.Evaluator(loaded.built, jax.tree_util.tree_map(lambda a: a.sharding, loaded.variables))

    def checked(batches):
        for i, batch in enumerate(batches):
            if i == 0 and config.eval_crops > 1 and batch["image"].ndim != 5:
                raise UserError(f"the {config.dataset} evaluation pipeline does not produce {config.eval_crops} "
                                "crops per image (it yields whole images); evaluate with --config.eval_crops=1")
            yield batch

    batches = data.eval(jax.process_index(), jax.process_count(), loaded.built.row_multiple)
    metrics = evaluator(loaded.variables, checked(batches))
    return {**metrics, "step": loaded.step, "crops": int(config.eval_crops), "dataset": config.dataset,
            "mesh": dict(loaded.mesh.shape), "checkpoint": loaded.checkpoint}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow is imported, and kept off the accelerator, where images are first read
    # (`data.tensorflow_on_cpu`): a bad flag or checkpoint is reported before that 4-second import.
    from alexnet_jax import cli
    from alexnet_jax.errors import UserError

    logging.get_absl_handler().use_absl_log_file = False
    try:
        result = evaluate_checkpoint(FLAGS.workdir, step=FLAGS.step, overrides=cli.config_overrides())
    except UserError as e:
        sys.exit(f"alexnet_jax.evaluate: error: {e}")
    logging.info("step %d, %d crop(s): top1 %.2f%% | top5 %.2f%% | loss %.4f | %d images", result["step"],
                 result["crops"], 100 * result["top1"], 100 * result["top5"], result["loss"], result["count"])
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdir"])
    from alexnet_jax import cli

    app.run(main, flags_parser=cli.parse_flags)
