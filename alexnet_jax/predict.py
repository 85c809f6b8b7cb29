"""Classify images with a checkpoint: `python -m alexnet_jax.predict --workdir DIR IMAGE [IMAGE ...]`.

Prints the top-5 classes with their probabilities for each image. Images (PNG, JPEG, GIF, BMP, of any size) are
preprocessed as the evaluation pipeline does, with the normalisation record the checkpoint saved (no training
set needed): converted to the model's channels (grayscale for FashionMNIST), the centre square taken; ImageNet:
resized to `resize_size` (256), normalised (the paper's per-pixel mean image, or per-channel mean/std) and the
centre crop taken, exactly the single-view evaluation; small datasets: resized to the input size and
normalised per channel. Takes the same `--config.key=value` overrides as `evaluate`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags (defined on demand, so importing this module never clashes with main's)."""
    from alexnet_jax import cli

    flags.DEFINE_string("workdir", None, "The training run's --workdir (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to use; default: the latest readable one.")
    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
    cli.define_config_overrides()


def class_names(dataset: str, meta: dict[str, Any], num_classes: int) -> list[str]:
    """The checkpoint's class names; else the dataset's (ImageNet: tfds's imagenet2012 synset labels)."""
    from alexnet_jax import data as datalib

    names = meta.get("class_names")
    if names and len(names) == num_classes:
        return list(names)
    if dataset == "fashion_mnist":
        return list(datalib.FASHION_MNIST_CLASSES)
    if dataset == "cifar10":
        return list(datalib.CIFAR10_CLASSES)
    if dataset == "imagenet2012":
        import tensorflow_datasets as tfds

        return list(tfds.builder("imagenet2012").info.features["label"].names)
    return [str(i) for i in range(num_classes)]


def preprocess(path: str, image_shape: tuple[int, int, int], norm: Any, dataset: str,
               resize_method: str = "area") -> np.ndarray:
    """One image file as the model's normalised (H, W, C) float32 input (`norm`: a data.Normalisation)."""
    import tensorflow as tf

    from alexnet_jax import data as datalib
    from alexnet_jax.data import augment
    from alexnet_jax.errors import UserError

    size, _, channels = image_shape
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); give PNG, JPEG, GIF or BMP") from None
    h, w = int(image.shape[0]), int(image.shape[1])
    side = min(h, w)
    square = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
    if dataset in datalib.SMALL_DATASETS:  # the whole (square) image, resized as the eval pipeline does
        return np.asarray(datalib.resize_and_normalise(square, norm.mean, norm.std, size), np.float32)
    # photos (ImageNet, a folder, a tfds dataset), as augment.eval_image with one view: the square at
    # resize_size, normalised, its centre crop
    resize = norm.resize_size or round(size * 256 / 224)
    mean, std = norm.arrays()
    square = (augment.resize(square, resize, resize_method) - mean) / std
    return np.asarray(augment.centre_crop(square, size), np.float32)


def predict(workdir: str, paths: list[str], *, step: int | None = None, top_k: int = 5,
            overrides: dict[str, Any] | None = None) -> list[tuple[str, list[tuple[str, float]]]]:
    """Top-k (class name, probability) for every image in `paths`, with checkpoint `step` (default latest)."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import inference

    loaded = inference.load(workdir, step, inference.mesh_of_one_device(), overrides)
    config = loaded.config
    names = class_names(config.dataset, loaded.meta, config.num_classes)
    norm = loaded.normalisation
    images = np.stack([preprocess(p, loaded.image_shape, norm, config.dataset, config.resize_method)
                       for p in paths])
    probs = jax.jit(lambda v, x: jax.nn.softmax(loaded.model.apply(v, x, train=False)))(loaded.variables,
                                                                                        jnp.asarray(images))
    probs = np.asarray(jax.device_get(probs))
    k = min(top_k, probs.shape[-1])
    out = []
    for path, p in zip(paths, probs, strict=True):
        top = np.argsort(-p, kind="stable")[:k]
        out.append((path, [(names[i], float(p[i])) for i in top]))
    return out


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files: python -m alexnet_jax.predict --workdir DIR IMAGE ...")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from alexnet_jax import cli
    from alexnet_jax.errors import UserError

    logging.get_absl_handler().use_absl_log_file = False
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        sys.exit(f"alexnet_jax.predict: error: no such file: {', '.join(missing)}")
    try:
        results = predict(FLAGS.workdir, paths, step=FLAGS.step, top_k=FLAGS.top_k, overrides=cli.config_overrides())
    except UserError as e:
        sys.exit(f"alexnet_jax.predict: error: {e}")
    for path, top in results:
        print(path)
        for rank, (name, prob) in enumerate(top, 1):
            print(f"  {rank}. {name:<24s} {100 * prob:6.2f}%")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdir"])
    from alexnet_jax import cli

    app.run(main, flags_parser=cli.parse_flags)
