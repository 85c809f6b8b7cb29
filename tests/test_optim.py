"""The optimiser is the paper's rule exactly, and the schedules do what they say."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alexnet_jax import default_config, optim


def config(**kw) -> ml_collections.ConfigDict:
    c = default_config.get_config()
    c.update(kw)
    return c


def test_paper_update_rule_against_numpy_with_changing_lr():
    """v <- 0.9 v - wd*eps*w - eps*g; w <- w + v, with eps changing mid-run (step schedule)."""
    c = config(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, lr_schedule="step", lr_step_epochs=(2.0,),
               lr_decay_factor=0.1)
    tx = optim.create_optimizer(optim.OptimizerSpec.from_config(c), steps_per_epoch=1, total_steps=6)
    rng = np.random.default_rng(0)
    params = {"fc": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}
    state = tx.init(params)
    w = {k: np.asarray(v, np.float64) for k, v in params["fc"].items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for step in range(5):
        grads = {"fc": {k: jnp.asarray(rng.normal(size=x.shape), jnp.float32) for k, x in w.items()}}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        eps = 0.1 if step < 2 else 0.01
        for k in w:
            wd = 5e-4 if k == "kernel" else 0.0  # decay on weights, not biases
            v[k] = 0.9 * v[k] - wd * eps * w[k] - eps * np.asarray(grads["fc"][k], np.float64)
            w[k] = w[k] + v[k]
        for k in w:
            np.testing.assert_allclose(params["fc"][k], w[k], rtol=1e-5, atol=1e-6)
    assert np.isclose(float(optim.current_lr(state)), 0.01)


def test_velocity_carries_the_learning_rate():
    """After a drop, the old velocity keeps its size: unlike sgd(lr, momentum), which rescales it."""
    c = config(learning_rate=1.0, momentum=0.9, weight_decay=0.0, lr_schedule="step", lr_step_epochs=(1.0,),
               lr_decay_factor=0.1)
    tx = optim.create_optimizer(optim.OptimizerSpec.from_config(c), steps_per_epoch=1, total_steps=3)
    p = {"w": {"kernel": jnp.zeros(())}}
    s = tx.init(p)
    g = {"w": {"kernel": jnp.ones(())}}
    u1, s = tx.update(g, s, p)
    u2, s = tx.update({"w": {"kernel": jnp.zeros(())}}, s, p)
    assert float(u1["w"]["kernel"]) == -1.0
    np.testing.assert_allclose(float(u2["w"]["kernel"]), -0.9)  # 0.9 * v, not 0.9 * v * 0.1


def test_plateau_divides_by_ten_after_patience_and_stops_after_three():
    c = config(learning_rate=0.01, lr_schedule="plateau", plateau_patience=2, plateau_cooldown=0)
    tx = optim.create_optimizer(optim.OptimizerSpec.from_config(c), 10, 100)
    plateau = optim.create_plateau(optim.OptimizerSpec.from_config(c))
    params = {"w": {"kernel": jnp.zeros((2,))}}
    opt_state, pstate = tx.init(params), plateau.init(params)
    lrs = []
    for err in [0.5, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]:
        pstate, opt_state = optim.plateau_step(plateau, pstate, opt_state, err)
        lrs.append(round(float(optim.current_lr(opt_state)), 8))
    assert lrs[:3] == [0.01, 0.01, 0.01]
    assert lrs[3] == 0.001  # two evaluations without improvement after 0.4
    assert lrs[4] == 0.001  # 0.3 improves
    assert min(lrs) == 1e-5  # 3 reductions, no more
    # the update uses the reduced rate
    updates, _ = tx.update({"w": {"kernel": jnp.ones((2,))}}, opt_state, params)
    np.testing.assert_allclose(updates["w"]["kernel"], -1e-5 * np.ones(2), rtol=1e-5)


def test_cosine_warmup_and_constant_schedules():
    cos = optim.create_schedule(
        optim.OptimizerSpec.from_config(config(learning_rate=0.1, lr_schedule="cosine", warmup_epochs=1.0)), 10, 100)
    assert float(cos(0)) == 0.0
    np.testing.assert_allclose(float(cos(10)), 0.1, rtol=1e-6)
    assert float(cos(100)) < 1e-6
    const = optim.create_schedule(optim.OptimizerSpec.from_config(config(learning_rate=0.1, lr_schedule="constant")),
                                  10, 100)
    assert float(const(0)) == float(const(99)) == np.float32(0.1)


def test_decay_mask_selects_kernels():
    mask = optim.decay_mask({"conv1": {"kernel": 1, "bias": 2}, "bn1": {"scale": 3}})
    assert mask == {"conv1": {"kernel": True, "bias": False}, "bn1": {"scale": False}}
    assert jax.tree.leaves(mask).count(True) == 1
