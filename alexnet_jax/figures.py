"""Figures from a training workdir, as PNG files beside it (no TensorBoard needed).

- `plot_filters`: conv1's kernels as the paper's Figure 3 grid, the two groups apart (in the two-group net
  conv1's first half of output channels feed the first group of conv2, as the first GPU's kernels did);
- `plot_curves`: loss, top-1/top-5 and learning rate against steps (and epochs) from the TensorBoard events;
- `plot_predictions` / `plot_confusion`: test images with predicted and true labels, and the confusion matrix
  (small datasets: FashionMNIST, CIFAR-10).

The scripts in `scripts/` (plot_filters.py, plot_curves.py, plot_predictions.py) call these.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

import numpy as np

from alexnet_jax.errors import UserError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def read_params(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(step, params as NumPy, config, meta) of a checkpoint, read with orbax alone (no model, any device)."""
    import jax
    import orbax.checkpoint as ocp

    from alexnet_jax import checkpointing

    step, config, meta = checkpointing.read_saved(workdir, step)
    item = os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "params")
    ckptr = ocp.StandardCheckpointer()
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), ckptr.metadata(item).item_metadata.tree)
    return step, ckptr.restore(item, target), config, meta


def conv1_groups(variant: str, groups: int) -> int:
    """How many groups conv1's output channels form in a checkpoint's net (the paper net: 2, one per GPU)."""
    from alexnet_jax.model import VARIANTS

    return int(groups or 0) or VARIANTS[variant].default_groups


