"""ACDC runs: determinism, resume, test_mode, settings and bad input, auto-circuit's entry point."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import token_pairs

from acdc_viz import (
    Acdc,
    DataError,
    DecisionMismatch,
    ModelSupportError,
    RunOutOfMemory,
    SettingsError,
    TokenPairs,
    acdc_prune_scores,
    load_trace,
    save_trace,
)
from acdc_viz.acdc import ApproximateWarning


def pairs_for(model, **kw):
    return TokenPairs(*token_pairs(d_vocab=model.cfg.d_vocab, **kw))


@pytest.mark.parametrize("positions", [False, True])
def test_two_runs_give_identical_traces(gpt2, positions):
    a = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, positions=positions).run()
    b = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, positions=positions).run()
    assert a.canonical_json() == b.canonical_json()
    assert a.is_complete and 0 < a.steps[-1].kept_edges < len(a.steps)


@pytest.mark.parametrize("positions", [False, True])
def test_resume_gives_the_uninterrupted_result(gpt2, tmp_path, positions):
    full = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, positions=positions).run()
    first = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, positions=positions)
    for i, _ in enumerate(first.steps()):
        if i == 40:
            break
    assert first.trace.status == "stopped" and first.trace.resume_from == 41
    save_trace(first.trace, tmp_path / "stopped.json")
    resumed = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, positions=positions,
                   resume=load_trace(tmp_path / "stopped.json")).run()
    assert resumed.canonical_json() == full.canonical_json()


def test_resume_refuses_other_settings(gpt2):
    acdc = Acdc(gpt2, pairs_for(gpt2), tau=1e-3)
    next(acdc.steps())
    with pytest.raises(SettingsError, match="tau"):
        Acdc(gpt2, pairs_for(gpt2), tau=2e-3, resume=acdc.trace)
    with pytest.raises(SettingsError, match="data_hash"):
        Acdc(gpt2, pairs_for(gpt2, seed=5), tau=1e-3, resume=acdc.trace)


def test_steps_can_pause_and_continue(gpt2):
    acdc = Acdc(gpt2, pairs_for(gpt2), tau=1e-3)
    it = acdc.steps()
    first = [next(it) for _ in range(3)]
    assert [s.index for s in first] == [0, 1, 2]
    rest = list(acdc.steps())          # a fresh generator continues where the last one stopped
    assert rest[0].index == 3 and acdc.done and len(acdc.trace.steps) == acdc.n_edges


def test_final_metric_recomputed_from_scratch(native_ln):
    acdc = Acdc(native_ln, pairs_for(native_ln), tau=3e-3, ablation="mean")
    trace = acdc.run()
    assert acdc.final_metric_from_scratch() == pytest.approx(trace.final_metric, abs=1e-5)


@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_test_mode_agrees_on_a_model_with_layernorm_and_mlps(native_ln, ablation):
    trace = Acdc(native_ln, pairs_for(native_ln, batch=2, pos=4), tau=3e-3, ablation=ablation,
                 test_mode=True, positions=True).run()
    assert trace.is_complete


def test_test_mode_catches_a_wrong_engine(gpt2, monkeypatch):
    acdc = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, test_mode=True)
    real = acdc.runner.chain_logits
    monkeypatch.setattr(acdc.runner, "chain_logits",
                        lambda chain: real(chain) + 0.1 * torch.randn_like(real(chain)))
    with pytest.raises(DecisionMismatch, match="hooked"):
        acdc.run()


def test_abs_delta_and_metrics(gpt2):
    for metric in ("kl", "mse"):
        plain = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, metric=metric).run()
        absolute = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, metric=metric, abs_delta=True).run()
        for s in absolute.steps:
            assert s.removed == (abs(s.delta) < 1e-3)
        for s in plain.steps:
            assert s.removed == (s.delta < 1e-3)


def test_user_metric_callable(gpt2):
    calls = []

    def logit_l1(circuit, full):
        calls.append(circuit.shape)
        return (circuit - full).abs().mean()

    trace = Acdc(gpt2, pairs_for(gpt2), tau=1e-2, metric=logit_l1).run()
    assert trace.settings["metric"] == "logit_l1"
    assert calls[0] == (4, 6, gpt2.cfg.d_vocab)     # a plain callable sees every position


def test_float64_and_all_positions(gpt2):
    trace = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, dtype="float64", all_positions=True).run()
    assert trace.settings["dtype"] == "float64" and trace.settings["metric"] == "kl_all_positions"


@pytest.mark.parametrize("tau", [float("nan"), -1.0, float("inf"), "abc", None])
def test_bad_tau(gpt2, tau):
    with pytest.raises(SettingsError, match="tau"):
        Acdc(gpt2, pairs_for(gpt2), tau=tau)


def test_bad_settings(gpt2):
    with pytest.raises(SettingsError, match="ablation"):
        Acdc(gpt2, pairs_for(gpt2), tau=1e-3, ablation="gaussian")
    with pytest.raises(SettingsError, match="metric"):
        Acdc(gpt2, pairs_for(gpt2), tau=1e-3, metric="accuracy")
    with pytest.raises(SettingsError, match="dtype"):
        Acdc(gpt2, pairs_for(gpt2), tau=1e-3, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="CUDA"):
            Acdc(gpt2, pairs_for(gpt2), tau=1e-3, device="cuda")


def test_bad_data(gpt2):
    clean, corrupt = token_pairs(d_vocab=50)
    with pytest.raises(DataError, match="shape"):
        Acdc(gpt2, (clean, corrupt[:, :-1]), tau=1e-3)
    with pytest.raises(DataError, match="dtype"):
        Acdc(gpt2, (clean, corrupt.to(torch.int32)), tau=1e-3)
    with pytest.raises(DataError, match="empty|batch"):
        Acdc(gpt2, (clean[:0], corrupt[:0]), tau=1e-3)
    with pytest.raises(DataError, match="vocab|d_vocab"):
        Acdc(gpt2, (clean + 100, corrupt), tau=1e-3)


def test_model_without_what_the_engine_needs():
    with pytest.raises(ModelSupportError, match="TransformerLens"):
        Acdc(torch.nn.Linear(3, 3), token_pairs(), tau=1e-3)

    class Rotary(torch.nn.Module):
        class cfg:
            n_layers, n_heads, d_vocab, d_head, n_ctx = 1, 1, 50, 4, 8
            positional_embedding_type = "rotary"
            normalization_type = "RMS"
            act_fn = "silu"
            attn_only = False

    with pytest.raises(ModelSupportError, match="rotary"):
        Acdc(Rotary(), token_pairs(), tau=1e-3)


def test_out_of_memory_keeps_the_trace(gpt2, monkeypatch, tmp_path):
    """At one hypothesis per pass there is nothing left to halve: the run stops, trace kept."""
    acdc = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, batch_hypotheses=1)
    real, calls = acdc.runner.chain_logits, []

    def flaky(chain):
        calls.append(chain)
        if len(calls) == 6:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(chain)

    monkeypatch.setattr(acdc.runner, "chain_logits", flaky)
    with pytest.raises(RunOutOfMemory, match="smaller batch") as info:
        acdc.run()
    assert info.value.trace is acdc.trace and len(acdc.trace.steps) == 5
    save_trace(acdc.trace, tmp_path / "t.json")            # what is kept can be saved and resumed
    resumed = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, resume=load_trace(tmp_path / "t.json")).run()
    assert resumed.is_complete


def test_acdc_prune_scores(gpt2):
    """auto-circuit's entry point scores each edge with the smallest tau of the grid
    that removed it in a single run, +inf if none did."""
    clean, corrupt = token_pairs(d_vocab=50)
    loader = [{"clean": clean, "corrupt": corrupt}, {"clean": clean[:1], "corrupt": corrupt[:1]}]
    scores = acdc_prune_scores(gpt2, loader, official_edges=None, tao_exps=[-6, -5],
                               tao_bases=[1, 5])
    runs = {tau: Acdc(gpt2, TokenPairs(clean, corrupt), tau=tau).run()
            for tau in (1e-6, 5e-6, 1e-5, 5e-5)}
    assert len(scores) == len(runs[1e-5].graph.edges)
    for name, score in scores.items():
        removed_at = [tau for tau, t in sorted(runs.items())
                      if name in t.removed_after(len(t.steps) - 1)]
        assert score == (removed_at[0] if removed_at else math.inf)
    assert any(math.isinf(s) for s in scores.values())
    assert any(not math.isinf(s) for s in scores.values())
    with pytest.raises(SettingsError, match="faithfulness"):
        acdc_prune_scores(gpt2, loader, faithfulness_target="logit_diff")


@pytest.mark.parametrize("positions", [False, True])
def test_speculative_hypotheses_change_nothing(gpt2, positions):
    """K hypotheses per pass, the causal prefix reused, a metric over all positions, and every
    decision re-checked by test_mode's hooked full forward pass."""
    kw = {"tau": 1e-3, "positions": positions, "all_positions": True, "dtype": "float64"}
    one = Acdc(gpt2, pairs_for(gpt2), **kw).run()
    many = Acdc(gpt2, pairs_for(gpt2), batch_hypotheses=5, test_mode=True, **kw)
    assert many.runner.reuse_prefix == positions
    assert_same_decisions(many.run(), one)


