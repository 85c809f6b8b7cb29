"""The small datasets (FashionMNIST, CIFAR-10): preparation with tfds, and in-memory training and evaluation.

They are prepared by a tfds builder into `data_dir` (FashionMNIST from the local IDX files when
present) and held in memory. The training stream is a pure function of (seed, step): step s of epoch e takes rows
[s*B, (s+1)*B) of a stateless permutation seeded by (seed, e), and each image's augmentation is seeded by
(seed, step, row). So a run restarted at step N yields exactly the batches an uninterrupted run would,
and each process of a multi-host run reads only its own rows of every global batch.

Evaluation visits every test example exactly once: the last batch is zero-padded and a `mask` marks the
real rows, so metrics are sums over real examples whatever the batch size or process count.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import socket
import struct
import urllib.parse
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from alexnet_jax.data import records
from alexnet_jax.data.base import (
    Data,
    Normalisation,
    check_data_dir,
    data_options,
    eval_slice,
    normalisation_for,
    steps_per_epoch,
)
from alexnet_jax.data.spec import DATASETS, DataSpec
from alexnet_jax.data.stats import channel_stats
from alexnet_jax.data.views import View, of_square, resize_and_normalise
from alexnet_jax.errors import UserError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str) -> np.ndarray:
    """Read one (gzipped) IDX file of the MNIST family into a uint8 array, checking its header."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}. Reinstall the files (apt-get install --reinstall "
                        "dataset-fashion-mnist) or point --config.fashion_mnist_dir elsewhere.") from e
    if len(data) < 8:
        raise UserError(f"{path} is not an IDX file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise UserError(f"{path} is not a uint8 IDX file of images or labels (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: header says {shape}, found {body.size} values. "
                        "Reinstall the files (apt-get install --reinstall dataset-fashion-mnist).")
    return body.reshape(shape)


def fashion_mnist_files_present(source_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(source_dir, f)) for pair in FASHION_MNIST_FILES.values() for f in pair)


class FashionMnistFiles(tfds.core.GeneratorBasedBuilder):
    """FashionMNIST from the original IDX files on disk (Debian's dataset-fashion-mnist), no download.

    Same features and splits as tfds's own `fashion_mnist`, so the rest of the pipeline cannot tell them apart.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "The original Zalando IDX files, read from a local folder.",
        "1.1.0": "Examples kept in file order.",
    }

    def __init__(self, *, source_dir: str, **kwargs):
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Zalando's FashionMNIST read from local IDX files.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=list(FASHION_MNIST_CLASSES)),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the files' order: example i is row i of the IDX file
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in FASHION_MNIST_FILES}

    def _generate_examples(self, split: str):
        image_file, label_file = FASHION_MNIST_FILES[split]
        images = read_idx(os.path.join(self._source_dir, image_file))
        labels = read_idx(os.path.join(self._source_dir, label_file))
        if len(images) != len(labels):
            raise UserError(f"{split}: {len(images)} images but {len(labels)} labels in {self._source_dir}")
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": _png(image), "label": int(label)}


def _png(image: np.ndarray) -> bytes:
    """A 28x28 uint8 image as the grayscale PNG tfds's Image feature stores (lossless: the same pixels decoded).
    Encoded here with PIL: tfds's own encoder runs one eager TensorFlow op per image, 12 of the 22 s that preparing
    FashionMNIST's 70,000 images took on 2 cores."""
    out = io.BytesIO()
    Image.fromarray(image, mode="L").save(out, format="PNG")
    return out.getvalue()


@dataclasses.dataclass
class InMemoryData:
    """A whole split as uint8 NHWC images and int32 labels."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """A quick look before a tfds download, whose retries would otherwise hang for minutes offline."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download_url(builder: tfds.core.DatasetBuilder) -> str | None:
    url = getattr(type(builder), "URL", None)  # tfds's MNIST-family builders name their source here
    return url if isinstance(url, str) else None


