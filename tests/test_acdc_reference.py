"""The engine against the independent brute-force reference (tests/reference_acdc.py), step by step.

The engine runs with K = 1, 4 and 32 speculative hypotheses per pass (``batch_hypotheses``), with
the causal-prefix reuse on in position mode. Both run in float64, so that a decision can only
differ through a real disagreement, not through float32 rounding of a delta that sits next to tau.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gpt2_bridge, native_bridge, token_pairs
from reference_acdc import reference_acdc, reference_metric

from acdc_viz.acdc import Acdc
from acdc_viz.data import TokenPairs

# tau per model: chosen so that each run both removes and keeps edges.
CASES = {"gpt2": 3e-4, "attn_only": 3e-3}
_REFERENCE: dict = {}


@pytest.fixture(scope="module")
def models64(tmp_path_factory):
    return {
        "gpt2": gpt2_bridge(tmp_path_factory.mktemp("gpt2_64")).to(torch.float64),
        "attn_only": native_bridge().to(torch.float64),
    }


@pytest.mark.parametrize("model_name", sorted(CASES))
@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
@pytest.mark.parametrize("positions", [False, True])
@pytest.mark.parametrize("hypotheses", [1, 4, 32])
def test_engine_equals_reference_step_by_step(models64, model_name, ablation, positions,
                                              hypotheses):
    """Every step (edge, decision, metrics) equals the brute-force reference's, for every
    ablation, with and without positions, and K = 1, 4, 32."""
    model = models64[model_name]
    clean, corrupt = token_pairs(batch=3, pos=4, d_vocab=model.cfg.d_vocab)
    tau = CASES[model_name]
    acdc = Acdc(model, TokenPairs(clean, corrupt), tau=tau, ablation=ablation,
                positions=positions, dtype=torch.float64, batch_hypotheses=hypotheses)
    trace = acdc.run()
    key = (model_name, ablation, positions)
    if key not in _REFERENCE:          # the reference is slow: once per case, for every K
        _REFERENCE[key] = reference_acdc(model, clean, corrupt, tau=tau, ablation=ablation,
                                          positions=positions)
    ref = _REFERENCE[key]

    assert [s.edge for s in trace.steps] == [r.edge for r in ref]
    for ours, theirs in zip(trace.steps, ref, strict=True):
        assert ours.removed == theirs.removed, (ours, theirs)
        assert ours.metric_before == pytest.approx(theirs.metric_before, rel=1e-7, abs=1e-10)
        assert ours.metric_after == pytest.approx(theirs.metric_after, rel=1e-7, abs=1e-10)
    removed = {s.edge for s in trace.steps if s.removed}
    assert 0 < len(removed) < len(trace.steps), "tau should give a mixed circuit"
    # The kept circuit, recomputed from scratch by the reference, has the last step's metric.
    scratch = reference_metric(model, clean, corrupt, removed, ablation=ablation)
    assert scratch == pytest.approx(trace.final_metric, abs=1e-5)
    assert acdc.final_metric_from_scratch() == pytest.approx(trace.final_metric, abs=1e-5)
