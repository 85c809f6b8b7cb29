"""ILSVRC-2012 as one source of photos: tfds's `imagenet2012` builder fed the manual tars, checked image by image.

Preparation. tfds cannot download ImageNet: the user puts `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`
in a manual folder (`config.manual_dir`, tfds's `<data_dir>/downloads/manual` when unset) and runs
`scripts/prepare_imagenet.py`, which runs tfds's own builder and then decodes every prepared JPEG once, so a
damaged archive is reported by file name before training instead of failing (or worse) mid-run.

It is prepared in tfds's array_record format (read record by record: `records`); a copy prepared before in
TFRecord (tfds's default) is converted once by the same script, beside its files.

`sources.imagenet_source(builder)` is the `Source` the pipelines read (train / validation, JPEG images); what is
done to the images (the paper's augmentations, 10-crop test, resumable stream) lives in `photos`.
"""

from __future__ import annotations

import os
import shutil
import tarfile

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from alexnet_jax.data import records
from alexnet_jax.data.base import data_options
from alexnet_jax.errors import UserError

NAME = "imagenet2012"
MANUAL_FILES = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
DOWNLOAD_PAGE = "https://image-net.org/download-images"


def _data_dir(config_data_dir: str) -> str | None:
    return os.path.expanduser(config_data_dir) if config_data_dir else None


def open_builder(data_dir: str | None) -> tfds.core.DatasetBuilder:
    return tfds.builder(NAME, data_dir=data_dir)


def manual_dir_for(builder: tfds.core.DatasetBuilder, manual_dir: str) -> str:
    """The folder holding the archives: the given one, or tfds's own default `<data_dir>/downloads/manual`."""
    if manual_dir:
        return os.path.expanduser(manual_dir)
    return os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def prepare_command(data_dir: str | None, manual_dir: str) -> str:
    dd = f" --data_dir {data_dir}" if data_dir else ""
    return f"python scripts/prepare_imagenet.py{dd} --manual_dir {manual_dir}"


def _archive_message(manual: str, data_dir: str | None, missing: list[str]) -> str:
    return (f"{' and '.join(missing)} not found in {manual}: download ILSVRC2012_img_train.tar (138 GB) and "
            f"ILSVRC2012_img_val.tar (6.3 GB) from {DOWNLOAD_PAGE} (free registration), put both in that folder "
            f"(or pass --manual_dir), then run `{prepare_command(data_dir, manual)}` once.")


def missing_archives(manual: str) -> list[str]:
    return [f for f in MANUAL_FILES.values() if not os.path.isfile(os.path.join(manual, f))]


def find_undecodable(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
    """File names of the prepared images of `split` that do not decode as JPEG (all cores, one pass)."""
    features = builder.info.features
    recs = records.Records(builder, split)
    parsed = recs.in_order(0, len(recs)).map(
        lambda record: features.deserialize_example(record, decoders={"image": tfds.decode.SkipDecoding()}),
        num_parallel_calls=tf.data.AUTOTUNE).with_options(data_options())
    names = {n.decode() for n in parsed.map(lambda ex: ex["file_name"]).as_numpy_iterator()}
    decoded = parsed.map(
        lambda ex: (ex["file_name"], tf.shape(tf.io.decode_jpeg(ex["image"], channels=3))),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors()
    good = {n.decode() for n, _ in decoded.as_numpy_iterator()}
    return sorted(names - good)


def prepare(data_dir: str | None, manual_dir: str = "", verify: bool = True) -> tfds.core.DatasetBuilder:
    """Run tfds's imagenet2012 builder on the manual archives (a copy prepared before needs none: one in TFRecord
    is converted to array_record beside its files); then check every JPEG decodes."""
    builder = open_builder(data_dir)
    manual = manual_dir_for(builder, manual_dir)
    missing = missing_archives(manual)
    if missing and not builder.is_prepared():
        raise UserError(_archive_message(manual, data_dir, missing))
    if not builder.is_prepared():
        logging.info("preparing %s from %s into %s", NAME, manual, builder.data_dir)
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual),
                                         file_format=records.FORMAT)
        except (OSError, EOFError, KeyError, ValueError, tarfile.TarError) as e:
            raise UserError(f"tfds could not prepare {NAME} from {manual} ({type(e).__name__}: {e}): the archives "
                            f"are not the ILSVRC-2012 tars (see {DOWNLOAD_PAGE}); check their md5 and size, "
                            "re-download what differs and run the command again.") from None
    records.random_access(builder)  # (a copy prepared in TFRecord before: converted once)
    if verify:
        for split in MANUAL_FILES:
            bad = find_undecodable(builder, split)
            if bad:
                shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
                shutil.rmtree(builder.data_dir, ignore_errors=True)
                raise UserError(
                    f"{len(bad)} JPEG(s) in {os.path.join(manual, MANUAL_FILES[split])} do not decode: {shown}. "
                    "The archive is damaged (compare its md5 with image-net.org's) - replace it or those files "
                    f"and run `{prepare_command(data_dir, manual)}` again; the prepared copy was removed so no "
                    "corrupt image can reach training.")
    return builder


def open_prepared(config_data_dir: str, manual_dir: str = "") -> tfds.core.DatasetBuilder:
    """The prepared builder (in `--config.data_dir`, `~` allowed), or a UserError naming the exact files, where
    they go and the command to run."""
    data_dir = _data_dir(config_data_dir)
    builder = open_builder(data_dir)
    manual = manual_dir_for(builder, manual_dir)
    if not builder.is_prepared():
        missing = missing_archives(manual)
        if missing:
            raise UserError(f"{NAME} is not prepared in {builder.data_dir_root}, and "
                            + _archive_message(manual, data_dir, missing))
        raise UserError(f"{NAME} is not prepared in {builder.data_dir_root}; the archives are in {manual}: run "
                        f"`{prepare_command(data_dir, manual)}` once, then train.")
    absent = [s for s in MANUAL_FILES if s not in builder.info.splits]
    if absent:
        raise UserError(f"{NAME} in {builder.data_dir} was prepared without its {'/'.join(absent)} split "
                        f"({' and '.join(MANUAL_FILES[s] for s in absent)} was missing): put the file(s) in "
                        f"{manual}, delete {builder.data_dir} and run `{prepare_command(data_dir, manual)}`.")
    if not records.has_array_record(builder):
        raise UserError(f"{NAME} in {builder.data_dir} is stored as TFRecord only; records are read by index from "
                        f"array_record: run `{prepare_command(data_dir, manual)}` once, which writes its array_record "
                        "copy beside it (about as long as reading the dataset once), then train.")
    return records.random_access(builder)
