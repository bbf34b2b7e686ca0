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
