"""Command line: `python -m alexnet_jax.main --config configs/imagenet.py --workdir DIR [--config.key=value]`."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where logs, TensorBoard scalars and summary.json are written.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override keys with --config.key=value.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow (tf.data) is imported, and kept off the accelerator, when the data is opened
    # (`data.tensorflow_on_cpu`): a bad flag or mesh stops the run before that 4-second import.
    from alexnet_jax import distributed, train
    from alexnet_jax.errors import UserError

    logging.get_absl_handler().use_absl_log_file = False
    try:
        distributed.initialize(distributed.DistributedSpec.from_config(FLAGS.config))  # before any other JAX call
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (UserError, train.TrainingError) as e:
        sys.exit(f"alexnet_jax: error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
