"""Features of any layer for a split or for image files, and the paper's Figure 4 (right):

    python -m alexnet_jax.features --workdir W --layer fc7 --out feats.npz [--split eval|train] [IMAGE ...]
    python -m alexnet_jax.features --workdir W --neighbours 6 --figure neighbours.png [--queries 5]

IMAGE: files or folders (a folder's images found as `predict` finds them).
`--out`: an .npz with `features` (N, D) float32 (the layer's activations flattened: conv layers after their
ReLU, `pool1`/`pool2`/`pool5` after pooling, fc6/fc7 after their ReLU, fc8 the logits), `labels` (N,) (-1 for
files), `file_names` (N,) (the dataset's file names where it has them, else ''), `class_names`, `layer`, `split`.
Images are the evaluation's single centre view (`eval_crops=1`), every image of the split exactly once.

`--neighbours N`: the paper's Figure 4 (right): for `--queries` images (the first of the evaluation split, or the
files given), the N training images whose fc7 (or `--layer`) activations are nearest in Euclidean distance,
drawn as a PNG, one query per row. Takes the same `--config.key=value` overrides as `evaluate`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
LAYERS = ("conv1_out", "pool1", "conv2_out", "pool2", "conv3_out", "conv4_out", "conv5_out", "pool5", "fc6_out",
          "fc7_out", "fc8_out")


def define_flags() -> None:
    from alexnet_jax import cli

    flags.DEFINE_string("workdir", None, "The training run's --workdir (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to use; default: the latest readable one.")
    flags.DEFINE_string("layer", "fc7", f"Whose activations: one of {', '.join(LAYERS)} (conv1 = conv1_out, ...).")
    flags.DEFINE_enum("split", "eval", ["eval", "train"], "The configured dataset's split (without image files).")
    flags.DEFINE_string("out", None, "Write the features here (.npz).")
    flags.DEFINE_integer("neighbours", 0, "Draw each query's N nearest training images (the paper's Figure 4).")
    flags.DEFINE_integer("queries", 5, "How many query images the figure shows.")
    flags.DEFINE_string("figure", "neighbours.png", "Where --neighbours draws its PNG.")
    cli.define_config_overrides()


def layer_name(layer: str) -> str:
    """'conv3' -> 'conv3_out' (a conv's or FC layer's activations after its ReLU; fc8's logits)."""
    from alexnet_jax.errors import UserError

    name = f"{layer}_out" if f"{layer}_out" in LAYERS else layer
    if name not in LAYERS:
        raise UserError(f"--layer={layer!r}: choose one of conv1..conv5, pool1, pool2, pool5, fc6, fc7, fc8")
    return name


class Extractor:
    """A checkpoint's model returning one layer's activations, jit-compiled, on one device."""

    def __init__(self, workdir: str, step: int | None = None, overrides: dict[str, Any] | None = None):
        import jax

        from alexnet_jax import inference

        self.loaded = inference.load(workdir, step, inference.mesh_of_one_device(), overrides)
        model, variables = self.loaded.model, self.loaded.variables

        def apply(x, layer):
            _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
            return state["intermediates"][layer].reshape(x.shape[0], -1)

        self._apply = jax.jit(apply, static_argnums=1)

    def __call__(self, images: np.ndarray, layer: str) -> np.ndarray:
        import jax

        return np.asarray(jax.device_get(self._apply(images, layer_name(layer))), np.float32)


def of_split(extractor: Extractor, split: str, layer: str) -> dict[str, np.ndarray]:
    """Features of every image of the configured dataset's `split` ('train' or 'eval'), once each, in order;
    with the (normalised) images for drawing."""
    from alexnet_jax import data as datalib
    from alexnet_jax.errors import UserError

    config = extractor.loaded.config.copy_and_resolve_references()
    config.eval_crops = 1  # one view per image (whatever the run evaluated with)
    spec = datalib.DataSpec.from_config(config)
    data = datalib.create_data(spec, extractor.loaded.normalisation)
    if data.views is None:
        raise UserError(f"features of {config.dataset} with --config.prepared=True: use the source images "
                        "(--config.prepared=False)")
    feats, labels, names, images = [], [], [], []
    for batch in data.views(split, 0, 1):
        keep = batch["mask"] > 0
        feats.append(extractor(batch["image"], layer)[keep])
        labels.append(batch["label"][keep])
        if "file_name" in batch:
            names += [n.decode() if isinstance(n, bytes) else str(n) for n in batch["file_name"][keep]]
        else:
            names += [""] * int(keep.sum())
        images.append(batch["image"][keep])
    return {"features": np.concatenate(feats), "labels": np.concatenate(labels).astype(np.int32),
            "file_names": np.asarray(names), "images": np.concatenate(images)}


def of_files(extractor: Extractor, paths: list[str], layer: str) -> dict[str, np.ndarray]:
    """Features of image files, preprocessed as `predict` does."""
    from alexnet_jax import predict

    loaded = extractor.loaded
    torchvision = bool(loaded.meta.get("converted_from", "").startswith("torchvision"))
    images = np.stack([predict.preprocess(p, loaded.image_shape, loaded.normalisation, loaded.config.dataset,
                                          loaded.config.resize_method, torchvision) for p in paths])
    return {"features": extractor(images, layer), "labels": np.full(len(paths), -1, np.int32),
            "file_names": np.asarray(paths), "images": images}


def nearest(queries: np.ndarray, pool: np.ndarray, n: int) -> np.ndarray:
    """(Q, n) indices of `pool`'s rows nearest to each query in Euclidean distance, nearest first."""
    d = (np.square(queries).sum(1)[:, None] - 2 * queries @ pool.T + np.square(pool).sum(1)[None])
    return np.argsort(d, axis=1, kind="stable")[:, :n]


def displayable(images: np.ndarray, norm: Any) -> np.ndarray:
    """Normalised model inputs back to 0-1 RGB (or gray) for drawing."""
    if norm.kind == "pixel" and norm.mean_image is not None:
        size, s = images.shape[1], norm.mean_image.shape[0]
        top = (s - size) // 2
        x = images + norm.mean_image[top : top + size, top : top + size]
    else:
        x = images * norm.std + norm.mean
    return np.clip(x / 255.0, 0, 1)


def draw_neighbours(path: str, queries: np.ndarray, pool: np.ndarray, index: np.ndarray,
                    titles: list[str] | None = None) -> None:
    """One row per query: the query, then its neighbours (the paper's Figure 4, right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = index.shape[0], index.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.4 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            image = queries[r] if c == 0 else pool[index[r, c - 1]]
            ax = axes[r, c]
            ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1
                      else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and titles:
                ax.set_ylabel(titles[r], fontsize=6)
    axes[0, 0].set_title("query", fontsize=8)
    for c in range(1, cols):
        axes[0, c].set_title(f"#{c}", fontsize=8)
    fig.suptitle("nearest training images by Euclidean distance of the activations", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow is imported, and kept off the accelerator, where images are first read
    # (`data.tensorflow_on_cpu`): a bad flag or checkpoint is reported before that 4-second import.
    from alexnet_jax import cli, predict
    from alexnet_jax.errors import UserError

    logging.get_absl_handler().use_absl_log_file = False
    try:
        if not FLAGS.out and not FLAGS.neighbours:
            raise UserError("give --out FILE.npz (the features) and/or --neighbours N (the Figure 4 PNG)")
        extractor = Extractor(FLAGS.workdir, FLAGS.step, cli.config_overrides())
        files = predict.image_files(argv[1:])  # a folder: its images, by the folder preparation's rules
        if argv[1:] and not files:
            raise UserError(f"no image files in {', '.join(argv[1:])}")
        got = of_files(extractor, files, FLAGS.layer) if files else of_split(extractor, FLAGS.split, FLAGS.layer)
        names = list(extractor.loaded.meta.get("class_names") or [])
        if FLAGS.out:
            np.savez(FLAGS.out, features=got["features"], labels=got["labels"], file_names=got["file_names"],
                     class_names=np.asarray(names), layer=FLAGS.layer, split="files" if files else FLAGS.split)
            print(f"wrote {FLAGS.out}: {got['features'].shape[0]} images x {got['features'].shape[1]} {FLAGS.layer} "
                  "features")
        if FLAGS.neighbours:
            train = got if (FLAGS.split == "train" and not files) else of_split(extractor, "train", FLAGS.layer)
            q = slice(0, FLAGS.queries)
            index = nearest(got["features"][q], train["features"], FLAGS.neighbours)
            norm = extractor.loaded.normalisation
            titles = [os.path.basename(n) if n else (names[int(y)] if 0 <= y < len(names) else "")
                      for n, y in zip(got["file_names"][q], got["labels"][q], strict=True)]
            draw_neighbours(FLAGS.figure, displayable(got["images"][q], norm), displayable(train["images"], norm),
                            index, titles)
            print(f"wrote {FLAGS.figure}: {index.shape[0]} queries x {index.shape[1]} nearest training images")
    except UserError as e:
        sys.exit(f"alexnet_jax.features: error: {e}")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdir"])
    from alexnet_jax import cli

    app.run(main, flags_parser=cli.parse_flags)
