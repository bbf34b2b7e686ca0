"""tracr-reverse and tracr-proportion: compiled transformers whose circuit is known by construction.

tracr (Lindner et al. 2023) compiles a RASP program into weights in which every residual
direction has a name (``tokens:3``, ``length:2``, ``opp_idx-1:0``) and every block reads and
writes only the directions of its own RASP operation. The circuit is therefore not a hypothesis:
an edge ``src -> dest`` carries information exactly when ``src`` writes a direction that ``dest``
reads (:func:`residual_flow`). The ACDC paper (Table 3) uses these two programs as ground truth,
and ACDC with zero ablation recovers both with edge AUC 1.000.

The models ship as native TransformerLens 4 bridges in ``bundled/tracr-*.safetensors``, built by
``scripts/build_tracr.py`` with ``tracr-pypi`` (a dev-only extra). Nothing here imports JAX or
tracr. The build also verifies and records the canonical circuit (``meta["build"]["circuit"]``)
with :func:`derive_circuit`, and records tracr's own outputs on every input
(``bundled/tracr-reference/``) so that tests without JAX can check the conversion.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from acdc_viz.data import TokenPairs
from acdc_viz.graph import CircuitGraph
from acdc_viz.metrics import Metric
from acdc_viz.tasks.base import Task, TaskError
from acdc_viz.tasks.bundled import BUNDLED_DIR, bundled_meta, load_bundled

PROMPT_TOKENS = 4
"""Prompt length of the tasks, BOS included (BOS + 3 tokens, as in the ACDC code).

Not the compiled maximum (BOS + 5): at length 5 the selector-width MLP of tracr-reverse gives
"5" even when its attention input is zeroed, so two edges of the program stop mattering under
zero ablation (see docs/tracr.md).
"""

REFERENCE_DIR = BUNDLED_DIR / "tracr-reference"
"""tracr's own outputs on every input, recorded by the build (``{task}.json``)."""

EFFECT_TOL = 1e-4
"""An edge matters when removing it moves some output (non-BOS position) by more than this.

Outputs are O(1) and the edges that matter move them by 0.67 or more; the others move them by
0, or by a float32 leak of tracr's near-one-hot softmax (about 6e-7)."""


