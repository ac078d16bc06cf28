"""Which node each EP rank is on, and how a rank reaches each peer.

A *node* is a group of ranks that reach each other's memory through a pointer
(NVLink or PCIe peer mapping, CUDA IPC between processes). Between nodes a
rank can only write a peer's memory with NVSHMEM puts (RDMA). The nodes come
from the hosts the JAX processes run on (exchanged over the
``jax.distributed`` key-value store), or are forced smaller with the
virtual-node option: ``Buffer(ranks_per_node=...)`` or the environment
variable ``JAX_EP_RANKS_PER_NODE`` (the argument wins). Virtual nodes let one
host test the put path: peers in another virtual node use puts even though a
pointer to them exists.

Ranks are laid out *rail-aligned*, as DeepEP's internode kernels assume:
every node holds the same number of ranks, consecutive in rank order, so
rank = node * ranks_per_node + local. ``node`` is what DeepEP calls the RDMA
rank and ``local`` the NVL rank; RDMA traffic between nodes flows between
ranks of the same local index (a *rail*).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket

import numpy as np

__all__ = [
    "RANKS_PER_NODE_ENV", "PATH_POINTER", "check_ranks_per_node", "PATH_PUT", "Topology", "make_topology", "ranks_per_node_from_env",
    "exchange_hostnames", "discover",
]

RANKS_PER_NODE_ENV = "JAX_EP_RANKS_PER_NODE"

# How a rank reaches a peer; the codes of cuda/transport.cuh's PeerPath.
PATH_POINTER = 0  # plain stores/loads through a mapped pointer (itself, NVLink, IPC)
PATH_PUT = 1      # NVSHMEM device puts (a peer in another node, real or virtual)
_PATH_NAMES = {PATH_POINTER: "pointer", PATH_PUT: "put"}

_exchange_counter = itertools.count()  # host exchanges happen in the same order on every rank


@dataclasses.dataclass(frozen=True)
class Topology:
    """Ranks grouped into nodes of ``ranks_per_node`` consecutive ranks.

    Attributes:
      num_ranks: ``R``, the EP ranks.
      ranks_per_node: ranks in each node (``R`` for a single node).
      hosts: per rank, the host it runs on (``None`` when unknown, e.g. ranks
        of a mesh axis in one process).
      virtual: whether the nodes were forced smaller than the hosts
        (``ranks_per_node`` argument or ``JAX_EP_RANKS_PER_NODE``).
    """

    num_ranks: int
    ranks_per_node: int
    hosts: tuple | None = None
    virtual: bool = False

    def __post_init__(self):
        _check_count("num_ranks", self.num_ranks)
        _check_count("ranks_per_node", self.ranks_per_node)
        if self.num_ranks % self.ranks_per_node:
            raise ValueError(_not_divisible(self.ranks_per_node, self.num_ranks))
        if self.hosts is not None and len(self.hosts) != self.num_ranks:
            raise ValueError(f"hosts has {len(self.hosts)} entries for {self.num_ranks} ranks")

    @property
    def num_nodes(self) -> int:
        """Nodes (DeepEP's number of RDMA ranks)."""
        return self.num_ranks // self.ranks_per_node

    @property
    def single_node(self) -> bool:
        """True when every rank reaches every other through a pointer."""
        return self.num_nodes == 1

    def _check_rank(self, rank: int) -> int:
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank must be an int in [0, {self.num_ranks}), got {rank!r}")
        return int(rank)

    def node_of(self, rank: int) -> int:
        """The node of ``rank`` (DeepEP's RDMA rank)."""
        return self._check_rank(rank) // self.ranks_per_node

    def local_of(self, rank: int) -> int:
        """``rank``'s index in its node (DeepEP's NVL rank; its rail)."""
        return self._check_rank(rank) % self.ranks_per_node

    def rank_of(self, node: int, local: int) -> int:
        """The rank at (``node``, ``local``)."""
        if not 0 <= node < self.num_nodes or not 0 <= local < self.ranks_per_node:
            raise ValueError(f"no rank at node {node}, local index {local} "
                             f"({self.num_nodes} nodes of {self.ranks_per_node} ranks)")
        return node * self.ranks_per_node + local

    def same_node(self, a: int, b: int) -> bool:
        return self.node_of(a) == self.node_of(b)

    def node_ranks(self, node: int) -> tuple:
        """The ranks of ``node``, in order."""
        return tuple(self.rank_of(node, i) for i in range(self.ranks_per_node))

    def rail_peers(self, rank: int) -> tuple:
        """The ranks with ``rank``'s local index, one per node (``rank`` included):
        the peers its RDMA traffic goes to in the rail-aligned internode mode."""
        local = self.local_of(rank)
        return tuple(self.rank_of(n, local) for n in range(self.num_nodes))

    def peer_paths(self, rank: int) -> np.ndarray:
        """``uint8 [R]``: how ``rank`` reaches each peer, ``PATH_POINTER`` inside
        its node (itself included), ``PATH_PUT`` in another. The table the
        kernels choose their transport from (cuda/transport.cuh)."""
        node = self.node_of(rank)
        nodes = np.arange(self.num_ranks) // self.ranks_per_node
        return np.where(nodes == node, PATH_POINTER, PATH_PUT).astype(np.uint8)

    def peer_path_names(self, rank: int) -> tuple:
        """``peer_paths`` as names: ``("pointer", ..., "put", ...)``."""
        return tuple(_PATH_NAMES[int(p)] for p in self.peer_paths(rank))

    def describe(self) -> str:
        kind = ("virtual node" if self.virtual else "node") + ("s" if self.num_nodes != 1 else "")
        ranks = "rank" if self.ranks_per_node == 1 else "ranks"
        return f"{self.num_nodes} {kind} of {self.ranks_per_node} {ranks} (R = {self.num_ranks})"


def _check_count(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_ranks_per_node(value) -> int:
    """``value`` as ranks per node: a positive int, else a ValueError."""
    _check_count("ranks_per_node", value)
    return int(value)


def _not_divisible(ranks_per_node: int, num_ranks: int) -> str:
    fits = [d for d in range(1, num_ranks + 1) if num_ranks % d == 0]
    return (f"ranks_per_node={ranks_per_node} does not divide the {num_ranks} EP ranks into whole nodes: "
            f"use one of {fits}")


def ranks_per_node_from_env(environ=None) -> int | None:
    """``JAX_EP_RANKS_PER_NODE`` as a positive int, or None when unset or empty."""
    environ = os.environ if environ is None else environ
    raw = environ.get(RANKS_PER_NODE_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{RANKS_PER_NODE_ENV}={raw!r}: must be a positive int (ranks in each virtual node)")
    return value


def _host_nodes(hosts) -> int:
    """Ranks per host of a rail-aligned job (every host the same number of
    consecutive ranks), or a ValueError saying how the ranks are laid out."""
    hosts = tuple(hosts)
    order = list(dict.fromkeys(hosts))
    counts = {h: hosts.count(h) for h in order}
    size = counts[order[0]]
    blocks = [hosts[i:i + size] for i in range(0, len(hosts), size)]
    if len(set(counts.values())) != 1 or any(len(set(b)) != 1 for b in blocks) or len(blocks) != len(order):
        layout = ", ".join(f"{h}: ranks {[r for r, x in enumerate(hosts) if x == h]}" for h in order)
        raise ValueError(
            "jax_ep needs the same number of ranks on every host, consecutive in rank order "
            f"(rank = node * ranks_per_node + local); got {layout}. Start one process per GPU with "
            "consecutive process ids on each host (SLURM: --distribution=block)"
        )
    return size


def make_topology(num_ranks: int, ranks_per_node: int | None = None, hosts=None, environ=None) -> Topology:
    """The topology of ``num_ranks`` ranks.

    Args:
      num_ranks: ``R``.
      ranks_per_node: force virtual nodes of this many ranks; None reads
        ``JAX_EP_RANKS_PER_NODE``, and when that is unset the nodes are the
        hosts (one node when ``hosts`` is None).
      hosts: per rank, the name of its host, or None (one host).
      environ: the environment to read (default ``os.environ``).

    Virtual nodes must fit inside hosts: a pointer exists only between ranks of
    one host, so ``ranks_per_node`` must divide the ranks of each host.
    """
    _check_count("num_ranks", num_ranks)
    if ranks_per_node is None:
        ranks_per_node = ranks_per_node_from_env(environ)
        source = RANKS_PER_NODE_ENV
    else:
        ranks_per_node = check_ranks_per_node(ranks_per_node)
        source = "ranks_per_node"
    if hosts is not None and len(hosts) != num_ranks:
        raise ValueError(f"hosts has {len(hosts)} entries for {num_ranks} ranks")
    host_size = num_ranks if hosts is None else _host_nodes(hosts)
    if ranks_per_node is None:
        return Topology(num_ranks, host_size, tuple(hosts) if hosts is not None else None, virtual=False)
    if num_ranks % ranks_per_node:
        raise ValueError(f"{source}: " + _not_divisible(ranks_per_node, num_ranks))
    if host_size % ranks_per_node:
        raise ValueError(
            f"{source}={ranks_per_node}: virtual nodes must fit inside hosts, which hold {host_size} ranks each; "
            f"use a divisor of {host_size}"
        )
    return Topology(num_ranks, int(ranks_per_node), tuple(hosts) if hosts is not None else None,
                    virtual=ranks_per_node != host_size)


def exchange_hostnames(client, rank: int, num_ranks: int, *, timeout_s: float = 120.0, hostname: str | None = None,
                       seq: int | None = None) -> tuple:
    """Every rank's host name, through a ``jax.distributed`` key-value client
    (``key_value_set``, ``blocking_key_value_get``). Collective: every rank
    calls it, in the same order as its other exchanges."""
    seq = next(_exchange_counter) if seq is None else seq
    prefix = f"jax_ep/topology/{seq}/host"
    mine = hostname or socket.gethostname()
    client.key_value_set(f"{prefix}/{rank}", mine)
    hosts = []
    for peer in range(num_ranks):
        if peer == rank:
            hosts.append(mine)
            continue
        try:
            hosts.append(str(client.blocking_key_value_get(f"{prefix}/{peer}", int(timeout_s * 1000))))
        except Exception as e:  # the client raises a generic error on deadline
            raise TimeoutError(
                f"jax_ep: rank {rank} waited {timeout_s:.0f} s for rank {peer}'s host name; every rank must "
                f"create the same jax_ep.Buffer objects in the same order"
            ) from e
    return tuple(hosts)


def discover(ranks_per_node: int | None = None, *, num_ranks: int | None = None, timeout_s: float = 120.0) -> Topology:
    """The topology of the ranks of this job: the JAX processes (one rank per
    process, hosts exchanged over ``jax.distributed``), or, when one process
    drives several devices, its devices (one host). ``num_ranks`` overrides
    the rank count (ranks of a mesh axis in one process)."""
    import jax

    if jax.process_count() > 1:
        from jax_ep.runtime import _kv_client

        r = jax.process_count()
        if num_ranks is not None and num_ranks != r:
            raise ValueError(f"num_ranks={num_ranks} but there are {r} JAX processes (one EP rank per process)")
        hosts = exchange_hostnames(_kv_client(), jax.process_index(), r, timeout_s=timeout_s)
        return make_topology(r, ranks_per_node, hosts)
    r = num_ranks if num_ranks is not None else len(jax.devices())
    return make_topology(r, ranks_per_node, (socket.gethostname(),) * r)
