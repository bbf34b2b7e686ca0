"""Memory per hypothesis (automatic K on a GPU) and half precision on a modern family.

``hypothesis_memory`` estimates what one more hypothesis adds to a dense pass; automatic K on a
GPU fits ``MEMORY_SHARE`` of the free memory with it. These tests need no GPU: the estimate is
checked against the peak memory that the CPU allocator reports to the profiler while the engine
evaluates dense passes of K = 2 and K = 6 hypotheses (the slope is the cost of one hypothesis),
and automatic K against a patched ``torch.cuda.mem_get_info``. An out-of-memory error halving K
is tested in ``test_acdc.py`` (``test_out_of_memory_halves_the_hypotheses``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch
from conftest import gpt2_bridge, token_pairs
from model_families import VOCAB
from torch.profiler import ProfilerActivity, profile

from acdc_viz import Acdc, TokenPairs
from acdc_viz.acdc import (
    MAX_HYPOTHESES,
    MEMORY_SHARE,
    ApproximateWarning,
    hypothesis_memory,
)

torch.set_num_threads(1)


def peak_bytes(fn) -> int:
    """The most memory allocated at once while ``fn()`` runs, beyond what was allocated before
    (from the allocator's events, as the profiler records them; the models here are on CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    assert prof.profiler is not None and prof.profiler.kineto_results is not None
    events = sorted((e.start_ns(), getattr(e, "nbytes")())  # noqa: B009 (missing from stubs)
                    for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    assert events, "the profiler recorded no allocations"
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def dense_pass_peak(model, pairs: TokenPairs, k: int, **kw: Any) -> tuple[int, Acdc]:
    """The peak memory of the first pass of a fresh run (its buffers included) over the last
    ``k`` edges of the visit order (into layer 0's attention), with the circuit made dense above:
    every destination above layer 0 loses its edge from ``Embed`` and keeps all the others, so it
    has an input of its own that differs between hypotheses."""
    acdc = Acdc(model, pairs, tau=1e-3, batch_hypotheses=k, **kw)
    for edge in acdc.graph.edges:
        if edge.src.kind == "embed" and (edge.dest.kind == "out" or edge.dest.layer >= 1):
            acdc.runner.set_removed(edge, True)
    chain = tuple(acdc.graph.edges[-k:])
    return peak_bytes(lambda: acdc._chain_metrics(chain)), acdc


@pytest.fixture(scope="module")
def models(tmp_path_factory, family):
    """``models(name)``: a GPT-2 bridge with a wider vocabulary, or a family of
    ``model_families``."""
    gpt2 = {}

    def get(name):
        if name != "gpt2":
            return family(name).bridge, VOCAB
        if not gpt2:
            gpt2["model"] = gpt2_bridge(tmp_path_factory.mktemp("gpt2-wide"), n_layer=2, n_head=4,
                                        n_embd=64, vocab_size=2000, n_positions=32)
        return gpt2["model"], 2000

    return get


# (model, Acdc keywords, prompt length): GPT-2 (plain MLP, large vocabulary), Llama (GQA with
# 2 key/value heads for 4 query heads, SwiGLU, RMSNorm upcast, float32 softmax), GPT-NeoX
# (parallel blocks, partial rotary); float32, bfloat16 and float64; positions, all positions.
CASES = [
    ("gpt2", {}, 12),
    ("gpt2", {"dtype": "bfloat16"}, 12),
    ("gpt2", {"all_positions": True}, 12),
    ("llama", {}, 24),
    ("llama", {"dtype": "bfloat16"}, 24),
    ("llama", {"positions": True}, 12),
    ("llama-mqa-tied", {"dtype": "float64"}, 24),
    ("gpt_neox", {}, 12),
]


@pytest.mark.parametrize(("name", "kw", "pos"), CASES,
                         ids=[f"{n}-{'-'.join(f'{a}={b}' for a, b in k.items()) or 'default'}"
                              for n, k, _ in CASES])
def test_the_estimate_bounds_the_measured_cost_of_a_hypothesis(models, name, kw, pos):
    """Per hypothesis, a dense pass over the model's 2 blocks allocates at most the estimate for
    2 dense blocks, and no less than half of it."""
    model, vocab = models(name)
    pairs = TokenPairs(*token_pairs(batch=4, pos=pos, d_vocab=vocab))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ApproximateWarning)
        two, acdc = dense_pass_peak(model, pairs, 2, **kw)
        six, _ = dense_pass_peak(model, pairs, 6, **kw)
    measured = (six - two) / 4
    estimate = hypothesis_memory(acdc.weights, pairs.batch_size, pairs.seq_len,
                                 last_position_only=acdc.metric.last_position_only,
                                 positions=acdc.graph.n_positions is not None, dtype=acdc.dtype,
                                 blocks=acdc.weights.n_layers)
    assert measured <= estimate.total <= 2 * measured, (measured, estimate)


def fake_gpu(monkeypatch, acdc: Acdc, free: int) -> None:
    """Make ``acdc`` believe it runs on a GPU with ``free`` bytes free."""
    monkeypatch.setattr(acdc, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))


