"""Self-checks for the brute-force ACDC reference (tests/reference_acdc.py).

The reference is the oracle the fast engine is compared against, so it must be
trusted on its own.  These tests check it against things that do NOT share its
code path:

* edge enumeration vs. a separate "all (src, dest) pairs that satisfy the layer
  rule" definition, plus known totals (GPT-2 small: 32,491 edges);
* the hooked forward vs. the plain forward (nothing removed -> bit-identical);
* closed-form outcomes: removing every edge into Out with zero ablation leaves
  only the b_O biases in the final residual stream; removing every edge with
  resample ablation must reproduce the corrupt run's logits exactly;
* a second, hook-free implementation of the circuit semantics written directly
  from the weights ("graph forward": each destination's input is the sum over
  its sources of either the live or the ablated output, plus the b_O biases),
  compared on random edge subsets in float64 -- this checks the reference's
  "input - current + ablated" formulation AND its use of TL4 hooks;
* causality of the position-split variant;
* the ACDC loop's bookkeeping (tau extremes, metric chaining, abs_delta).

All models are tiny (2 layers) so the whole file runs in seconds on 2 CPU cores.
Biases and LayerNorm parameters are randomized because HF/native init sets them
to 0/1, which would hide bugs such as dropping b_O or mis-applying LayerNorm.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Collection

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from reference_acdc import (
    RefStep,
    parse_edge,
    reference_acdc,
    reference_edge_names,
    reference_logits,
    reference_metric,
)

BATCH, SEQ = 3, 6


# --------------------------------------------------------------------------------------
# Model fixtures
# --------------------------------------------------------------------------------------


def _make_gpt2(tmp_dir, dtype):
    """A tiny GPT-2 with random biases and LayerNorm parameters, as a TransformerBridge."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=3, n_embd=24, vocab_size=50, n_positions=16))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial biases / LN params (HF init: zeros / ones)
        for p in hf.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    hf = hf.to(dtype)
    hf.save_pretrained(tmp_dir)
    bridge = TransformerBridge.boot_transformers(str(tmp_dir), hf_model=hf, device="cpu")
    bridge.eval()  # fresh HF models are in train mode, with dropout 0.1
    return bridge


