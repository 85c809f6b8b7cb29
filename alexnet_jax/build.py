"""One model on one mesh, built the same way for training, evaluation and inference: `build(spec, mesh, ...)`.

It builds the model with its layers placed (`sharding.placement`) and knows the batch's sharding: how a
process's rows become the global batch (`global_batch`) and what multiple of rows an evaluation batch must have
(`row_multiple`). The trainer adds the optimizer to it; `inference.load` adds restored parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from alexnet_jax import sharding
from alexnet_jax.model import AlexNet, ModelSpec, create_model


@dataclasses.dataclass(frozen=True)
class Built:
    model: AlexNet
    mesh: Mesh
    strategy: str
    image_shape: tuple[int, int, int]
    batch_sharding: NamedSharding

    @property
    def row_multiple(self) -> int:
        """A process's evaluation batch need only be a multiple of its share of the batch shards."""
        shards = math.prod(self.mesh.shape[a] for a in sharding.batch_axes(self.strategy))
        return max(1, shards // jax.process_count())

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The global batch from this process's rows."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def shardings(self, tree: Any) -> Any:
        """Where each leaf of `tree` (variables or a whole train state) lives: sharding.py's table."""
        return sharding.tree_shardings(self.mesh, tree, self.strategy)

    def abstract_variables(self) -> dict[str, Any]:
        """The model's variables as `jax.ShapeDtypeStruct`s placed on the mesh (nothing computed)."""
        shape = (1, *self.image_shape)
        abstract = jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))
        return dict(jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract, self.shardings(abstract)))


def build(spec: ModelSpec, mesh: Mesh, strategy: str, image_shape: Sequence[int]) -> Built:
    """`spec`'s model on `mesh` under `strategy` for `image_shape` inputs. Whether the mesh can split the batches
    and the conv groups is checked once, at the door, before any data is read (`RunSpec.check_mesh`,
    `inference.load`)."""
    return Built(create_model(spec, mesh, strategy), mesh, strategy, tuple(image_shape),
                 sharding.batch_sharding(mesh, strategy))
