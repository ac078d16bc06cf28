"""Nodes, virtual nodes and per-peer transports (jax_ep.topology), on CPU."""

import re
from pathlib import Path

import numpy as np
import pytest

import jax_ep
from jax_ep import topology as topo
from conftest import run_ranks, random_routing
from fake_kv import FakeKV, run_threads

ROOT = Path(__file__).resolve().parents[1]


def test_flat_is_one_node_of_pointers():
    t = topo.make_topology(8, environ={})
    assert t.single_node and t.num_nodes == 1 and t.ranks_per_node == 8 and not t.virtual
    assert t.peer_path_names(3) == ("pointer",) * 8
    assert t.rail_peers(5) == (5,)


@pytest.mark.parametrize("r,rpn", [(8, 4), (8, 2), (8, 1), (2, 1), (4, 2)])
def test_virtual_nodes_rail_aligned(r, rpn):
    t = topo.make_topology(r, rpn, environ={})
    assert t.num_nodes == r // rpn and t.virtual == (rpn != r)
    for rank in range(r):
        node, local = t.node_of(rank), t.local_of(rank)
        assert (node, local) == divmod(rank, rpn) and t.rank_of(node, local) == rank
        assert rank in t.node_ranks(node)
        assert t.rail_peers(rank) == tuple(n * rpn + local for n in range(r // rpn))
        paths = t.peer_paths(rank)
        assert paths.dtype == np.uint8 and paths.shape == (r,)
        want = [topo.PATH_POINTER if p // rpn == node else topo.PATH_PUT for p in range(r)]
        np.testing.assert_array_equal(paths, want)
        assert paths[rank] == topo.PATH_POINTER


def test_example_2x4_table():
    t = topo.make_topology(8, 4, environ={})
    assert t.peer_path_names(5) == ("put",) * 4 + ("pointer",) * 4
    assert t.rail_peers(6) == (2, 6)
    assert t.describe() == "2 virtual nodes of 4 ranks (R = 8)"
    assert topo.make_topology(2, 1, environ={}).describe() == "2 virtual nodes of 1 rank (R = 2)"


def test_env_var_and_argument():
    assert topo.make_topology(8, environ={topo.RANKS_PER_NODE_ENV: "2"}).ranks_per_node == 2
    assert topo.make_topology(8, 4, environ={topo.RANKS_PER_NODE_ENV: "2"}).ranks_per_node == 4  # argument wins
    assert topo.make_topology(8, environ={topo.RANKS_PER_NODE_ENV: " "}).ranks_per_node == 8
    for bad in ("x", "0", "-2", "1.5"):
        with pytest.raises(ValueError, match=r"JAX_EP_RANKS_PER_NODE=.*positive int"):
            topo.make_topology(8, environ={topo.RANKS_PER_NODE_ENV: bad})


def test_not_divisible_names_what_works():
    with pytest.raises(ValueError, match=r"ranks_per_node=3 does not divide the 8 EP ranks.*\[1, 2, 4, 8\]"):
        topo.make_topology(8, 3, environ={})
    with pytest.raises(ValueError, match=r"JAX_EP_RANKS_PER_NODE: ranks_per_node=3"):
        topo.make_topology(4, environ={topo.RANKS_PER_NODE_ENV: "3"})
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="ranks_per_node must be a positive int"):
            topo.make_topology(8, bad, environ={})
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 8\)"):
        topo.make_topology(8, 4, environ={}).node_of(8)


def test_hosts_make_nodes():
    t = topo.make_topology(4, hosts=["a", "a", "b", "b"], environ={})
    assert t.num_nodes == 2 and t.ranks_per_node == 2 and not t.virtual
    assert t.peer_path_names(0) == ("pointer", "pointer", "put", "put")
    v = topo.make_topology(8, 2, hosts=["a"] * 4 + ["b"] * 4, environ={})
    assert v.num_nodes == 4 and v.virtual
    same = topo.make_topology(8, 4, hosts=["a"] * 4 + ["b"] * 4, environ={})
    assert same.num_nodes == 2 and not same.virtual


@pytest.mark.parametrize("hosts", [["a", "b", "a", "b"], ["a", "a", "a", "b"], ["a", "b", "b", "a"]])
def test_hosts_not_rail_aligned(hosts):
    with pytest.raises(ValueError, match=r"same number of ranks on every host, consecutive.*distribution=block"):
        topo.make_topology(4, hosts=hosts, environ={})


def test_virtual_nodes_must_fit_in_hosts():
    with pytest.raises(ValueError, match=r"virtual nodes must fit inside hosts, which hold 4 ranks"):
        topo.make_topology(8, 8, hosts=["a"] * 4 + ["b"] * 4, environ={})
    with pytest.raises(ValueError, match="hosts has 3 entries for 4 ranks"):
        topo.make_topology(4, hosts=["a"] * 3, environ={})


def test_exchange_hostnames_over_kv():
    kv, r = FakeKV(), 4
    names = ["n0", "n0", "n1", "n1"]
    got = run_threads(r, lambda i: topo.exchange_hostnames(kv, i, r, timeout_s=10, hostname=names[i], seq=7))
    assert got == {i: tuple(names) for i in range(r)}
    assert topo.make_topology(r, hosts=got[0], environ={}).num_nodes == 2


def test_exchange_names_the_missing_rank():
    kv = FakeKV()
    kv.key_value_set("jax_ep/topology/3/host/1", "n0")
    with pytest.raises(TimeoutError, match=r"rank 0 waited 0 s for rank 2's host name"):
        topo.exchange_hostnames(kv, 0, 3, timeout_s=0.05, hostname="n0", seq=3)


def test_path_codes_match_the_kernel_header():
    text = (ROOT / "cuda" / "transport.cuh").read_text()
    assert int(re.search(r"kPointer\s*=\s*(\d+)", text).group(1)) == topo.PATH_POINTER
    assert int(re.search(r"kPut\s*=\s*(\d+)", text).group(1)) == topo.PATH_PUT


# --- Buffer ---------------------------------------------------------------------------

R, T, K, E, H = 8, 6, 3, 16, 128


def test_buffer_ranks_per_node_validated():
    with pytest.raises(ValueError, match="ranks_per_node must be a positive int"):
        jax_ep.Buffer(num_experts=E, ranks_per_node=0)
    buf = jax_ep.Buffer(num_experts=E, ranks_per_node=2)
    assert buf.topology is None  # xla backend: R is the EP axis size
    t = buf.topology_for(8)
    assert (t.num_nodes, t.ranks_per_node, t.virtual) == (4, 2, True)
    with pytest.raises(ValueError, match=r"ranks_per_node=2 does not divide the 3 EP ranks"):
        buf.topology_for(3)


def test_buffer_env_var(monkeypatch):
    monkeypatch.setenv(topo.RANKS_PER_NODE_ENV, "4")
    assert jax_ep.Buffer(num_experts=E).topology_for(8).ranks_per_node == 4
    monkeypatch.setenv(topo.RANKS_PER_NODE_ENV, "nope")
    with pytest.raises(ValueError, match="JAX_EP_RANKS_PER_NODE='nope'"):
        jax_ep.Buffer(num_experts=E)


def test_buffer_checks_ranks_per_node_at_trace(rng):
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    idxs = random_routing(rng, R, T, K, E)
    buf = jax_ep.Buffer(num_experts=E, ranks_per_node=3,
                        low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=T))
    with pytest.raises(ValueError, match=r"ranks_per_node=3 does not divide the 8 EP ranks"):
        run_ranks(lambda x, i: buf.low_latency_dispatch(x, i).recv_count, R, xs, idxs)