def test_automatic_k_fills_a_share_of_the_free_gpu_memory(models, monkeypatch):
    model, vocab = models("llama")
    pairs = TokenPairs(*token_pairs(batch=8, pos=16, d_vocab=vocab))
    acdc = Acdc(model, pairs, tau=1e-3)
    assert acdc.batch_hypotheses == 32                        # the CPU maximum
    need = hypothesis_memory(acdc.weights, 8, 16).total
    for hypotheses in (1, 3, 40):
        fake_gpu(monkeypatch, acdc, int(hypotheses * need / MEMORY_SHARE) + 1)
        assert acdc._auto_hypotheses() == hypotheses
    fake_gpu(monkeypatch, acdc, 10 ** 15)
    assert acdc._auto_hypotheses() == MAX_HYPOTHESES
    fake_gpu(monkeypatch, acdc, 1)
    assert acdc._auto_hypotheses() == 1                       # at least one, even when full


def test_the_estimate_follows_the_architecture(models):
    """Each term grows with what it counts: batch, prompt length, vocabulary (with a metric over
    all positions), a gated MLP's width, key/value heads, and the run's dtype."""
    gqa = Acdc(models("llama")[0], TokenPairs(*token_pairs(d_vocab=VOCAB)), tau=1e-3).weights
    mha = dataclasses.replace(gqa, kv_group=None, layers=[
        dataclasses.replace(layer, W_K=layer.W_Q, b_K=layer.b_Q, W_V=layer.W_Q, b_V=layer.b_Q)
        for layer in gqa.layers])
    base = hypothesis_memory(gqa, 4, 16)
    assert hypothesis_memory(gqa, 8, 16) == tuple(2 * t for t in base)
    longer = hypothesis_memory(gqa, 4, 32)           # all but the logits, at the last position
    assert all(b < t for b, t in zip(base[:-1], longer[:-1], strict=True))
    assert hypothesis_memory(gqa, 4, 16, last_position_only=False).logits == 16 * base.logits
    assert hypothesis_memory(gqa, 4, 16, positions=True).dependent_outputs > base.dependent_outputs
    # a gated MLP holds the gate, its activation, the linear branch and their product
    plain = dataclasses.replace(gqa, layers=[dataclasses.replace(layer, W_gate=None)
                                             for layer in gqa.layers])
    W_in = gqa.layers[0].W_in
    assert W_in is not None
    d_mlp = int(W_in.shape[1])
    assert base.mlp - hypothesis_memory(plain, 4, 16).mlp == 4 * 2 * d_mlp * 16 * 4
    # with 2 key/value heads for 4 query heads, making a block's inputs takes 8 rows, not 12
    assert gqa.n_kv_heads == 2 and mha.n_kv_heads == 4
    making = 2 * (4 + 2 * 2) * 16 * 64 * 4 * 4
    assert hypothesis_memory(gqa, 4, 16).attention >= making
    assert hypothesis_memory(mha, 4, 16).attention > hypothesis_memory(gqa, 4, 16).attention
    half = hypothesis_memory(gqa, 4, 16, dtype=torch.bfloat16)
    assert half.total < base.total
    assert half.logits > base.logits / 2           # the metric stays in float32


def test_bfloat16_on_a_grouped_query_llama_is_approximate_with_a_float32_metric(models):
    """bfloat16 weights run end to end on a modern family (GQA, SwiGLU, RMSNorm, rotary): the run
    warns, its trace says approximate, the metric sees float32 logits, and the first decision
    that differs from float32 (if any) has a delta within bfloat16's rounding of tau."""
    model, vocab = models("llama")
    pairs = TokenPairs(*token_pairs(batch=4, pos=6, d_vocab=vocab))
    tau = 3e-3
    exact = Acdc(model, pairs, tau=tau).run()
    with pytest.warns(ApproximateWarning, match="approximate"):
        half = Acdc(model, pairs, tau=tau, dtype="bfloat16")
    seen = []
    many_fn = half.metric.many_fn
    assert many_fn is not None

    def spy(circuit: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        seen.append((circuit.dtype, full.dtype))
        return many_fn(circuit, full)

    half.metric = dataclasses.replace(half.metric, many_fn=spy)
    trace = half.run()
    assert half.weights.dtype == torch.bfloat16 and trace.is_complete
    assert trace.settings["dtype"] == "bfloat16" and trace.settings["approximate"] is True
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    first = next((i for i, (a, b) in enumerate(zip(exact.steps, trace.steps, strict=True))
                  if a.removed != b.removed), None)
    if first is not None:
        rounding = max(abs(a.metric_after - b.metric_after)
                       for a, b in zip(exact.steps[:first], trace.steps[:first], strict=True))
        assert abs(exact.steps[first].delta - tau) <= 2 * rounding + 1e-3
    assert trace.final_metric is not None and exact.final_metric is not None
    assert abs(trace.final_metric - exact.final_metric) < 0.01
