"""A folder of the user's images as a tfds dataset: `root/<split>/<class>/*.{jpg,jpeg,png,gif,bmp}` (or
`root/<class>/*` for one training split), class names from the folder names.

Why a builder of ours and not tfds's `ImageFolder`: `ImageFolder` reads the files at `as_dataset` time, so it has
no prepared records (its `file_instructions` name TFRecord files that do not exist). The photo pipeline streams
prepared records deterministically (per-process file slices, shard permutations, resume by skipping records), so
the folder is prepared once, as any tfds dataset is, into `<data_dir>/image_folder_photos/<name>-<fingerprint>/`.
The fingerprint covers every file's path, size and modification time: adding, removing or editing a photo
prepares a new copy.

Photos as people have them: every file is opened with PIL before anything is written. CMYK, grayscale, RGBA,
16-bit, palette (GIF) images become 8-bit RGB (alpha dropped, as torchvision's `ImageFolder` loader does;
16-bit scaled to 8) and are stored as JPEG (quality 95, no chroma subsampling); RGB and grayscale JPEGs are
stored as they are. Files that do not open or decode (truncated, not an image) are all listed in one error, with
their paths, before anything is prepared or trained. Files with other extensions are ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from alexnet_jax.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
EVAL_SPLIT_NAMES = ("validation", "val", "valid", "test", "eval")
JPEG_QUALITY = 95


def _images_in(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def _subdirs(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def scan(root: str) -> dict[str, dict[str, list[str]]]:
    """{split: {class: [file paths relative to root]}}. `root/<class>/*` (images directly in root's
    subfolders) is one 'train' split; otherwise root's subfolders are splits holding class folders."""
    if not os.path.isdir(root):
        raise UserError(f"--config.folder={root!r} is not a directory: give the folder that holds "
                        "<split>/<class>/ or <class>/ subfolders of images")
    subdirs = _subdirs(root)
    flat = any(_images_in(os.path.join(root, d)) for d in subdirs)
    layout = {"train": subdirs} if flat else {s: _subdirs(os.path.join(root, s)) for s in subdirs}
    out: dict[str, dict[str, list[str]]] = {}
    for split, classes in layout.items():
        base = root if flat else os.path.join(root, split)
        files = {c: [os.path.relpath(os.path.join(base, c, f), root) for f in _images_in(os.path.join(base, c))]
                 for c in classes}
        files = {c: f for c, f in files.items() if f}
        if files:
            out[split] = files
    if "train" not in out:
        raise UserError(f"no training images found in {root}: put them in {root}/train/<class>/*.jpg (or "
                        f"{root}/<class>/*.jpg); found splits {sorted(out) or 'none'} (extensions: "
                        f"{', '.join(EXTENSIONS)})")
    if len(out["train"]) < 2:
        raise UserError(f"{root}: the training images are in {len(out['train'])} class folder(s); a classifier "
                        "needs at least 2 (one subfolder per class)")
    strays = sorted(set(c for s in out.values() for c in s) - set(out["train"]))
    if strays:
        raise UserError(f"{root}: class folder(s) {strays} hold evaluation images but no training images: add "
                        "training images for them or remove them")
    return out


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


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16-bit ('I;16', 'I') scaled to 8 bits, alpha dropped, palettes expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def encoded(path: str) -> bytes:
    """The bytes stored for one image: the file itself if it is an RGB or grayscale JPEG, else JPEG-95 of its
    8-bit RGB. Raises OSError/ValueError (PIL's) for anything unreadable, truncated images included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning, palette-transparency notes
        with Image.open(path) as image:
            image.load()  # decodes everything: a truncated file fails here
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                with open(path, "rb") as f:
                    return f.read()
            buf = io.BytesIO()
            to_rgb(image).save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: full colour detail
            return buf.getvalue()


def unreadable(root: str, splits: dict[str, dict[str, list[str]]]) -> list[str]:
    """'path (reason)' for every file that does not decode."""
    bad = []
    for files in splits.values():
        for rel_files in files.values():
            for rel in rel_files:
                try:
                    encoded(os.path.join(root, rel))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    reason = "truncated" if "truncated" in str(e) else (
                        "not an image" if "cannot identify" in str(e) else str(e).splitlines()[0][:80])
                    bad.append(f"{os.path.join(root, rel)} ({reason})")
    return bad


@dataclasses.dataclass(eq=True)
class FolderConfig(tfds.core.BuilderConfig):
    root: str = ""
    class_names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()


class ImageFolderPhotos(tfds.core.GeneratorBasedBuilder):
    """A folder of images, prepared once (one `FolderConfig` per folder and content)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images as RGB JPEG, class names from folder names, relative file names."}

    def __init__(self, *, files: dict[str, dict[str, list[str]]] | None = None, **kwargs):
        self._files = files
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

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self.builder_config.splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        c: FolderConfig = self.builder_config
        for cls, rels in self._files[split].items():
            for rel in rels:
                yield rel, {"image": encoded(os.path.join(c.root, rel)), "label": c.class_names.index(cls),
                            "file_name": rel}


def prepare(root: str, data_dir: str | None) -> tuple[ImageFolderPhotos, str | None]:
    """The folder prepared (once per content) and its evaluation split name (None: only training images)."""
    root = os.path.abspath(os.path.expanduser(root))
    splits = scan(root)
    names = tuple(sorted(splits["train"]))
    base = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in os.path.basename(root.rstrip("/")))[:40]
    config = FolderConfig(name=f"{base or 'root'}-{fingerprint(root, splits)}", root=root, class_names=names,
                          splits=tuple(sorted(splits)),
                          description=f"{root}: {len(names)} classes")
    builder = ImageFolderPhotos(config=config, data_dir=data_dir, files=splits)
    if not builder.is_prepared():
        bad = unreadable(root, splits)
        if bad:
            shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise UserError(f"{len(bad)} file(s) in {root} cannot be read as images: {shown}. Replace or remove "
                            "them and run again (nothing was prepared or trained).")
        counts = {s: sum(len(v) for v in splits[s].values()) for s in splits}
        logging.info("preparing the images of %s (%s; %d classes) into %s", root, counts, len(names),
                     builder.data_dir)
        builder.download_and_prepare()
    return builder, eval_split_of(splits)
