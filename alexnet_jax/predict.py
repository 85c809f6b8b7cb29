"""Classify images with a checkpoint: `python -m alexnet_jax.predict --workdir DIR IMAGE [IMAGE ...]`.

Prints the top-5 classes with their probabilities for each image. Images (PNG, JPEG, GIF, BMP) are
preprocessed as the evaluation pipeline does, with what the checkpoint saved (no training set needed):
converted to the model's channels (grayscale for FashionMNIST), centre-cropped to a square (ImageNet: resized
so the shorter side is 256/224 of the crop, as in the paper, then centre-cropped), resized to the model's
input size and normalised with the training set's per-channel mean/std.
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
    flags.DEFINE_string("workdir", None, "The training run's --workdir (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to use; default: the latest readable one.")
    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")

IMAGENET_RESIZE_RATIO = 256 / 224  # the paper: shorter side 256, 224 crops


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


def preprocess(path: str, image_shape: tuple[int, int, int], mean: Any, std: Any, dataset: str) -> np.ndarray:
    """One image file as the model's normalised (H, W, C) float32 input."""
    import tensorflow as tf

    from alexnet_jax import data as datalib
    from alexnet_jax.errors import UserError

    size, _, channels = image_shape
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); give PNG, JPEG, GIF or BMP") from None
    h, w = int(image.shape[0]), int(image.shape[1])
    if dataset == "imagenet2012":  # shorter side to 256/224 of the crop, then the centre crop
        short = int(round(size * IMAGENET_RESIZE_RATIO))
        h, w = max(short, round(h * short / min(h, w))), max(short, round(w * short / min(h, w)))
        image = tf.image.resize(image, (h, w), method="bilinear")
        crop = size
    else:  # small datasets: the whole (square) image, resized as the eval pipeline does
        crop = min(h, w)
    image = tf.image.crop_to_bounding_box(image, (h - crop) // 2, (w - crop) // 2, crop, crop)
    return np.asarray(datalib.resize_and_normalise(image, mean, std, size), np.float32)


def predict(workdir: str, paths: list[str], *, step: int | None = None, top_k: int = 5
            ) -> list[tuple[str, list[tuple[str, float]]]]:
    """Top-k (class name, probability) for every image in `paths`, with checkpoint `step` (default latest)."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import checkpointing, sharding, train
    from alexnet_jax.errors import UserError

    step, saved, meta = checkpointing.read_saved(workdir, step)
    config = checkpointing.config_from_dict(saved)
    image_shape = tuple(meta.get("image_shape") or ())
    if len(image_shape) != 3 or meta.get("mean") is None or meta.get("std") is None:
        raise UserError(f"the checkpoint at step {step} does not record the input shape and normalisation "
                        "(mean/std) that predict needs; evaluate it with alexnet_jax.evaluate instead")
    mean = np.asarray(meta["mean"], np.float32)
    std = np.asarray(meta["std"], np.float32)
    mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    trainer = train.Trainer(config, mesh, image_shape, 1, max(1, config.num_train_steps))
    ckpt = checkpointing.for_trainer(workdir, config, trainer, read_only=True)
    state = ckpt.restore(step, template=trainer.init(jax.random.PRNGKey(0)), model_only=True).state
    names = class_names(config.dataset, meta, config.num_classes)
    images = np.stack([preprocess(p, image_shape, mean, std, config.dataset) for p in paths])
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    probs = jax.jit(lambda v, x: jax.nn.softmax(trainer.model.apply(v, x, train=False)))(variables,
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
    from alexnet_jax.errors import UserError

    logging.get_absl_handler().use_absl_log_file = False
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        sys.exit(f"alexnet_jax.predict: error: no such file: {', '.join(missing)}")
    try:
        results = predict(FLAGS.workdir, paths, step=FLAGS.step, top_k=FLAGS.top_k)
    except UserError as e:
        sys.exit(f"alexnet_jax.predict: error: {e}")
    for path, top in results:
        print(path)
        for rank, (name, prob) in enumerate(top, 1):
            print(f"  {rank}. {name:<24s} {100 * prob:6.2f}%")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
