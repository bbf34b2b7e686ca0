"""The computational graph that ACDC prunes (Conmy et al. 2023); names as in docs/architecture.md.

A transformer's residual stream is a sum of the outputs of everything that ran before. ACDC
treats each term of that sum as a separate wire from a *source* (the embedding, one attention
head, one MLP) to a *destination* (an input that reads the stream), so that each wire can be
cut on its own. Heads read the stream three times, through their query, key and value inputs,
and those are three destinations: a head that only uses an earlier head to decide *where* to
attend (its key) is a different circuit from one that copies it (its value).

Names (used in traces, hover texts, the CLI and tests):

- sources: ``Embed``, ``A{l}.{h}`` (head output), ``MLP{l}`` (MLP output); with sandwich norms
  (Gemma 2: the layer's summed attention output is normed before the residual add, so no single
  head's output is added to the stream) the layer's normed attention output ``A{l}`` instead of
  its heads;
- destinations: ``A{l}.{h}.q|k|v``, ``MLP{l}`` (MLP input), ``Out`` (final residual stream);
  with grouped- or multi-query attention the key and value inputs belong to the KV group that
  query heads share: ``A{l}.kv{g}.k|v`` (group g serves heads g*r .. g*r + r - 1, r = n_heads /
  n_kv_heads), while queries stay ``A{l}.{h}.q``;
- edges: ``{src}->{dest}``, plus ``@{position}`` when the graph is split by token position.

The visit order (``CircuitGraph.edges``) is the order in which ACDC tests the edges. It is
deterministic and goes from the output towards the input, which is what makes each test cost
one partial forward pass (nothing below the destination under test has been changed yet):

1. destinations: ``Out``; then for each layer from last to first, ``MLP{l}``, then the heads
   from last to first, each with its ``q``, ``k`` and ``v`` inputs (grouped-query: the KV groups
   from last to first, each with its heads' ``q`` inputs, last head first, then its ``k``, ``v``);
2. for each destination, its sources from latest to earliest: in the same layer the MLP before
   the heads, heads from high to low, ``Embed`` last;
3. with positions, each (source, destination) pair at positions from last to first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import networkx as nx

SourceKind = Literal["embed", "head", "attn", "mlp"]
DestKind = Literal["q", "k", "v", "mlp", "out"]
NodeKind = Literal["embed", "head", "attn", "mlp", "out"]
GraphShape = tuple[int, int, bool, int | None, bool, int, bool]
"""``(n_layers, n_heads, attn_only, n_positions, parallel, n_kv_heads, sandwich)``: what
determines a ``CircuitGraph``."""
QKV: tuple[DestKind, DestKind, DestKind] = ("q", "k", "v")


@dataclass(frozen=True)
class Source:
    """Something that writes to the residual stream.

    ``index`` is its place in forward order (``Embed`` is 0, then each layer's heads, or its
    normed attention output ``A{l}`` with sandwich norms, then its MLP); the engine uses it to
    index stacked activations. ``Embed`` has layer -1.
    """

    name: str
    kind: SourceKind
    layer: int
    head: int | None
    index: int


@dataclass(frozen=True)
class Destination:
    """Something that reads the residual stream. ``Out`` has layer ``n_layers``.

    ``node`` is the drawn node it belongs to: ``A{l}.{h}`` for a head's q/k/v input; a KV group's
    key or value input (``A{l}.kv{g}.k``, ``head`` None, ``group`` g) belongs to no single head:
    its node is the group's ``A{l}.kv{g}``, and ``heads`` are the query heads that read it.
    """

    name: str
    kind: DestKind
    layer: int
    head: int | None
    node: str
    group: int | None = None
    heads: tuple[int, ...] = ()


@dataclass(frozen=True)
class Edge:
    """One wire from a source to a destination, optionally at one token position."""

    src: Source
    dest: Destination
    position: int | None = None

    @property
    def name(self) -> str:
        base = f"{self.src.name}->{self.dest.name}"
        return base if self.position is None else f"{base}@{self.position}"


@dataclass(frozen=True)
class Node:
    """A drawn node: ``Embed``, ``A{l}.{h}``, ``MLP{l}`` or ``Out``, at a position or not.

    ``layer`` is -1 for ``Embed`` and ``n_layers`` for ``Out``.
    """

    name: str
    kind: NodeKind
    layer: int
    head: int | None
    position: int | None

    @property
    def key(self) -> str:
        return node_key(self.name, self.position)


def node_key(name: str, position: int | None) -> str:
    """The key of a drawn node or port at a position: ``A1.2``, or ``A1.2@5`` when split."""
    return name if position is None else f"{name}@{position}"


def _feeds(src: Source, dest: Destination, parallel: bool = False) -> bool:
    """Whether ``src`` is computed before ``dest`` reads the stream. In a parallel block the MLP
    reads the block's input, as its attention does, so no head of its layer feeds it."""
    if src.layer < dest.layer:
        return True
    return (not parallel and src.layer == dest.layer and src.kind in ("head", "attn")
            and dest.kind == "mlp")


def kv_node(layer: int, group: int) -> str:
    """The name of a KV group's key/value node: ``A{layer}.kv{group}``."""
    return f"A{layer}.kv{group}"


