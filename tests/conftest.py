"""Tiny models built locally (no hub): GPT-2 bridges and native attention-only bridges."""

from __future__ import annotations

import logging

import pytest
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)
# The test models are tiny: one thread is faster, and two OpenMP teams on a busy 2-core machine
# made small-tensor tests up to 100 times slower.
torch.set_num_threads(1)


def gpt2_bridge(tmp_dir, *, n_layer=2, n_head=3, n_embd=24, vocab_size=50, n_positions=16, seed=0):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                    vocab_size=vocab_size, n_positions=n_positions))
    hf.save_pretrained(tmp_dir)
    hf.eval()  # a freshly built HF model is in training mode (dropout on)
    return TransformerBridge.boot_transformers(str(tmp_dir), hf_model=hf, device="cpu")


def native_bridge(*, normalization_type=None, attn_only=True, n_layers=2, n_heads=4, d_model=32,
                  d_vocab=50, seed=0, attention_dir="causal"):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=d_model,
        d_head=d_model // n_heads,
        n_layers=n_layers,
        n_ctx=16,
        n_heads=n_heads,
        d_vocab=d_vocab,
        attn_only=attn_only,
        normalization_type=normalization_type,
        seed=seed,
        act_fn="gelu",
        attention_dir=attention_dir,
    )
    return TransformerBridge.boot_native(cfg)


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    return gpt2_bridge(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def attn_only():
    return native_bridge()


@pytest.fixture(scope="session")
def native_ln():
    return native_bridge(normalization_type="LN", attn_only=False)


def token_pairs(batch=4, pos=6, d_vocab=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (batch, pos), generator=g)
    corrupt = torch.randint(0, d_vocab, (batch, pos), generator=g)
    return clean, corrupt


def shortformer_checkpoint(directory, *, n_layers=2, n_heads=4, d_model=16, d_head=4, d_vocab=50,
                           n_ctx=16, seed=0):
    """A random attention-only shortformer model saved as redwood_attn_2l is: a TransformerLens
    HookedTransformer state dict (``final.pth``: the same key names, mask buffers included) and
    a TransformerLens-style ``config.json``. Returns (directory, state dict, config)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return shift + scale * torch.randn(*shape, generator=g)

    sd = {"embed.W_E": rand(d_vocab, d_model), "pos_embed.W_pos": rand(n_ctx, d_model, scale=0.8)}
    for layer in range(n_layers):
        a = f"blocks.{layer}"
        sd[f"{a}.ln1.w"] = rand(d_model, scale=0.2, shift=1.0)
        sd[f"{a}.ln1.b"] = rand(d_model, scale=0.2)
        for x in "QKV":
            sd[f"{a}.attn.W_{x}"] = rand(n_heads, d_model, d_head, scale=d_model**-0.5 * 1.5)
            sd[f"{a}.attn.b_{x}"] = rand(n_heads, d_head, scale=0.2)
        sd[f"{a}.attn.W_O"] = rand(n_heads, d_head, d_model, scale=d_head**-0.5)
        sd[f"{a}.attn.b_O"] = rand(d_model, scale=0.2)
        sd[f"{a}.attn.mask"] = torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool))
        sd[f"{a}.attn.IGNORE"] = torch.tensor(-1e5)
    sd["ln_final.w"] = rand(d_model, scale=0.2, shift=1.0)
    sd["ln_final.b"] = rand(d_model, scale=0.2)
    sd["unembed.W_U"] = rand(d_model, d_vocab, scale=d_model**-0.5 * 2)
    sd["unembed.b_U"] = rand(d_vocab, scale=0.2)
    config = {
        "act_fn": "gelu_new", "n_layers": n_layers, "d_model": d_model, "n_ctx": n_ctx,
        "d_head": d_head, "d_mlp": -1, "model_name": "custom", "n_heads": n_heads,
        "d_vocab": d_vocab, "eps": 1e-05, "use_attn_result": True, "use_attn_scale": True,
        "normalization_type": "LN", "attention_dir": "causal", "attn_only": True,
        "positional_embedding_type": "shortformer", "shortformer_pos": True, "final_rms": False,
        "d_vocab_out": d_vocab,
    }
    torch.save(sd, directory / "final.pth")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory, sd, config


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """``family(name)``: the tiny model of ``tests/model_families.py``, built once a session."""
    from model_families import FAMILIES

    built = {}

    def get(name):
        if name not in built:
            built[name] = FAMILIES[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get


def assert_engine_equals_reference(bridge, weights, *, tau, ablation, positions,
                                   hypotheses=(1, 4, None), tolerance=1e-9, label=""):
    """Run ACDC on ``weights`` for every K in ``hypotheses`` and the brute-force reference on
    ``bridge``: every step's edge and decision equal, metrics within ``tolerance``, and the
    circuit mixed (some edges removed, some kept). Returns the traces."""
    from reference_acdc import reference_acdc

    from acdc_viz import Acdc, TokenPairs

    clean, corrupt = token_pairs(batch=3, pos=4, d_vocab=int(weights.d_vocab))
    ref = reference_acdc(bridge, clean, corrupt, tau=tau, ablation=ablation, positions=positions)
    traces = []
    for k in hypotheses:
        trace = Acdc(weights, TokenPairs(clean, corrupt), tau=tau, ablation=ablation,
                     positions=positions, dtype=torch.float64, batch_hypotheses=k).run()
        assert [(s.edge, s.removed) for s in trace.steps] == [(r.edge, r.removed) for r in ref]
        worst = max(max(abs(s.metric_before - r.metric_before),
                        abs(s.metric_after - r.metric_after))
                    for s, r in zip(trace.steps, ref, strict=True))
        print(f"{label} {ablation} positions={positions} K={k}: {len(ref)} edges, "
              f"{sum(r.removed for r in ref)} removed, max |metric - reference| = {worst:.3g}")
        assert worst <= tolerance
        traces.append(trace)
    assert 0 < sum(r.removed for r in ref) < len(ref), "tau should give a mixed circuit"
    return traces


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point huggingface_hub at an empty cache, so nothing can come from a real one."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def assert_engine_forward_equals_bridge(bridge, weights, tolerance=1e-12):
    """The engine's clean run and its recomputations from the first block's attention, from the
    last block's MLP and from the second block give the bridge's own float64 logits."""
    import torch

    from acdc_viz.patching import CircuitRunner

    clean, corrupt = token_pairs(batch=3, pos=6, d_vocab=int(weights.d_vocab))
    runner = CircuitRunner(weights, weights.circuit_graph(6), clean, corrupt,
                           last_position_only=False)
    with torch.no_grad():
        theirs = bridge(clean)
    assert theirs.dtype == torch.float64
    starts = [(0, "attn"), (weights.n_layers - 1, "attn"), (weights.n_layers - 1, "mlp")]
    for ours in [runner.full_logits] + [runner.logits_from(*start) for start in starts
                                        if start[1] == "attn" or not weights.attn_only]:
        assert (ours - theirs).abs().max().item() <= tolerance


def assert_same_decisions_for_every_k(weights, hypotheses=(1, 4, None)):
    """For a model the hook-based reference cannot run on through its TL 4 bridge (it is checked
    through TL 3 instead): ACDC with positions gives the same decisions, and metrics within
    1e-12, for every number of hypotheses per pass, and a mixed circuit."""
    import torch

    from acdc_viz import Acdc, TokenPairs

    clean, corrupt = token_pairs(batch=3, pos=4, d_vocab=int(weights.d_vocab))
    traces = [Acdc(weights, TokenPairs(clean, corrupt), tau=3e-3, positions=True,
                   dtype=torch.float64, batch_hypotheses=k).run() for k in hypotheses]
    steps = [[(s.edge, s.removed) for s in t.steps] for t in traces]
    assert all(s == steps[0] for s in steps)
    for trace in traces[1:]:
        assert max(abs(a.metric_after - b.metric_after)
                   for a, b in zip(trace.steps, traces[0].steps, strict=True)) <= 1e-12
    assert 0 < sum(r for _, r in steps[0]) < len(steps[0])
