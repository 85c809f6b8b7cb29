"""The model: the paper's parameter count and feature sizes, LRN against references, groups, init, variants."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax.flops import count_params, feature_shapes
from alexnet_jax.model import AlexNet, Conv, ModelSpec, conv1_edge_padding, create_model, local_response_norm, max_pool

PAPER_LAYER_PARAMS = {  # REFERENCE.md section 1
    "conv1": 34_944, "conv2": 307_456, "conv3": 885_120, "conv4": 663_936, "conv5": 442_624,
    "fc6": 37_752_832, "fc7": 16_781_312, "fc8": 4_097_000,
}


def init(model, rng, x):
    """`model.init` compiled as one program: run eagerly, every initialiser and op compiles on its own (~800 tiny
    XLA programs for these tests, 72 ms each on 2 cores: 58 of their 81 s)."""
    return jax.jit(model.init)(rng, x)


@functools.cache
def _compiled_apply(model, train, mutable):
    kwargs = {"train": True} if train else {}  # plain layers (nn.Conv) take no `train`
    return jax.jit(lambda v, x, rngs: model.apply(v, x, rngs=rngs, mutable=mutable, **kwargs))


def apply(model, variables, x, train=False, rngs=None, mutable=False):
    """`model.apply` compiled as one program (see `init`), once per model and mode (the rngs are an argument)."""
    return _compiled_apply(model, train, tuple(mutable) if mutable else False)(variables, x, rngs)


def abstract_params(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))["params"]


def test_paper_parameter_count_per_layer():
    params = abstract_params(AlexNet(num_classes=1000), (224, 224, 3))
    assert count_params(params) == 60_965_224
    assert {k: count_params(v) for k, v in params.items()} == PAPER_LAYER_PARAMS
    assert params["conv2"]["kernel"].shape == (5, 5, 48, 256)  # 256 x 5x5x48: two groups
    assert params["conv3"]["kernel"].shape == (3, 3, 256, 384)  # across groups
    assert params["conv4"]["kernel"].shape == (3, 3, 192, 384)


@pytest.mark.parametrize("size", [224, 227])
def test_paper_feature_sizes(size):
    shapes = feature_shapes(AlexNet(), (size, size, 3))
    assert shapes["conv1"] == (55, 55, 96)
    assert shapes["pool1"] == (27, 27, 96)
    assert shapes["conv2"] == (27, 27, 256)
    assert shapes["pool2"] == (13, 13, 256)
    assert shapes["conv3"] == (13, 13, 384) and shapes["conv5"] == (13, 13, 256)
    assert shapes["pool5"] == (6, 6, 256)  # 9216 inputs to fc6


def test_conv1_edge_padding_is_cuda_convnets():
    assert conv1_edge_padding(224, 11, 4) == 3
    assert conv1_edge_padding(227, 11, 4) == 0


def test_owt_variant_is_torchvisions_alexnet():
    params = abstract_params(AlexNet(variant="owt"), (224, 224, 3))
    assert count_params(params) == 61_100_840
    assert params["conv2"]["kernel"].shape == (5, 5, 64, 192)
    shapes = feature_shapes(AlexNet(variant="owt"), (224, 224, 3))
    assert shapes["conv1"] == (55, 55, 64) and shapes["pool5"] == (6, 6, 256)


@pytest.mark.parametrize("size,pooled", [(28, 2), (32, 3)])
def test_small_variant_keeps_topology(size, pooled):
    model = AlexNet(num_classes=10, variant="small")
    shapes = feature_shapes(model, (size, size, 1))
    assert [k for k in shapes if k.startswith("conv")] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert shapes["pool5"][:2] == (pooled, pooled)
    params = abstract_params(model, (size, size, 1))
    assert params["conv2"]["kernel"].shape[2] == 64 // 2  # grouped
    assert params["fc8"]["kernel"].shape[-1] == 10


def lrn_numpy64(x, r=2, k=2.0, alpha=1e-4, beta=0.75, groups=1):
    """The paper's formula, written out in float64."""
    x = np.asarray(x, np.float64)
    c = x.shape[-1]
    g = c // groups
    out = np.empty_like(x)
    for ch in range(c):
        lo, hi = max(ch - r, ch // g * g), min(ch + r, ch // g * g + g - 1)
        s = np.sum(x[..., lo : hi + 1] ** 2, axis=-1)
        out[..., ch] = x[..., ch] / (k + alpha * s) ** beta
    return out


def test_lrn_matches_tensorflow_and_float64_formula():
    x = np.random.default_rng(0).normal(0, 40, (2, 5, 5, 16)).astype(np.float32)  # large: LRN matters
    ours = np.asarray(local_response_norm(jnp.asarray(x)))
    ref_tf = tf.nn.local_response_normalization(x, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75).numpy()
    np.testing.assert_allclose(ours, ref_tf, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, lrn_numpy64(x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours, x / 2.0**0.75, rtol=1e-3)  # the sum term is really there


def test_lrn_groups_do_not_cross_the_split():
    x = np.random.default_rng(1).normal(0, 40, (1, 3, 3, 8)).astype(np.float32)
    ours = np.asarray(local_response_norm(jnp.asarray(x), groups=2))
    np.testing.assert_allclose(ours, lrn_numpy64(x, groups=2), rtol=1e-5, atol=1e-5)
    halves = [tf.nn.local_response_normalization(h, 2, 2.0, 1e-4, 0.75).numpy() for h in np.split(x, 2, -1)]
    np.testing.assert_allclose(ours, np.concatenate(halves, -1), rtol=1e-5, atol=1e-5)


def test_grouped_conv_equals_feature_group_count():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 6))
    ours = Conv(8, 3, 1, ((1, 1), (1, 1)), groups=2)
    ref = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2)
    variables = init(ours, jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, init(ref, jax.random.PRNGKey(1), x))
    np.testing.assert_allclose(apply(ours, variables, x), apply(ref, variables, x), rtol=1e-5, atol=1e-5)


