"""Torchvision AlexNet weights as an alexnet_jax checkpoint.

`python -m alexnet_jax.convert --torchvision alexnet-owt-7be5be79.pth --workdir runs/torchvision` reads a
torchvision `alexnet` state dict (torch's own `weights_only` loader: no pickled code runs) and writes an orbax
checkpoint of the matching 'owt' variant, so `alexnet_jax.evaluate` and `alexnet_jax.predict` work on it.

Layout of torchvision's model (pytorch/vision torchvision/models/alexnet.py): `features.{0,3,6,8,10}` are
conv1..conv5 (OIHW kernels), `classifier.{1,4,6}` are fc6..fc8 (`(out, in)` weights). Flax keeps HWIO
kernels and `(in, out)` dense kernels, and flattens pool5 in NHWC order where torch flattens NCHW, so fc6's
input rows are permuted from (C, 6, 6) to (6, 6, C) order. Input normalisation is torchvision's ImageNet
mean/std, stored on this project's 0-255 scale.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from absl import app, flags, logging

from alexnet_jax.config import RESUMABLE_CHANGES
from alexnet_jax.data import Normalisation
from alexnet_jax.errors import UserError
from alexnet_jax.pretrained import (  # noqa: F401 - the conversion's pieces, also used by init_from
    CONV_KEYS,
    FC_KEYS,
    MEAN_255,
    PUBLISHED_TOP1,
    PUBLISHED_TOP5,
    STD_255,
    TORCHVISION_MEAN,
    TORCHVISION_STD,
    check_architecture,
    load_state_dict,
    to_flax_params,
)
from alexnet_jax.workdir_lock import WriterLock

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("torchvision", None, "A torchvision alexnet state dict (.pth), e.g. alexnet-owt-7be5be79.pth.")
    flags.DEFINE_string("workdir", None, "Where to write the checkpoint (WORKDIR/checkpoints/0).")
    from alexnet_jax import cli

    cli.define_config_overrides()  # e.g. --config.image_size=227, --config.data_dir for the saved config


def torchvision_config(widths: tuple[int, ...], fc_width: int, num_classes: int, image_size: int = 224) -> Any:
    """The alexnet_jax config that builds torchvision's network and evaluates as torchvision does."""
    from alexnet_jax import default_config
    from alexnet_jax.model import VARIANTS

    c = default_config.get_config()
    c.dataset = "imagenet2012"
    c.variant = "owt"
    spec = VARIANTS["owt"]
    c.widths = () if tuple(widths) == spec.widths else tuple(widths)
    c.fc_width = 0 if fc_width == spec.fc_width else fc_width
    c.num_classes = num_classes
    c.image_size = image_size
    # torchvision's evaluation: Resize(256) (PIL bilinear, antialiased), CenterCrop(224), Normalize(mean, std).
    c.resize_size = 256
    c.resize_method = "antialias"
    c.normalization = "channel"
    c.channel_mean = MEAN_255
    c.channel_std = STD_255
    c.eval_crops = 1
    c.eval_batch_size = 200
    c.train_crop = "random_resized"  # how torchvision trained it (for fine-tuning from these weights)
    c.pca_lighting = 0.0
    c.lr_schedule = "step"
    c.lr_step_epochs = (30.0, 60.0, 80.0)
    return c


def convert(path: str, workdir: str, *, image_size: int = 224,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the torchvision state dict at `path` as checkpoint step 0 of `workdir`; returns a summary."""
    import jax

    from alexnet_jax import checkpointing, sharding, train
    from alexnet_jax.specs import RunSpec

    state_dict = load_state_dict(path)
    widths, fc_width, num_classes, channels = check_architecture(state_dict, f"--torchvision {path}")
    if channels != 3:
        raise UserError(f"--torchvision {path}: conv1 reads {channels} channels; torchvision's AlexNet reads RGB (3)")
    directory = checkpointing.checkpoint_dir(workdir)
    if os.path.isdir(directory) and os.listdir(directory):
        raise UserError(f"{directory} already holds checkpoints; give a new --workdir for the converted weights")
    params = to_flax_params(state_dict)
    overrides = dict(overrides or {})
    config = torchvision_config(widths, fc_width, num_classes, int(overrides.pop("image_size", image_size)))
    for key, value in overrides.items():  # the keys the checkpoint may carry differently (data_dir, eval_crops...)
        if key not in RESUMABLE_CHANGES:
            raise UserError(f"--config.{key}: the converted net's config fixes it; these can be set: image_size, "
                            + ", ".join(sorted(RESUMABLE_CHANGES)))
        config[key] = tuple(value) if isinstance(config[key], tuple) else value
    image_size = config.image_size
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    image_shape = (image_size, image_size, 3)
    spec = RunSpec.from_config(config)
    trainer = train.Trainer(spec, mesh, image_shape, 1, 1)
    template = trainer.init(jax.random.PRNGKey(0))
    diffs = checkpointing.tree_differences(params, template.params)
    if diffs:  # the converted tree must be exactly the model's (a bug here must not write a bad checkpoint)
        raise UserError("the converted parameters do not fit the owt AlexNet: " + "; ".join(diffs))
    state = template.replace(params=jax.device_put(params, trainer.state_sharding.params))
    names = None
    if num_classes == 1000:
        from alexnet_jax.labels import class_names

        names = class_names("imagenet2012", {}, num_classes)
    norm = Normalisation("channel", np.asarray(MEAN_255, np.float32), np.asarray(STD_255, np.float32),
                         resize_size=config.resize_size)
    info = {"dataset": config.dataset, "image_shape": list(image_shape), "class_names": names,
            "normalisation": norm.to_json(), "source": os.path.abspath(path),
            "converted_from": "torchvision.models.alexnet state dict"}
    with WriterLock(workdir):  # a training run on this workdir meanwhile would race the save
        if os.path.isdir(directory) and os.listdir(directory):  # checked again: one may have finished meanwhile
            raise UserError(f"{directory} already holds checkpoints; give a new --workdir for the converted weights")
        ckpt = checkpointing.Checkpointer(workdir, spec.checkpoint, trainer.abstract_state, trainer.state_sharding,
                                          metadata=info)
        ckpt.save(0, state)
        ckpt.close()
    from alexnet_jax.flops import count_params

    return {"checkpoint": ckpt.step_dir(0), "params": count_params(params), "widths": list(widths),
            "fc_width": fc_width, "num_classes": num_classes}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from alexnet_jax import cli

    logging.get_absl_handler().use_absl_log_file = False
    try:
        out = convert(FLAGS.torchvision, FLAGS.workdir, overrides=cli.config_overrides())
    except UserError as e:
        sys.exit(f"alexnet_jax.convert: error: {e}")
    print(f"wrote {out['checkpoint']}: owt AlexNet, {out['params']:,} parameters, widths {out['widths']}, "
          f"fc {out['fc_width']}, {out['num_classes']} classes")
    print(f"evaluate: python -m alexnet_jax.evaluate --workdir {FLAGS.workdir} --config.data_dir=<tfds data_dir>")
    print(f"predict:  python -m alexnet_jax.predict --workdir {FLAGS.workdir} IMAGE.jpg")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["torchvision", "workdir"])
    from alexnet_jax import cli

    app.run(main, flags_parser=cli.parse_flags)
