"""Plain-numpy restatement of the jax_ep contract, written from the docs with
loops, independent of ``jax_ep.reference``. Tests compare both backends to it."""

from __future__ import annotations

import numpy as np


def owner_and_local(expert: int, num_experts: int, num_ranks: int):
    per = num_experts // num_ranks
    return expert // per, expert % per


def token_experts(row, num_experts):
    """Distinct valid expert ids of one token, in slot order."""
    out = []
    for e in row:
        if 0 <= e < num_experts and e not in out:
            out.append(int(e))
    return out


def layout(idx, num_experts, num_ranks):
    t = idx.shape[0]
    per_rank = np.zeros(num_ranks, np.int32)
    per_expert = np.zeros(num_experts, np.int32)
    in_rank = np.zeros((t, num_ranks), bool)
    for i in range(t):
        for e in token_experts(idx[i], num_experts):
            per_expert[e] += 1
            in_rank[i, owner_and_local(e, num_experts, num_ranks)[0]] = True
    per_rank[:] = in_rank.sum(0)
    return per_rank, per_expert, in_rank


def local_row(idx_row, w_row, dst, num_experts, num_ranks):
    """A token's top-k ids/weights as rank `dst` receives them."""
    ids = np.full(idx_row.shape, -1, np.int32)
    ws = np.zeros(w_row.shape, np.float32)
    for k, e in enumerate(idx_row):
        if 0 <= e < num_experts:
            o, loc = owner_and_local(int(e), num_experts, num_ranks)
            if o == dst:
                ids[k], ws[k] = loc, w_row[k]
    return ids, ws


def dispatch_rank_major(xs, idxs, ws, num_experts, capacity):
    """Per destination: (recv_x, recv_idx, recv_w, src list, dropped, per-expert counts)."""
    r = len(xs)
    t, k = idxs[0].shape
    h = xs[0].shape[1]
    le = num_experts // r
    out = []
    for d in range(r):
        rows = []
        counts = np.zeros(le, np.int32)
        for s in range(r):
            for i in range(t):
                ids, wv = local_row(idxs[s][i], ws[s][i], d, num_experts, r)
                if (ids >= 0).any():
                    rows.append((s, i, ids, wv))
                    for loc in set(int(v) for v in ids if v >= 0):
                        counts[loc] += 1
        recv_x = np.zeros((capacity, h), xs[0].dtype)
        recv_idx = np.full((capacity, k), -1, np.int32)
        recv_w = np.zeros((capacity, k), np.float32)
        src = []
        for j, (s, i, ids, wv) in enumerate(rows[:capacity]):
            recv_x[j], recv_idx[j], recv_w[j] = xs[s][i], ids, wv
            src.append((s, i))
        out.append(dict(x=recv_x, idx=recv_idx, w=recv_w, src=src, pos=list(range(len(src))),
                        dropped=max(len(rows) - capacity, 0), counts=counts))
    return out