def test_paper_init():
    model = AlexNet(num_classes=10, variant="small")
    params = init(model, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert np.all(params[name]["bias"] == 1.0), name
    for name in ("conv1", "conv3", "fc8"):
        assert np.all(params[name]["bias"] == 0.0), name
    fc6 = np.asarray(params["fc6"]["kernel"])
    assert abs(fc6.std() - 0.01) < 5e-4 and abs(fc6.mean()) < 5e-4
    he = AlexNet(num_classes=10, variant="small", init_scheme="he")
    he_params = init(he, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    assert np.all(he_params["fc6"]["bias"] == 0.0)
    fan_in = 3 * 3 * 96  # conv4: 3x3 over 192/2 channels
    assert abs(np.asarray(he_params["conv4"]["kernel"]).std() / np.sqrt(2 / fan_in) - 1) < 0.02
    for name in ("conv2", "conv3", "conv5", "fc6", "fc7"):  # >= 100k weights each: the std to ~0.3%
        kernel = np.asarray(he_params[name]["kernel"])
        assert abs(kernel.std() / np.sqrt(2 / np.prod(kernel.shape[:-1])) - 1) < 0.02, name


# narrow widths where the claim does not depend on them: the full widths' programs take ~3x the compile time
NARROW = dict(widths=(16, 32, 32, 32, 16), fc_width=64)


def test_dropout_only_in_training():
    model = AlexNet(num_classes=10, variant="small", **NARROW)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 1))
    variables = init(model, jax.random.PRNGKey(0), x)
    a = apply(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = apply(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    e1, e2 = apply(model, variables, x), apply(model, variables, x)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(e1, e2)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = AlexNet(num_classes=10, variant="small", dtype=jnp.bfloat16, init_scheme="he", **NARROW)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
    variables = init(model, jax.random.PRNGKey(0), x)
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = apply(model, variables, x)
    ref = apply(AlexNet(num_classes=10, variant="small", init_scheme="he", **NARROW), variables, x)
    assert out.dtype == jnp.float32
    # bfloat16 keeps 8 significant bits (~0.4% per rounding); through 8 layers the logits measured 1.7-3.0%
    # off in relative L2 norm at the full widths (3 seeds), 0.8% at NARROW: within 6%, and more than float32's
    # rounding (really bfloat16)
    err = np.linalg.norm(np.asarray(out) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
    assert 1e-3 < err < 0.06, err


def test_batchnorm_variant_replaces_lrn(monkeypatch):
    """norm='batchnorm' has batch statistics in all five conv layers and runs no LRN at all: an LRN that raises
    when called leaves it untouched, and stops the 'lrn' net (the intercept works)."""
    from alexnet_jax.model import alexnet

    def no_lrn(*args, **kwargs):
        raise AssertionError("LRN ran")

    monkeypatch.setattr(alexnet, "local_response_norm", no_lrn)
    model = AlexNet(num_classes=10, variant="small", norm="batchnorm", init_scheme="he", **NARROW)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 1))
    variables = init(model, jax.random.PRNGKey(0), x)
    assert sorted(variables["batch_stats"]) == ["bn1", "bn2", "bn3", "bn4", "bn5"]
    _, updated = apply(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                             mutable=["batch_stats"])
    assert not np.allclose(updated["batch_stats"]["bn1"]["mean"], 0.0)
    with pytest.raises(AssertionError, match="LRN ran"):
        AlexNet(num_classes=10, variant="small", **NARROW).init(jax.random.PRNGKey(0), x)


def test_groups_1_has_full_kernels():
    params = abstract_params(AlexNet(groups=1), (227, 227, 3))
    assert params["conv2"]["kernel"].shape == (5, 5, 96, 256)
    assert count_params(params) == 60_965_224 + 307_200 + 663_552 + 442_368


def test_bad_options_are_rejected():
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="variant"):
        AlexNet(variant="vgg").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="norm"):
        AlexNet(variant="small", norm="layer").init(jax.random.PRNGKey(0), x)


