"""TransformerLens 3.x ``HookedTransformer`` through the same engine.

TransformerLens 4 removed HookedTransformer, so these tests run where a 3.x is installed: CI
runs them in a second environment (see the Makefile's ``test-tl3``). Elsewhere they are skipped.
"""

from __future__ import annotations

import pytest
import torch
from conftest import token_pairs

from acdc_viz import Acdc, TokenPairs

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4: HookedTransformer is gone
    HookedTransformer = None

pytestmark = pytest.mark.skipif(HookedTransformer is None,
                                reason="needs TransformerLens 3.x (make test-tl3)")


def hooked(**kw):
    assert HookedTransformer is not None and HookedTransformerConfig is not None
    settings = {"n_layers": 2, "d_model": 24, "d_head": 8, "n_heads": 3, "d_mlp": 48, "d_vocab": 50,
                "n_ctx": 16, "act_fn": "gelu_new", "normalization_type": "LN", "seed": 0}
    cfg = HookedTransformerConfig(**{**settings, **kw})
    model = HookedTransformer(cfg)
    with torch.no_grad():              # random biases, so that no term is trivially zero
        for name, p in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out")):
                p.normal_(0, 0.1)
    return model.to(torch.float64)


@pytest.mark.parametrize("kw", [{}, {"attn_only": True, "normalization_type": None}])
@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
@pytest.mark.parametrize("positions", [False, True])
def test_hooked_transformer_matches_its_own_hooked_forward(kw, ablation, positions):
    model = hooked(**kw)
    clean, corrupt = token_pairs(batch=3, pos=4)
    trace = Acdc(model, TokenPairs(clean, corrupt), tau=1e-3, ablation=ablation,
                 positions=positions, dtype="float64", test_mode=True).run()
    assert trace.is_complete
    assert 0 < trace.steps[-1].kept_edges < len(trace.steps)


def test_hooked_transformer_matches_the_reference():
    from reference_acdc import reference_acdc

    model = hooked()
    clean, corrupt = token_pairs(batch=3, pos=4)
    trace = Acdc(model, TokenPairs(clean, corrupt), tau=1e-3, dtype="float64").run()
    ref = reference_acdc(model, clean, corrupt, tau=1e-3)
    assert [(s.edge, s.removed) for s in trace.steps] == [(r.edge, r.removed) for r in ref]
