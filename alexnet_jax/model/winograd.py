"""3x3 stride-1 'SAME' convolution by Winograd's minimal filtering F(2x2, 3x3), with a hand-written VJP.

Why: on XLA:CPU the convolution library (YNNPACK) runs conv3-conv5's 3x3 convolutions, and above all their
input and kernel gradients, 1.3-1.6x slower than PyTorch's oneDNN (docs/performance.md). F(2x2, 3x3) computes
each 2x2 output tile from a 4x4 input tile with 16 multiplies instead of 36 (Lavin & Gray 2016): the
convolution becomes 16 batched matmuls over the channels, 2.25x fewer multiply-adds (1.9x at 13x13 after
padding to whole tiles), plus cheap adds that XLA fuses. The transforms use only 0, +-1 and +-1/2, so the
result equals the direct convolution to float32 rounding (~1e-6 relative; tests compare values and both
gradients). The backward pass is written out (transposed transforms, the same batched matmuls) because
autodiff of the forward's strided slices left 16 separate pad fusions in the gradient, most of the gain.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # B^T: 4x4 input tile -> transform domain
G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))  # G: 3-tap kernel row -> transform domain
AT = ((1, 1, 1, 0), (0, 1, -1, -1))  # A^T: transform domain -> 2x2 output tile


def _comb(terms: Iterable[tuple[float, jax.Array]]) -> jax.Array:
    """sum(coef * array) over the nonzero coefficients, unrolled (XLA fuses it into one loop)."""
    out = None
    for c, v in terms:
        if c == 0:
            continue
        t = v if c == 1 else -v if c == -1 else v * c
        out = t if out is None else out + t
    assert out is not None
    return out


def _input_transform(xp: jax.Array, th: int, tw: int) -> list[jax.Array]:
    """xp (n, 2th+2, 2tw+2, c) -> the 16 planes of B^T d B, each (n, th, tw, c), index 4i+j."""
    even, odd = xp[:, 0::2], xp[:, 1::2]  # tile t reads rows 2t..2t+3: even[t], odd[t], even[t+1], odd[t+1]
    rows = (even[:, :th], odd[:, :th], even[:, 1:], odd[:, 1:])
    out = []
    for u in (_comb(zip(BT[i], rows, strict=True)) for i in range(4)):
        even, odd = u[:, :, 0::2], u[:, :, 1::2]
        cols = (even[:, :, :tw], odd[:, :, :tw], even[:, :, 1:], odd[:, :, 1:])
        out += [_comb(zip(BT[j], cols, strict=True)) for j in range(4)]
    return out


def _kernel_transform(k: jax.Array) -> jax.Array:
    """(3, 3, c, o) -> G k G^T as (16, c, o)."""
    rows = [_comb((G[i][a], k[a]) for a in range(3)) for i in range(4)]
    return jnp.stack([_comb((G[j][b], r[b]) for b in range(3)) for r in rows for j in range(4)])


def _kernel_transform_transposed(du: jax.Array) -> jax.Array:
    """(16, c, o) -> (3, 3, c, o): the adjoint of `_kernel_transform` (the kernel gradient)."""
    du = du.reshape(4, 4, *du.shape[1:])
    rows = [[_comb((G[j][b], du[i, j]) for j in range(4)) for b in range(3)] for i in range(4)]
    return jnp.stack([jnp.stack([_comb((G[i][a], rows[i][b]) for i in range(4)) for b in range(3)])
                      for a in range(3)])


def _overlap_add(tiles: list[jax.Array], axis: int) -> jax.Array:
    """The adjoint of reading 4 positions 2t..2t+3 per tile t: (4 x (.., t, ..)) -> (.., 2t+2, ..)."""
    zero = jnp.zeros_like(jax.lax.slice_in_dim(tiles[0], 0, 1, axis=axis))
    even = jnp.concatenate([tiles[0], zero], axis) + jnp.concatenate([zero, tiles[2]], axis)
    odd = jnp.concatenate([tiles[1], zero], axis) + jnp.concatenate([zero, tiles[3]], axis)
    shape = list(even.shape)
    shape[axis] *= 2
    return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


def _tiles(shape: tuple[int, ...]) -> tuple[int, int]:
    return -(-shape[1] // 2), -(-shape[2] // 2)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))` in NHWC/HWIO, by F(2x2, 3x3)."""
    return _conv3x3_fwd(x, kernel)[0]


def _conv3x3_fwd(x: jax.Array, kernel: jax.Array):
    n, h, w, c = x.shape
    th, tw = _tiles(x.shape)
    xp = jnp.pad(x, [(0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)])
    v = jnp.stack(_input_transform(xp, th, tw)).reshape(16, n * th * tw, c)
    u = _kernel_transform(kernel)
    m = jnp.einsum("tmc,tco->tmo", v, u).reshape(4, 4, n, th, tw, -1)
    rows = [_comb(zip(AT[p], m, strict=True)) for p in range(2)]  # (4, n, th, tw, o) each
    y = jnp.stack([jnp.stack([_comb(zip(AT[q], r, strict=True)) for q in range(2)], axis=3) for r in rows], axis=2)
    return y.reshape(n, 2 * th, 2 * tw, -1)[:, :h, :w], (v, u, x.shape)


def _conv3x3_bwd(res, dy: jax.Array):
    v, u, (n, h, w, c) = res
    th, tw = _tiles((n, h, w))
    o = dy.shape[-1]
    dyp = jnp.pad(dy, [(0, 0), (0, 2 * th - h), (0, 2 * tw - w), (0, 0)]).reshape(n, th, 2, tw, 2, o)
    dm = jnp.stack([_comb((AT[p][i] * AT[q][j], dyp[:, :, p, :, q]) for p in range(2) for q in range(2))
                    for i in range(4) for j in range(4)]).reshape(16, n * th * tw, o)
    du = jnp.einsum("tmc,tmo->tco", v, dm)
    dv = jnp.einsum("tmo,tco->tmc", dm, u).reshape(4, 4, n, th, tw, c)
    cols = [_overlap_add([_comb((BT[j][b], dv[i, j]) for j in range(4)) for b in range(4)], axis=2)
            for i in range(4)]
    dxp = _overlap_add([_comb((BT[i][a], cols[i]) for i in range(4)) for a in range(4)], axis=1)
    return dxp[:, 1 : 1 + h, 1 : 1 + w], _kernel_transform_transposed(du)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