def filter_grid(kernel: np.ndarray, groups: int, cols: int | None = None) -> np.ndarray:
    """conv1's (kh, kw, cin, cout) kernel as one image: each kernel min-max scaled to [0, 1], laid out row by
    row, each group its own block of rows with a blank row between groups (the paper's Figure 3)."""
    kh, kw, cin, cout = kernel.shape
    per = cout // groups
    cols = cols or min(per, 16)  # the paper's 48 per GPU: 3 rows of 16
    rows = math.ceil(per / cols)
    pad = 1
    gap = max(2, kh // 2)
    height = groups * rows * (kh + pad) + (groups - 1) * gap + pad
    width = cols * (kw + pad) + pad
    grid = np.ones((height, width, cin), np.float32)
    for g in range(groups):
        top = g * (rows * (kh + pad) + gap)
        for i in range(per):
            k = kernel[..., g * per + i].astype(np.float32)
            k = (k - k.min()) / max(float(k.max() - k.min()), 1e-12)
            r, c = divmod(i, cols)
            y, x = top + pad + r * (kh + pad), pad + c * (kw + pad)
            grid[y:y + kh, x:x + kw] = k
    return grid


def plot_filters(workdir: str, out: str | None = None, step: int | None = None) -> str:
    """conv1's kernels of the latest (or `step`) checkpoint as `WORKDIR/conv1_filters.png`."""
    step, params, config, _ = read_params(workdir, step)
    kernel = np.asarray(params["conv1"]["kernel"])
    groups = conv1_groups(config.get("variant", "paper"), config.get("groups"))
    grid = filter_grid(kernel, groups)
    kh, kw, cin, cout = kernel.shape
    plt = _pyplot()
    tiles_x, tiles_y = grid.shape[1] / (kw + 1), grid.shape[0] / (kh + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, min(14.0, 0.6 * tiles_x)), max(2.0, 0.6 * tiles_y) + 0.6))
    if cin == 1:
        ax.imshow(grid[..., 0], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    else:
        ax.imshow(grid[..., :3], interpolation="nearest")
    ax.set_axis_off()
    split = f"\n{groups} groups of {cout // groups} (one per GPU in the paper), one block each" if groups > 1 else ""
    ax.set_title(f"conv1: {cout} kernels {kh}x{kw}x{cin} at step {step}{split}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out or os.path.join(workdir, "conv1_filters.png"))


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`tag -> (steps, values)` from the TensorBoard event files the trainer wrote (process 0, WORKDIR/)."""
    import tensorflow as tf

    from alexnet_jax.data.base import data_options

    files = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
    if not files:
        raise UserError(f"no TensorBoard event files in {workdir}: train with --workdir {workdir} first")
    series: dict[str, dict[int, float]] = {}
    for path in files:  # a resumed run appends a new file; later values of a step win
        try:
            for record in tf.data.TFRecordDataset(path).with_options(data_options()).as_numpy_iterator():
                event = tf.compat.v1.Event.FromString(record)
                for v in event.summary.value:
                    value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else float(v.simple_value)
                    series.setdefault(v.tag, {})[int(event.step)] = value
        except tf.errors.DataLossError:  # a file cut short by a kill: keep what was read
            continue
    return {tag: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for tag, d in series.items()}


def _steps_per_epoch(workdir: str) -> float | None:
    path = os.path.join(workdir, "summary.json")
    if os.path.isfile(path):
        with open(path) as f:
            s = json.load(f)
        if s.get("epochs"):
            return s["step"] / s["epochs"]
    try:
        from alexnet_jax import checkpointing

        _, _, meta = checkpointing.read_saved(workdir)
        return meta.get("steps_per_epoch")
    except UserError:
        return None


def plot_curves(workdir: str, out: str | None = None) -> str:
    """Loss, top-1/top-5 accuracy and learning rate against steps (epochs on top) as `WORKDIR/curves.png`."""
    s = read_scalars(workdir)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("loss", [("train/loss", "train"), ("eval/loss", "test")], False),
              ("accuracy (%)", [("train/top1", "train top-1"), ("train/top5", "train top-5"),
                                ("eval/top1", "test top-1"), ("eval/top5", "test top-5")], True),
              ("learning rate", [("train/lr", "lr")], False))
    for ax, (label, tags, percent) in zip(axes, panels, strict=True):
        for tag, name in tags:
            if tag in s:
                steps, values = s[tag]
                style = "o-" if tag.startswith("eval") else "-"
                ax.plot(steps, 100 * values if percent else values, style, label=name, markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend()
    per_epoch = _steps_per_epoch(workdir)
    if per_epoch:
        for ax in axes:
            top = ax.secondary_xaxis("top", functions=(lambda x, p=per_epoch: x / p, lambda e, p=per_epoch: e * p))
            top.set_xlabel("epoch")
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    return _save(fig, out or os.path.join(workdir, "curves.png"))


def predictions(workdir: str, step: int | None = None, max_images: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(images 0-255 (N, H, W, C), predicted, true labels, class names, meta) on the test split."""
    import jax

    from alexnet_jax import data as datalib
    from alexnet_jax import inference
    from alexnet_jax.labels import class_names

    # the grid shows each test image once, as the model sees it
    loaded = inference.load(workdir, step, inference.mesh_of_one_device(), {"eval_crops": 1})
    config, meta, variables = loaded.config, loaded.meta, loaded.variables
    if config.dataset not in ("fashion_mnist", "cifar10"):
        raise UserError(f"prediction grids are for the small datasets (fashion_mnist, cifar10), not {config.dataset}")
    data = datalib.create_data(datalib.DataSpec.from_config(config))
    apply = jax.jit(lambda v, x: jax.numpy.argmax(loaded.model.apply(v, x, train=False), -1))
    images, preds, labels = [], [], []
    count = 0
    for batch in data.eval(0, 1):
        keep = np.asarray(batch["mask"]) > 0
        images.append(np.asarray(batch["image"])[keep])
        preds.append(np.asarray(apply(variables, batch["image"]))[keep])
        labels.append(np.asarray(batch["label"])[keep])
        count += int(keep.sum())
        if max_images and count >= max_images:
            break
    x = np.concatenate(images)[:max_images]
    mean, std = np.asarray(data.mean, np.float32), np.asarray(data.std, np.float32)
    x = np.clip(x * std + mean, 0, 255)
    names = class_names(config.dataset, meta, config.num_classes)
    return x, np.concatenate(preds)[:max_images], np.concatenate(labels)[:max_images], names, meta


def plot_prediction_grid(images: np.ndarray, preds: np.ndarray, labels: np.ndarray, names: list[str], out: str,
                         n: int = 32) -> str:
    """The first `n` test images, each titled 'predicted / true' (green when right, red when wrong)."""
    plt = _pyplot()
    n = min(n, len(images))
    cols = 8
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9))
    for i, ax in enumerate(np.ravel(axes)):
        ax.set_axis_off()
        if i >= n:
            continue
        img = images[i] / 255.0
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=1)
        right = preds[i] == labels[i]
        ax.set_title(f"{names[preds[i]]}\n({names[labels[i]]})", fontsize=7, color="green" if right else "red")
    acc = 100 * float(np.mean(preds == labels))
    fig.suptitle(f"predicted (true) on {len(images)} test images: {acc:.1f}% correct", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


def plot_confusion(preds: np.ndarray, labels: np.ndarray, names: list[str], out: str) -> str:
    m = confusion_matrix(preds, labels, len(names))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(m, cmap="Blues")
    k = len(names)
    if k <= 20:
        for t in range(k):
            for p in range(k):
                ax.text(p, t, str(m[t, p]), ha="center", va="center", fontsize=7,
                        color="white" if m[t, p] > m.max() / 2 else "black")
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix, {int(m.sum())} test images, {100 * np.trace(m) / max(1, m.sum()):.1f}% correct")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, out)


def plot_predictions(workdir: str, step: int | None = None, max_images: int | None = None) -> tuple[str, str]:
    """`WORKDIR/predictions.png` and `WORKDIR/confusion.png` for a small-dataset run."""
    images, preds, labels, names, _ = predictions(workdir, step, max_images)
    return (plot_prediction_grid(images, preds, labels, names, os.path.join(workdir, "predictions.png")),
            plot_confusion(preds, labels, names, os.path.join(workdir, "confusion.png")))