class CircuitGraph:
    """All edges of a model's computational graph, in ACDC's visit order.

    Args:
        n_layers: number of transformer blocks.
        n_heads: attention heads per block.
        attn_only: the blocks have no MLP.
        n_positions: split every edge by token position (prompts must all have this length);
            ``None`` for one edge over all positions.
        parallel: the blocks are parallel (attention and MLP read the same stream, GPT-NeoX,
            Phi): ``MLP{l}`` receives no edge from ``A{l}.*``. The visit order is unchanged.
        n_kv_heads: key/value heads per block when fewer than ``n_heads`` (grouped- or
            multi-query attention): the k and v destinations are then per KV group,
            ``A{l}.kv{g}.k|v``. ``None`` (or ``n_heads``): every head has its own.
        sandwich: the summed attention output is normed before the residual add (Gemma 2's
            sandwich norms): each layer's attention is one source, ``A{l}``, drawn as a node
            that its heads feed; the heads stay destinations (their q/k/v inputs).
    """

    def __init__(
        self, n_layers: int, n_heads: int, *, attn_only: bool = False,
        n_positions: int | None = None, parallel: bool = False, n_kv_heads: int | None = None,
        sandwich: bool = False,
    ) -> None:
        """Build the sources and destinations; the edges follow lazily (``edges``)."""
        if n_layers < 1 or n_heads < 1:
            raise ValueError(f"a graph needs at least one layer and one head, got {n_layers=}, "
                             f"{n_heads=}")
        if n_positions is not None and n_positions < 1:
            raise ValueError(f"n_positions must be positive or None, got {n_positions}")
        n_kv = n_heads if n_kv_heads is None else int(n_kv_heads)
        if n_kv < 1 or n_heads % n_kv:
            raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads "
                             "(n_kv_heads must divide n_heads)")
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.attn_only = attn_only
        self.n_positions = n_positions
        self.parallel = bool(parallel) and not attn_only
        self.n_kv_heads = n_kv
        self.sandwich = bool(sandwich)
        group_size = n_heads // n_kv

        sources: list[Source] = [Source("Embed", "embed", -1, None, 0)]
        for layer in range(n_layers):
            if self.sandwich:
                sources.append(Source(f"A{layer}", "attn", layer, None, len(sources)))
            for head in range(0 if self.sandwich else n_heads):
                sources.append(Source(f"A{layer}.{head}", "head", layer, head, len(sources)))
            if not attn_only:
                sources.append(Source(f"MLP{layer}", "mlp", layer, None, len(sources)))
        self.sources: tuple[Source, ...] = tuple(sources)

        dests: list[Destination] = [Destination("Out", "out", n_layers, None, "Out")]
        for layer in reversed(range(n_layers)):
            if not attn_only:
                dests.append(Destination(f"MLP{layer}", "mlp", layer, None, f"MLP{layer}"))
            if not self.grouped:
                for head in reversed(range(n_heads)):
                    node = f"A{layer}.{head}"
                    dests.extend(Destination(f"{node}.{k}", k, layer, head, node, None, (head,))
                                 for k in QKV)
                continue
            for group in reversed(range(n_kv)):
                heads = tuple(range(group * group_size, (group + 1) * group_size))
                dests.extend(Destination(f"A{layer}.{h}.q", "q", layer, h, f"A{layer}.{h}", group,
                                         (h,)) for h in reversed(heads))
                node = kv_node(layer, group)
                dests.extend(Destination(f"{node}.{k}", k, layer, None, node, group, heads)
                             for k in ("k", "v"))
        self.destinations: tuple[Destination, ...] = tuple(dests)

    @property
    def grouped(self) -> bool:
        """Whether key and value inputs are per KV group (fewer KV heads than query heads)."""
        return self.n_kv_heads < self.n_heads

    @classmethod
    def from_config(cls, cfg: Any, *, n_positions: int | None = None) -> CircuitGraph:
        """Build from a TransformerLens config (``model.cfg``); no weights are needed.

        ``parallel`` follows ``cfg.parallel_attn_mlp`` (a TransformerLens 4 bridge of a parallel
        family may leave it unset: build from ``TransformerWeights.parallel`` then)."""
        n_kv = getattr(cfg, "n_key_value_heads", None)
        return cls(cfg.n_layers, cfg.n_heads, attn_only=bool(getattr(cfg, "attn_only", False)),
                   n_positions=n_positions,
                   parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
                   n_kv_heads=int(n_kv) if n_kv else None,
                   sandwich=bool(getattr(cfg, "use_normalization_before_and_after", False)))

    @classmethod
    def from_shape(cls, shape: GraphShape) -> CircuitGraph:
        """The graph of a ``CircuitGraph.shape`` (caches key on the shape, not on a graph)."""
        n_layers, n_heads, attn_only, n_positions, parallel, n_kv_heads, sandwich = shape
        return cls(n_layers, n_heads, attn_only=attn_only, n_positions=n_positions,
                   parallel=parallel, n_kv_heads=n_kv_heads, sandwich=sandwich)

    def sources_of(self, dest: Destination) -> list[Source]:
        """The sources that feed ``dest``, latest first (the visit order)."""
        return [s for s in reversed(self.sources) if _feeds(s, dest, self.parallel)]

    @cached_property
    def edges(self) -> tuple[Edge, ...]:
        """Every edge, in the visit order."""
        positions: list[int | None] = (
            [None] if self.n_positions is None else list(reversed(range(self.n_positions)))
        )
        return tuple(
            Edge(src, dest, pos)
            for dest in self.destinations
            for src in self.sources_of(dest)
            for pos in positions
        )

    @cached_property
    def edge_index(self) -> dict[str, int]:
        """Edge name to its place in the visit order."""
        return {e.name: i for i, e in enumerate(self.edges)}

    def edge(self, name: str) -> Edge:
        try:
            return self.edges[self.edge_index[name]]
        except KeyError:
            raise KeyError(f"no edge named {name!r} in this graph ({len(self.edges)} edges, "
                           f"for example {self.edges[0].name!r})") from None

    @cached_property
    def nodes(self) -> tuple[Node, ...]:
        """The drawn nodes, bottom to top (Embed, then per layer heads, the normed attention
        output with sandwich norms, and MLP, then Out)."""
        positions: list[int | None] = (
            [None] if self.n_positions is None else list(range(self.n_positions))
        )
        kinds: list[tuple[str, NodeKind, int, int | None]] = []
        for s in self.sources:
            if s.kind == "attn":        # its heads are drawn (they are destinations) below it
                kinds.extend((f"A{s.layer}.{h}", "head", s.layer, h) for h in range(self.n_heads))
            kinds.append((s.name, s.kind, s.layer, s.head))
        kinds.append(("Out", "out", self.n_layers, None))
        return tuple(Node(n, k, lay, h, p) for (n, k, lay, h) in kinds for p in positions)

    def to_networkx(self) -> nx.MultiDiGraph:
        """A ``networkx.MultiDiGraph`` of the drawn nodes.

        Node keys are ``Node.key`` (``A1.2`` or ``A1.2@5``) with attributes ``kind``, ``layer``,
        ``head`` and ``position``; each graph edge is keyed by the ACDC edge name and carries
        ``port`` (``q``/``k``/``v``/``mlp``/``out``) and ``order`` (its place in the visit order);
        with sandwich norms, ``head_links`` are edges too, with ``port`` ``link`` and ``order``
        None.
        Parallel edges exist because a head is read through three ports. An edge into a KV group's
        key or value input (grouped-query attention) appears once per query head that reads it,
        each copy with the same key and ``group`` set.
        """
        import networkx as nx

        g = nx.MultiDiGraph()
        for n in self.nodes:
            g.add_node(n.key, name=n.name, kind=n.kind, layer=n.layer, head=n.head,
                       position=n.position)
        for i, e in enumerate(self.edges):
            for node in self.reading_nodes(e.dest):
                g.add_edge(node_key(e.src.name, e.position), node_key(node, e.position),
                           key=e.name, port=e.dest.kind, order=i, group=e.dest.group)
        for head, output in self.head_links():
            g.add_edge(head, output, key=f"{head}=>{output}", port="link", order=None,
                       group=None)
        return g

    def head_links(self) -> list[tuple[str, str]]:
        """With sandwich norms, the fixed links (node keys) from each head to its layer's normed
        attention output, which ACDC never tests; empty otherwise."""
        if not self.sandwich:
            return []
        positions: list[int | None] = (
            [None] if self.n_positions is None else list(range(self.n_positions)))
        return [(node_key(f"A{layer}.{h}", p), node_key(f"A{layer}", p))
                for layer in range(self.n_layers) for h in range(self.n_heads) for p in positions]

    def reading_nodes(self, dest: Destination) -> tuple[str, ...]:
        """The drawn nodes whose computation reads ``dest``: its node, or for a KV group's key or
        value input every query head of the group."""
        if dest.head is None and dest.group is not None:
            return tuple(f"A{dest.layer}.{h}" for h in dest.heads)
        return (dest.node,)

    @property
    def shape(self) -> GraphShape:
        """What determines the graph completely: layers, heads, attention-only, positions,
        parallel blocks, key/value heads, sandwich norms."""
        return (self.n_layers, self.n_heads, bool(self.attn_only), self.n_positions,
                self.parallel, self.n_kv_heads, self.sandwich)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CircuitGraph):
            return NotImplemented
        return self.shape == other.shape

    def __hash__(self) -> int:
        return hash(self.shape)

    def __len__(self) -> int:
        return len(self.edges)

    def __repr__(self) -> str:
        pos = "" if self.n_positions is None else f", n_positions={self.n_positions}"
        mlp = ", attn_only=True" if self.attn_only else ""
        mlp += ", parallel=True" if self.parallel else ""
        mlp += f", n_kv_heads={self.n_kv_heads}" if self.grouped else ""
        mlp += ", sandwich=True" if self.sandwich else ""
        return (f"CircuitGraph(n_layers={self.n_layers}, n_heads={self.n_heads}{mlp}{pos}; "
                f"{len(self)} edges)")
