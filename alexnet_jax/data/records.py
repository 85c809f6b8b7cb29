"""Records read by index: one split of a prepared tfds dataset as a sequence, and the index streams over it.

Every prepared photo dataset (ImageNet, a tfds dataset by name, a folder, the squares of each) is stored in tfds's
`array_record` format, which reads record i of a split directly (`Records`, over array_record's own reader). So
the training stream is defined on indices, the rule the in-memory datasets already follow:

- global batch s of epoch e = s // steps_per_epoch takes rows [sB, (s+1)B) of a permutation of the split's n records
  seeded by (seed, e) (`tf.random.experimental.stateless_shuffle`: the same op, the same seed as `small.py`);
- a process reads only its rows of each global batch, so which records make up batch s does not depend on the
  number of processes, and each row is augmented from the key (seed, s, global row);
- a run resumed at step N computes the permutation of N's epoch and reads step N's records first: nothing before
  it is read, and it may resume on another number of processes or devices and continue the same stream.

Evaluation reads each process's even slice of the evaluation split in order (`base.eval_slice`), padded.

A dataset someone prepared before in TFRecord (tfds's default) is converted once, shard by shard, beside its
TFRecord files (`to_array_record`): each shard is written under a temporary name, then renamed, so an interrupted
conversion resumes at the shard it stopped in.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module
from tqdm import tqdm

from alexnet_jax.data.base import data_options
from alexnet_jax.errors import UserError

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD
FORMAT = ARRAY_RECORD.value  # what `download_and_prepare(file_format=...)` is given
# One record per chunk (random access), not compressed: tfds's writer compresses with zstd, which JPEG bytes do not
# shrink under and which cost raw squares 1.1 ms of CPU per batch of 32 to undo (docs/notes/2026-12.md).
WRITER_OPTIONS = "group_size:1,uncompressed"


class Writer(tfds.core.ExampleWriter):
    """The example writer of the builders defined here: `WRITER_OPTIONS`. tfds has no public way to choose how
    array_record is written: builders return their writer from `DatasetBuilder._example_writer`, a hook its own
    docstring invites overriding ("implement a custom ExampleWriter and inject it here") but private by name.
    `tests/test_library_apis.py::test_prepared_records_are_written_by_our_writer` fails loudly if that hook changes."""

    def __init__(self):
        super().__init__(file_format=ARRAY_RECORD)

    def write(self, path, examples) -> None:
        """`examples`: (key, serialized example) pairs, as tfds hands them; written in that order."""
        writer = array_record_module.ArrayRecordWriter(os.fspath(path), WRITER_OPTIONS)
        for _, serialized in examples:
            writer.write(serialized)
        writer.close()


class Records:
    """One split of a prepared builder, read record by record (serialized tfds examples). `reads` counts the
    records read so far, so a test can check that a resumed stream reads nothing before its first step.

    One array_record reader per shard, opened on first use and shared by the pipeline's threads (the reader is
    thread-safe); a batch of indices is one `read` per shard it touches, in the calling thread (tfds's
    `ArrayRecordDataSource` starts a thread pool for every batch: 40% more CPU per batch of raw squares here)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        self.name, self.split = f"{builder.name}'s {split} split", split
        shards = [(fi.filename, fi.skip, fi.take) for fi in builder.info.splits[split].file_instructions]
        self._files = [f for f, _, _ in shards]
        self._ends = np.cumsum([take for _, _, take in shards], dtype=np.int64)  # records up to each shard's end
        # index i of shard k is record i - offset[k] of its file (the split may start inside the shard: `skip`)
        self._offsets = (self._ends - [take for _, _, take in shards]) - [skip for _, skip, _ in shards]
        self._readers: list = [None] * len(shards)
        self.reads = 0
        self._lock = threading.Lock()
        if shards:  # a path that cannot be opened stops here, in one line, not inside the pipeline
            self._reader(0)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _reader(self, shard: int):
        if self._readers[shard] is None:
            with self._lock:
                if self._readers[shard] is None:
                    self._readers[shard] = open_reader(self._files[shard])
        return self._readers[shard]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The records at `indices` (any order, repeats allowed), as a 1-d array of bytes."""
        keys = np.asarray(indices, np.int64).reshape(-1)
        if keys.size and (keys.min() < 0 or keys.max() >= len(self)):
            raise IndexError(f"record index out of range for {self.name} ({len(self)} records)")
        with self._lock:
            self.reads += int(keys.size)
        shards = np.searchsorted(self._ends, keys, side="right")
        positions = keys - self._offsets[shards]
        out = np.empty(keys.size, object)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            out[where] = self._reader(int(shard)).read(positions[where].tolist())
        return out

    def read_tf(self, indices: tf.Tensor) -> tf.Tensor:
        """`read` inside a tf.data pipeline: a string tensor of the indices' shape."""
        out = tf.numpy_function(self.read, [indices], tf.string, stateful=False)
        return tf.reshape(out, tf.shape(indices))

    def in_order(self, lo: int, hi: int, chunk: int = 64) -> tf.data.Dataset:
        """Records lo .. hi-1, in order, read `chunk` at a time (evaluation, statistics, preparation)."""
        read = tf.autograph.experimental.do_not_convert(self.read_tf)  # (AutoGraph's conversion costs start-up)
        return tf.data.Dataset.range(lo, hi).batch(chunk).map(read).unbatch()


