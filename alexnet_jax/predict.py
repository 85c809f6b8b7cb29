"""Classify images with a checkpoint: `python -m alexnet_jax.predict --workdir DIR IMAGE|FOLDER [...]`.

Prints the top-k classes with their probabilities for every readable image (a folder's images are all
classified, sorted by path) and one line `alexnet_jax.predict: error: PATH: ...` for every file that is not a
readable image; the exit status is 1 when any failed. `--output FILE.csv|.json` writes the same as one row per
file instead. Images go through the network in batches of `eval_batch_size`. ImageNet classes print as
`n01440764 tench`: the WordNet id with its first WordNet lemma (alexnet_jax/resources/imagenet_names.txt).

Preprocessing is the evaluation's single view, through the function evaluation uses (`data.views.of_square`),
with the normalisation record the checkpoint saved (no training set needed). Every file is read as the pipelines
read it (`pixels`: CMYK, grayscale, RGBA, 16-bit and palette images become RGB, as `data.folder` stores them;
EXIF-rotated photos upright), then its centre square: photos (ImageNet, a folder, a tfds dataset) resized to
`resize_size`, normalised, centre crop; small datasets resized to the input size, normalised per channel.
A checkpoint converted from torchvision (`alexnet_jax.convert`) preprocesses exactly as torchvision's transforms:
the whole image's shorter side to 256 with PIL's antialiased bilinear, rounded to uint8, the centre 224 crop,
mean/std. Takes the same `--config.key=value` overrides as `evaluate`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags, logging

from alexnet_jax.labels import class_names, readable_names

FLAGS = flags.FLAGS
# Batches read ahead of the network (the first ones while the checkpoint is restored and compiled).
READ_AHEAD = 4
# At most this many images per forward pass on the CPU backend, whatever --batch_size says: no slower per image
# there than 200 at once, and the first pass starts once 50 images are read, not 200 (docs/notes/2026-12.md).
FORWARD_CHUNK = 50


def define_flags() -> None:
    """Command-line flags (defined on demand, so importing this module never clashes with main's)."""
    from alexnet_jax import cli

    flags.DEFINE_string("workdir", None, "The training run's --workdir (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to use; default: the latest readable one.")
    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
    flags.DEFINE_integer("batch_size", None, "Images per forward pass; default: the checkpoint's eval_batch_size (at "
                         "most 50 on the CPU, faster there).")
    flags.DEFINE_bool("compilation_cache", True, "Keep compiled programs in ~/.cache/alexnet_jax/jax (or "
                      "$XDG_CACHE_HOME), so a second predict compiles nothing.")
    flags.DEFINE_string("output", None, "Write the results to this .csv or .json file (one row per file: the top-k "
                        "classes and probabilities, or the reason it could not be read) instead of printing them.")
    cli.define_config_overrides()


def image_files(args: list[str]) -> list[str]:
    """The paths given, with every folder replaced by the image files under it: the rules a folder's training
    preparation uses (`data.images.walk`: recursive, hidden and operating-system files passed over), sorted;
    what was passed over is logged in one line."""
    from alexnet_jax.data import images

    skipped = images.Skipped()
    out = images.files_under(args, skipped)
    if skipped.count:
        logging.info("%s", skipped.summary())
    return out


def torchvision_view(path: str, size: int, resize: int, norm: Any) -> np.ndarray:
    """torchvision's `Resize(resize)`, `CenterCrop(size)`, `ToTensor`, `Normalize` on PIL, in NHWC: the shorter
    side to `resize` (the longer to int(resize * long / short)) with PIL's bilinear (antialiased when shrinking),
    uint8; the crop's offsets rounded as torchvision rounds them; then (x/255 - mean)/std (on 0-255: the same)."""
    from PIL import Image

    from alexnet_jax.data import images

    with open(path, "rb") as f:
        image = images.upright_rgb(images.opened(f.read()))  # (EXIF-rotated photos upright: torchvision does not)
    w, h = image.size
    if w <= h:
        new = (resize, int(resize * h / w))
    else:
        new = (int(resize * w / h), resize)
    image = image.resize(new, Image.Resampling.BILINEAR)
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32)
    return ((pixels / 255.0 - norm.mean / 255.0) / (norm.std / 255.0)).astype(np.float32)