def lrn_autodiff_reference(x, groups):
    """The formula written plainly in jnp, differentiated by JAX."""
    g = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    sq = jnp.pad(jnp.square(g), [(0, 0)] * (g.ndim - 1) + [(2, 2)])
    sums = sum(sq[..., i : i + g.shape[-1]] for i in range(5))
    return (g / (2.0 + 1e-4 * sums) ** 0.75).reshape(x.shape)


@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_gradient_matches_autodiff(groups):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 12)) * 50
    w = jnp.arange(12.0) - 5
    ours = jax.jit(jax.grad(lambda x: jnp.sum(local_response_norm(x, groups=groups) * w)))(x)
    ref = jax.jit(jax.grad(lambda x: jnp.sum(lrn_autodiff_reference(x, groups) * w)))(x)
    # the reference is the formula (its values against NumPy's float64 loop), not the kernels' window sum
    np.testing.assert_allclose(lrn_autodiff_reference(x, groups), lrn_numpy64(np.asarray(x), groups=groups),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("shape", [(2, 13, 15, 4), (2, 14, 16, 3), (1, 28, 27, 8)])
def test_max_pool_matches_flax_values_and_gradients_with_ties(shape):
    """Odd and even sizes (the gradient's interleave ends differently), ties where the row-major first maximum
    must win."""
    x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), shape))
    x = jnp.round(x * 4) / 4  # many equal values in a window, zeros after ReLU among them
    ref = lambda v: nn.max_pool(v, (3, 3), (2, 2), "VALID")  # noqa: E731
    np.testing.assert_array_equal(jax.jit(max_pool)(x), jax.jit(ref)(x))
    w = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
    g_ours = jax.jit(jax.grad(lambda v: jnp.sum(max_pool(v) * w)))(x)
    g_ref = jax.jit(jax.grad(lambda v: jnp.sum(ref(v) * w)))(x)
    # same positions get the gradient; where two windows overlap the sum may round in another order
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(g_ours != 0, g_ref != 0)


def load_config(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name)
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_config_files_build_the_intended_models():
    imagenet = load_config("imagenet.py")
    model = create_model(ModelSpec.from_config(imagenet))
    params = abstract_params(model, (imagenet.image_size, imagenet.image_size, 3))
    assert count_params(params) == 60_965_224 and imagenet.batch_size == 128
    assert (imagenet.learning_rate, imagenet.momentum, imagenet.weight_decay) == (0.01, 0.9, 5e-4)
    assert imagenet.lr_schedule == "plateau" and imagenet.init_scheme == "paper"

    blog = load_config("fashion_mnist_224.py")  # the paper's net on 1-channel 224 px inputs, 10 classes
    params = abstract_params(create_model(ModelSpec.from_config(blog)), (224, 224, 1))
    assert count_params(params) == 60_965_224 - 34_944 + (11 * 11 * 96 + 96) - 4_097_000 + (4096 * 10 + 10)
    assert feature_shapes(create_model(ModelSpec.from_config(blog)), (224, 224, 1))["pool5"] == (6, 6, 256)

    quick = load_config("fashion_mnist.py")
    shapes = feature_shapes(create_model(ModelSpec.from_config(quick)), (28, 28, 1))
    assert shapes["pool5"] == (2, 2, quick.widths[-1]) and quick.num_classes == 10
