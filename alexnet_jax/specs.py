"""The config read once, at the door of a run, into one small frozen spec per concern.

`RunSpec.from_config(config)` is the only place a training run reads its `ml_collections.ConfigDict`: each owner
reads and checks its own keys (`ModelSpec.from_config` in the model, `OptimizerSpec` in optim, `ShardingSpec`
in sharding, `DataSpec` in data, `CheckpointSpec` in checkpointing, `TransferSpec` in pretrained) and the loop's
are read here (`LoopSpec`). Everything below takes these specs and plain arguments, never the config: a reader
sees at a function's signature what it depends on. The flat `--config.key` flags and the config files stay as
they are.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from jax.sharding import Mesh

from alexnet_jax import checkpointing, optim, pretrained, sharding
from alexnet_jax import data as datalib
from alexnet_jax.config import check_config
from alexnet_jax.model import ModelSpec


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """The training loop's keys: how long, how often it logs and evaluates, and what its summary names."""

    batch_size: int = 128
    eval_batch_size: int = 256
    num_train_steps: int = -1  # -1: from num_epochs
    num_epochs: float = 90.0
    eval_every_steps: int = -1  # -1: once per epoch
    log_every_steps: int = 100
    seed: int = 0
    dataset: str = ""

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LoopSpec:
        keys = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: config.get(k, getattr(cls, k)) for k in keys})

    def total_steps(self, steps_per_epoch: int) -> int:
        """`num_train_steps`, or `num_epochs` of `steps_per_epoch` steps."""
        if self.num_train_steps > 0:
            return self.num_train_steps
        return int(round(self.num_epochs * steps_per_epoch))

    def eval_every(self, steps_per_epoch: int) -> int:
        return self.eval_every_steps if self.eval_every_steps > 0 else steps_per_epoch


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a training run reads from its config, one spec per concern."""

    model: ModelSpec
    optimizer: optim.OptimizerSpec
    sharding: sharding.ShardingSpec
    data: datalib.DataSpec
    checkpoint: checkpointing.CheckpointSpec
    transfer: pretrained.TransferSpec
    loop: LoopSpec

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, process_count: int = 1) -> RunSpec:
        """Read and check every key before data or devices are touched; a bad value is one line naming its flag."""
        check_config(config, process_count)
        return cls(model=ModelSpec.from_config(config), optimizer=optim.OptimizerSpec.from_config(config),
                   sharding=sharding.ShardingSpec.from_config(config), data=datalib.DataSpec.from_config(config),
                   checkpoint=checkpointing.CheckpointSpec.from_config(config),
                   transfer=pretrained.TransferSpec.from_config(config), loop=LoopSpec.from_config(config))

    @property
    def batch_sizes(self) -> dict[str, int]:
        """The global batches the mesh must split, by config key (`sharding.check_mesh`)."""
        return {"batch_size": self.loop.batch_size, "eval_batch_size": self.loop.eval_batch_size}

    def check_mesh(self, mesh: Mesh) -> None:
        """Refuse (one line naming the flag) a mesh that cannot split the global batches or the conv groups."""
        sharding.check_mesh(mesh, self.sharding.strategy, groups=self.model.conv_groups,
                            batch_sizes=self.batch_sizes)

    def with_classes(self, count: int) -> RunSpec:
        """fc8 sized for the dataset's `count` classes where the config said 0. Nothing is written back into the
        config; the checkpoint records the count the model was built with (inference rebuilds it from there)."""
        model = self.model.with_classes(count)
        checkpoint = self.checkpoint.with_run_value("num_classes", model.num_classes)
        return dataclasses.replace(self, model=model, checkpoint=checkpoint)
