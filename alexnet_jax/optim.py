"""The paper's optimiser (section 5) and learning-rate schedules, built from optax pieces.

The paper's rule is `v <- m*v - wd*eps*w - eps*g; w <- w + v`: the velocity carries the learning rate,
so a learning-rate drop only affects new updates. In optax that is add_decayed_weights -> scale(-eps) ->
trace(m). (`add_decayed_weights + sgd(eps, m)` equals it only while eps is constant.)

Every hyperparameter is injected (`optax.inject_hyperparams`) so it is visible in the optimiser state
for logging and checkpointing. The paper's divide-by-10-on-plateau schedule uses
`optax.contrib.reduce_on_plateau`'s logic, fed the validation error once per evaluation (not the
training loss every step); its scale is written into the injected `lr_scale`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from alexnet_jax.errors import UserError

SCHEDULES = ("plateau", "step", "cosine", "constant")


def decay_mask(params: Any) -> Any:
    """Weight decay on kernels only: the paper's `w`; cuda-convnet and Caffe set no decay on biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def paper_sgd(
    learning_rate: float,
    momentum: float,
    weight_decay: float,
    lr_scale: float = 1.0,
    nesterov: bool = False,
    mask: Callable[[Any], Any] | None = decay_mask,
) -> optax.GradientTransformation:
    """`v <- momentum*v - weight_decay*eps*w - eps*grad; w <- w + v` with eps = learning_rate*lr_scale."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.scale(-learning_rate * lr_scale),
        optax.trace(decay=momentum, nesterov=nesterov),
    )


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The optimiser's part of the config, read once (`from_config`): the paper's section 5 by default."""

    learning_rate: float = 0.01
    batch_size: int = 128
    lr_reference_batch: int = 0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "plateau"
    lr_decay_factor: float = 0.1
    lr_step_epochs: tuple[float, ...] = (30.0, 60.0, 80.0)
    warmup_epochs: float = 0.0
    plateau_patience: int = 2
    plateau_rtol: float = 1e-3
    plateau_cooldown: int = 0
    plateau_max_reductions: int = 3
    frozen: str = ""
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> OptimizerSpec:
        """The optimiser keys of a config, each refused in one line naming the flag when it cannot be used."""
        def fail(key: str, msg: str) -> None:
            raise UserError(f"--config.{key}={config.get(key)!r}: {msg}")

        if config.learning_rate <= 0:
            fail("learning_rate", "must be positive")
        if config.get("lr_reference_batch", 0) < 0:
            fail("lr_reference_batch", "must be >= 0 (0: use learning_rate as given at any batch size)")
        if not 0 <= config.momentum < 1:
            fail("momentum", "must be in [0, 1)")
        if config.weight_decay < 0:
            fail("weight_decay", "must be >= 0")
        if not 0 <= config.get("label_smoothing", 0.0) < 1:
            fail("label_smoothing", "must be in [0, 1) (0: the paper's one-hot targets)")
        if config.lr_schedule not in SCHEDULES:
            fail("lr_schedule", f"choose one of {SCHEDULES}")
        if config.get("frozen", ""):
            try:
                re.compile(config.frozen)
            except re.error as e:
                fail("frozen", f"is not a regular expression ({e}); e.g. 'conv.*' or 'conv.*|fc6'")
        keys = [f.name for f in dataclasses.fields(cls)]
        values = {k: config.get(k, getattr(cls, k)) for k in keys}
        return cls(**{**values, "lr_step_epochs": tuple(values["lr_step_epochs"])})

    @property
    def base_learning_rate(self) -> float:
        """`learning_rate`, scaled by batch_size / lr_reference_batch when a reference batch is set.

        Why: the paper's 0.01 belongs to its batch of 128. At batch 16 it diverges on a few-class set, in PyTorch
        as in JAX (docs/paper.md); the linear rule keeps the paper's rate at 128 and the step's noise in check
        elsewhere.
        """
        ref = self.lr_reference_batch
        return self.learning_rate * (self.batch_size / ref if ref > 0 else 1.0)


