"""Stride-1 3x3 and 5x5 convolutions by Winograd's minimal filtering F(2x2, rxr), with a hand-written VJP.

Why: on XLA:CPU the convolution library (YNNPACK) runs conv3-conv5's 3x3 convolutions, and above all their
input and kernel gradients, 1.3-1.6x slower than PyTorch's oneDNN (docs/performance.md). F(2x2, 3x3) computes
each 2x2 output tile from a 4x4 input tile with 16 multiplies instead of 36 (Lavin & Gray 2016): the
convolution becomes 16 batched matmuls over the channels, 2.25x fewer multiply-adds (1.9x at 13x13 after
padding to whole tiles), plus cheap adds that XLA fuses. conv2's 5x5 kernels: F(2x2, 5x5), 36 matmuls from 6x6
tiles, 2.8x fewer. The F(2x2, 3x3) transforms use only 0, +-1 and +-1/2 and F(2x2, 5x5)'s the points 0, +-1,
+-2, so the result equals the direct convolution to float32 rounding (~1e-6 relative; tests compare values and
both gradients). The backward pass is written out (transposed transforms, the same batched matmuls) because
autodiff of the forward's strided slices left 16 separate pad fusions in the gradient, most of the gain.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial

import jax
import jax.numpy as jnp

# (B^T: input tile -> transform domain, G: kernel row -> transform domain, A^T: transform domain -> 2 outputs),
# Lavin & Gray's F(2, 3) and the Cook-Toom construction at the points 0, 1, -1, 2, -2, inf for F(2, 5).
MATRICES = {
    3: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    5: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0, 0, 0), (-1 / 6, -1 / 6, -1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3), (1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3), (0, 0, 0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 1))),
}
SIZES = tuple(MATRICES)


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


def _windows(x: jax.Array, axis: int, tiles: int, a: int) -> list[jax.Array]:
    """The a views x[2t + p] (t < tiles) along `axis`, p = 0..a-1, from x's even and odd positions."""
    even = jax.lax.slice_in_dim(x, 0, None, 2, axis)
    odd = jax.lax.slice_in_dim(x, 1, None, 2, axis)
    return [jax.lax.slice_in_dim(even if p % 2 == 0 else odd, p // 2, p // 2 + tiles, axis=axis) for p in range(a)]


def _overlap_add(tiles: list[jax.Array], axis: int) -> jax.Array:
    """The adjoint of `_windows`: position 2t + p receives tiles[p][t]; length 2 * tiles + a - 2."""
    a, half = len(tiles), len(tiles) // 2
    def padded(t: jax.Array, p: int) -> jax.Array:
        cfg = [(0, 0, 0)] * t.ndim
        cfg[axis] = (p // 2, half - 1 - p // 2, 0)
        return jax.lax.pad(t, jnp.zeros((), t.dtype), cfg)
    even = _comb((1, padded(tiles[p], p)) for p in range(0, a, 2))
    odd = _comb((1, padded(tiles[p], p)) for p in range(1, a, 2))
    shape = list(even.shape)
    shape[axis] *= 2
    return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


def _kernel_transform(k: jax.Array, g: Sequence[Sequence[float]]) -> jax.Array:
    """(r, r, c, o) -> G k G^T as (a*a, c, o)."""
    r = k.shape[0]
    rows = [_comb((gi[b], k[b]) for b in range(r)) for gi in g]
    return jnp.stack([_comb((gj[b], row[b]) for b in range(r)) for row in rows for gj in g])


def _kernel_transform_transposed(du: jax.Array, g: Sequence[Sequence[float]]) -> jax.Array:
    """(a*a, c, o) -> (r, r, c, o): the adjoint of `_kernel_transform` (the kernel gradient)."""
    a, r = len(g), len(g[0])
    du = du.reshape(a, a, *du.shape[1:])
    rows = [[_comb((g[j][b], du[i, j]) for j in range(a)) for b in range(r)] for i in range(a)]
    return jnp.stack([jnp.stack([_comb((g[i][b0], rows[i][b]) for i in range(a)) for b in range(r)])
                      for b0 in range(r)])


def _varying(x: jax.Array) -> frozenset[str]:
    """The mesh axes `x` varies along inside a shard_map (empty outside one)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; older releases call it `vma`
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _summed_to(ct: jax.Array, like: jax.Array) -> jax.Array:
    """`ct` summed over the mesh axes it varies along but the primal (`like`) does not (inside a shard_map).

    Autodiff does this itself (the transpose of the implicit broadcast, pvary, is psum); a custom VJP must:
    e.g. a kernel replicated over 'data' meets images split over 'data', so its gradient is summed over 'data'.
    """
    extra = tuple(sorted(_varying(ct) - _varying(like)))
    return jax.lax.psum(ct, extra) if extra else ct


def _geometry(shape: Sequence[int], r: int, padding: tuple[tuple[int, int], tuple[int, int]]):
    (pt, pb), (pl, pr) = padding
    oh, ow = shape[1] + pt + pb - r + 1, shape[2] + pl + pr - r + 1
    return oh, ow, -(-oh // 2), -(-ow // 2)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, (1, 1), padding)` in NHWC/HWIO for 3x3 and 5x5 kernels."""
    return _conv_fwd(x, kernel, padding)[0]


def _conv_fwd(x: jax.Array, kernel: jax.Array, padding):
    n, h, w, c = x.shape
    r = kernel.shape[0]
    bt, g, at = MATRICES[r]
    a = r + 1
    oh, ow, th, tw = _geometry(x.shape, r, padding)
    (pt, _), (pl, _) = padding
    xp = jnp.pad(x, [(0, 0), (pt, 2 * th + r - 1 - h - pt), (pl, 2 * tw + r - 1 - w - pl), (0, 0)])
    rows = _windows(xp, 1, th, a)
    v = []
    for u in (_comb(zip(bt[i], rows, strict=True)) for i in range(a)):
        cols = _windows(u, 2, tw, a)
        v += [_comb(zip(bt[j], cols, strict=True)) for j in range(a)]
    v = jnp.stack(v).reshape(a * a, n * th * tw, c)
    u = _kernel_transform(kernel, g)
    m = jnp.einsum("tmc,tco->tmo", v, u).reshape(a, a, n, th, tw, -1)
    out_rows = [_comb(zip(at[p], m, strict=True)) for p in range(2)]  # (a, n, th, tw, o) each
    y = jnp.stack([jnp.stack([_comb(zip(at[q], row, strict=True)) for q in range(2)], axis=3)
                   for row in out_rows], axis=2)
    return y.reshape(n, 2 * th, 2 * tw, -1)[:, :oh, :ow], (v, u, x.shape, r)


def _conv_bwd(padding, res, dy: jax.Array):
    v, u, (n, h, w, c), r = res
    bt, g, at = MATRICES[r]
    a = r + 1
    oh, ow, th, tw = _geometry((n, h, w), r, padding)
    (pt, _), (pl, _) = padding
    o = dy.shape[-1]
    dyp = jnp.pad(dy, [(0, 0), (0, 2 * th - oh), (0, 2 * tw - ow), (0, 0)]).reshape(n, th, 2, tw, 2, o)
    dm = jnp.stack([_comb((at[p][i] * at[q][j], dyp[:, :, p, :, q]) for p in range(2) for q in range(2))
                    for i in range(a) for j in range(a)]).reshape(a * a, n * th * tw, o)
    du = jnp.einsum("tmc,tmo->tco", v, dm)
    dv = jnp.einsum("tmo,tco->tmc", dm, u).reshape(a, a, n, th, tw, c)
    cols = [_overlap_add([_comb((bt[j][b], dv[i, j]) for j in range(a)) for b in range(a)], axis=2)
            for i in range(a)]
    dxp = _overlap_add([_comb((bt[i][p], cols[i]) for i in range(a)) for p in range(a)], axis=1)
    # v was computed from x alone and u from the kernel alone: they carry the primals' mesh-axis types
    return (_summed_to(dxp[:, pt : pt + h, pl : pl + w], v),
            _summed_to(_kernel_transform_transposed(du, g), u))


conv.defvjp(_conv_fwd, _conv_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv` with 'SAME' padding for a 3x3 kernel (conv3-conv5)."""
    return conv(x, kernel, ((1, 1), (1, 1)))