def pixels(path: str, channels: int = 3) -> np.ndarray:
    """An image file's uint8 (H, W, channels) pixels as the pipelines see them, upright by its EXIF orientation:
    an RGB or grayscale JPEG decoded by TensorFlow (bit for bit the training pipeline's decode), any other file
    through PIL (`images.upright_rgb`: CMYK, RGBA, 16-bit, palette -> RGB; lossless), then grayscale for a
    1-channel model. The file is read once."""
    import tensorflow as tf

    from alexnet_jax import data as datalib
    from alexnet_jax.data import images

    datalib.tensorflow_on_cpu()
    with open(path, "rb") as f:
        data = f.read()
    image = images.opened(data)  # decodes everything: a truncated file fails here
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        return images.orient_array(tf.io.decode_jpeg(data, channels=channels).numpy(), images.orientation(image))
    rgb = images.upright_rgb(image)
    return np.asarray(rgb.convert("L"))[..., None] if channels == 1 else np.asarray(rgb)


def preprocess(path: str, image_shape: tuple[int, int, int], norm: Any, dataset: str,
               resize_method: str = "area", torchvision: bool = False) -> np.ndarray:
    """One image file as the model's normalised (H, W, C) float32 input (`norm`: a data.Normalisation); a
    UserError naming the file if it is not a readable image. A converted torchvision checkpoint's images go
    through PIL alone: no TensorFlow is imported for them."""
    from alexnet_jax.data import images
    from alexnet_jax.errors import UserError

    def unreadable(e: BaseException) -> UserError:
        return UserError(f"{path}: not a readable image ({images.reason(e)}); give JPEG, PNG, WebP, TIFF, GIF, "
                         "BMP, PPM or PGM")

    size, _, channels = image_shape
    if torchvision:
        try:
            return torchvision_view(path, size, norm.resize_size or 256, norm)
        except images.READ_ERRORS as e:
            raise unreadable(e) from None
    import tensorflow as tf

    from alexnet_jax import data as datalib
    from alexnet_jax.data import views

    datalib.tensorflow_on_cpu()
    try:
        image = tf.constant(pixels(path, channels))
    except (*images.READ_ERRORS, tf.errors.OpError) as e:
        raise unreadable(e) from None
    h, w = int(image.shape[0]), int(image.shape[1])
    side = min(h, w)
    square = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
    return np.asarray(views.of_square(square, view_of(image_shape, norm, dataset, resize_method), norm), np.float32)


def view_of(image_shape: tuple[int, int, int], norm: Any, dataset: str, resize_method: str = "area") -> Any:
    """The evaluation's single view (`data.views.View`) of a checkpoint's images: the small datasets whole,
    photos' centre square at the normalisation's `resize_size` (a checkpoint older than it: the paper's
    256/224 of the crop), its centre crop."""
    from alexnet_jax.data import SMALL_DATASETS, views

    size = image_shape[0]
    if dataset in SMALL_DATASETS:
        return views.View(size)
    return views.View(size, norm.resize_size or round(size * 256 / 224), resize_method, 1)


@dataclasses.dataclass
class Result:
    path: str
    top: list[tuple[str, float]] | None  # (class name, probability), best first; None if unreadable
    error: str | None = None


def _view(config: Any, meta: dict[str, Any]) -> tuple:
    """What reading an image takes from a checkpoint's config and meta: equal views read every file alike."""
    return (tuple(meta.get("image_shape") or ()), meta.get("normalisation"), config["dataset"],
            config["resize_method"], bool(meta.get("converted_from", "").startswith("torchvision")))


def _reader(config: Any, meta: dict[str, Any], norm: Any) -> Callable[[str], np.ndarray | str]:
    """path -> the model's input for that file, or the reason it is not a readable image (a str)."""
    from alexnet_jax.errors import UserError

    image_shape, _, dataset, resize_method, torchvision = _view(config, meta)

    def read(path: str) -> np.ndarray | str:
        try:
            return preprocess(path, image_shape, norm, dataset, resize_method, torchvision)
        except UserError as e:
            return str(e)

    return read