def _l2(circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the outputs at every position but BOS (the ACDC code's ``l2``).

    tracr leaves the BOS position's output unspecified, so it is not part of the program's output.
    """
    return (circuit_logits[:, 1:] - full_logits[:, 1:]).pow(2).mean()


L2 = Metric("l2", _l2, last_position_only=False)


# ----- the bundled models' metadata ------------------------------------------------------------


def _build(name: str) -> dict[str, Any]:
    try:
        return bundled_meta(name)["build"]
    except KeyError:
        raise TaskError(f"bundled/{name}.json has no 'build' section; rebuild it with "
                        "scripts/build_tracr.py") from None


def vocabulary(name: str) -> list[str]:
    """The input tokens by id, as text (``["1", "2", "3", "BOS", "compiler_pad"]``)."""
    return list(_build(name)["tokens"])


def all_inputs(name: str, seq_len: int) -> torch.Tensor:
    """Every input of ``seq_len`` tokens (BOS first), in lexicographic order of ids."""
    build = _build(name)
    if not 1 <= seq_len <= build["max_seq_len"] + 1:
        raise TaskError(f"{name} takes inputs of 1 to {build['max_seq_len'] + 1} tokens (BOS "
                        f"included), not {seq_len}")
    special = (build["bos_token"], build["pad_token"])
    ids = [i for i, t in enumerate(build["tokens"]) if t not in special]
    bos = build["tokens"].index(build["bos_token"])
    rows = [[bos, *rest] for rest in itertools.product(ids, repeat=seq_len - 1)]
    return torch.tensor(rows, dtype=torch.int64)


# ----- prompts, metrics, canonical circuit ------------------------------------------------------


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed points (n >= 2)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == torch.arange(n)).any()):
            return perm


def make_pairs(name: str, n: int, seed: int) -> TokenPairs:
    """``n`` distinct inputs of ``PROMPT_TOKENS`` tokens; each one's corruption is another of them.

    Corruption is a permutation of the batch with no fixed points, as in the ACDC code. Zero
    ablation (the tasks' default) ignores it; resample ablation uses it.
    """
    inputs = all_inputs(name, PROMPT_TOKENS)
    if n < 2:
        raise TaskError(f"{name} needs at least 2 prompts (each prompt's corruption is another "
                        f"prompt of the batch), got {n}")
    if n > len(inputs):
        build = _build(name)
        words = [t for t in build["tokens"] if t not in (build["bos_token"], build["pad_token"])]
        raise TaskError(
            f"{name} has only {len(inputs)} distinct inputs of {PROMPT_TOKENS} tokens (BOS and "
            f"{PROMPT_TOKENS - 1} of {words}); asked for {n}. Ask for at most {len(inputs)} "
            "prompts."
        )
    generator = torch.Generator().manual_seed(seed)
    clean = inputs[torch.randperm(len(inputs), generator=generator)[:n]]
    return TokenPairs(clean, clean[derangement(n, generator)])


def canonical_edges(name: str, positions: bool, seq_len: int) -> set[str]:
    """The circuit recorded by the build for prompts of ``seq_len`` tokens (BOS included).

    With ``positions`` the edges are the circuit's edges at the positions where removing them
    changes an output (see :func:`derive_circuit`), not every position's copy: for example no
    edge into ``Out@0`` counts, since BOS's output is not part of the program's output.
    """
    circuit = _build(name)["circuit"]
    key = "by_position" if positions else "edges"
    recorded = circuit[key]
    if str(seq_len) not in recorded:
        raise TaskError(f"the canonical circuit of {name} is recorded for prompts of "
                        f"{sorted(int(k) for k in recorded)} tokens (BOS included), not {seq_len}")
    return set(recorded[str(seq_len)])


def token_labels(name: str, pairs: TokenPairs) -> list[str]:
    tokens = vocabulary(name)
    return [tokens[int(i)] for i in pairs.clean[0]]


_CHECKED = ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx",
            "attention_dir", "normalization_type")


def check_model(name: str, model: Any) -> None:
    """Raise ``TaskError`` unless ``model`` has the shape of the bundled ``name`` model."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TaskError(f"{name} needs a TransformerLens model (with .cfg), got "
                        f"{type(model).__name__}")
    expected = bundled_meta(name)["config"]
    wrong = [f"{k}={getattr(cfg, k, None)!r} (expected {expected[k]!r})"
             for k in _CHECKED if k in expected and getattr(cfg, k, None) != expected[k]]
    if wrong:
        raise TaskError(f"this model does not fit {name}: " + ", ".join(wrong) + ". Load it with "
                        f"get_task({name!r}).load_model(device).")


# ----- deriving the circuit from tracr's bookkeeping (used by the build script and tests) ------


def residual_flow(weights: Any, labels: list[str]) -> dict[str, list[str]]:
    """Edges along which information can flow, with the residual directions each one carries.

    ``src -> dest`` carries the directions that ``src`` writes (non-zero columns of W_E / W_pos,
    W_O or W_out) and ``dest`` reads (non-zero rows of W_Q, W_K, W_V, W_in or W_U). tracr's
    residual basis is one-hot, so this is its own bookkeeping of which block uses which variable.
    Keys are in the graph's visit order.
    """
    def written(m: torch.Tensor) -> set[int]:
        return set(torch.nonzero(m.abs().sum(0)).flatten().tolist())

    def read(m: torch.Tensor) -> set[int]:
        return set(torch.nonzero(m.abs().sum(1)).flatten().tolist())

    writes = {"Embed": written(weights.W_E) | written(weights.W_pos)}
    reads = {"Out": read(weights.W_U)}
    for layer, lw in enumerate(weights.layers):
        for head in range(weights.n_heads):
            node = f"A{layer}.{head}"
            writes[node] = written(lw.W_O[head])
            reads[f"{node}.q"], reads[f"{node}.k"], reads[f"{node}.v"] = (
                read(lw.W_Q[head]), read(lw.W_K[head]), read(lw.W_V[head]))
        if not weights.attn_only:
            writes[f"MLP{layer}"] = written(lw.W_out)
            reads[f"MLP{layer}"] = read(lw.W_in)
    graph = CircuitGraph(weights.n_layers, weights.n_heads, attn_only=weights.attn_only)
    flow = {}
    for edge in graph.edges:
        carried = writes[edge.src.name] & reads[edge.dest.name]
        if carried:
            flow[edge.name] = sorted(labels[i] for i in carried)
    return flow


class _ZeroAblation:
    """Output deviation of circuits under zero ablation, at every non-BOS position."""

    def __init__(self, weights: Any, tokens: torch.Tensor, positions: bool) -> None:
        from acdc_viz.patching import CircuitRunner

        graph = CircuitGraph(weights.n_layers, weights.n_heads, attn_only=weights.attn_only,
                             n_positions=tokens.shape[1] if positions else None)
        self.runner = CircuitRunner(weights, graph, tokens, tokens, "zero",
                                    last_position_only=False)
        self.edges = [e.name for e in graph.edges]
        self._removed: set[str] = set()

    def deviation(self, kept: set[str]) -> float:
        """max |outputs of the circuit ``kept`` - the model's outputs|."""
        removed = set(self.edges) - kept
        for name in removed ^ self._removed:
            self.runner.set_removed(self.runner.graph.edge(name), name in removed)
        self._removed = removed
        out = self.runner.logits_from(0, "attn")
        return float((out[:, 1:] - self.runner.full_logits[:, 1:]).abs().max())

    def minimal(self, candidate: list[str], what: str) -> tuple[list[str], dict[str, float]]:
        """The edges of ``candidate`` that matter, after checking that ``candidate`` suffices."""
        base = self.deviation(set(candidate))
        if base > EFFECT_TOL:
            raise TaskError(f"{what}: zero-ablating every edge outside it moves the outputs by "
                            f"{base:.3g}; the circuit is incomplete")
        effects = {e: self.deviation(set(candidate) - {e}) for e in candidate}
        kept = [e for e in candidate if effects[e] > EFFECT_TOL]
        joint = self.deviation(set(kept))
        if joint > EFFECT_TOL:
            raise TaskError(f"{what}: the edges that matter one by one do not suffice together "
                            f"(deviation {joint:.3g}); some information flows along redundant "
                            "paths")
        return kept, effects


@dataclass(frozen=True)
class CircuitDerivation:
    """The canonical circuit for one prompt length, and the evidence for it.

    Attributes:
        flow: the edges of :func:`residual_flow`, with the directions each carries.
        effects: for each flow edge, the largest output change when it alone is zero-ablated
            from the flow circuit (over every input of the length).
        edges: the flow edges that matter (effect > ``EFFECT_TOL``); zero-ablating every other
            edge of the model leaves all outputs unchanged (checked).
        by_position: the same with the graph split by position: ``edges`` at the positions where
            they matter, again checked to suffice together.
    """

    seq_len: int
    flow: dict[str, list[str]]
    effects: dict[str, float]
    edges: list[str]
    by_position: list[str]


def derive_circuit(model: Any, labels: list[str], tokens: torch.Tensor) -> CircuitDerivation:
    """Derive and verify the canonical circuit of a tracr model on ``tokens`` (all one length)."""
    from acdc_viz.models.adapter import TransformerWeights, from_model

    weights = model if isinstance(model, TransformerWeights) else from_model(model, tokens[:4])
    weights = weights.to("cpu", torch.float32)
    flow = residual_flow(weights, labels)
    seq_len = int(tokens.shape[1])
    edges, effects = _ZeroAblation(weights, tokens, False).minimal(
        list(flow), f"the residual flow at {seq_len} tokens")
    split = _ZeroAblation(weights, tokens, True)
    order = {name: i for i, name in enumerate(split.edges)}
    spread = sorted((f"{e}@{p}" for e in edges for p in range(seq_len)), key=order.__getitem__)
    by_position, _ = split.minimal(spread, f"the circuit at every position of {seq_len} tokens")
    return CircuitDerivation(seq_len, flow, {e: round(v, 6) for e, v in effects.items()}, edges,
                             by_position)


# ----- the registry entries --------------------------------------------------------------------


def _task(name: str, description: str, default_prompts: int) -> Task:
    """A tracr task: its bundled model, every distinct input, and the L2 metric (paper)."""
    return Task(
        name=name,
        description=description,
        bundled=True,
        model_name=name,
        load_model=lambda device: load_bundled(name, device=device),
        make_pairs=partial(make_pairs, name),
        default_prompts=default_prompts,
        metrics={"l2": lambda pairs: L2},
        canonical_edges=partial(canonical_edges, name),
        default_tau=1e-3,
        default_ablation="zero",
        default_metric="l2",
        token_labels=partial(token_labels, name),
        check_model=partial(check_model, name),
    )


TASKS = [
    _task("tracr-reverse", "tracr-compiled reverse of a sequence of {1,2,3} (ACDC Table 3)", 27),
    _task("tracr-proportion", "tracr-compiled running fraction of 'x' in {w,x,y,z} (ACDC Table 3)",
          50),
]
