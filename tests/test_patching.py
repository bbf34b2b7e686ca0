"""The fast runner against the model's own hooked forward, for arbitrary sets of removed edges."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import token_pairs

from acdc_viz.graph import CircuitGraph
from acdc_viz.hooked import hooked_logits
from acdc_viz.models.adapter import from_model
from acdc_viz.patching import CircuitRunner

MODELS = ["gpt2", "attn_only", "native_ln"]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
@pytest.mark.parametrize("positions", [False, True])
def test_runner_matches_hooked_forward(request, model_name, ablation, positions):
    """Logits with a random third of the edges removed equal those of the model's own
    hooked forward pass."""
    model = request.getfixturevalue(model_name)
    clean, corrupt = token_pairs(d_vocab=model.cfg.d_vocab)
    weights = from_model(model, clean)
    graph = CircuitGraph.from_config(model.cfg, n_positions=clean.shape[1] if positions else None)
    runner = CircuitRunner(weights, graph, clean, corrupt, ablation, last_position_only=False)
    torch.testing.assert_close(runner.full_logits, model(clean), atol=1e-4, rtol=1e-4)
    rng = random.Random(0)
    removed = rng.sample(list(graph.edges), len(graph.edges) // 3)
    for e in removed:
        runner.set_removed(e, True)
    ours = runner.logits_from(0, "attn")
    theirs = hooked_logits(model, clean, corrupt, removed, ablation, last_position_only=False)
    assert (ours - runner.full_logits).abs().max() > 1e-3  # the removals do change the output
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def _sequential(runner, chain):
    """The chain's hypotheses the slow way: remove edges one by one, recompute everything."""
    out = []
    for e in chain:
        runner.set_removed(e, True)
        out.append(runner.logits_from(0, "attn"))
    for e in chain:
        runner.set_removed(e, False)
    return torch.stack(out)


@pytest.mark.parametrize("model_name", ["gpt2", "native_ln"])
@pytest.mark.parametrize("positions", [False, True])
@pytest.mark.parametrize("last_only", [True, False])
def test_chain_of_hypotheses_equals_sequential_removals(request, model_name, positions, last_only):
    """chain_logits (one batched pass, causal prefix reused) against one full pass per hypothesis,
    walking the whole visit order the way ACDC does, with a mixed circuit accepted on the way."""
    model = request.getfixturevalue(model_name)
    clean, corrupt = token_pairs(d_vocab=model.cfg.d_vocab)
    weights = from_model(model, clean).to(dtype=torch.float64)
    graph = CircuitGraph.from_config(model.cfg, n_positions=clean.shape[1] if positions else None)
    runner = CircuitRunner(weights, graph, clean, corrupt, "resample", last_position_only=last_only)
    assert runner.reuse_prefix == positions
    rng, edges, i, checked, shared = random.Random(1), graph.edges, 0, 0, 0
    while i < len(edges):
        chain = edges[i: i + rng.choice([1, 3, 7])]
        fast = runner.chain_logits(chain)
        shared += len(chain) > 1 and fast.stride(0) == 0        # nothing above told them apart
        if rng.random() < (0.08 if positions else 0.3) or i < 10:   # the slow check is costly
            torch.testing.assert_close(fast, _sequential(runner, chain), atol=1e-9, rtol=1e-9)
            checked += 1
        for e in chain:                                  # accept a random prefix of the chain
            if rng.random() < 0.2:
                break
            runner.accept(e)
            i += 1
        else:
            continue
        i += 1                                           # the edge that stopped the walk is kept
    assert checked > 10 and 0 < len(runner.edges.removed) < len(edges)
    assert shared > 0


def test_prefix_cache_follows_outside_changes(gpt2):
    """set_removed outside a chain (a resumed run) invalidates the cached keys and values."""
    clean, corrupt = token_pairs(d_vocab=gpt2.cfg.d_vocab)
    weights = from_model(gpt2, clean).to(dtype=torch.float64)
    graph = CircuitGraph.from_config(gpt2.cfg, n_positions=clean.shape[1])
    runner = CircuitRunner(weights, graph, clean, corrupt, "zero", last_position_only=False)
    for e in graph.edges[:200:3]:
        runner.set_removed(e, True)
    chain = graph.edges[200:204]
    torch.testing.assert_close(runner.chain_logits(chain), _sequential(runner, chain),
                               atol=1e-9, rtol=1e-9)


def test_only_what_depends_on_the_hypothesis_is_computed_per_hypothesis(gpt2):
    """With every edge above a block removed, a chain into that block changes only the heads it
    touches: later nodes read ablated values, so they and the logits are computed once."""
    clean, corrupt = token_pairs(d_vocab=gpt2.cfg.d_vocab)
    weights = from_model(gpt2, clean).to(dtype=torch.float64)
    graph = CircuitGraph.from_config(gpt2.cfg)
    runner = CircuitRunner(weights, graph, clean, corrupt, "resample")
    top = gpt2.cfg.n_layers - 1
    first = next(i for i, e in enumerate(graph.edges)
                 if e.dest.layer == top and e.dest.kind in "qkv")
    for e in graph.edges[:first]:
        runner.set_removed(e, True)
    chain = [e for e in graph.edges[first:] if e.dest.name == graph.edges[first].dest.name]
    fast = runner.chain_logits(chain)
    assert len(chain) > 1 and fast.stride(0) == 0              # one set of logits for all
    assert runner.last_pass is not None
    first_head = runner.passes.first_head[top]
    assert runner.last_pass.dep_sources == [first_head + graph.edges[first].dest.head]
    torch.testing.assert_close(fast, _sequential(runner, chain), atol=1e-9, rtol=1e-9)
