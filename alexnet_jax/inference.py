"""A trained model for inference: config, model, variables and metadata from a checkpoint, no optimizer.

`load(workdir)` is what `evaluate`, `predict` and `figures` start from: it reads the run's config and metadata
(input shape, class names, the normalisation record) from the checkpoint, builds the model for the requested
mesh (any device count, whatever mesh trained it) and restores only the parameters (and BatchNorm statistics)
onto it. The optimizer, the plateau state and the training set are never touched.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from alexnet_jax import checkpointing, sharding
from alexnet_jax.build import Built, build
from alexnet_jax.config import RESUMABLE_CHANGES, check_config, config_from_dict
from alexnet_jax.data import Normalisation
from alexnet_jax.errors import UserError
from alexnet_jax.model import AlexNet, ModelSpec


@dataclasses.dataclass
class Loaded:
    step: int
    config: ml_collections.ConfigDict  # the run's config with the overrides applied
    built: Built  # the model on its mesh (`alexnet_jax.build`), as training builds it
    variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...} placed on `mesh` (or their ShapeDtypeStructs)
    meta: dict[str, Any]
    checkpoint: str  # the step's directory

    @property
    def model(self) -> AlexNet:
        return self.built.model

    @property
    def mesh(self) -> Mesh:
        return self.built.mesh

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])

    @property
    def normalisation(self) -> Normalisation:
        return normalisation_of(self.meta, self.step)


def recorded_normalisation(meta: dict[str, Any]) -> Normalisation | None:
    """The normalisation the checkpoint's images had, from its record (`train.run_metadata`); checkpoints written
    before the record have `mean`/`std` (a 3-D mean is the paper's per-pixel mean image); None without either."""
    if meta.get("normalisation"):
        return Normalisation.from_json(meta["normalisation"])
    if meta.get("mean") is None or meta.get("std") is None:
        return None
    mean, std = np.asarray(meta["mean"], np.float32), np.asarray(meta["std"], np.float32)
    if mean.ndim == 3:
        return Normalisation("pixel", mean.mean((0, 1)), np.ones(3, np.float32), mean, mean.shape[0])
    return Normalisation("channel", mean, std)


def normalisation_of(meta: dict[str, Any], step: int) -> Normalisation:
    """`recorded_normalisation`, or a UserError for a checkpoint that recorded none."""
    norm = recorded_normalisation(meta)
    if norm is None:
        raise UserError(f"the checkpoint at step {step} does not record the normalisation its images had; "
                        "evaluate it with alexnet_jax.evaluate (which reads the training set) instead")
    return norm


def read_config(workdir: str, step: int | None = None, overrides: dict[str, Any] | None = None
                ) -> tuple[int, ml_collections.ConfigDict, dict[str, Any]]:
    """(step, config, meta) of `step` (default: the newest readable one). `overrides` may change only what
    does not change the model (checkpointing's RESUMABLE_CHANGES: where data lives, evaluation, the mesh)."""
    step, saved, meta = checkpointing.read_saved(workdir, step)
    config = config_from_dict(saved)
    for key, value in (overrides or {}).items():
        if key not in RESUMABLE_CHANGES:
            raise UserError(f"--config.{key} cannot be changed for a trained checkpoint (it changes the model or "
                            f"its training); these can: {', '.join(sorted(RESUMABLE_CHANGES))}")
        config[key] = tuple(value) if isinstance(config[key], tuple) else value
    check_config(config, jax.process_count())
    return step, config, meta


def load(workdir: str, step: int | None = None, mesh: Mesh | None = None,
         overrides: dict[str, Any] | None = None, inference: bool = False, restore: bool = True,
         saved: tuple[int, ml_collections.ConfigDict, dict[str, Any]] | None = None) -> Loaded:
    """The model of checkpoint `step` (default latest) of `workdir`, restored onto `mesh` (default: the
    config's `mesh_shape`; `mesh_of_one_device()` for a single image). `inference`: the model only runs forward
    passes (predict, features), so `kernels='auto'` becomes 'native' on every backend: the cpu_tuned
    formulations are there for the backward pass, and XLA's own convolutions run the forward faster on the CPU
    too (docs/notes/2026-12.md); the function is the same to float32 rounding. `restore=False`: the variables are
    left as `jax.ShapeDtypeStruct`s (shapes, dtypes, shardings), for which a program can be compiled while
    `restored` reads them. `saved`: what `read_config(workdir, step, overrides)` returned, if the caller has it
    (not read again; its config is not changed)."""
    if saved is None:
        step, config, meta = read_config(workdir, step, overrides)
    else:
        step, config, meta = saved[0], saved[1].copy_and_resolve_references(), saved[2]
    if inference and config.kernels == "auto":
        config.kernels = "native"
    if len(meta.get("image_shape") or ()) != 3:
        raise UserError(f"the checkpoint at step {step} does not record its input shape; retrain with this version")
    spec, how = ModelSpec.from_config(config), sharding.ShardingSpec.from_config(config)
    mesh = mesh if mesh is not None else how.make_mesh()
    sharding.check_mesh(mesh, how.strategy, groups=spec.conv_groups,
                        batch_sizes={"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size})
    built = build(spec, mesh, how.strategy, tuple(meta["image_shape"]))
    loaded = Loaded(step, config, built, built.abstract_variables(), meta,
                    os.path.join(checkpointing.checkpoint_dir(workdir), str(step)))
    return restored(loaded) if restore else loaded


def restored(loaded: Loaded) -> Loaded:
    """`loaded` (from `load(restore=False)`) with its variables read from the checkpoint onto their shardings."""
    workdir = os.path.dirname(os.path.dirname(loaded.checkpoint))
    variables = checkpointing.restore_arrays(workdir, loaded.step, dict(loaded.variables))
    return dataclasses.replace(loaded, variables=variables)


def mesh_of_one_device() -> Mesh:
    return sharding.make_mesh((1, 1), devices=jax.devices()[:1])
