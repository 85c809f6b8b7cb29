"""Image files as people have them on a disk: which files of a folder are images, and each one's pixels upright.

One scan (`walk`) serves training's preparation of a folder, `predict` and `features`. Its rules are torchvision
`ImageFolder`'s: folders walked recursively, symbolic links followed (but no folder visited twice, so a link
loop ends), the extensions `.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp` in any letter case; plus `.gif`.
Beyond torchvision, what an operating system leaves beside photos is passed over and counted (`Skipped`), never
read: hidden files and folders (names starting with '.', such as macOS's AppleDouble `._IMG_0001.JPG` resource
forks and `.DS_Store`), `Thumbs.db`, `desktop.ini`, `__MACOSX/` folders, and files with other extensions.

Pixels (`upright_rgb`, `stored_bytes`): the first frame of multi-frame GIF/TIFF, turned upright by its EXIF
orientation (PIL's `ImageOps.exif_transpose`: phones store portrait photos sideways with orientation 6;
TensorFlow's JPEG decoder and torchvision ignore the tag), as 8-bit RGB. PIL and NumPy only: no TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
OS_FILES = ("thumbs.db", "desktop.ini")  # Windows' thumbnail cache and folder settings (any letter case)
OS_FOLDERS = ("__macosx",)  # what macOS's Archive Utility adds to a zip: AppleDouble copies of every file
JPEG_QUALITY = 95
ORIENTATION = 0x0112  # the EXIF tag
# What PIL raises for a file that is not a readable image (truncated, not an image, a decompression bomb).
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


@dataclasses.dataclass
class Skipped:
    """What a scan passed over, by reason, for one log line."""

    hidden: list[str] = dataclasses.field(default_factory=list)  # file names
    hidden_folders: list[str] = dataclasses.field(default_factory=list)
    os_files: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # 'Thumbs.db': 3
    os_folders: list[str] = dataclasses.field(default_factory=list)
    other: list[str] = dataclasses.field(default_factory=list)  # file names with other extensions
    loose: list[str] = dataclasses.field(default_factory=list)  # images outside any class folder

    @property
    def count(self) -> int:
        return (len(self.hidden) + len(self.hidden_folders) + sum(self.os_files.values()) + len(self.os_folders)
                + len(self.other) + len(self.loose))

    def summary(self) -> str:
        """e.g. 'skipped 3 hidden files (._*, .DS_Store), 3 Thumbs.db, 1 notes.txt'; '' when nothing was."""
        parts = []
        if self.hidden:
            kinds = sorted({"._*" if n.startswith("._") else n for n in self.hidden}, key=lambda k: (k != "._*", k))
            shown = ", ".join(kinds[:4]) + (", ..." if len(kinds) > 4 else "")
            parts.append(f"{_n(len(self.hidden), 'hidden file')} ({shown})")
        if self.hidden_folders:
            names = ", ".join(sorted(set(self.hidden_folders))[:4])
            parts.append(f"{_n(len(self.hidden_folders), 'hidden folder')} ({names})")
        parts += [f"{n} {name}" for name, n in sorted(self.os_files.items())]
        if self.os_folders:
            parts.append(f"{_n(len(self.os_folders), 'folder')} {sorted(set(self.os_folders))[0]}/")
        by_ext = collections.defaultdict(list)
        for name in self.other:
            by_ext[os.path.splitext(name)[1].lower()].append(name)
        for ext, names in sorted(by_ext.items()):
            parts.append(f"1 {names[0]}" if len(names) == 1 else
                         f"{len(names)} {ext or 'extension-less'} files")
        if self.loose:
            parts.append(f"{_n(len(self.loose), 'image')} outside the class folders ({', '.join(self.loose[:3])})")
        return "skipped " + ", ".join(parts) if parts else ""


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def walk(folder: str, skipped: Skipped | None = None) -> list[str]:
    """The image files under `folder` (recursively, links followed, no folder twice), sorted; what was passed
    over is added to `skipped`."""
    skipped = skipped if skipped is not None else Skipped()
    seen: set[tuple[int, int]] = set()
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked: nothing more below it
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        kept = []
        for d in sorted(dirs):
            if d.startswith("."):
                skipped.hidden_folders.append(d)
            elif d.lower() in OS_FOLDERS:
                skipped.os_folders.append(d)
            else:
                kept.append(d)
        dirs[:] = kept
        out += [os.path.join(root, name) for name in _kept(root, files, skipped)]
    return sorted(out)


def _kept(folder: str, names: list[str], skipped: Skipped) -> list[str]:
    """The image files among `names` (files of `folder`); the others counted in `skipped`."""
    kept = []
    for name in sorted(names):
        if name.startswith("."):
            skipped.hidden.append(name)
        elif name.lower() in OS_FILES:
            skipped.os_files[name] += 1
        elif not is_image_name(name):
            skipped.other.append(name)
        elif os.path.isfile(os.path.join(folder, name)):  # (a dangling link is not a file)
            kept.append(name)
    return kept


def loose_files(folder: str, skipped: Skipped) -> None:
    """Count the files directly in `folder` (above the class folders: not read) into `skipped`."""
    names = [n for n in os.listdir(folder) if not os.path.isdir(os.path.join(folder, n))]
    skipped.loose += [os.path.join(folder, n) for n in _kept(folder, names, skipped)]


def visible_folders(folder: str, skipped: Skipped | None = None) -> list[str]:
    """The names of `folder`'s subfolders a scan enters (not hidden, not an operating system's), sorted."""
    out = []
    for d in sorted(os.listdir(folder)):
        if not os.path.isdir(os.path.join(folder, d)):
            continue
        if d.startswith("."):
            if skipped is not None:
                skipped.hidden_folders.append(d)
        elif d.lower() in OS_FOLDERS:
            if skipped is not None:
                skipped.os_folders.append(d)
        else:
            out.append(d)
    return out


def files_under(paths: list[str], skipped: Skipped | None = None) -> list[str]:
    """The paths given, every folder among them replaced by its images (`walk`); files named are kept as given."""
    out = []
    for p in paths:
        out += walk(p, skipped) if os.path.isdir(p) else [p]
    return out


# ---------------------------------------------------------------------------------------------------------
# Pixels.


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16-bit ('I;16', 'I') scaled to 8 bits, alpha dropped (as torchvision's loader
    does), palettes expanded, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def opened(data: bytes) -> Image.Image:
    """The image in `data`, decoded whole (a truncated file fails here), its first frame for GIF/TIFF."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning, palette-transparency notes
        image = Image.open(io.BytesIO(data))
        image.load()
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or not one of the eight)."""
    try:
        value = int(image.getexif().get(ORIENTATION, 1))
    except (TypeError, ValueError, SyntaxError, OSError):  # a damaged EXIF block: read the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def upright_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, turned upright by the EXIF orientation."""
    if orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def stored_bytes(path: str) -> bytes:
    """The bytes a folder's preparation stores for one file, which is read once: the file itself if it is an
    upright RGB or grayscale JPEG, else JPEG-95 (4:4:4) of its upright 8-bit RGB. Raises one of `READ_ERRORS`
    for a file that is not a readable image."""
    with open(path, "rb") as f:
        data = f.read()
    image = opened(data)
    if image.format == "JPEG" and image.mode in ("RGB", "L") and orientation(image) == 1:
        return data
    buf = io.BytesIO()
    upright_rgb(image).save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: full colour detail
    return buf.getvalue()


def orient_array(pixels: np.ndarray, value: int) -> np.ndarray:
    """(H, W, C) pixels as stored -> upright, for EXIF orientation `value` (what `ImageOps.exif_transpose` does
    to a PIL image, on an array: for pixels another decoder produced)."""
    ops = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(ops.get(value, ops[1])(pixels))


def orientation_of_bytes(data: bytes) -> int:
    """The EXIF orientation of an encoded image (its header only is read); 1 if it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return orientation(image)
    except READ_ERRORS:
        return 1


def reason(e: BaseException) -> str:
    """A few words on why a file is not a readable image."""
    text = str(e)
    if "truncated" in text:
        return "truncated"
    if "cannot identify" in text:
        return "not an image"
    return (text.splitlines()[0][:80] if text.strip() else type(e).__name__)
