"""A grouped matmul whose memory and work follow the rows that hold data.

``grouped_matmul(x, w, group_sizes)`` computes what
``jax.lax.ragged_dot(x, w, group_sizes)`` computes: rows ``[start_g, end_g)``
of ``x`` (consecutive groups, ``end_g = sum(group_sizes[:g+1])``) times
``w[g]``, and zero rows past the last group. On GPUs, XLA (as of jaxlib
0.11) rewrites ``ragged_dot`` into one dense dot of ``[M, G*K]`` by
``[G*K, N]``: ``G`` times the FLOPs, and at DeepEP's shape (49,024 rows,
128 local experts, hidden 7168) a 90 GB operand, so the expert MLP of a
dropless layer does not fit any GPU.

Here the rows are cut into tiles of ``tile_rows`` and each tile into
*segments* where a group starts inside it: every segment is one tile's rows
of one group. A loop over chunks of ``chunk`` segments multiplies each
segment's tile by its group's matrix (a batched matmul of ``[chunk,
tile_rows, K]`` by ``[chunk, K, N]``, rows outside the segment masked) and
adds it into its tile of the output. The loop runs only over the segments
before the last group's end, so empty rows of a worst-case buffer cost
nothing; there are at most ``ceil(M / tile_rows) + G`` segments, and exactly
the tiles that hold data when every group starts on a tile boundary (the
expert-major layout with ``expert_alignment`` a multiple of ``tile_rows``).

The gradient is the same loop: ``dx`` with ``w`` transposed, ``dw`` summed
segment by segment into a float32 ``[G, K, N]``. ``jax.custom_vjp``:
reverse mode only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["grouped_matmul"]


class _Segments(NamedTuple):
    """Segments of a call, ``P = ceil(M / tile_rows) + G`` rounded up to a
    multiple of ``chunk``: the real ones first, in row order, then empty ones."""

    start: jax.Array   # int32 [P]: first row
    end: jax.Array     # int32 [P]: one past the last row (== start: empty)
    tile: jax.Array    # int32 [P]: its tile
    group: jax.Array   # int32 [P]: its group (clamped to G - 1 where empty)
    count: jax.Array   # int32 []: real segments


def _segments(group_sizes: jax.Array, rows: int, tile_rows: int, chunk: int) -> _Segments:
    g = group_sizes.shape[0]
    num_tiles = -(-rows // tile_rows)
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    total = ends[-1]
    tile_starts = jnp.arange(num_tiles, dtype=jnp.int32) * tile_rows
    # A segment starts at every tile start before the end of the data, and at
    # every start of a nonempty group that lies inside a tile.
    cand = jnp.concatenate([tile_starts, starts])
    real = jnp.concatenate([tile_starts < total, (ends > starts) & (starts % tile_rows != 0)])
    p = num_tiles + g
    padded = -(-p // chunk) * chunk
    key = jnp.where(real, cand, rows)  # empty candidates sort last
    start = jnp.sort(key)
    count = jnp.sum(real.astype(jnp.int32))
    start = jnp.pad(start, (0, padded - p), constant_values=rows)
    nxt = jnp.concatenate([start[1:], jnp.full((1,), rows, jnp.int32)])
    end = jnp.where(jnp.arange(padded) < count, jnp.minimum(nxt, total), start)
    end = jnp.maximum(end, start)
    tile = jnp.minimum(start // tile_rows, num_tiles - 1)
    group = jnp.minimum(jnp.searchsorted(ends, start, side="right").astype(jnp.int32), g - 1)
    return _Segments(start, end, tile, group, count)


def _chunks(seg: _Segments, chunk: int):
    """(number of chunks that hold real segments, the chunk's slices)."""
    n = (seg.count + chunk - 1) // chunk

    def take(c):
        at = c * chunk
        return tuple(jax.lax.dynamic_slice_in_dim(a, at, chunk) for a in (seg.start, seg.end, seg.tile, seg.group))

    return n, take


def _zeros_varying_like(shape, dtype, *inputs) -> jax.Array:
    """Zeros that vary over the manual mesh axes that any of ``inputs`` varies
    over (inside ``jax.shard_map`` a loop's carry must match its body's output)."""
    zeros = jnp.zeros(shape, dtype)
    axes = set()
    for a in inputs:
        axes |= set(getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", None) or ())
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _segment_rows(x_tiles, start, end, tile, tile_rows):
    """[chunk, tile_rows, K]: each segment's tile of x, zero outside its rows."""
    rows = tile[:, None] * tile_rows + jnp.arange(tile_rows, dtype=jnp.int32)[None, :]
    inside = (rows >= start[:, None]) & (rows < end[:, None])
    return jnp.where(inside[..., None], x_tiles[tile], 0)


def _apply(x_tiles: jax.Array, w: jax.Array, seg: _Segments, tile_rows: int, chunk: int,
           transpose: bool = False) -> jax.Array:
    """Sum over segments of mask * x[tile] @ w[group] (``w[group].T`` with
    ``transpose``, without a transposed copy of w), into [num_tiles, tile_rows, N] in x's dtype."""
    n, take = _chunks(seg, chunk)
    out = _zeros_varying_like(x_tiles.shape[:2] + (w.shape[1] if transpose else w.shape[2],), x_tiles.dtype,
                              x_tiles, w, *seg)
    spec = "ban,bkn->bak" if transpose else "bak,bkn->ban"

    def body(c, out):
        start, end, tile, group = take(c)
        xs = _segment_rows(x_tiles, start, end, tile, tile_rows)
        y = jnp.einsum(spec, xs, w[group], preferred_element_type=jnp.float32)
        # Segments of one tile cover disjoint rows: adding their zeros is exact.
        return out.at[tile].add(y.astype(out.dtype), indices_are_sorted=True)

    return jax.lax.fori_loop(0, n, body, out)


def _weight_grad(x_tiles, dy_tiles, seg: _Segments, num_groups: int, tile_rows: int, chunk: int) -> jax.Array:
    """float32 [G, K, N]: sum over segments of (mask * x[tile])^T @ dy[tile] into w[group]'s slot."""
    n, take = _chunks(seg, chunk)
    dw = _zeros_varying_like((num_groups, x_tiles.shape[2], dy_tiles.shape[2]), jnp.float32, x_tiles, dy_tiles, *seg)

    def body(c, dw):
        start, end, tile, group = take(c)
        xs = _segment_rows(x_tiles, start, end, tile, tile_rows)
        part = jnp.einsum("bak,ban->bkn", xs, dy_tiles[tile], preferred_element_type=jnp.float32)
        return dw.at[group].add(part, indices_are_sorted=True)

    return jax.lax.fori_loop(0, n, body, dw)


def _tiles(a: jax.Array, tile_rows: int) -> jax.Array:
    rows = a.shape[0]
    num_tiles = -(-rows // tile_rows)
    return jnp.pad(a, ((0, num_tiles * tile_rows - rows), (0, 0))).reshape(num_tiles, tile_rows, a.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x, w, group_sizes, tile_rows, chunk):
    return _gmm_fwd(x, w, group_sizes, tile_rows, chunk)[0]


def _gmm_fwd(x, w, group_sizes, tile_rows, chunk):
    seg = _segments(group_sizes, x.shape[0], tile_rows, chunk)
    y = _apply(_tiles(x, tile_rows), w, seg, tile_rows, chunk)
    return y.reshape(-1, w.shape[2])[: x.shape[0]], (x, w, seg)


def _gmm_bwd(tile_rows, chunk, res, dy):
    x, w, seg = res
    dy_tiles = _tiles(dy.astype(x.dtype), tile_rows)
    dx = _apply(dy_tiles, w, seg, tile_rows, chunk, transpose=True).reshape(-1, x.shape[1])[: x.shape[0]]
    dw = _weight_grad(_tiles(x, tile_rows), dy_tiles, seg, w.shape[0], tile_rows, chunk)
    return dx, dw.astype(w.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, tile_rows: int = 128,
                   chunk: int = 8) -> jax.Array:
    """``jax.lax.ragged_dot(x, w, group_sizes)`` in work and memory linear in the rows.

    Args:
      x: ``[M, K]`` (bfloat16, float16 or float32), rows grouped in order of
        ``w``'s groups.
      w: ``[G, K, N]``, x's dtype.
      group_sizes: ``int32 [G]``, rows of each group; rows past their sum
        come out zero (as do rows past ``M``, which the sum may not exceed).
      tile_rows: rows per tile of the batched matmuls (a multiple of 8;
        128 suits tensor cores). Groups that start on tile boundaries (an
        expert-major buffer with ``expert_alignment`` a multiple of it) need
        one segment per tile.
      chunk: segments per iteration of the loop (memory: ``chunk`` of ``w``'s
        ``[K, N]`` matrices gathered at a time).

    Returns:
      ``[M, N]`` in x's dtype (float32 accumulation). Differentiable in
      reverse mode with respect to ``x`` and ``w``.
    """
    if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"grouped_matmul takes x [M, K], w [G, K, N], group_sizes [G]; got x{list(x.shape)}, "
                         f"w{list(w.shape)}, group_sizes{list(group_sizes.shape)}")
    if w.shape[1] != x.shape[1] or group_sizes.shape[0] != w.shape[0]:
        raise ValueError(f"shapes do not match: x{list(x.shape)}, w{list(w.shape)}, "
                         f"group_sizes{list(group_sizes.shape)} (need w [G, {x.shape[1]}, N], group_sizes [G])")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"group_sizes must be an integer array, got {group_sizes.dtype}")
    for name, v in (("tile_rows", tile_rows), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if tile_rows % 8:
        raise ValueError(f"tile_rows must be a multiple of 8, got {tile_rows}")
    if x.shape[0] == 0 or w.shape[0] == 0:
        return jnp.zeros((x.shape[0], w.shape[2]), x.dtype)
    return _gmm(x, w.astype(x.dtype), group_sizes, tile_rows, chunk)