def create_schedule(spec: OptimizerSpec, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The base learning rate as a function of the step (the plateau factor is applied on top)."""
    lr = spec.base_learning_rate
    name = spec.lr_schedule
    if name in ("plateau", "constant"):
        return optax.constant_schedule(lr)
    if name == "step":
        boundaries = {int(e * steps_per_epoch): spec.lr_decay_factor for e in spec.lr_step_epochs}
        return optax.piecewise_constant_schedule(lr, boundaries)
    if name == "cosine":
        warmup = int(spec.warmup_epochs * steps_per_epoch)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=0.0,
        )
    raise ValueError(f"unknown lr_schedule {name!r}; choose one of {SCHEDULES}")


def frozen_labels(pattern: str) -> Callable[[Any], Any]:
    """params -> 'frozen' / 'trained' per leaf: frozen where `pattern` fully matches the layer name ('conv1') or
    the leaf's path ('conv1/kernel'), e.g. 'conv.*' or 'conv.*|fc6'."""
    regex = re.compile(pattern)

    def label(path: Any, _: Any) -> str:
        names = [str(getattr(p, "key", p)) for p in path]
        hit = regex.fullmatch(names[0]) or regex.fullmatch("/".join(names))
        return "frozen" if hit else "trained"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def frozen_paths(pattern: str, params: Any) -> list[str]:
    """'layer/param' of every parameter `pattern` freezes; a UserError if it freezes none (a typo)."""
    labels = jax.tree_util.tree_leaves_with_path(frozen_labels(pattern)(params))
    frozen = sorted({"/".join(str(getattr(k, "key", k)) for k in path) for path, label in labels if label == "frozen"})
    if not frozen:
        raise UserError(f"--config.frozen={pattern!r} matches no parameter: the layers are {sorted(params)} "
                        "(e.g. 'conv.*' freezes conv1-conv5)")
    return frozen


def create_optimizer(spec: OptimizerSpec, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
    """The paper's momentum SGD with the specified schedule, all hyperparameters injected. With
    `spec.frozen`, the matching parameters go through `optax.set_to_zero` instead (optax.multi_transform):
    no update, no weight decay, and no momentum buffer for them in the optimizer state."""
    tx = optax.inject_hyperparams(paper_sgd, static_args=("nesterov", "mask"))(
        learning_rate=create_schedule(spec, steps_per_epoch, total_steps),
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        lr_scale=1.0,
        nesterov=bool(spec.nesterov),
    )
    if not spec.frozen:
        return tx
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, frozen_labels(spec.frozen))


def hyperparams_state(opt_state: Any) -> Any:
    """The injected-hyperparameters state inside `opt_state` (nested under multi_transform when layers are
    frozen)."""
    if hasattr(opt_state, "hyperparams"):
        return opt_state
    return opt_state.inner_states["trained"].inner_state


def _with_hyperparams(opt_state: Any, hyper: dict[str, Any]) -> Any:
    if hasattr(opt_state, "hyperparams"):
        return opt_state._replace(hyperparams=hyper)
    trained = opt_state.inner_states["trained"]
    inner = trained._replace(inner_state=trained.inner_state._replace(hyperparams=hyper))
    return opt_state._replace(inner_states={**opt_state.inner_states, "trained": inner})


def create_plateau(spec: OptimizerSpec) -> optax.GradientTransformationExtraArgs:
    """Divide the learning rate by `1/lr_decay_factor` when validation error stops improving."""
    return optax.contrib.reduce_on_plateau(
        factor=spec.lr_decay_factor,
        patience=spec.plateau_patience,
        rtol=spec.plateau_rtol,
        atol=0.0,
        cooldown=spec.plateau_cooldown,
        accumulation_size=1,
        min_scale=spec.lr_decay_factor ** spec.plateau_max_reductions,
    )


def plateau_step(
    plateau: optax.GradientTransformationExtraArgs, plateau_state: Any, opt_state: Any, val_error: float
) -> tuple[Any, Any]:
    """Feed one validation error to the plateau logic and write its scale into the optimiser."""
    _, plateau_state = plateau.update({}, plateau_state, value=jnp.asarray(val_error, jnp.float32))
    hyper = dict(hyperparams_state(opt_state).hyperparams)
    # A copy: sharing one buffer between `plateau.scale` and `lr_scale` makes the donating train step fail
    # ("donate the same buffer twice") on the first step after an evaluation.
    hyper["lr_scale"] = jnp.array(plateau_state.scale, hyper["lr_scale"].dtype, copy=True)
    return plateau_state, _with_hyperparams(opt_state, hyper)


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate the last update used (base schedule value times the plateau factor)."""
    hyper = hyperparams_state(opt_state).hyperparams
    return hyper["learning_rate"] * hyper["lr_scale"]