def open_reader(path: str):
    try:
        return array_record_module.ArrayRecordReader(path, options="readahead_buffer_size:0",
                                                     file_reader_buffer_size=32768)
    except (RuntimeError, ValueError) as e:
        where = os.fspath(path)
        hint = (" An array_record older than 0.8.6 reads only local files: upgrade it (pip install -U "
                "array-record), or mount the bucket with Cloud Storage FUSE (`gcsfuse --implicit-dirs BUCKET "
                "/gcs`) and give --config.data_dir=/gcs/...; " if where.startswith("gs://") else " ")
        raise UserError(f"cannot open {where} ({str(e).splitlines()[0][:160]}).{hint}or prepare the dataset again "
                        "(delete its folder).") from None


def train_steps(n: int, batch_size: int, seed: int, start_step: int, num_steps: int, process_index: int = 0,
                process_count: int = 1) -> tf.data.Dataset:
    """(step, rows, positions) for steps `start_step .. num_steps-1`: `rows` (local,) are this process's record
    indices in global batch `step` (rows [sB, (s+1)B) of epoch e's permutation of `n`, seeded by (seed, e)),
    `positions` (local,) their rows in the global batch. One permutation per epoch, computed when its first step
    is reached; nothing before `start_step` is computed beyond it."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise UserError(f"--config.batch_size={batch_size} is larger than the {n} training images")
    local = batch_size // process_count
    first, last = start_step // per_epoch, -(-num_steps // per_epoch)
    positions = tf.range(process_index * local, (process_index + 1) * local, dtype=tf.int64)

    @tf.autograph.experimental.do_not_convert
    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                        seed=tf.stack([tf.constant(seed, tf.int64), e]))
        steps = tf.data.Dataset.range(tf.maximum(tf.constant(start_step, tf.int64), e * per_epoch),
                                      tf.minimum(tf.constant(num_steps, tf.int64), (e + 1) * per_epoch))

        @tf.autograph.experimental.do_not_convert
        def rows(step: tf.Tensor):
            begin = (step % per_epoch) * batch_size + process_index * local
            return step, perm[begin : begin + local], positions

        return steps.map(rows)

    return tf.data.Dataset.range(first, max(first, last)).flat_map(epoch)


def shard_paths(builder: tfds.core.DatasetBuilder, fmt: tfds.core.FileFormat) -> dict[str, list[str]]:
    """Each split's shard files in `fmt`, as tfds names them."""
    out = {}
    for name, info in builder.info.splits.items():
        template = info.filename_template.replace(filetype_suffix=fmt.file_suffix)
        out[name] = [os.fspath(p) for p in template.sharded_filepaths(info.num_shards)]
    return out


def has_array_record(builder: tfds.core.DatasetBuilder) -> bool:
    return (builder.info.file_format == ARRAY_RECORD
            or all(os.path.exists(p) for paths in shard_paths(builder, ARRAY_RECORD).values() for p in paths))


def is_readable(builder: tfds.core.DatasetBuilder) -> bool:
    """Prepared, and in array_record (prepared so, or converted: `to_array_record`)."""
    return builder.is_prepared() and has_array_record(builder)


def to_array_record(builder: tfds.core.DatasetBuilder) -> None:
    """Write each TFRecord shard of a prepared builder again as array_record beside it (resumable by shard)."""
    source = shard_paths(builder, tfds.core.FileFormat.TFRECORD)
    target = shard_paths(builder, ARRAY_RECORD)
    todo = [(s, t) for split in source for s, t in zip(source[split], target[split], strict=True)
            if not os.path.exists(t)]
    missing = [s for s, _ in todo if not os.path.exists(s)]
    if missing:
        raise UserError(f"{builder.name} in {builder.data_dir} is neither in array_record nor complete in TFRecord "
                        f"({len(missing)} shard(s) missing, e.g. {missing[0]}): delete that folder and prepare it "
                        "again")
    logging.info("%s in %s is stored as TFRecord: writing it once more as array_record (read by index) beside it",
                 builder.name, builder.data_dir)
    with tqdm(total=len(todo), unit=" shards", desc=f"{builder.name}: TFRecord -> array_record",
              mininterval=2.0) as bar:
        for src, dst in todo:
            records = tf.data.TFRecordDataset(src, buffer_size=8 << 20).with_options(data_options()).as_numpy_iterator()
            Writer().write(dst + ".tmp", ((None, r) for r in records))
            os.replace(dst + ".tmp", dst)
            bar.update(1)


def random_access(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """The builder reading its array_record files (converted from TFRecord first when it has none)."""
    if not has_array_record(builder):
        to_array_record(builder)
    if builder.info.file_format != ARRAY_RECORD:
        builder.info.set_file_format(ARRAY_RECORD, override=True, override_if_initialized=True)
    return builder
