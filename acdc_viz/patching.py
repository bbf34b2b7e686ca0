"""Forward passes of a circuit: the full model with some edges replaced by ablated values.

Removing the edge ``src -> dest`` changes dest's input to

    current input - src's current output + src's ablated output.

So a destination's input is the ordinary residual stream plus a *correction*
``sum over removed sources (ablated - current)``. We keep the removed edges as 0/1 masks
``mask[dest_row, source, position]`` and compute each correction with one matrix product,
only for destinations that have removed edges. Everything else runs as one ordinary batched
forward pass: no per-head hooks on the hot path.

ACDC visits destinations from the output down, so when it tests an edge into a block,
nothing below that block has been changed: a test starts from the cached clean residual stream
at that block. Corrections are split into the part from sources below the starting block
(fixed during a test, cached per destination group) and the part from sources recomputed in
the pass.

**Chains of hypotheses.** ``chain_logits(edges)`` evaluates "the circuit minus edges[0]",
"minus edges[0] and edges[1]", ... in one pass, stacked along the batch dimension
(hypothesis-major: row ``j * batch + b``). Hypothesis j differs from the current circuit by the
first j+1 edges of the chain, which enter the corrections as a cumulative sum over j.

**What differs between hypotheses.** Hypotheses differ only in the chain's edges, so a pass first
computes them per hypothesis only where the chain enters, and then wherever a node *keeps* an
edge from a node that differs. Everything else (in a sparse circuit, nearly all of the layers
above the tested block, often the logits too) is the same for all hypotheses and computed once,
at the batch's size. For that, a pass carries ``base``: the stream with each shared source's
output and each differing source's ablated value. A destination's input is then ``base`` plus its
removed edges from shared sources (as ablated - output), minus its kept edges from differing ones.
When the logits are shared, ``chain_logits`` returns one copy expanded over the hypotheses.

**Causal prefix.** In position mode with a causal model, removing an edge at position p changes
nothing at positions < p. A pass then computes only positions >= the chain's lowest position and
takes the keys and values of the earlier positions (and, for metrics over all positions, their
logits) from a cache of the current circuit. ``accept`` moves an evaluated hypothesis into the
circuit and, lazily, its keys and values into that cache.

**Shortformer positions** (``TransformerWeights.W_pos_qk``) enter q and k after ``ln1``, so
they are a position-dependent bias of q and k (``qkv_biases``); corrections still act on the
stream before ``ln1``, and the positions are no source.

**Rotary embeddings and float32 attention.** A rotary model's q and k are rotated as they are
projected, shared and per-hypothesis rows alike (q from the pass's query position, k from its
first position), so the causal-prefix cache holds rotated keys, as the plain forward pass
records them; values never rotate. Where Hugging Face takes the attention softmax (or, for GPT-J,
the scores) in float32 inside a float64 model (``TransformerWeights.softmax_dtype`` and
``scores_dtype``), a pass does too, with the adapter's eager attention; other models keep
``scaled_dot_product_attention``.

**Grouped- and multi-query attention**: the key and value inputs are destinations per KV group
(``A{l}.kv{g}.k|v``, mask rows per key/value head). A pass projects keys and values once per
key/value head, for the shared and the per-hypothesis rows alike, caches them per key/value head
for the causal prefix, and repeats them for the query heads of their group only at the attention.
A query head is recomputed per hypothesis when its q input or its group's k or v input differs.

**Sandwich norms** (Gemma 2): the layer's summed attention output is normed before the residual
add, so the layer's attention is one source, ``A{l}`` (``CircuitGraph(sandwich=True)``); a pass
sums its heads (repeating the shared ones for each hypothesis when some differ) and norms them
(``LayerWeights.attention_output``). The MLP's post-norm is part of the MLP's output.

**Parallel blocks** (GPT-NeoX/Pythia with the MLP's own norm, Phi with the attention's norm):
the MLP reads the block's input stream, not ``resid_mid``, so ``MLP{l}`` has no edges from
``A{l}.*`` (``CircuitGraph(parallel=True)``) and its corrections come only from sources below the
block. A pass takes the MLP's input before the attention adds its heads to the stream; a pass
that starts at the MLP stage builds it from the cached ``resid_pre`` (every source it reads is
below the start, so clean) and keeps ``resid_mid`` as the stream that the layers above read.

**Where the code is.** ``acdc_viz.removed_edges`` keeps the circuit: masks, host-side counts and
destination groups. ``acdc_viz.pass_inputs`` builds destinations' inputs from the stream and
their corrections; ``acdc_viz.forward_pass`` runs the blocks of a pass on them. ``CircuitRunner``
below is the front that ``Acdc`` calls, and keeps the causal-prefix cache in step with the circuit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from acdc_viz.errors import SettingsError
from acdc_viz.forward_pass import STAGE_ORDER, PassRunner, PassState, Stage, full_run, stage_of
from acdc_viz.graph import CircuitGraph, Edge
from acdc_viz.models.adapter import TransformerWeights
from acdc_viz.pass_inputs import Activations
from acdc_viz.removed_edges import RemovedEdges

Ablation = Literal["resample", "zero", "mean"]
ABLATIONS: tuple[str, ...] = ("resample", "zero", "mean")


class CircuitRunner:
    """Caches for one model, one batch of prompt pairs and one ablation; runs partial forwards.

    The front that ``Acdc`` uses: ``RemovedEdges`` keeps the circuit, ``PassRunner`` runs the
    passes, and this class keeps the causal-prefix cache in step with the circuit.

    Args:
        weights: the model, as ``TransformerWeights``.
        graph: the computational graph (split by position or not).
        clean, corrupt: token ids, (batch, pos), already on the weights' device.
        ablation: ``resample`` (corrupt activations), ``zero`` or ``mean`` (batch mean of the
            corrupt activations).
        last_position_only: return logits only at the last position.
        reuse_prefix: in position mode, compute only positions from the tested edges' lowest
            one (default: whenever the graph is split by position and the model is causal).
    """

    def __init__(
        self,
        weights: TransformerWeights,
        graph: CircuitGraph,
        clean: torch.Tensor,
        corrupt: torch.Tensor,
        ablation: str = "resample",
        *,
        last_position_only: bool = True,
        reuse_prefix: bool | None = None,
    ) -> None:
        """Record the clean and corrupt runs that every pass starts from, and an empty circuit
        of removed edges."""
        if ablation not in ABLATIONS:
            raise SettingsError(f"unknown ablation {ablation!r}: expected one of {list(ABLATIONS)}")
        parallel = weights.parallel and not weights.attn_only
        if graph != weights.circuit_graph(graph.n_positions):
            raise SettingsError(
                f"the graph has parallel={graph.parallel}, {graph.n_kv_heads} key/value heads "
                f"and sandwich={graph.sandwich}, but the model's blocks are "
                f"{'parallel' if parallel else 'sequential'} with {weights.n_kv_heads} and "
                f"sandwich={weights.sandwich}: build it with weights.circuit_graph()")
        self.weights = weights
        self.graph = graph
        self.last_position_only = last_position_only
        self.batch, seq_len = clean.shape
        possible = graph.n_positions is not None and weights.causal
        self.reuse_prefix = possible if reuse_prefix is None else bool(reuse_prefix) and possible

        with torch.no_grad():
            clean_run = full_run(weights, clean, last_position_only)
            ablated = full_run(weights, corrupt, last_position_only).sources
        if ablation == "zero":
            ablated = torch.zeros_like(ablated[:, :1]).expand_as(ablated)
        elif ablation == "mean":
            ablated = ablated.mean(1, keepdim=True).expand_as(ablated)
        self.full_logits: torch.Tensor = clean_run.logits
        acts = Activations(
            resid_pre=clean_run.resid_pre, resid_mid=clean_run.resid_mid,
            resid_final=clean_run.resid_final, ablated=ablated,
            diff_clean=ablated - clean_run.sources,        # ablated - current, for clean sources
            # The current circuit's keys, values (and logits), for the causal-prefix reuse.
            kv_current=clean_run.kv, logits_current=self.full_logits.clone())
        del clean_run
        self.edges = RemovedEdges(graph, weights.dtype, weights.device)
        self.passes = PassRunner(weights, graph, self.edges, acts, self.batch, seq_len,
                                 last_position_only)
        self.last_pass: PassState | None = None          # the pass of the last chain
        self._pending: tuple[PassState, int] | None = None   # an accepted hypothesis not cached
        self._stale = False                              # the cache misses a set_removed
        self._chain: list[Edge] = []
        self._accepted = 0

    # ----- the circuit -------------------------------------------------------------------------

    def set_removed(self, edge: Edge, removed: bool) -> None:
        """Remove (or restore) one edge."""
        self.edges.set(edge, removed)
        self._stale = True

    def accept(self, edge: Edge) -> None:
        """Remove the next edge of the last chain: its hypothesis becomes the current circuit.

        Equivalent to ``set_removed(edge, True)``, but keeps the causal-prefix cache without
        recomputing it. Edges must be accepted in chain order.
        """
        if self._accepted >= len(self._chain) or self._chain[self._accepted] is not edge:
            self.set_removed(edge, True)
            return
        self.edges.set(edge, True)
        if self.reuse_prefix and self.last_pass is not None:
            self._pending = (self.last_pass, self._accepted)
        self._accepted += 1

    def _sync_prefix(self) -> None:
        """Bring the causal-prefix cache up to the current circuit: adopt the last accepted
        hypothesis, or recompute everything after a ``set_removed``."""
        if self._stale:
            self._pending = None
            state = self.passes.run(0, "attn", 1, 0, {}, stash=True).state
            self.passes.adopt(state, 0)
            self._stale = False
        elif self._pending is not None:
            self.passes.adopt(*self._pending)
        self._pending = None

    # ----- forward passes ----------------------------------------------------------------------

    @staticmethod
    def start_of(edge: Edge) -> tuple[int, Stage]:
        """Where a pass that tests ``edge`` starts: its destination's block and stage."""
        return stage_of(edge)

    def chain_logits(self, edges: Sequence[Edge]) -> torch.Tensor:
        """Logits (len(edges), batch, ...) of the hypotheses "the circuit minus edges[:j+1]".

        The edges must be consecutive in the visit order and still in the circuit; hypothesis j
        is exact for the current circuit with edges[0..j] removed. When nothing above the chain
        can tell the hypotheses apart, the result is one set of logits expanded over the first
        axis (stride 0 there).
        """
        if not edges:
            raise ValueError("chain_logits needs at least one edge")
        with torch.no_grad():
            if self.reuse_prefix:
                self._sync_prefix()
            entries = self.edges.chain_entries(edges)
            layer, stage = min((stage_of(e) for e in edges),
                               key=lambda start: (start[0], STAGE_ORDER[start[1]]))
            first_pos = min(e.position or 0 for e in edges) if self.reuse_prefix else 0
            out = self.passes.run(layer, stage, len(edges), first_pos, entries,
                                  stash=self.reuse_prefix)
            self.last_pass = out.state
            self._chain, self._accepted = list(edges), 0
            shape = (len(edges), self.batch, *out.logits.shape[1:])
            return out.logits.expand(shape) if out.shared else out.logits.view(shape)

    def logits_from(self, layer: int, stage: Stage) -> torch.Tensor:
        """Logits of the current circuit, recomputing every position from ``stage`` of ``layer``.

        Exact as long as no edge into a destination below that point is removed, which ACDC's
        visit order guarantees; ``logits_from(0, "attn")`` recomputes everything.
        """
        with torch.no_grad():
            return self.passes.run(layer, stage, 1, 0, {}, stash=False).logits
