"""`kernels`: the CPU-tuned LRN and pooling gradients and XLA's native ops compute the same function (values and
gradients); grouped convolution is XLA's grouped convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import default_config
from alexnet_jax.errors import UserError
from alexnet_jax.model import AlexNet, grouped_conv, ops, resolve_kernels
from alexnet_jax.specs import RunSpec


def _value_and_grads(f, *args, seed=3):
    y, pullback = jax.vjp(f, *args)
    g = jnp.asarray(np.random.default_rng(seed).normal(size=y.shape), y.dtype)
    return (y, *pullback(g))


@pytest.mark.parametrize("kernel,strides,padding,groups", [
    (3, 1, ((1, 1), (1, 1)), 2),  # conv4/conv5
    (5, 1, ((2, 2), (2, 2)), 2),  # conv2
    (11, 4, ((0, 3), (0, 3)), 1),  # conv1 at 224 px: cuda-convnet's edge padding
    (5, 1, ((1, 0), (2, 1)), 4),  # asymmetric padding, four groups
])
def test_grouped_conv_is_xlas_grouped_convolution(kernel, strides, padding, groups):
    rng = np.random.default_rng(1)
    cin = 32 if strides == 1 else 3
    x = jnp.asarray(rng.normal(size=(2, 27 if strides == 1 else 39, 27 if strides == 1 else 39, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, cin // groups, 8)), jnp.float32)
    ours = _value_and_grads(lambda x, k: grouped_conv(x, k, groups, strides, padding), x, k)
    # the reference: XLA's grouped convolution itself (grouped_conv does not call it: feature_group_count made the
    # SPMD partitioner gather the batch, docs/sharding.md)
    reference = _value_and_grads(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (strides, strides), list(padding), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups), x, k)
    for a, c in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * float(jnp.abs(c).max()))


@pytest.mark.parametrize("variant,size", [("paper", 67), ("owt", 63)])
def test_kernel_choices_give_the_same_logits_and_gradients(variant, size):
    """The whole net (LRN, grouped convs, pooling, conv1) with kernels='cpu_tuned' vs 'native'."""
    x = jnp.asarray(np.random.default_rng(2).normal(0, 50, (2, size, size, 3)), jnp.float32)
    nets = {k: AlexNet(num_classes=10, variant=variant, widths=(32, 48, 32, 32, 32), fc_width=32, kernels=k)
            for k in ("cpu_tuned", "native")}
    params = jax.jit(nets["native"].init)(jax.random.PRNGKey(0), x)["params"]
    results = {}
    for name, net in nets.items():
        def loss(p, net=net):
            logits = net.apply({"params": p}, x)
            return jnp.sum(logits * jnp.arange(10.0)), logits

        results[name] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (_, logits_t), grads_t = results["cpu_tuned"]
    (_, logits_n), grads_n = results["native"]
    assert float(jnp.abs(logits_n).max()) > 0
    np.testing.assert_allclose(logits_t, logits_n, rtol=1e-5, atol=1e-5 * float(jnp.abs(logits_n).max()))
    flat_t = jax.tree_util.tree_leaves_with_path(grads_t)
    flat_n = dict(jax.tree_util.tree_leaves_with_path(grads_n))
    assert len(flat_t) == len(flat_n) == 16  # 8 layers x (kernel, bias): every parameter compared
    for path, a in flat_t:
        b = flat_n[path]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_auto_is_cpu_tuned_on_cpu_and_native_elsewhere(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert resolve_kernels("auto") == "cpu_tuned"
    assert resolve_kernels("native") == "native"
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    assert resolve_kernels("auto") == "native"
    assert resolve_kernels("cpu_tuned") == "cpu_tuned"
    with pytest.raises(ValueError, match="unknown kernels"):
        resolve_kernels("fast")


def test_bad_kernels_value_is_refused_with_the_choices():
    config = default_config.get_config()
    config.kernels = "fastest"
    with pytest.raises(UserError, match=r"--config.kernels='fastest': choose one of \('auto', 'native', 'cpu_tuned'\)"):
        RunSpec.from_config(config)  # every key checked where the config is read