def dispatch_expert_major(xs, idxs, ws, num_experts, capacity, alignment):
    r = len(xs)
    t, k = idxs[0].shape
    h = xs[0].shape[1]
    le = num_experts // r
    out = []
    for d in range(r):
        groups = [[] for _ in range(le)]
        for s in range(r):
            for i in range(t):
                ids, wv = local_row(idxs[s][i], ws[s][i], d, num_experts, r)
                for loc in sorted(set(int(v) for v in ids if v >= 0)):
                    mine = ids == loc
                    groups[loc].append((s, i, np.where(mine, ids, -1), np.where(mine, wv, 0.0)))
        recv_x = np.zeros((capacity, h), xs[0].dtype)
        recv_idx = np.full((capacity, k), -1, np.int32)
        recv_w = np.zeros((capacity, k), np.float32)
        src, pos_list, start, dropped, sizes = [], [], 0, 0, []
        for g in groups:
            for j, (s, i, ids, wv) in enumerate(g):
                pos = start + j
                if pos < capacity:
                    recv_x[pos], recv_idx[pos], recv_w[pos] = xs[s][i], ids, wv
                    src.append((s, i))
                    pos_list.append(pos)
                else:
                    dropped += 1
            aligned = -(-len(g) // alignment) * alignment
            sizes.append(min(start + aligned, capacity) - min(start, capacity))
            start += aligned
        counts = np.array([len(g) for g in groups], np.int32)
        out.append(dict(x=recv_x, idx=recv_idx, w=recv_w, src=src, pos=pos_list, dropped=dropped, counts=counts,
                        group_sizes=np.array(sizes, np.int32)))
    return out


def ll_dispatch(xs, idxs, num_experts, max_tokens):
    """Per rank: x [E/R, R*M, H], count [E/R], src [E/R, R*M, 3] (source rank,
    token, first top-k slot naming the expert; -1 on padding rows). Ranks may
    have different token counts."""
    r = len(xs)
    h = xs[0].shape[1]
    le = num_experts // r
    out = []
    for d in range(r):
        recv = np.zeros((le, r * max_tokens, h), xs[0].dtype)
        src = np.full((le, r * max_tokens, 3), -1, np.int32)
        count = np.zeros(le, np.int32)
        for s in range(r):
            for i in range(idxs[s].shape[0]):
                for e in token_experts(idxs[s][i], num_experts):
                    o, loc = owner_and_local(e, num_experts, r)
                    if o == d:
                        recv[loc, count[loc]] = xs[s][i]
                        src[loc, count[loc]] = (s, i, list(idxs[s][i]).index(e))
                        count[loc] += 1
        out.append(dict(x=recv, count=count, src=src))
    return out


def fp8_cast(x, round_scale=False, use_ue8m0=False):
    """The CUDA kernels' per-token FP8 cast, in numpy float32 (each step
    correctly rounded, as the docs state it).

    x: float32 [T, H] (BF16 inputs as their exact float32 values), H % 128 == 0.
    Returns (uint8 [T, H] e4m3 bytes, scales): float32 [T, H/128], or with
    use_ue8m0 int32 [T, H/512], byte j of word w the biased exponent of group
    4w + j. Policy on non-finite inputs (the kernels' fmaxf and saturating
    conversion): a NaN never raises the amax; a NaN product casts to 0x7f;
    an inf makes its group's scale inf (exponent byte 0xff) and 1/scale 0.
    """
    import ml_dtypes

    t, h = x.shape
    g = np.asarray(x, np.float32).reshape(t, h // 128, 128)
    with np.errstate(invalid="ignore", over="ignore"):
        amax = np.fmax(np.fmax.reduce(np.abs(g), axis=-1, initial=np.float32(0)), np.float32(1e-4))
        scale = (amax * np.float32(1.0 / 448.0)).astype(np.float32)
        if round_scale or use_ue8m0:  # the smallest power of two >= scale, from the bits
            bits = scale.view(np.uint32)
            bits = np.where(bits & 0x7FFFFF, (bits & 0x7F800000) + 0x800000, bits).astype(np.uint32)
            scale = bits.view(np.float32)
        inv = (np.float32(1.0) / scale).astype(np.float32)
        y = (g * inv[..., None]).astype(np.float32)
        q = np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    q = np.where(np.isnan(y), np.uint8(0x7F), q).reshape(t, h)
    if not use_ue8m0:
        return q, scale
    exponent = (scale.view(np.uint32) >> 23).astype(np.uint8)
    return q, np.ascontiguousarray(exponent).view(np.int32).reshape(t, h // 512)


def fp8_quantize(x, round_scale=False):
    """float32 [T, H] -> (float8_e4m3fn q [T, H], float32 scales [T, H/128]): fp8_cast."""
    import ml_dtypes

    q, scale = fp8_cast(x, round_scale)
    return q.view(ml_dtypes.float8_e4m3fn), scale


def fp8_edge_rows(rng, t, h, finite=False):
    """float32 [t, h] (h % 128 == 0) of random groups with the cast's edge
    cases among them, each exact in BF16: all-zero and all-negative-zero
    groups, BF16/float32 denormals (alone, the 1e-4 amax floor, and beside a
    large value, e4m3 subnormals), values at the FP8 maximum (x * (1/scale)
    at and just past 448), ties of e4m3 rounding, and unless `finite` an inf
    and NaNs."""
    import ml_dtypes

    x = rng.standard_normal((t, h)).astype(np.float32) * rng.uniform(1e-3, 1e3, (t, 1)).astype(np.float32)
    cases = [
        np.zeros(128, np.float32),
        np.full(128, -0.0, np.float32),
        rng.standard_normal(128).astype(np.float32) * np.float32(1e-39),   # float32 denormals only
        np.concatenate([[np.float32(3.0)], np.float32(3.0 / 448 / 512) * np.arange(-7, 8, dtype=np.float32),
                        rng.standard_normal(112).astype(np.float32) * np.float32(1e-3)]),  # e4m3 subnormals
        np.concatenate([[np.float32(1e30)], rng.standard_normal(127).astype(np.float32) * np.float32(1e-39)]),
        np.full(128, 448.0, np.float32) * np.where(rng.random(128) < 0.5, -1, 1).astype(np.float32),
        np.float32(7.0) * rng.choice([1.0, 0.999, 1.001, 0.5, -0.0625], 128).astype(np.float32),
        np.float32(2.0) ** rng.integers(-20, 20, 128).astype(np.float32) * np.float32(1.0625),  # e4m3 ties
    ]
    if not finite:
        cases.append(np.where(np.arange(128) == 5, np.float32(np.inf), x[0, :128]))
        cases.append(np.where(np.arange(128) % 3 == 0, np.float32(np.nan), x[0, :128]))
        cases.append(np.full(128, np.nan, np.float32))
    flat = x.reshape(-1, 128)
    for i, c in enumerate(cases):  # case i in row i (for t >= 11), group i of it
        flat[(i * (h // 128 + 1)) % len(flat)] = c
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def dispatch_rounds(idxs, num_experts, capacity, alignment, layout, max_rounds):
    """Overflow rounds as a loop of plain dispatches: each round dispatches every
    pending slot at `capacity`, the rows it keeps are served, the rest wait for
    the next round; the last round keeps what fits and drops the rest.

    Returns (slot_round per rank [T, K] (-1 masked), rounds run, rows dropped per
    destination rank)."""
    r = len(idxs)
    t, k = idxs[0].shape
    le = num_experts // r
    pending = [np.array(i, np.int32) for i in idxs]
    slot_round = [np.where((i >= 0) & (i < num_experts), -2, -1).astype(np.int32) for i in idxs]
    xs = [np.zeros((t, 1), np.float32)] * r
    ws = [np.zeros((t, k), np.float32)] * r
    rounds, dropped = 0, [0] * r
    while rounds < max_rounds and any((p >= 0).any() for p in pending):
        if layout == "rank_major":
            out = dispatch_rank_major(xs, pending, ws, num_experts, capacity)
        else:
            out = dispatch_expert_major(xs, pending, ws, num_experts, capacity, alignment)
        for d in range(r):
            for (s, i), pos in zip(out[d]["src"], out[d]["pos"]):
                ids = out[d]["idx"][pos]
                for kk in range(k):
                    e = pending[s][i, kk]
                    if e < 0 or owner_and_local(int(e), num_experts, r)[0] != d:
                        continue
                    if layout == "rank_major" or owner_and_local(int(e), num_experts, r)[1] in ids:
                        slot_round[s][i, kk] = rounds
                        pending[s][i, kk] = -1
            dropped[d] = out[d]["dropped"]
        rounds += 1
    for s in range(r):
        slot_round[s] = np.where(slot_round[s] == -2, rounds - 1, slot_round[s])
    return slot_round, rounds, dropped


def ll_combine_grads(xs, idxs, ws, gs, num_experts, max_tokens):
    """Gradients of ``low_latency_combine(recv_x, w, handle)`` after a
    low-latency dispatch of ``xs`` whose experts return their input: per
    rank (d/dy float64 [E/R, R*M, H], d/dw float64 [T, K]) for the output
    cotangents ``gs`` (float [T, H] per rank). d/dw[t, k] = g[t] . x[t] on a
    valid slot (its expert's row is the token's), 0 on a masked one; d/dy of
    a received row: the sum of its token's weights naming that expert, times
    the token's cotangent; 0 on padding rows."""
    r = len(xs)
    le = num_experts // r
    recv = ll_dispatch(xs, idxs, num_experts, max_tokens)
    out = []
    for d in range(r):
        valid = idxs[d] >= 0
        gw = np.where(valid, (np.asarray(gs[d], np.float64) * xs[d].astype(np.float64)).sum(1)[:, None], 0.0)
        src = recv[d]["src"]
        gy = np.zeros((le, r * max_tokens, xs[0].shape[1]))
        for loc in range(le):
            for j in np.nonzero(src[loc, :, 0] >= 0)[0]:
                s, t = src[loc, j, 0], src[loc, j, 1]
                gy[loc, j] = ws[s][t][idxs[s][t] == d * le + loc].sum() * np.asarray(gs[s][t], np.float64)
        out.append((gy, gw))
    return out


def ll_dispatch_grad(idxs, gds, num_experts, max_tokens):
    """Gradient of ``low_latency_dispatch(x, idx).recv_x`` (BF16) for the
    cotangents ``gds`` (float [E/R, R*M, H] per rank): per rank float64
    [T, H], each token's sum of the cotangent rows its messages were packed
    into (one per distinct expert it names)."""
    r = len(idxs)
    le = num_experts // r
    h = gds[0].shape[-1]
    fake = [np.zeros((idx.shape[0], 1), np.float32) for idx in idxs]
    src = [d["src"] for d in ll_dispatch(fake, idxs, num_experts, max_tokens)]
    out = [np.zeros((idx.shape[0], h)) for idx in idxs]
    for d in range(r):
        for loc in range(le):
            for j in np.nonzero(src[d][loc, :, 0] >= 0)[0]:
                out[src[d][loc, j, 0]][src[d][loc, j, 1]] += np.asarray(gds[d][loc, j], np.float64)
    return out