def classify(workdir: str, paths: list[str], *, step: int | None = None, top_k: int = 5,
             overrides: dict[str, Any] | None = None, batch_size: int | None = None,
             progress: bool | None = None) -> list[Result]:
    """Top-k (class name, probability) for every readable image of `paths`, an error for each other one.

    Images are read and preprocessed on all cores (a thread pool: PIL and TensorFlow decode without Python's
    lock) from the start: while JAX and orbax are imported, by the checkpoint's JSON files as they are on disk
    (`checkpoint_files.peek_saved`; redone if orbax's reading of the checkpoint then differs), while the
    checkpoint is restored and the network compiled, and then READ_AHEAD batches ahead of the network, which takes
    at most `batch_size` (default: the checkpoint's `eval_batch_size`) at a time (at most FORWARD_CHUNK on the
    CPU), in batches as even as the count allows: the last one is padded, so one program is compiled.
    `kernels='auto'` means XLA's own convolutions here (`inference.load(inference=True)`). `progress`: a progress
    bar (default: for more than 200 files)."""
    import concurrent.futures

    from alexnet_jax import checkpoint_files
    from alexnet_jax.data import Normalisation

    pool = concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1))
    futures: dict[int, concurrent.futures.Future] = {}
    try:
        guess = checkpoint_files.peek_saved(workdir, step)
        if guess is not None and guess[2].get("normalisation") and len(guess[2].get("image_shape") or ()) == 3:
            early = _reader(guess[1], guess[2], Normalisation.from_json(guess[2]["normalisation"]))
            futures = {i: pool.submit(early, p) for i, p in enumerate(paths[: READ_AHEAD * FORWARD_CHUNK])}
        return _classify(workdir, paths, step, top_k, overrides, batch_size, progress, pool, futures, guess)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _classify(workdir: str, paths: list[str], step: int | None, top_k: int, overrides: dict[str, Any] | None,
              batch_size: int | None, progress: bool | None, pool: Any, futures: dict[int, Any],
              guess: tuple[int, dict[str, Any], dict[str, Any]] | None) -> list[Result]:
    """`classify` once JAX is imported: `futures` are the reads started before, with the checkpoint `guess`."""
    import jax
    from tqdm import tqdm

    from alexnet_jax import inference

    saved = inference.read_config(workdir, step, overrides)
    step, config, meta = saved
    read = _reader(config, meta, inference.normalisation_of(meta, step))
    if guess is None or _view(guess[1], guess[2]) != _view(config, meta):
        for f in futures.values():  # read with another checkpoint's view: read again
            f.cancel()
        futures.clear()
    most = max(1, int(batch_size or config.eval_batch_size))
    if jax.default_backend() == "cpu":  # faster per image there, and the first pass waits for fewer images
        most = min(most, FORWARD_CHUNK)
    batch = -(-len(paths) // -(-len(paths) // most)) if paths else 1  # as even as can be: the least padding

    submitted = len(futures)  # the early reads are paths[:submitted]

    def read_up_to(end: int) -> None:
        nonlocal submitted
        for i in range(submitted, min(end, len(paths))):
            futures[i] = pool.submit(read, paths[i])
        submitted = max(submitted, min(end, len(paths)))

    results: list[Result] = []
    show = len(paths) > 200 if progress is None else progress
    with tqdm(total=len(paths), unit=" images", desc="predict", disable=not show, mininterval=1.0) as bar:
        read_up_to(READ_AHEAD * batch)
        loaded = inference.load(workdir, step, inference.mesh_of_one_device(), overrides, inference=True,
                                restore=False, saved=saved)
        names = class_names(config.dataset, loaded.meta, config.num_classes)
        k = min(top_k, len(names))
        loaded, forward = _restored_and_compiled(loaded, batch)
        for start in range(0, len(paths), batch):
            chunk = list(range(start, min(start + batch, len(paths))))
            read_now = [futures.pop(i).result() for i in chunk]
            read_up_to(start + (READ_AHEAD + 1) * batch)
            results += [Result(paths[i], None, x) for i, x in zip(chunk, read_now, strict=True) if isinstance(x, str)]
            good = [(paths[i], x) for i, x in zip(chunk, read_now, strict=True) if not isinstance(x, str)]
            results += _ranked(good, batch, lambda x: forward(loaded.variables, x), names, k)
            bar.update(len(chunk))
    order = {p: i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order[r.path])


def _restored_and_compiled(loaded: Any, batch: int) -> tuple[Any, Any]:
    """(`loaded` with its variables read, the softmax forward pass compiled for `batch` images): the program is
    traced and compiled (or found in the compilation cache) while the checkpoint is read."""
    import concurrent.futures

    import jax
    import jax.numpy as jnp

    from alexnet_jax import inference

    @jax.jit
    def forward(v, x):
        return jax.nn.softmax(loaded.model.apply(v, x, train=False))

    abstract, x_shape = loaded.variables, jax.ShapeDtypeStruct((batch, *loaded.image_shape), jnp.float32)
    with concurrent.futures.ThreadPoolExecutor(1) as compiler:
        compiling = compiler.submit(lambda: forward.lower(abstract, x_shape).compile())
        return inference.restored(loaded), compiling.result()


def _ranked(good: list[tuple[str, np.ndarray]], batch: int, probabilities: Any, names: list[str],
            k: int) -> list[Result]:
    """The top `k` classes of each read image, in one forward pass over a batch padded to `batch` rows."""
    if not good:
        return []
    import jax

    images = np.stack([x for _, x in good])
    images = np.concatenate([images, np.zeros((batch - len(good), *images.shape[1:]), images.dtype)])
    probs = np.asarray(jax.device_get(probabilities(images)))[: len(good)]
    return [Result(path, [(names[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]])
            for (path, _), p in zip(good, probs, strict=True)]


def predict(workdir: str, paths: list[str], *, step: int | None = None, top_k: int = 5,
            overrides: dict[str, Any] | None = None) -> list[tuple[str, list[tuple[str, float]]]]:
    """(path, top-k) for every image in `paths`; a UserError for the first one that is not a readable image."""
    from alexnet_jax.errors import UserError

    results = classify(workdir, paths, step=step, top_k=top_k, overrides=overrides)
    bad = next((r for r in results if r.error), None)
    if bad is not None:
        raise UserError(bad.error)
    return [(r.path, r.top) for r in results]


def write_results(path: str, results: list[Result], top_k: int) -> None:
    """`results` as CSV (`file, error, class_1, probability_1, ...`) or JSON (a list of {"file", "top": [{"class",
    "probability"}], "error"}), by `path`'s extension; written whole, then renamed."""
    import csv
    import json

    rows = [{"file": r.path, "top": [{"class": c, "probability": p} for c, p in (r.top or [])], "error": r.error}
            for r in results]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        if path.lower().endswith(".json"):
            json.dump(rows, f, indent=1, ensure_ascii=False)
        else:
            writer = csv.writer(f)
            writer.writerow(["file", "error"] + [x for k in range(1, top_k + 1) for x in (f"class_{k}",
                                                                                      f"probability_{k}")])
            for row in rows:
                top = [x for t in row["top"] for x in (t["class"], f"{t['probability']:.6f}")]
                writer.writerow([row["file"], row["error"] or ""] + top + [""] * (2 * top_k - len(top)))
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("give image files or folders: python -m alexnet_jax.predict --workdir DIR IMAGE ...")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow is imported, and kept off the accelerator, where images are first read
    # (`data.tensorflow_on_cpu`): a bad flag or checkpoint is reported before that 4-second import.
    from alexnet_jax import cli
    from alexnet_jax.data import images
    from alexnet_jax.errors import UserError

    logging.get_absl_handler().use_absl_log_file = False
    if FLAGS.output and not FLAGS.output.lower().endswith((".csv", ".json")):
        sys.exit(f"alexnet_jax.predict: error: --output={FLAGS.output}: give a .csv or .json file name")
    if FLAGS.output and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.output))):
        sys.exit(f"alexnet_jax.predict: error: --output={FLAGS.output}: its folder does not exist")
    missing = [p for p in argv[1:] if not os.path.exists(p)]
    if missing:
        sys.exit(f"alexnet_jax.predict: error: no such file: {', '.join(missing)}")
    paths = image_files(argv[1:])
    if not paths:
        sys.exit(f"alexnet_jax.predict: error: no image files ({' '.join(images.EXTENSIONS)}) in "
                 f"{', '.join(argv[1:])}")
    if FLAGS.batch_size is not None and FLAGS.batch_size <= 0:
        sys.exit(f"alexnet_jax.predict: error: --batch_size={FLAGS.batch_size}: give a positive number of images")
    if FLAGS.compilation_cache:
        cli.persistent_compilation_cache()
    try:
        results = classify(FLAGS.workdir, paths, step=FLAGS.step, top_k=FLAGS.top_k,
                           overrides=cli.config_overrides(), batch_size=FLAGS.batch_size)
    except UserError as e:
        sys.exit(f"alexnet_jax.predict: error: {e}")
    failed = sum(1 for r in results if r.error)
    if FLAGS.output:
        try:
            write_results(FLAGS.output, results, max(len(r.top or []) for r in results) or FLAGS.top_k)
        except OSError as e:
            sys.exit(f"alexnet_jax.predict: error: --output={FLAGS.output} could not be written ({e.strerror})")
        print(f"wrote {FLAGS.output}: {len(results) - failed} image(s) classified, {failed} unreadable")
    for r in results:
        if r.error:
            print(f"alexnet_jax.predict: error: {r.error}", file=sys.stderr)
            continue
        if FLAGS.output:
            continue
        print(r.path)
        shown = readable_names([name for name, _ in r.top])
        for rank, (name, (_, prob)) in enumerate(zip(shown, r.top, strict=True), 1):
            print(f"  {rank}. {name:<32s} {100 * prob:6.2f}%")
    if failed:
        print(f"alexnet_jax.predict: {failed} of {len(results)} file(s) could not be read", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdir"])
    from alexnet_jax import cli, xla_cpu

    cli.set_xla_cpu_flags(ynnpack=xla_cpu.YNNPACK_OFF)  # before parse_flags's default: passes of <= 50 images

    app.run(main, flags_parser=cli.parse_flags)
