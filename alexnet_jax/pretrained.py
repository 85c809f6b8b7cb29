"""Pretrained weights for fine-tuning (`--config.init_from=PATH`) and conversion: a torchvision AlexNet state dict
(`.pth`) or an alexnet_jax checkpoint (a workdir's latest, or one step's directory), read as a parameter tree with
the normalisation its images had.

`merge(init, pretrained)` is big_vision's `model_load` idea: every parameter whose name and shape match is taken
from the pretrained tree, everything else (e.g. fc8 for another class count) keeps its fresh initialisation, and
the report lists both. The trainer applies it at step 0 only; a resumed fine-tuning run resumes from its own
checkpoint.

Torchvision's layout (pytorch/vision torchvision/models/alexnet.py): `features.{0,3,6,8,10}` are conv1..conv5
(OIHW kernels), `classifier.{1,4,6}` are fc6..fc8 (`(out, in)` weights). Flax keeps HWIO kernels and `(in, out)`
dense kernels, and flattens pool5 in NHWC order where torch flattens NCHW, so fc6's input rows are permuted from
(C, 6, 6) to (6, 6, C) order. Input normalisation is torchvision's ImageNet mean/std on this project's 0-255 scale.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import checkpointing
from alexnet_jax.data.base import Normalisation
from alexnet_jax.errors import UserError

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


@dataclasses.dataclass
class Pretrained:
    """A pretrained parameter tree (NumPy), its BatchNorm statistics, the normalisation its inputs had, where it
    came from, and the architecture keys it implies (`variant`, `widths`, `fc_width`, ...)."""

    params: dict[str, Any]
    normalisation: Normalisation | None
    source: str
    architecture: dict[str, Any]
    batch_stats: dict[str, Any] | None = None


def is_state_dict(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".pth", ".pt", ".bin"))


def torchvision_architecture(widths: tuple[int, ...], fc_width: int) -> dict[str, Any]:
    from alexnet_jax.model import VARIANTS

    spec = VARIANTS["owt"]
    return {"variant": "owt", "widths": () if tuple(widths) == spec.widths else tuple(widths),
            "fc_width": 0 if fc_width == spec.fc_width else fc_width, "norm": "", "groups": 0}


def torchvision_normalisation(resize_size: int = 256) -> Normalisation:
    return Normalisation("channel", np.asarray(MEAN_255, np.float32), np.asarray(STD_255, np.float32),
                         resize_size=resize_size)


ARCHITECTURE_KEYS = ("variant", "widths", "fc_width", "norm", "groups")


def _checkpoint_location(path: str) -> tuple[str, int | None]:
    """(workdir, step) of a workdir (latest step) or of a step directory `WORKDIR/checkpoints/<step>`."""
    path = os.path.abspath(os.path.expanduser(path.rstrip("/")))
    parent = os.path.dirname(path)
    if os.path.basename(path).isdigit() and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent), int(os.path.basename(path))
    return path, None


def read(path: str, resize_size: int = 256) -> Pretrained:
    """The pretrained weights at `path`: a torchvision state dict, a workdir or a checkpoint step directory."""
    if not path or not os.path.exists(os.path.expanduser(path)):
        raise UserError(f"--config.init_from={path!r}: no such file or directory; give a torchvision AlexNet state "
                        "dict (.pth), an alexnet_jax --workdir or one of its checkpoints/<step> directories")
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        state = load_state_dict(path)
        widths, fc_width, _, _ = check_architecture(state, f"--config.init_from={path}")
        return Pretrained(to_flax_params(state), torchvision_normalisation(resize_size),
                          f"torchvision state dict {path}", torchvision_architecture(widths, fc_width))
    workdir, step = _checkpoint_location(path)
    step, saved, meta = checkpointing.read_saved(workdir, step)
    items = checkpointing.restore_as_saved(workdir, step, ("params", "batch_stats"))
    norm = Normalisation.from_json(meta["normalisation"]) if meta.get("normalisation") else None
    from alexnet_jax.config import config_from_dict

    config = config_from_dict(saved)
    return Pretrained(items["params"], norm, f"step {step} of {workdir}",
                      {k: config[k] for k in ARCHITECTURE_KEYS}, items.get("batch_stats") or None)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        out.update(_flat(value, name) if isinstance(value, dict) else {name: value})
    return out


def merge(init: dict[str, Any], pretrained: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """(tree, loaded, initialised): `init` with every leaf whose path and shape match taken from `pretrained`;
    `loaded` and `initialised` name the leaves ('fc8/kernel (4096, 3), pretrained (4096, 1000)')."""
    theirs = _flat(pretrained)
    loaded, initialised = [], []

    def pick(path: str, leaf: Any) -> Any:
        other = theirs.get(path)
        if other is not None and tuple(np.shape(other)) == tuple(np.shape(leaf)):
            loaded.append(path)
            return np.asarray(other, np.asarray(leaf).dtype)
        why = "not in the pretrained weights" if other is None else f"pretrained {tuple(np.shape(other))}"
        initialised.append(f"{path} {tuple(np.shape(leaf))}, {why}")
        return leaf

    def walk(tree: Any, prefix: str = "") -> Any:
        return {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) if isinstance(v, dict) else
                pick(f"{prefix}/{k}" if prefix else str(k), v) for k, v in tree.items()}

    return walk(init), loaded, initialised


@dataclasses.dataclass(frozen=True)
class TransferSpec:
    """The fine-tuning part of the config, read once: where the weights come from and whose normalisation."""

    init_from: str = ""
    init_normalisation: str = "pretrained"
    resize_size: int = 256
    architecture: tuple[tuple[str, Any], ...] = ()  # the config's ARCHITECTURE_KEYS, as the config spells them

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> TransferSpec:
        how = config.get("init_normalisation", "pretrained")
        if how not in ("pretrained", "data"):
            raise UserError(f"--config.init_normalisation={how!r}: choose 'pretrained' (the weights' own) or 'data' "
                            "(computed from your images)")
        return cls(config.get("init_from", ""), how, int(config.get("resize_size", 256)),
                   tuple((k, config[k]) for k in ARCHITECTURE_KEYS))


def for_run(spec: TransferSpec, workdir: str) -> tuple[Pretrained | None, Normalisation | None]:
    """(`spec.init_from`'s weights or None, the normalisation to use instead of the data's or None). A run
    resumed from its own checkpoint reads no pretrained file (it may have moved since) and keeps the
    normalisation it saved."""
    if not spec.init_from:
        return None, None
    if checkpointing.has_checkpoint(workdir):
        own = checkpointing.latest_normalisation(workdir)
        use = own and spec.init_normalisation == "pretrained"
        return None, Normalisation.from_json(own) if use else None
    pre = read(spec.init_from, spec.resize_size)
    arch = dict(spec.architecture)
    if arch != pre.architecture:
        differ = ", ".join(f"{k}={pre.architecture[k]!r}" for k in arch if arch[k] != pre.architecture[k])
        logging.warning("the pretrained network (%s) differs from the config's: %s; only parameters whose name and "
                        "shape match are loaded (set those --config keys to load them all)", pre.source, differ)
    return pre, pre.normalisation if spec.init_normalisation == "pretrained" else None


def load_into(state: Any, pre: Pretrained, shardings: Any) -> Any:
    """The train state with the pretrained parameters (and BatchNorm statistics) wherever name and shape match,
    placed with `shardings` (the state's); a report in the log."""
    import jax

    params, loaded, initialised = merge(jax.device_get(state.params), pre.params)
    if not loaded:
        raise UserError(f"--config.init_from: no parameter of {pre.source} matches this network by name and shape "
                        f"(its architecture: {pre.architecture}); set those config keys to fine-tune from it")
    layers = sorted({p.split("/")[0] for p in loaded})
    logging.info("init_from %s: loaded %d arrays (%s); initialised %d: %s", pre.source, len(loaded),
                 ", ".join(layers), len(initialised), "; ".join(initialised) or "none")
    state = state.replace(params=jax.device_put(params, shardings.params))
    if pre.batch_stats and state.batch_stats:
        stats, _, _ = merge(jax.device_get(state.batch_stats), pre.batch_stats)
        state = state.replace(batch_stats=jax.device_put(stats, shardings.batch_stats))
    return state
