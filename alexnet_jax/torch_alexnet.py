"""The same AlexNet in PyTorch, for `scripts/benchmark.py --vs-torch`: a yardstick, not a second implementation.

Built from an `alexnet_jax.model.AlexNet` and an image shape, so the two nets have the same layers, shapes,
groups, LRN (the paper's formula: torch's `LocalResponseNorm` divides alpha by the window size, so it gets
alpha * n; with groups the window stays inside each group, as in the JAX model), overlapping 3/2 max-pooling,
dropout and SGD with momentum and weight decay. `load_flax_params` copies JAX parameters in, which is how the
tests show that both compute the same function. torch is an optional dependency: `pip install '.[bench]'`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alexnet_jax.model import LRN_ALPHA, LRN_BETA, LRN_BIAS, LRN_DEPTH_RADIUS, AlexNet, conv1_edge_padding

INSTALL_HINT = "pip install 'torch==2.13.0' (or: pip install -e '.[bench]'), a CPU build"


def import_torch():
    """torch, or a UserError that says how to install it."""
    try:
        import torch
    except ImportError as e:
        from alexnet_jax.errors import UserError

        raise UserError(f"--vs-torch needs PyTorch, which is not installed: {INSTALL_HINT}") from e
    return torch


def build(model: AlexNet, image_shape: tuple[int, int, int]) -> Any:
    """A torch.nn.Module equivalent to `model` for NCHW inputs of `image_shape` (H, W, C)."""
    torch = import_torch()
    nn = torch.nn
    spec = model.spec
    norm = spec.default_norm if model.norm is None else model.norm
    groups = spec.default_groups if model.groups is None else model.groups
    widths = tuple(model.widths or spec.widths)
    fc_width = model.fc_width or spec.fc_width
    if norm not in ("lrn", "none"):
        raise ValueError("the torch yardstick covers LRN or no normalisation")
    h, w, cin = image_shape
    k1, s1 = spec.conv1_kernel, spec.conv1_stride
    if spec.conv1_padding == "cuda-convnet":
        pad1 = (0, conv1_edge_padding(w, k1, s1), 0, conv1_edge_padding(h, k1, s1))  # F.pad: left right top bottom
    else:
        p = int(spec.conv1_padding)
        pad1 = (p, p, p, p)

    class GroupLRN(nn.Module):
        """The paper's LRN within each channel group."""

        def __init__(self) -> None:
            super().__init__()
            n = 2 * LRN_DEPTH_RADIUS + 1
            self.lrn = nn.LocalResponseNorm(n, alpha=LRN_ALPHA * n, beta=LRN_BETA, k=LRN_BIAS)

        def forward(self, x):
            if groups == 1:
                return self.lrn(x)
            return torch.cat([self.lrn(p) for p in x.chunk(groups, dim=1)], dim=1)

    def after(c: int) -> list:
        return [nn.ReLU(inplace=True)] + ([GroupLRN()] if norm == "lrn" and c else [])

    p2 = spec.conv2_kernel // 2
    features = nn.Sequential(
        nn.ZeroPad2d(pad1), nn.Conv2d(cin, widths[0], k1, s1), *after(1), nn.MaxPool2d(3, 2),
        nn.Conv2d(widths[0], widths[1], spec.conv2_kernel, 1, p2, groups=groups), *after(2), nn.MaxPool2d(3, 2),
        nn.Conv2d(widths[1], widths[2], 3, 1, 1), *after(0),
        nn.Conv2d(widths[2], widths[3], 3, 1, 1, groups=groups), *after(0),
        nn.Conv2d(widths[3], widths[4], 3, 1, 1, groups=groups), *after(0), nn.MaxPool2d(3, 2),
        *([nn.AdaptiveAvgPool2d(spec.adaptive_pool)] if spec.adaptive_pool else []),
    )
    with torch.no_grad():
        flat = features(torch.zeros(1, cin, h, w)).numel()

    def hidden(fan_in: int) -> list:  # torchvision (owt): dropout on the input; the paper: on the output
        layers = [nn.Linear(fan_in, fc_width), nn.ReLU(inplace=True)]
        drop = nn.Dropout(model.dropout_rate)
        return [drop, *layers] if spec.dropout_before_fc else [*layers, drop]

    return nn.Sequential(features, nn.Flatten(), *hidden(flat), *hidden(fc_width),
                         nn.Linear(fc_width, model.num_classes))


def load_flax_params(net: Any, params: Any) -> None:
    """Copy a JAX parameter tree (conv1..conv5, fc6..fc8) into `build`'s module.

    Conv kernels go HWIO -> OIHW; fc6's rows are reordered from NHWC flattening to torch's NCHW flattening.
    """
    torch = import_torch()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    c5 = convs[-1].out_channels
    with torch.no_grad():
        for i, m in enumerate(convs):
            p = params[f"conv{i + 1}"]
            m.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
            m.bias.copy_(torch.from_numpy(np.array(p["bias"])))
        for i, m in enumerate(linears):
            p = params[f"fc{i + 6}"]
            k = np.asarray(p["kernel"])
            if i == 0:
                side = int(round((k.shape[0] // c5) ** 0.5))
                k = k.reshape(side, side, c5, -1).transpose(2, 0, 1, 3).reshape(k.shape[0], -1)
            m.weight.copy_(torch.from_numpy(k.T.copy()))
            m.bias.copy_(torch.from_numpy(np.array(p["bias"])))


def make_optimizer(net: Any, learning_rate: float, momentum: float, weight_decay: float) -> Any:
    """torch SGD: v <- m v + (g + wd w); w <- w - lr v (the paper's rule while the rate is constant)."""
    torch = import_torch()
    return torch.optim.SGD(net.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)


def make_train_step(net: Any, opt: Any, bfloat16: bool = False):
    """A closure doing one training step on NCHW float32 tensors; returns the loss tensor. `bfloat16`: the
    forward and loss under `torch.autocast('cpu', torch.bfloat16)` (PyTorch's mixed precision on the CPU)."""
    import contextlib

    torch = import_torch()
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()

    def step(images, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16) if bfloat16 else contextlib.nullcontext():
            loss = loss_fn(net(images), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return step
