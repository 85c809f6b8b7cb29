"""A folder of the user's images as a tfds dataset: `root/<split>/<class>/**` (or `root/<class>/**` for one
training split), class names from the folder names.

Which files are images is `images.walk`'s rules (torchvision `ImageFolder`'s: each class folder walked
recursively, links followed, `.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp .gif` in any letter case), and what
an operating system leaves beside photos (hidden files such as macOS's `._*` and `.DS_Store`, `Thumbs.db`,
`desktop.ini`, `__MACOSX/`) and other files are passed over, counted in one log line. `root/train/` holding
class folders (no images of its own) makes the split layout; otherwise root's subfolders are the classes.

Why a builder of ours and not tfds's `ImageFolder`: `ImageFolder` reads the files at `as_dataset` time, so it has
no prepared records. The folder is prepared once, as any tfds dataset is (in array_record: `records`), into
`<data_dir>/image_folder_photos/<name>-<fingerprint>/`; the fingerprint covers every file's path, size and
modification time: adding, removing or editing a photo prepares a new copy. In a multi-process run process 0
prepares it and the others wait (`once`).

Each file is opened and decoded once (`images.stored_bytes`): upright RGB and grayscale JPEGs are stored as they
are, byte for byte; anything else (a photo with an EXIF rotation, CMYK, RGBA, 16-bit, palette, WebP, TIFF...) as
JPEG-95 (4:4:4) of its upright 8-bit RGB. Files that do not decode are all listed in one error, with their paths,
once every file has been read and before the dataset is written (tfds discards what it had written).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from collections.abc import Iterator

import tensorflow_datasets as tfds
from absl import logging
from tqdm import tqdm

from alexnet_jax.data import images, once, records
from alexnet_jax.errors import UserError

EVAL_SPLIT_NAMES = ("validation", "val", "valid", "test", "eval")
THREADS = max(1, os.cpu_count() or 1)  # files read and decoded at once while preparing
CHUNK = 256  # files in flight (their bytes in memory) at once


@dataclasses.dataclass(frozen=True)
class FolderScan:
    """What a folder holds: {split: {class: [image paths relative to root]}}, and what was passed over."""

    root: str
    splits: dict[str, dict[str, list[str]]]
    skipped: images.Skipped

    @property
    def count(self) -> int:
        return sum(len(f) for classes in self.splits.values() for f in classes.values())


def _has_images(folder: str) -> bool:
    return any(images.is_image_name(n) and os.path.isfile(os.path.join(folder, n)) for n in os.listdir(folder))


def scan(root: str) -> FolderScan:
    """The folder's images by split and class (`images.walk` under each class folder). `root/train/` with class
    folders in it (no images of its own) makes `root`'s subfolders splits; otherwise they are the classes of one
    'train' split. A class folder without images stops here, named."""
    if not os.path.isdir(root):
        raise UserError(f"--config.folder={root!r} is not a directory: give the folder that holds "
                        "<split>/<class>/ or <class>/ subfolders of images")
    skipped = images.Skipped()
    top = images.visible_folders(root, skipped)
    images.loose_files(root, skipped)
    split_layout = "train" in top and not _has_images(os.path.join(root, "train"))
    bases = {s: os.path.join(root, s) for s in top} if split_layout else {"train": root}
    out: dict[str, dict[str, list[str]]] = {}
    empty = []
    for split, base in bases.items():
        classes = images.visible_folders(base, skipped) if split_layout else top
        if split_layout:
            images.loose_files(base, skipped)
        files = {c: [os.path.relpath(p, root) for p in images.walk(os.path.join(base, c), skipped)] for c in classes}
        empty += [os.path.join(base, c) for c, f in files.items() if not f]
        if files:
            out[split] = files
    if empty:
        shown = ", ".join(f"{p}/" for p in empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise UserError(f"{len(empty)} class folder(s) hold no images: {shown} (images are "
                        f"{' '.join(images.EXTENSIONS)} files, in any letter case): add images or remove the "
                        "folder(s); nothing was prepared.")
    if "train" not in out:
        raise UserError(f"no training images found in {root}: put them in {root}/train/<class>/*.jpg (or "
                        f"{root}/<class>/*.jpg); found splits {sorted(out) or 'none'} (extensions: "
                        f"{', '.join(images.EXTENSIONS)})")
    if len(out["train"]) < 2:
        raise UserError(f"{root}: the training images are in {len(out['train'])} class folder(s); a classifier "
                        "needs at least 2 (one subfolder per class)")
    strays = sorted(set(c for s in out.values() for c in s) - set(out["train"]))
    if strays:
        raise UserError(f"{root}: class folder(s) {strays} hold evaluation images but no training images: add "
                        "training images for them or remove them")
    return FolderScan(root, out, skipped)


def eval_split_of(splits: dict[str, dict[str, list[str]]]) -> str | None:
    """The folder's evaluation split ('validation', 'val', 'test', ...), or None (only 'train')."""
    for name in EVAL_SPLIT_NAMES:
        if name in splits:
            return name
    others = sorted(set(splits) - {"train"})
    return others[0] if others else None