def test_virtual_nodes_change_nothing_on_xla(rng):
    """The xla backend has no transports: virtual nodes give the flat results, bit for bit."""
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    idxs = random_routing(rng, R, T, K, E)
    ws = [rng.random((T, K)).astype(np.float32) for _ in range(R)]
    outs = []
    for rpn in (None, 4, 1):
        buf = jax_ep.Buffer(num_experts=E, ranks_per_node=rpn,
                            low_latency=jax_ep.LowLatencyOptions(num_max_dispatch_tokens_per_rank=T))

        def f(x, i, w, buf=buf):
            o = buf.low_latency_dispatch(x, i)
            d = buf.dispatch(x, i, w)
            return o.recv_x, o.recv_count, buf.low_latency_combine(o.recv_x, w, o.handle), d.recv_x

        outs.append([np.asarray(a) for a in run_ranks(f, R, xs, idxs, ws)])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)


def test_cuda_buffer_across_nodes_needs_the_put_path():
    """Across (virtual) nodes a CUDA low-latency Buffer runs over NVSHMEM puts
    (ll_transport='nvshmem'): other transports are refused with what would
    work (FP8 combine rows and gradients run over puts: tests/test_ll_put_ops.py;
    internode normal mode's limits: tests/test_internode_ops.py)."""
    opts = jax_ep.LowLatencyOptions(backend="cuda", num_max_dispatch_tokens_per_rank=8)
    with pytest.raises(NotImplementedError, match=r"low_latency.backend='cuda' with 4 virtual nodes of 2 ranks "
                                                  r"\(R = 8\) needs ll_transport='nvshmem'.*got ll_transport='ipc'"):
        jax_ep.Buffer(num_experts=E, ranks_per_node=2, low_latency=opts, num_ll_bytes=1 << 20)


def test_discover_over_jax_distributed(tmp_path):
    """Two CPU processes under jax_ep.launch exchange their host names over
    the real jax.distributed key-value store."""
    from test_launch import Launcher, _lines

    lau = Launcher(tmp_path)
    script = lau.script("""
        import jax_ep.launch as L
        L.initialize_distributed(timeout_s=40)
        import socket
        from jax_ep import topology
        flat = topology.discover()
        virtual = topology.discover(ranks_per_node=1)
        assert flat.hosts == (socket.gethostname(),) * 2, flat
        print("TOPO", flat.num_nodes, flat.virtual, virtual.num_nodes, virtual.virtual,
              virtual.peer_path_names(rank))
    """)
    try:
        rc, out, _ = lau.run("-n", 2, "--gpus", 0, "--timeout", 45, script)
    finally:
        lau.cleanup()
    assert rc == 0, out
    assert "TOPO 1 False 2 True ('pointer', 'put')" in _lines(out, 0), out
    assert "TOPO 1 False 2 True ('put', 'pointer')" in _lines(out, 1), out