def _fashion_mnist_builder(data_dir: str | None, fashion_mnist_dir: str) -> tfds.core.DatasetBuilder:
    source = os.path.expanduser(fashion_mnist_dir)
    if fashion_mnist_files_present(source):
        builder = FashionMnistFiles(source_dir=source, data_dir=data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare()
            for split, (image_file, label_file) in FASHION_MNIST_FILES.items():  # what decoding them would give
                _keep(builder, split, read_idx(os.path.join(source, image_file))[..., None],
                      read_idx(os.path.join(source, label_file)).astype(np.int32))
        return builder
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if builder.is_prepared():
        return builder
    expected = ", ".join(f for pair in FASHION_MNIST_FILES.values() for f in pair)
    message = (f"FashionMNIST not found: {source!r} does not hold {expected}, and tfds could not download it "
               "({}). Install the files with `sudo apt-get install dataset-fashion-mnist` or set "
               "--config.fashion_mnist_dir to the folder that holds them.")
    url = _download_url(builder)
    if url and not _reachable(url):
        raise UserError(message.format(f"{urllib.parse.urlparse(url).hostname} is unreachable"))
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any download failure means the same thing to the user
        raise UserError(message.format(type(e).__name__)) from None
    return builder


CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def _cifar10_builder(data_dir: str | None, manual_dir: str) -> tfds.core.DatasetBuilder:
    """tfds's own cifar10 builder; offline it reads `cifar-10-binary.tar.gz` from the manual folder.

    tfds checks a manually placed archive against the checksum it registers for the download, so a
    truncated or different file is refused rather than prepared.
    """
    builder = tfds.builder("cifar10", data_dir=data_dir)
    if builder.is_prepared():
        return builder
    manual = (os.path.expanduser(manual_dir) if manual_dir
              else os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual"))
    archive = os.path.join(manual, CIFAR10_ARCHIVE)
    todo = (f"download {CIFAR10_URL} (163 MB) where there is internet, put it in {manual} "
            "(or pass --config.manual_dir), and run again; tfds prepares it once into "
            f"{os.fspath(builder.data_dir_root)}.")
    if not os.path.isfile(archive) and not _reachable(CIFAR10_URL):
        raise UserError(f"cifar10 is not prepared and {urllib.parse.urlparse(CIFAR10_URL).hostname} is "
                        f"unreachable: {todo}")
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    except Exception as e:  # noqa: BLE001 - any download or extraction failure means the same to the user
        # tfds does not export its checksum error's class (tensorflow_datasets.core.download.download_manager):
        # known by name, so a rename only loses this more precise line
        if type(e).__name__ == "NonMatchingChecksumError":
            raise UserError(f"{archive} is not the CIFAR-10 binary archive tfds expects (its checksum differs): "
                            f"replace it with a fresh copy of {CIFAR10_URL}.") from None
        raise UserError(f"tfds could not prepare cifar10 ({type(e).__name__}: {e}): {todo}") from None
    return builder


def load_in_memory(spec: DataSpec, split: str) -> InMemoryData:
    """Prepare (once) and load a split of a small dataset, in tfds's split syntax ('test', 'test[:1000]',
    'train[:90%]', 'train[-5000:]+test'), in that order."""
    if spec.dataset == "fashion_mnist":
        builder = _fashion_mnist_builder(check_data_dir(spec.data_dir), spec.fashion_mnist_dir)
    elif spec.dataset == "cifar10":
        builder = _cifar10_builder(check_data_dir(spec.data_dir), spec.manual_dir)
    elif spec.dataset == "imagenet2012":
        raise UserError("imagenet2012 is not held in memory; it needs the streaming ImageNet pipeline.")
    else:
        raise UserError(f"unknown dataset {spec.dataset!r}; choose one of {DATASETS}")
    names = tuple(builder.info.features["label"].names)
    try:
        parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
    except (KeyError, ValueError, AssertionError) as e:
        raise UserError(f"split {split!r} of {spec.dataset}: {str(e).splitlines()[0][:160]}; it has splits "
                        f"{sorted(builder.info.splits)} (tfds syntax: 'test', 'test[:1000]', 'train[:90%]')") from None
    arrays = [(images[part.from_:part.to], labels[part.from_:part.to])
              for part in parts for images, labels in [_decoded(builder, part.splitname)]]
    images, labels = (arrays[0][k] if len(arrays) == 1 else np.concatenate([a[k] for a in arrays]) for k in (0, 1))
    if not len(labels):
        raise UserError(f"split {split!r} of {spec.dataset} holds no images: choose another "
                        "(--config.train_split / --config.eval_split)")
    return InMemoryData(images, labels, names)


def _decoded(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's (uint8 images, int32 labels). Decoding FashionMNIST's 60,000 PNGs takes 8-30 s on 2 cores, every
    run; the arrays are kept beside the prepared records (`<split>.images.npy`, `<split>.labels.npy`, 0.1 s to
    load) and rebuilt when tfds prepares the dataset again (a new folder) or a file is unreadable."""
    try:
        images, labels = (np.load(path) for path in _kept_paths(builder, split))
        if images.dtype == np.uint8 and len(images) == len(labels):
            return images, labels
    except (OSError, ValueError):
        pass
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = np.asarray(arrays["image"], np.uint8), np.asarray(arrays["label"], np.int32)
    _keep(builder, split, images, labels)
    return images, labels


def _keep(builder: tfds.core.DatasetBuilder, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Keep a split's decoded arrays beside its records for `_decoded`. The FashionMNIST files' builder keeps the
    IDX arrays it has just prepared (the records hold them losslessly, in file order): decoding them back cost
    another 8 s of CPU on the first run."""
    try:  # written whole, then renamed: a reader never sees half an array (several processes may write)
        for path, array in zip(_kept_paths(builder, split), (images, labels), strict=True):
            tmp = f"{path}.{os.getpid()}.tmp.npy"
            np.save(tmp, array)
            os.replace(tmp, path)
    except OSError as e:  # a read-only data_dir: decode again next time
        logging.info("not keeping the decoded %s split in %s: %s", split, os.fspath(builder.data_dir), e.strerror)


def _kept_paths(builder: tfds.core.DatasetBuilder, split: str) -> tuple[str, str]:
    """Where `_keep` puts a split's decoded (images, labels) and `_decoded` looks for them."""
    return tuple(os.path.join(os.fspath(builder.data_dir), f"{split}.{k}.npy") for k in ("images", "labels"))


def train_batches(
    data: InMemoryData,
    spec: DataSpec,
    mean: np.ndarray,
    std: np.ndarray,
    start_step: int,
    num_steps: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of global batches `start_step .. num_steps-1`, augmented and normalised."""
    n, bs = len(data), spec.batch_size
    per_epoch = steps_per_epoch(n, bs)
    if per_epoch == 0:
        raise UserError(f"batch_size {bs} is larger than the {n} training examples")
    local = bs // process_count
    images = tf.constant(data.images)
    labels = tf.constant(data.labels)
    seed = int(spec.seed)
    pad, flip, size = int(spec.crop_padding), bool(spec.random_flip), int(spec.image_size)
    h, w = data.images.shape[1:3]

    @tf.autograph.experimental.do_not_convert  # plain Python branching only: AutoGraph only slows the start
    def augment(row, step, position):
        image = tf.gather(images, row)
        key = tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + step, position])
        k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        if pad:
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.stateless_random_crop(image, (h, w, image.shape[-1]), seed=k_crop)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=k_flip)
        return {"image": resize_and_normalise(image, mean, std, size), "label": tf.gather(labels, row)}

    ds = records.train_steps(n, bs, seed, start_step, num_steps, process_index, process_count)
    ds = ds.flat_map(tf.autograph.experimental.do_not_convert(
        lambda step, rows, positions: tf.data.Dataset.from_tensor_slices((rows, tf.fill([local], step), positions))))
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds.with_options(data_options())))


def eval_batches(
    data: InMemoryData,
    spec: DataSpec,
    mean: np.ndarray,
    std: np.ndarray,
    process_index: int = 0,
    process_count: int = 1,
    row_multiple: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the test set in local batches, each image seen as `predict` sees a file
    (`views.of_square`, normalised by `mean` / `std` per channel); padded rows have mask 0.

    Every process yields the same number of batches of the same shapes, so collective eval steps line up;
    together the processes cover each example exactly once.
    """
    n = len(data)
    local = spec.eval_batch_size // process_count
    lo, hi, per_process = eval_slice(n, local, process_index, process_count, row_multiple)
    images, labels = data.images[lo:hi], data.labels[lo:hi]
    mask = np.ones(hi - lo, np.float32)
    fill = per_process - (hi - lo)
    if fill:
        images = np.concatenate([images, np.zeros((fill, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(fill, labels.dtype)])
        mask = np.concatenate([mask, np.zeros(fill, np.float32)])
    view, reflect = View(int(spec.image_size)), int(spec.eval_crops) == 2
    norm = Normalisation("channel", mean, std, None, view.crop)

    @tf.autograph.experimental.do_not_convert  # plain Python branching only; spares AutoGraph's warning
    def prepare(b):
        image = of_square(b["image"], view, norm)
        if reflect:  # (B, 2, H, W, C): the image and its mirror; eval_step averages their softmax
            image = tf.stack([image, tf.reverse(image, axis=[2])], axis=1)
        return {**b, "image": image}

    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels, "mask": mask})
    ds = ds.batch(local).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds.prefetch(2).with_options(data_options())))


def create_data(spec: DataSpec, normalisation: Normalisation | None = None) -> Data:
    """Prepare (if needed) and load FashionMNIST or CIFAR-10; normalised per channel by the training set (or by
    `normalisation`, e.g. pretrained weights' or a checkpoint's)."""
    train_data = load_in_memory(spec, spec.train_split or "train")
    test_data = load_in_memory(spec, spec.eval_split or "test")
    if normalisation is not None and normalisation.kind == "channel" and normalisation.mean.shape == (
            train_data.images.shape[-1],):
        norm = normalisation
    else:
        if normalisation is not None:
            logging.warning("the pretrained normalisation does not fit %s's %d channel(s): computed from the data",
                            spec.dataset, train_data.images.shape[-1])
        mean, std = channel_stats(train_data.images)
        norm = normalisation_for(spec, {"mean": mean, "std": std})
    mean, std = norm.arrays()
    return Data(
        num_train=len(train_data),
        num_eval=len(test_data),
        image_shape=(spec.image_size, spec.image_size, train_data.images.shape[-1]),
        class_names=train_data.class_names,
        train=lambda start, stop, pid, nproc: train_batches(train_data, spec, mean, std, start, stop, pid, nproc),
        eval=lambda pid, nproc, row_multiple=0: eval_batches(test_data, spec, mean, std, pid, nproc, row_multiple),
        mean=mean,
        std=std,
        normalisation=norm,
        views=lambda split, pid, nproc: eval_batches(train_data if split == "train" else test_data, spec, mean,
                                                     std, pid, nproc),
    )
