"""Plain-numpy restatement of the internode routing (docs/internode.md), with
loops, independent of ``jax_ep.internode_plan``."""

from __future__ import annotations

import numpy as np

import np_reference as npr


def node_routing(idx, num_experts, num_nodes, ranks_per_node):
    """One rank's tokens -> dict(in_node [T, N], nvl_mask [T, N], send_pos [T, N], per_node [N])."""
    t = idx.shape[0]
    r = num_nodes * ranks_per_node
    in_node = np.zeros((t, num_nodes), bool)
    mask = np.zeros((t, num_nodes), np.int32)
    send_pos = np.full((t, num_nodes), -1, np.int32)
    per_node = np.zeros(num_nodes, np.int32)
    for i in range(t):
        for e in npr.token_experts(idx[i], num_experts):
            dst = npr.owner_and_local(e, num_experts, r)[0]
            m, j = divmod(dst, ranks_per_node)
            in_node[i, m] = True
            mask[i, m] |= 1 << j
        for m in range(num_nodes):
            if in_node[i, m]:
                send_pos[i, m] = per_node[m]
                per_node[m] += 1
    return dict(in_node=in_node, nvl_mask=mask, send_pos=send_pos, per_node=per_node)


def forwarder_tables(idxs, num_experts, ranks_per_node, node_capacity):
    """Per forwarder rank: list of (source node, source token, mask) kept in
    table order, and how many arrived. Also the set of (src rank, token, node)
    that were kept."""
    r = len(idxs)
    nn = r // ranks_per_node
    routes = [node_routing(i, num_experts, nn, ranks_per_node) for i in idxs]
    tables, arrived, kept = [], [], set()
    for f in range(r):
        m, l = divmod(f, ranks_per_node)
        rows = []
        for n in range(nn):
            s = n * ranks_per_node + l
            for i in range(idxs[s].shape[0]):
                if routes[s]["in_node"][i, m]:
                    rows.append((n, i, int(routes[s]["nvl_mask"][i, m])))
        arrived.append(len(rows))
        tables.append(rows[:node_capacity])
        for n, i, _ in rows[:node_capacity]:
            kept.add((n * ranks_per_node + l, i, m))
    return tables, arrived, kept


def dispatch(xs, idxs, ws, num_experts, ranks_per_node, capacity, node_capacity, layout="rank_major", alignment=1):
    """Per destination rank, the flat dispatch of the tokens that reached it
    (npr's dict), with num_dropped counting rows lost at a forwarder too."""
    r = len(idxs)
    _, _, kept = forwarder_tables(idxs, num_experts, ranks_per_node, node_capacity)
    out = []
    for m in range(r // ranks_per_node):
        # The slots of node m's experts of a token that did not reach node m are as if masked.
        cut = []
        lost = [0] * r
        for s in range(r):
            ids = idxs[s].copy()
            for i in range(ids.shape[0]):
                if (s, i, m) in kept:
                    continue
                for d in range(m * ranks_per_node, (m + 1) * ranks_per_node):
                    ids_d, _ = npr.local_row(ids[i], ws[s][i], d, num_experts, r)
                    if layout == "rank_major":
                        lost[d] += int((ids_d >= 0).any())
                    else:
                        lost[d] += len(set(int(v) for v in ids_d if v >= 0))
                for k, e in enumerate(ids[i]):
                    if 0 <= e < num_experts and npr.owner_and_local(int(e), num_experts, r)[0] // ranks_per_node == m:
                        ids[i, k] = -1
            cut.append(ids)
        if layout == "rank_major":
            res = npr.dispatch_rank_major(xs, cut, ws, num_experts, capacity)
        else:
            res = npr.dispatch_expert_major(xs, cut, ws, num_experts, capacity, alignment)
        for d in range(m * ranks_per_node, (m + 1) * ranks_per_node):
            res[d]["dropped"] += lost[d]
            out.append(res[d])
    return out


def handle_arrays(idxs, num_experts, ranks_per_node, capacity, node_capacity, refs=None, layout="rank_major",
                  alignment=1):
    """Per rank, the internode handle's arrays with loops: rdma_slot [T, N],
    fwd_src_node / fwd_src_token [Cn], fwd_dst_row [Cn, L] (rank-major) or
    [Cn, L, K] (expert-major: at the first top-k slot naming the row's
    expert), recv_table_row [C] (-1 where none). ``refs``: ``dispatch``'s
    output for the same layout (made here when None)."""
    r = len(idxs)
    el = ranks_per_node
    nn = r // el
    tables, _, _ = forwarder_tables(idxs, num_experts, el, node_capacity)
    if refs is None:
        ws = [np.zeros(i.shape, np.float32) for i in idxs]
        xs = [np.zeros((i.shape[0], 1), np.float32) for i in idxs]
        refs = dispatch(xs, idxs, ws, num_experts, el, capacity, node_capacity, layout, alignment)
    k = idxs[0].shape[1]
    where = []  # per forwarder: (source node, token) -> table row
    for f in range(r):
        where.append({(n, i): row for row, (n, i, _) in enumerate(tables[f])})
    out = []
    for rank in range(r):
        m, l = divmod(rank, el)
        t = idxs[rank].shape[0]
        rdma_slot = np.full((t, nn), -1, np.int32)
        for i in range(t):
            for mm in range(nn):
                rdma_slot[i, mm] = where[mm * el + l].get((m, i), -1)
        fwd_src_node = np.full(node_capacity, -1, np.int32)
        fwd_src_token = np.full(node_capacity, -1, np.int32)
        for row, (n, i, _) in enumerate(tables[rank]):
            fwd_src_node[row], fwd_src_token[row] = n, i
        fwd_dst_row = np.full((node_capacity, el) + ((k,) if layout == "expert_major" else ()), -1, np.int32)
        recv_table_row = np.full(capacity, -1, np.int32)
        out.append(dict(rdma_slot=rdma_slot, fwd_src_node=fwd_src_node, fwd_src_token=fwd_src_token,
                        fwd_dst_row=fwd_dst_row, recv_table_row=recv_table_row))
    for d in range(r):
        m, j = divmod(d, el)
        for o, (s, i) in zip(refs[d]["pos"], refs[d]["src"]):
            f = m * el + s % el
            row = where[f][(s // el, i)]
            out[d]["recv_table_row"][o] = row
            if layout == "expert_major":  # the row's first slot holding its expert
                out[f]["fwd_dst_row"][row, j, int(np.argmax(refs[d]["idx"][o] >= 0))] = o
            else:
                out[f]["fwd_dst_row"][row, j] = o
    return out