@pytest.mark.parametrize("positions", [False, True])
def test_pausing_mid_chain_changes_nothing(gpt2, positions):
    """Leaving ``steps()`` inside a chain and calling it again walks the same chain: the trace is
    the uninterrupted one, bit for bit."""
    full = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, positions=positions).run()
    paused = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, positions=positions)
    while not paused.done:
        for i, _ in enumerate(paused.steps()):
            if i == 6:
                break
    assert paused.trace.canonical_json() == full.canonical_json()


def test_automatic_chains_grow_while_edges_go_and_shrink_when_one_stays(gpt2, monkeypatch):
    """Automatic K doubles while whole chains are removed and falls back to the run of
    removals that a kept edge ended."""
    acdc = Acdc(gpt2, pairs_for(gpt2), tau=1e-3)
    assert acdc.adaptive and acdc.batch_hypotheses == 32        # the CPU maximum
    real, chains = acdc.runner.chain_logits, []
    monkeypatch.setattr(acdc.runner, "chain_logits",
                        lambda chain: chains.append(len(chain)) or real(chain))
    trace = acdc.run()
    assert max(chains) > 4 and sum(chains) < 2 * len(trace.steps)
    start, length = 0, 1
    for size in chains:
        assert size <= length                 # a chain may end early at its destination group
        walked = trace.steps[start: start + size]
        kept = next((j for j, s in enumerate(walked) if not s.removed), None)
        # doubles while whole chains go; falls back to the run of removals a kept edge ended
        length = min(2 * length, 32) if kept is None else max(1, kept)
        start += size if kept is None else kept + 1
    assert start == len(trace.steps)


