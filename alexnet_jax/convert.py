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

FLAGS = flags.FLAGS

CONV_KEYS = ("features.0", "features.3", "features.6", "features.8", "features.10")
FC_KEYS = ("classifier.1", "classifier.4", "classifier.6")
CONV_KERNELS = (11, 5, 3, 3, 3)
POOL_SIZE = 6  # torchvision's AdaptiveAvgPool2d((6, 6))
# torchvision's transforms.Normalize for its ImageNet weights (0-1 scale) ...
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
# ... and this project's 0-255 scale (the data pipelines and predict normalise uint8 pixel values).
MEAN_255 = tuple(255.0 * m for m in TORCHVISION_MEAN)
STD_255 = tuple(255.0 * s for s in TORCHVISION_STD)
# Published accuracy of IMAGENET1K_V1 (torchvision's model card), centre 224 crop of the 256 resize.
PUBLISHED_TOP1, PUBLISHED_TOP5 = 0.56522, 0.79066


def define_flags() -> None:
    flags.DEFINE_string("torchvision", None, "A torchvision alexnet state dict (.pth), e.g. alexnet-owt-7be5be79.pth.")
    flags.DEFINE_string("workdir", None, "Where to write the checkpoint (WORKDIR/checkpoints/0).")
    from alexnet_jax import cli

    cli.define_config_overrides()  # e.g. --config.image_size=227, --config.data_dir for the saved config


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The file's tensors as float32 NumPy arrays, read with `torch.load(weights_only=True)`."""
    try:
        import torch
    except ImportError:
        raise UserError("reading a .pth file needs PyTorch: pip install 'alexnet_jax[torch]' "
                        "(a CPU build is enough)") from None
    if not os.path.isfile(path):
        raise UserError(f"--torchvision {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a file that is not a state dict
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"--torchvision {path}: not a PyTorch state dict that loads with weights_only=True "
                        f"({first}). Save the weights with torch.save(model.state_dict(), path).") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # training-script checkpoints
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"--torchvision {path}: holds a {type(obj).__name__}, not a state dict of tensors. "
                        "Save the weights with torch.save(model.state_dict(), path).")
    out = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")  # nn.DataParallel / DistributedDataParallel prefixes
        out[key] = value.detach().to(torch.float32).cpu().numpy()
    return out


def check_architecture(state: dict[str, np.ndarray], source: str = "the state dict"
                       ) -> tuple[tuple[int, ...], int, int, int]:
    """(conv widths, fc width, num_classes, input channels) of a torchvision AlexNet; UserError otherwise."""
    expected = [f"{k}.{p}" for k in CONV_KEYS + FC_KEYS for p in ("weight", "bias")]
    missing = [k for k in expected if k not in state]
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        seen = ", ".join(sorted(state)[:6]) + (", ..." if len(state) > 6 else "")
        raise UserError(
            f"{source} is not a torchvision AlexNet: "
            + (f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; " if missing else "")
            + (f"unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}; " if extra else "")
            + f"it holds {len(state)} tensors ({seen}). Give the state dict of torchvision.models.alexnet.")
    problems = []
    widths = []
    cin = state["features.0.weight"].shape[1] if state["features.0.weight"].ndim == 4 else 0
    channels = cin
    for key, k in zip(CONV_KEYS, CONV_KERNELS, strict=True):
        w = state[f"{key}.weight"]
        if w.ndim != 4 or w.shape[2:] != (k, k) or w.shape[1] != channels:
            problems.append(f"{key}.weight has shape {tuple(w.shape)}, expected (out, {channels}, {k}, {k})")
            break
        widths.append(int(w.shape[0]))
        channels = int(w.shape[0])
        if state[f"{key}.bias"].shape != (w.shape[0],):
            problems.append(f"{key}.bias has shape {tuple(state[f'{key}.bias'].shape)}")
    fc_in = channels * POOL_SIZE * POOL_SIZE
    fc_width = num_classes = 0
    if not problems:
        for key in FC_KEYS:
            w = state[f"{key}.weight"]
            if w.ndim != 2 or w.shape[1] != fc_in:
                problems.append(f"{key}.weight has shape {tuple(w.shape)}, expected (out, {fc_in})")
                break
            if state[f"{key}.bias"].shape != (w.shape[0],):
                problems.append(f"{key}.bias has shape {tuple(state[f'{key}.bias'].shape)}")
            fc_in = int(w.shape[0])
        fc_width = int(state["classifier.1.weight"].shape[0])
        num_classes = int(state["classifier.6.weight"].shape[0])
        if state["classifier.4.weight"].shape[0] != fc_width:
            problems.append("classifier.1 and classifier.4 have different widths")
    if problems:
        raise UserError(f"{source} has torchvision AlexNet's key names but not its shapes: {'; '.join(problems)}")
    return tuple(widths), fc_width, num_classes, int(cin)


def to_flax_params(state: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """torchvision tensors -> the 'owt' AlexNet's Flax parameter tree (conv1..conv5, fc6..fc8)."""
    check_architecture(state)
    params: dict[str, dict[str, np.ndarray]] = {}
    for i, key in enumerate(CONV_KEYS, 1):  # OIHW -> HWIO
        params[f"conv{i}"] = {"kernel": np.ascontiguousarray(state[f"{key}.weight"].transpose(2, 3, 1, 0)),
                              "bias": state[f"{key}.bias"]}
    for i, key in enumerate(FC_KEYS, 6):  # (out, in) -> (in, out)
        params[f"fc{i}"] = {"kernel": np.ascontiguousarray(state[f"{key}.weight"].T), "bias": state[f"{key}.bias"]}
    # fc6: torch's input index is c*36 + h*6 + w (NCHW flatten), Flax's is (h*6 + w)*C + c (NHWC flatten).
    k = params["fc6"]["kernel"]
    c = k.shape[0] // (POOL_SIZE * POOL_SIZE)
    params["fc6"]["kernel"] = np.ascontiguousarray(
        k.reshape(c, POOL_SIZE, POOL_SIZE, -1).transpose(1, 2, 0, 3).reshape(k.shape))
    return params


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
    trainer = train.Trainer(config, mesh, image_shape, 1, 1)
    template = trainer.init(jax.random.PRNGKey(0))
    diffs = checkpointing.tree_differences(params, template.params)
    if diffs:  # the converted tree must be exactly the model's (a bug here must not write a bad checkpoint)
        raise UserError("the converted parameters do not fit the owt AlexNet: " + "; ".join(diffs))
    state = template.replace(params=jax.device_put(params, trainer.state_sharding.params))
    names = None
    if num_classes == 1000:
        from alexnet_jax import predict

        names = predict.class_names("imagenet2012", {}, num_classes)
    norm = Normalisation("channel", np.asarray(MEAN_255, np.float32), np.asarray(STD_255, np.float32),
                         resize_size=config.resize_size)
    info = {"dataset": config.dataset, "image_shape": list(image_shape), "class_names": names,
            "normalisation": norm.to_json(), "source": os.path.abspath(path),
            "converted_from": "torchvision.models.alexnet state dict"}
    ckpt = checkpointing.Checkpointer(workdir, config, trainer.abstract_state, trainer.state_sharding,
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