def fingerprint(root: str, splits: dict[str, dict[str, list[str]]]) -> str:
    h = hashlib.sha1()
    for split in sorted(splits):
        for cls in sorted(splits[split]):
            for rel in splits[split][cls]:
                st = os.stat(os.path.join(root, rel))
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


@dataclasses.dataclass(eq=True)
class FolderConfig(tfds.core.BuilderConfig):
    root: str = ""
    class_names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()


class ImageFolderPhotos(tfds.core.GeneratorBasedBuilder):
    """A folder of images, prepared once (one `FolderConfig` per folder and content)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images as RGB JPEG, class names from folder names, relative file names."}

    def __init__(self, *, files: FolderScan | None = None, **kwargs):
        self._scan = files  # only needed to prepare; reading needs none
        self._read = 0
        self._bad: list[str] = []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c: FolderConfig = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"The images of {c.root}, one class per folder.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(c.class_names)),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _example_writer(self) -> records.Writer:
        return records.Writer()

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self.builder_config.splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        """Each file read and decoded once, `THREADS` at a time (PIL decodes without the GIL), in order; none
        yielded after a failure; once every file of every split has been read, one error listing all that failed
        (tfds then discards the unfinished dataset)."""
        c: FolderConfig = self.builder_config
        files = [(cls, rel) for cls, rels in self._scan.splits[split].items() for rel in rels]

        def read(rel: str) -> bytes | str:
            try:
                return images.stored_bytes(os.path.join(c.root, rel))
            except images.READ_ERRORS as e:
                return images.reason(e)

        with tqdm(total=len(files), unit=" images", desc=f"preparing {split}", mininterval=1.0,
                  smoothing=0.1) as bar, concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            for start in range(0, len(files), CHUNK):  # (a bounded number of images in memory at once)
                chunk = files[start : start + CHUNK]
                for (cls, rel), data in zip(chunk, pool.map(read, [rel for _, rel in chunk]), strict=True):
                    if isinstance(data, str):
                        self._bad.append(f"{os.path.join(c.root, rel)} ({data})")
                    elif not self._bad:
                        yield rel, {"image": data, "label": c.class_names.index(cls), "file_name": rel}
                    bar.update(1)
                self._read += len(chunk)
        if self._bad and self._read == self._scan.count:
            bad = self._bad
            shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise UserError(f"{len(bad)} file(s) in {c.root} cannot be read as images: {shown}. Replace or remove "
                            "them and run again (nothing was prepared or trained).")


def _remove_empty(path: str, stop: str) -> None:
    """Remove `path` and its parents up to `stop` while they are empty (what a failed preparation left)."""
    path, stop = os.path.abspath(path), os.path.abspath(stop)
    while path.startswith(stop + os.sep) and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
        path = os.path.dirname(path)


def prepare(root: str, data_dir: str | None, processes: once.Processes = once.ONE
            ) -> tuple[ImageFolderPhotos, str | None]:
    """The folder prepared (once per content, by process 0 of a multi-process run) and its evaluation split name
    (None: only training images)."""
    root = os.path.abspath(os.path.expanduser(root))
    found = scan(root)
    if found.skipped.count:
        logging.info("%s: %s", root, found.skipped.summary())
    names = tuple(sorted(found.splits["train"]))
    base = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in os.path.basename(root.rstrip("/")))[:40]
    config = FolderConfig(name=f"{base or 'root'}-{fingerprint(root, found.splits)}", root=root,
                          class_names=names, splits=tuple(sorted(found.splits)),
                          description=f"{root}: {len(names)} classes")

    builder = ImageFolderPhotos(config=config, data_dir=data_dir, files=found)

    def ready() -> bool:  # prepared, and in array_record (a copy prepared before in TFRecord is converted)
        return records.is_readable(ImageFolderPhotos(config=config, data_dir=data_dir))

    def build() -> None:
        if builder.is_prepared():
            records.to_array_record(builder)
            return
        counts = {s: sum(len(v) for v in found.splits[s].values()) for s in found.splits}
        logging.info("preparing the images of %s (%s; %d classes) into %s", root, counts, len(names),
                     builder.data_dir)
        try:
            builder.download_and_prepare(file_format=records.FORMAT)
        except UserError:
            _remove_empty(os.path.dirname(os.fspath(builder.data_dir)), os.fspath(builder.data_dir_root))
            raise

    once.prepare_once(f"the images of {root}", ready, build,
                      os.path.join(os.fspath(builder.data_dir_root), ".alexnet_jax_prepare",
                                   f"image_folder_photos-{config.name}.json"), processes)
    if not builder.info.splits:  # prepared by process 0 while this one waited: read what it wrote
        builder = ImageFolderPhotos(config=config, data_dir=data_dir, files=found)
    return records.random_access(builder), eval_split_of(found.splits)