def assert_same_decisions(a, b):
    """Same edges, same decisions, metrics equal up to float64 rounding (a batched matmul rounds
    differently from an unbatched one)."""
    assert [(s.edge, s.removed) for s in a.steps] == [(s.edge, s.removed) for s in b.steps]
    assert [s.metric_after for s in a.steps] == pytest.approx(
        [s.metric_after for s in b.steps], rel=1e-9, abs=1e-12)


def test_out_of_memory_halves_the_hypotheses(gpt2, monkeypatch):
    """An out-of-memory error halves K and retries, and the decisions stay those of K = 1."""
    expected = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, dtype="float64").run()
    acdc = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, batch_hypotheses=16, dtype="float64")
    real, sizes = acdc.runner.chain_logits, []

    def small_device(chain):
        sizes.append(len(chain))
        if len(chain) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(chain)

    monkeypatch.setattr(acdc.runner, "chain_logits", small_device)
    assert_same_decisions(acdc.run(), expected)
    # The first chain is Out's 9 edges (a chain stays within one destination block), then 4.
    assert sizes[:2] == [9, 4] and max(sizes[1:]) == 4 and acdc.batch_hypotheses == 4


def test_half_precision_is_flagged_approximate(gpt2):
    with pytest.warns(ApproximateWarning, match="approximate"):
        acdc = Acdc(gpt2, pairs_for(gpt2), tau=1e-3, dtype="bfloat16")
    assert acdc.trace.settings["approximate"] is True
    assert Acdc(gpt2, pairs_for(gpt2), tau=1e-3).trace.settings["approximate"] is False
    bad_values: tuple[Any, ...] = (0, -2, 2.5, True, "4")
    for bad in bad_values:
        with pytest.raises(SettingsError, match="batch_hypotheses"):
            Acdc(gpt2, pairs_for(gpt2), tau=1e-3, batch_hypotheses=bad)


def test_vectorised_metrics_equal_one_by_one():
    from acdc_viz.metrics import resolve_metric

    g = torch.Generator().manual_seed(0)
    circuits, full = torch.randn(5, 3, 4, 11, generator=g), torch.randn(3, 4, 11, generator=g)
    for name in ("kl", "mse"):
        metric = resolve_metric(name, all_positions=True)
        one_by_one = [metric(c, full) for c in circuits]
        assert metric.many(circuits, full).tolist() == pytest.approx(one_by_one, rel=1e-6)