def _make_native(dtype, attn_only=True):
    """A tiny TL-native bridge (no HuggingFace model) with random biases."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=32,
        d_head=8,
        n_layers=2,
        n_ctx=16,
        n_heads=4,
        d_vocab=50,
        attn_only=attn_only,
        normalization_type=None,
        seed=0,
        act_fn="relu",
    )
    # boot_native is attached to the class at import (setattr), which pyright cannot see
    bridge = TransformerBridge.boot_native(cfg, dtype=dtype)  # pyright: ignore[reportAttributeAccessIssue]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # native init has zero biases
        for p in bridge.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    bridge.eval()
    return bridge


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {
        ("gpt2", torch.float32): _make_gpt2(tmp_path_factory.mktemp("g32"), torch.float32),
        ("gpt2", torch.float64): _make_gpt2(tmp_path_factory.mktemp("g64"), torch.float64),
        ("native", torch.float32): _make_native(torch.float32),
        ("native", torch.float64): _make_native(torch.float64),
        # Not one of the two model kinds the engine targets, but the same "native"
        # (linear-trick) code path plus MLP nodes: cheap extra coverage.
        ("native_mlp", torch.float64): _make_native(torch.float64, attn_only=False),
    }


def _tokens(seed, batch=BATCH, seq=SEQ):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (batch, seq), generator=g)


CLEAN, CORRUPT = _tokens(10), _tokens(11)
KINDS = ["gpt2", "native"]
KINDS_ALL = KINDS + ["native_mlp"]  # float64 only


def _all_edges(bridge, positions=False):
    cfg = bridge.cfg
    return reference_edge_names(
        cfg.n_layers, cfg.n_heads, bool(cfg.attn_only), SEQ if positions else None
    )


def _plain(bridge, tokens):
    with torch.no_grad():
        return bridge(tokens)


# --------------------------------------------------------------------------------------
# Edge enumeration
# --------------------------------------------------------------------------------------


def _edges_by_rule(n_layers, n_heads, attn_only):
    """Independent definition of the edge SET: src computed before dest reads.

    Reading "time" of a node: Embed writes at -1; heads of layer l write at l;
    MLP l writes at l + 0.5 (after its layer's heads); head inputs of layer l read
    at l; MLP l reads at l + 0.5 (so it sees its own layer's heads); Out reads at
    n_layers.  Edge iff write time < read time.
    """
    srcs = [("Embed", -1.0)]
    dests = [("Out", float(n_layers))]
    for layer in range(n_layers):
        srcs += [(f"A{layer}.{h}", float(layer)) for h in range(n_heads)]
        dests += [(f"A{layer}.{h}.{x}", float(layer)) for h in range(n_heads) for x in "qkv"]
        if not attn_only:
            srcs.append((f"MLP{layer}", layer + 0.5))
            dests.append((f"MLP{layer}", layer + 0.5))
    return {f"{s}->{d}" for s, ws in srcs for d, rd in dests if ws < rd}


def test_gpt2_small_edge_count():
    names = reference_edge_names(12, 12, attn_only=False)
    assert len(names) == 32491  # the figure quoted for GPT-2 small
    assert len(set(names)) == len(names)
    assert set(names) == _edges_by_rule(12, 12, False)


def test_attn_only_edge_count():
    names = reference_edge_names(2, 8, attn_only=True)
    assert len(names) == 257  # layer0: 24*1, layer1: 24*9, Out: 1+16
    assert set(names) == _edges_by_rule(2, 8, True)
    assert not any("MLP" in n for n in names)


@pytest.mark.parametrize(
    "L,H,attn_only", [(1, 1, True), (1, 2, False), (3, 2, False), (3, 4, True)]
)
def test_edge_set_matches_rule(L, H, attn_only):
    names = reference_edge_names(L, H, attn_only)
    assert len(set(names)) == len(names)
    assert set(names) == _edges_by_rule(L, H, attn_only)


def test_visit_order_by_hand():
    """The reference's visit order equals orders written out by hand."""
    # 1 layer, 2 heads, with MLP: written out by hand from the brief.
    assert reference_edge_names(1, 2, attn_only=False) == [
        "MLP0->Out",
        "A0.1->Out",
        "A0.0->Out",
        "Embed->Out",
        "A0.1->MLP0",
        "A0.0->MLP0",
        "Embed->MLP0",
        "Embed->A0.1.q",
        "Embed->A0.1.k",
        "Embed->A0.1.v",
        "Embed->A0.0.q",
        "Embed->A0.0.k",
        "Embed->A0.0.v",
    ]
    # 2 layers: Out's sources, then MLP1 (sees its own layer's heads), then A1.1.q.
    names = reference_edge_names(2, 2, attn_only=False)
    assert names[:7] == [
        "MLP1->Out",
        "A1.1->Out",
        "A1.0->Out",
        "MLP0->Out",
        "A0.1->Out",
        "A0.0->Out",
        "Embed->Out",
    ]
    assert names[7:13] == [
        "A1.1->MLP1",
        "A1.0->MLP1",
        "MLP0->MLP1",
        "A0.1->MLP1",
        "A0.0->MLP1",
        "Embed->MLP1",
    ]
    assert names[13:17] == ["MLP0->A1.1.q", "A0.1->A1.1.q", "A0.0->A1.1.q", "Embed->A1.1.q"]
    assert names[17] == "MLP0->A1.1.k"
    # The last layer-1 destination is A1.0.v, then MLP0, then layer-0 heads.
    i = names.index("A1.1->MLP1")
    assert names.index("Embed->A1.0.v") < names.index("A0.1->MLP0") < names.index("Embed->A0.1.q")
    assert names[-1] == "Embed->A0.0.v" and i == 7


def test_visit_order_positions():
    base = reference_edge_names(1, 2, attn_only=False)
    pos = reference_edge_names(1, 2, attn_only=False, n_positions=3)
    assert len(pos) == 3 * len(base)
    # each pair's positions run last -> first, consecutively, pairs in base order
    assert pos == [f"{e}@{p}" for e in base for p in (2, 1, 0)]
    assert pos[:3] == ["MLP0->Out@2", "MLP0->Out@1", "MLP0->Out@0"]


def test_parse_edge():
    assert parse_edge("A0.3->A1.2.k@5") == ("A0.3", "A1.2.k", 5)
    assert parse_edge("Embed->Out") == ("Embed", "Out", None)
    assert parse_edge("MLP11->MLP12") == ("MLP11", "MLP12", None)
    assert parse_edge("A0->A1.kv1.v") == ("A0", "A1.kv1.v", None)   # sandwich norms, KV group
    for bad in ["A0.3-A1.2.k", "A0.kv1->Out", "Embed->A1.2.x", "Out->Embed", "A0->A1.kv1.q"]:
        with pytest.raises(ValueError):
            parse_edge(bad)


def test_invalid_edges_rejected(models):
    b = models[("native", torch.float32)]
    for bad in ["A1.0->A1.1.q", "A1.0->A0.1.q", "Embed->Out@99"]:
        with pytest.raises(ValueError):
            reference_metric(b, CLEAN, CORRUPT, {bad})


# --------------------------------------------------------------------------------------
# Hooked forward vs. plain forward, closed-form circuits
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_removed_is_plain_forward(models, kind):
    """With nothing removed the recording hooks must not change anything.

    Bit-exact against the plain forward *under the same hook flags*: on GPT-2 the
    reference enables use_split_qkv_input / use_attn_result / use_hook_mlp_in,
    and that code path (per-head LayerNorm copies, per-head W_O then sum) rounds
    differently from the default fused path (~5e-7 in float32, ~1e-15 in float64),
    so against the default-flag forward we only require closeness.
    """
    b = models[(kind, torch.float32)]
    ref = reference_logits(b, CLEAN, CORRUPT, set())
    torch.testing.assert_close(ref, _plain(b, CLEAN), rtol=0, atol=1e-5)
    if kind == "gpt2":
        b.set_use_split_qkv_input(True)
        b.set_use_attn_result(True)
        b.set_use_hook_mlp_in(True)
        try:
            assert torch.equal(ref, _plain(b, CLEAN))
        finally:
            b.set_use_split_qkv_input(False)
            b.set_use_attn_result(False)
            b.set_use_hook_mlp_in(False)
    else:
        assert torch.equal(ref, _plain(b, CLEAN))
    for metric in ("kl", "mse"):
        for all_pos in (False, True):
            assert (
                reference_metric(b, CLEAN, CORRUPT, set(), metric=metric, all_positions=all_pos)
                == 0.0
            )


@pytest.mark.parametrize("kind", KINDS)
def test_remove_all_into_out_zero_ablation(models, kind):
    """Zero-ablating every edge into Out leaves only the b_O biases (which always
    stay) in the final residual stream, so logits = unembed(ln_final(sum_l b_O[l])),
    identical at every position and for every prompt."""
    b = models[(kind, torch.float64)]
    removed = {e for e in _all_edges(b) if e.endswith("->Out")}
    logits = reference_logits(b, CLEAN, CORRUPT, removed, ablation="zero")
    with torch.no_grad():
        resid = b.b_O.sum(0)
        if b.cfg.normalization_type is not None:
            ln = b.ln_final.original_component
            resid = F.layer_norm(resid, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        expected = resid @ b.W_U + b.b_U
    assert b.b_O.abs().max() > 0.01  # the check would be weaker with zero biases
    torch.testing.assert_close(logits, expected.expand_as(logits), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS_ALL)
@pytest.mark.parametrize("which", ["into_out", "all", "all_positions_split"])
def test_resample_remove_everything_gives_corrupt_run(models, kind, which):
    """Sources + b_O partition the residual stream, so replacing every source
    feeding Out by its corrupt-run value reproduces the corrupt logits; removing
    ALL edges makes every node see corrupt inputs, same result."""
    b = models[(kind, torch.float64)]
    if which == "into_out":
        removed = {e for e in _all_edges(b) if e.endswith("->Out")}
    elif which == "all":
        removed = set(_all_edges(b))
    else:
        removed = set(_all_edges(b, positions=True))
    logits = reference_logits(b, CLEAN, CORRUPT, removed, ablation="resample")
    torch.testing.assert_close(logits, _plain(b, CORRUPT), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_equals_clean_is_noop(models, kind):
    """If corrupt == clean, ablated == current for every node (by induction), so any
    removed set leaves the output unchanged."""
    b = models[(kind, torch.float64)]
    g = torch.Generator().manual_seed(3)
    edges = _all_edges(b)
    removed = {e for e in edges if torch.rand((), generator=g) < 0.5}
    logits = reference_logits(b, CLEAN, CLEAN, removed, ablation="resample")
    torch.testing.assert_close(logits, _plain(b, CLEAN), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------
# Independent hook-free implementation of the circuit semantics
# --------------------------------------------------------------------------------------


def graph_forward(bridge, tokens, removed: Collection[str] = frozenset(),
                  ablated: dict | None = None):
    """Compute the circuit straight from the weights, without any hooks.

    Every destination's input is built from scratch as
        sum_{sources s written before it} (ablated[s] if s->dest removed else out[s])
        + sum of b_O of the attention layers already computed,
    i.e. the "sum of kept/ablated sources" view, which is mathematically equal to
    the reference's "input - current + ablated" update but shares no code with it.
    Returns (logits, {source: output}).
    """
    cfg = bridge.cfg
    n_heads, d_head = cfg.n_heads, cfg.d_head
    batch, seq = tokens.shape
    with torch.no_grad():
        W = {
            n: getattr(bridge, n).detach()
            for n in [
                "W_E",
                "W_pos",
                "W_Q",
                "W_K",
                "W_V",
                "b_Q",
                "b_K",
                "b_V",
                "W_O",
                "b_O",
                "W_U",
                "b_U",
            ]
        }
        if not cfg.attn_only:
            W.update({n: getattr(bridge, n).detach() for n in ["W_in", "b_in", "W_out", "b_out"]})
        dtype = W["W_E"].dtype

        def norm(module, x):
            if cfg.normalization_type is None:
                return x
            m = module.original_component
            return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)

        act = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "gelu": F.gelu}[
            cfg.act_fn
        ]

        # mask[(src, dest)][p] = 1 where the edge is removed at position p
        masks: dict = {}
        for name in removed:
            e = parse_edge(name)
            m = masks.setdefault((e.src, e.dest), torch.zeros(seq, dtype=dtype))
            if e.pos is None:
                m[:] = 1
            else:
                m[e.pos] = 1

        out = {"Embed": W["W_E"][tokens] + W["W_pos"][:seq]}
        bias = torch.zeros(cfg.d_model, dtype=dtype)

        def read(dest):
            total = bias.expand(batch, seq, -1).clone()
            for src, val in out.items():  # everything written so far feeds `dest`
                m = masks.pop((src, dest), None)
                if m is None:
                    total = total + val
                else:
                    assert ablated is not None
                    total = total + val * (1 - m)[:, None] + ablated[src] * m[:, None]
            return total

        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
        for layer in range(cfg.n_layers):
            new = {}
            for h in range(n_heads):
                ln1 = bridge.blocks[layer].ln1
                q = norm(ln1, read(f"A{layer}.{h}.q")) @ W["W_Q"][layer, h] + W["b_Q"][layer, h]
                k = norm(ln1, read(f"A{layer}.{h}.k")) @ W["W_K"][layer, h] + W["b_K"][layer, h]
                v = norm(ln1, read(f"A{layer}.{h}.v")) @ W["W_V"][layer, h] + W["b_V"][layer, h]
                scores = (q @ k.transpose(-1, -2)) / math.sqrt(d_head)
                pattern = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
                new[f"A{layer}.{h}"] = (pattern @ v) @ W["W_O"][layer, h]
            out.update(new)  # heads of one layer do not see each other
            bias = bias + W["b_O"][layer]
            if not cfg.attn_only:
                x = norm(bridge.blocks[layer].ln2, read(f"MLP{layer}"))
                out[f"MLP{layer}"] = (
                    act(x @ W["W_in"][layer] + W["b_in"][layer]) @ W["W_out"][layer]
                    + W["b_out"][layer]
                )
        x = norm(bridge.ln_final, read("Out"))
        logits = x @ W["W_U"] + W["b_U"]
        assert not masks, f"removed edges never read: {sorted(masks)}"
        return logits, out


def graph_ablated(bridge, corrupt, ablation):
    _, cache = graph_forward(bridge, corrupt)
    if ablation == "resample":
        return cache
    if ablation == "zero":
        return {k: torch.zeros_like(v) for k, v in cache.items()}
    return {k: v.mean(0) for k, v in cache.items()}


@pytest.mark.parametrize("kind", KINDS_ALL)
def test_graph_forward_matches_plain_model(models, kind):
    """Sanity of the hook-free implementation itself."""
    b = models[(kind, torch.float64)]
    logits, _ = graph_forward(b, CLEAN)
    torch.testing.assert_close(logits, _plain(b, CLEAN), rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS_ALL)
@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
@pytest.mark.parametrize("positions", [False, True])
def test_reference_matches_graph_forward(models, kind, ablation, positions):
    b = models[(kind, torch.float64)]
    edges = _all_edges(b, positions)
    abl = graph_ablated(b, CORRUPT, ablation)
    for seed, frac in [(0, 0.05), (1, 0.3), (2, 0.7)]:
        g = torch.Generator().manual_seed(seed)
        removed = {e for e in edges if torch.rand((), generator=g) < frac}
        expected, _ = graph_forward(b, CLEAN, removed, abl)
        got = reference_logits(b, CLEAN, CORRUPT, removed, ablation=ablation)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
        # and the logits actually moved (otherwise the comparison proves little)
        assert (got - _plain(b, CLEAN)).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_all_positions_of_a_pair_equals_whole_edge(models, kind):
    b = models[(kind, torch.float64)]
    for pair in ["Embed->Out", "A0.1->A1.2.k", "Embed->A0.0.v"]:
        whole = reference_logits(b, CLEAN, CORRUPT, {pair})
        split = reference_logits(b, CLEAN, CORRUPT, {f"{pair}@{p}" for p in range(SEQ)})
        torch.testing.assert_close(split, whole, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------
# Position causality
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_position_patch_is_causal(models, kind):
    """Patching a key input at position p can only affect query positions >= p
    (causal attention); patching Out at p only affects position p.  Earlier
    positions must be bit-identical: the correction there is exactly zero."""
    b = models[(kind, torch.float32)]
    plain = reference_logits(b, CLEAN, CORRUPT, set())  # same hook flags => same rounding
    p = 2
    for edge, later_changes in [
        ("Embed->A0.1.k", True),
        ("A0.2->A1.0.k", True),
        ("A0.0->Out", False),
    ]:
        logits = reference_logits(b, CLEAN, CORRUPT, {f"{edge}@{p}"})
        assert torch.equal(logits[:, :p], plain[:, :p]), edge
        assert (logits[:, p] - plain[:, p]).abs().max() > 1e-5, edge
        later = (logits[:, p + 1 :] - plain[:, p + 1 :]).abs().max()
        assert (later > 1e-5) if later_changes else (later == 0), edge


# --------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_metric_by_hand(models, kind):
    """The reference's metrics equal KL and MSE computed by hand."""
    b = models[(kind, torch.float64)]
    removed = {"Embed->Out", "A0.1->A1.2.q", "A1.0->Out"}
    circ = reference_logits(b, CLEAN, CORRUPT, removed)
    full = _plain(b, CLEAN)
    for all_pos in (False, True):
        sl = slice(None) if all_pos else slice(-1, None)
        pf = torch.softmax(full[:, sl], -1)
        pc = torch.softmax(circ[:, sl], -1)
        kl = (pf * (pf.log() - pc.log())).sum(-1).mean().item()
        mse = ((circ[:, sl] - full[:, sl]) ** 2).mean().item()
        assert kl > 1e-4
        assert reference_metric(b, CLEAN, CORRUPT, removed, all_positions=all_pos) == pytest.approx(
            kl, rel=1e-9
        )
        assert reference_metric(
            b, CLEAN, CORRUPT, removed, metric="mse", all_positions=all_pos
        ) == pytest.approx(mse, rel=1e-9)


# --------------------------------------------------------------------------------------
# The ACDC loop
# --------------------------------------------------------------------------------------


def _check_chain(steps: list[RefStep], tau, abs_delta=False):
    """metric_before chains through removals; decisions follow the threshold rule."""
    cur = 0.0
    for s in steps:
        assert s.metric_before == cur, s
        d = s.metric_after - s.metric_before
        assert s.removed == ((abs(d) if abs_delta else d) < tau), s
        if s.removed:
            cur = s.metric_after
    return cur


@pytest.mark.parametrize("kind", KINDS)
def test_tau_extremes(models, kind):
    """tau = -inf removes nothing (each step measures one edge alone); a huge tau removes
    everything, ending at the KL between the clean and the corrupt run."""
    b = models[(kind, torch.float64)]
    names = _all_edges(b)
    # tau = -inf: nothing removed, every candidate is measured against the full model
    # (first 20 steps only: the loop is brute force, one full forward per edge)
    keep = reference_acdc(b, CLEAN, CORRUPT, tau=-math.inf, max_steps=20)
    assert [s.edge for s in keep] == names[:20]
    assert not any(s.removed for s in keep)
    assert all(s.metric_before == 0.0 for s in keep)
    # single-edge metrics are the from-scratch metrics of that edge alone
    for s in keep[:5]:
        assert s.metric_after == pytest.approx(
            reference_metric(b, CLEAN, CORRUPT, {s.edge}), rel=1e-9, abs=1e-15
        )
    # huge tau: everything removed; final circuit == corrupt run
    drop = reference_acdc(b, CLEAN, CORRUPT, tau=1e12)
    assert all(s.removed for s in drop)
    final = _check_chain(drop, 1e12)
    pf = torch.log_softmax(_plain(b, CLEAN)[:, -1], -1)
    pc = torch.log_softmax(_plain(b, CORRUPT)[:, -1], -1)
    kl_clean_corrupt = (pf.exp() * (pf - pc)).sum(-1).mean().item()
    assert final == pytest.approx(kl_clean_corrupt, rel=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_acdc_run_is_consistent(models, kind):
    """A realistic run: chaining, threshold rule, and the final circuit's metric
    recomputed from scratch."""
    b = models[(kind, torch.float64)]
    steps = reference_acdc(b, CLEAN, CORRUPT, tau=0.002, max_steps=45)
    n_removed = sum(s.removed for s in steps)
    assert 0 < n_removed < len(steps)  # tau chosen so that both decisions occur
    final = _check_chain(steps, 0.002)
    removed = {s.edge for s in steps if s.removed}
    assert reference_metric(b, CLEAN, CORRUPT, removed) == pytest.approx(final, rel=1e-9, abs=1e-12)


def test_acdc_options(models):
    """With other options (mean and zero ablation, mse, all positions, abs_delta, positions)
    the steps chain, follow the threshold rule and end at the from-scratch metric."""
    b = models[("native", torch.float64)]
    for kw in [
        {
            "ablation": "mean",
            "metric": "mse",
            "all_positions": True,
            "abs_delta": True,
            "tau": 0.01,
        },
        {"ablation": "zero", "positions": True, "tau": 0.005},
    ]:
        steps = reference_acdc(b, CLEAN, CORRUPT, max_steps=40, **kw)
        assert len(steps) == 40
        final = _check_chain(steps, kw["tau"], kw.get("abs_delta", False))
        removed = {s.edge for s in steps if s.removed}
        m = reference_metric(
            b,
            CLEAN,
            CORRUPT,
            removed,
            ablation=kw["ablation"],
            metric=kw.get("metric", "kl"),
            all_positions=kw.get("all_positions", False),
        )
        assert m == pytest.approx(final, rel=1e-9, abs=1e-12)
    pos_steps = reference_acdc(b, CLEAN, CORRUPT, tau=0.0, positions=True, max_steps=8)
    assert [s.edge for s in pos_steps] == _all_edges(b, positions=True)[:8]


def test_restores_bridge_state(tmp_path):
    """The reference flips hook flags and eval mode temporarily; it must restore them
    and must not depend on the caller having called .eval() (dropout would make
    every pass random)."""
    b = _make_gpt2(tmp_path, torch.float32)
    b.train()
    assert not b.cfg.use_split_qkv_input and not b.cfg.use_attn_result
    r1 = reference_metric(b, CLEAN, CORRUPT, {"Embed->Out", "A0.1->A1.0.v"})
    r2 = reference_metric(b, CLEAN, CORRUPT, {"Embed->Out", "A0.1->A1.0.v"})
    assert r1 == r2
    assert b.training and all(m.training for m in b.modules())
    assert not b.cfg.use_split_qkv_input and not b.cfg.use_attn_result and not b.cfg.use_hook_mlp_in
