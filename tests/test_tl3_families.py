"""acdc_viz's ACDC decisions against the brute-force reference on TransformerLens 3.x models.

Issue 13: where TransformerLens 3.x ``HookedTransformer`` supports a family, every ACDC decision
of acdc_viz must equal the brute-force reference (``tests/reference_acdc.py``) run on it too.
TransformerLens 3 re-implements each architecture itself (rotary, gated MLPs, parallel blocks,
its own norms), so this cross-checks the engine against code that shares nothing with the
Hugging Face modules the TransformerLens 4 bridges wrap.

For each family of ``CASES``:

1. a tiny random Hugging Face model (the config and weights of ``tests/model_families.py``,
   float64, no tokenizer files) is saved to a directory;
2. a TransformerLens 3 ``HookedTransformer`` is built from the same weights offline, with TL 3's
   own config conversion (``get_pretrained_model_config`` on the directory) and weight
   converter (``transformer_lens.pretrained.weight_conversions``); its logits must equal the
   Hugging Face model's;
3. acdc_viz runs ACDC as a user does, ``Acdc(load_model(DIR))`` (a TransformerLens 4 bridge),
   and the reference runs on the ``HookedTransformer``: every decision must be equal.

TransformerLens 3 and 4 cannot share one environment, so step 3's engine runs in the
TransformerLens 4 environment, in a subprocess of this file (``python tests/test_tl3_families.py
JOBS RESULTS``): ``$ACDC_VIZ_TL4_PYTHON``, by default ``.venv/bin/python``. Under TransformerLens
4 itself (the normal test run) the tests are skipped; ``make test-tl3`` runs them.

TL 3 computes in float64 throughout, while Hugging Face (and so the bridge, and the engine, which
mirrors it) takes rotary angles, the attention softmax and RMSNorm in float32. So logits agree to
~1e-7, metrics to ``METRIC_TOLERANCE``, and the decisions exactly (no delta lies that close to
tau).

TL 3.9's config conversion does not cover every family here: for Phi it reads
``hf_config.partial_rotary_factor``, which transformers 5 no longer has (AttributeError), and it
knows Gemma, Gemma 2 and OLMo only by their official names. For those, ``_config_by_hand``
writes the config as TL 3's branch for the official checkpoints does, with the tiny model's sizes.

Covered: Llama (multi-head, and grouped-query as Llama 3), Qwen2, Qwen3, Mistral (sliding
window), Gemma, Gemma 2 (sandwich norms, soft caps, a local and a global layer), OLMo,
GPT-NeoX/Pythia (parallel and sequential), Phi and GPT-J (whose TL 4 bridge has no split-input
hooks, so this is where the reference checks it). A family is one line in ``BUILDERS`` and one in
``CASES``. Not here: the families acdc_viz refuses (OLMo 2 and Bloom, which TL 3 has) and Falcon,
which TL 3 lacks.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from model_families import FAMILIES, VOCAB, build_llama, build_mistral, reload_hf

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4: HookedTransformer is gone
    HookedTransformer = HookedTransformerConfig = None

pytestmark = pytest.mark.skipif(HookedTransformer is None,
                                reason="needs TransformerLens 3.x (make test-tl3)")

REPO = Path(__file__).resolve().parents[1]
TAU = 3e-3
#: Engine (float32 islands as in HF) against the reference on TL 3 (float64 throughout).
METRIC_TOLERANCE = 1e-6
#: TL 3's logits against Hugging Face's float64 model (whose float32 steps TL 3 lacks; measured
#: 1.8e-7 to 1.1e-6, Qwen3's float32 q/k norms the most).
LOGIT_TOLERANCE = 3e-6
#: The K the engine runs with: the adaptive one (tests/test_engine_*.py check that every K gives
#: the same trace).
HYPOTHESES = (None,)

#: Builders of the families checked: those of tests/model_families.py, plus a multi-head Llama
#: and a Mistral whose window (2) bites on the 4-token prompts.
BUILDERS = {
    **{name: FAMILIES[name] for name in ("gpt_neox", "gpt_neox-sequential", "llama", "qwen2",
                                         "qwen3", "gemma", "gemma2", "olmo", "phi", "gptj",
                                         "bloom")},
    "llama-mha": functools.partial(build_llama, num_key_value_heads=4),
    "mistral-window2": functools.partial(build_mistral, sliding_window=2),
}
#: (ablation, positions) per family: every ablation on each kind of model, and the position
#: split on five (with positions, the reference's pass per edge makes a case 4 times longer).
CASES: dict[str, list[tuple[str, bool]]] = {
    "llama-mha": [("resample", False), ("zero", True), ("mean", False)],    # multi-head
    "llama": [("resample", False), ("mean", True)],                         # grouped-query 4/2
    "qwen2": [("resample", False), ("zero", False)],                        # q/k/v biases, GQA
    "qwen3": [("resample", False), ("mean", False)],                        # per-head q/k norms
    "mistral-window2": [("resample", False), ("zero", True)],               # sliding window
    "gemma": [("resample", False), ("mean", False)],                        # 1 + w norms, GQA
    "gemma2": [("resample", False), ("zero", True), ("mean", False)],       # sandwich, caps
    "olmo": [("resample", False), ("zero", False)],                         # LN without params
    "gpt_neox": [("resample", True), ("zero", False), ("mean", False)],     # parallel, 2 LN
    "gpt_neox-sequential": [("resample", False), ("mean", False)],
    "phi": [("resample", False), ("zero", False), ("mean", True)],          # parallel, 1 LN
    "gptj": [("resample", False), ("zero", True), ("mean", False)],         # interleaved rotary
    "bloom": [("resample", False), ("zero", True), ("mean", False)],        # ALiBi, embed LN
}


# ------------------------------------------------------------------------------------------
# The TransformerLens 3 side
# ------------------------------------------------------------------------------------------

def _config_by_hand(hf_config: Any) -> dict[str, Any]:
    """TL 3's config for families its conversion cannot read from a directory, written as its
    branch for the official checkpoints does (``google/gemma-7b``, ``allenai/OLMo-1B-hf``,
    ``PhiForCausalLM``), with the sizes and the activation of ``hf_config`` (TL 3's Gemma
    branches say exact "gelu"; the Hugging Face Gemma config asks for tanh GELU)."""
    arch = hf_config.architectures[0]
    cfg: dict[str, Any] = {
        "d_model": hf_config.hidden_size, "n_heads": hf_config.num_attention_heads,
        "d_head": getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads,
        "d_mlp": hf_config.intermediate_size, "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings, "d_vocab": hf_config.vocab_size,
        "positional_embedding_type": "rotary", "original_architecture": arch,
        "rotary_base": hf_config.rope_parameters["rope_theta"], "use_attn_scale": True,
    }
    if arch == "PhiForCausalLM":
        factor = hf_config.rope_parameters.get("partial_rotary_factor", 1.0)
        cfg |= {"eps": hf_config.layer_norm_eps, "act_fn": hf_config.hidden_act,
                "normalization_type": "LN", "parallel_attn_mlp": True,
                "rotary_dim": round(factor * cfg["d_head"]), "default_prepend_bos": False}
    elif arch == "GemmaForCausalLM":
        # n_key_value_heads is set even when equal to n_heads, as for gemma-7b
        cfg |= {"eps": hf_config.rms_norm_eps, "act_fn": hf_config.hidden_activation,
                "normalization_type": "RMS", "rotary_dim": cfg["d_head"], "gated_mlp": True,
                "final_rms": True, "n_key_value_heads": hf_config.num_key_value_heads}
    elif arch == "Gemma2ForCausalLM":
        cfg |= {"eps": hf_config.rms_norm_eps, "act_fn": hf_config.hidden_activation,
                "normalization_type": "RMS", "rotary_dim": cfg["d_head"], "gated_mlp": True,
                "final_rms": True, "n_key_value_heads": hf_config.num_key_value_heads,
                "use_normalization_before_and_after": True, "use_local_attn": True,
                "window_size": hf_config.sliding_window,
                "attn_types": ["local" if "sliding" in t else "global"
                               for t in hf_config.layer_types],
                "attn_scores_soft_cap": hf_config.attn_logit_softcapping,
                "output_logits_soft_cap": hf_config.final_logit_softcapping,
                "attn_scale": hf_config.query_pre_attn_scalar ** 0.5}
    elif arch == "OlmoForCausalLM":
        cfg |= {"eps": 1e-5, "act_fn": hf_config.hidden_act, "normalization_type": "LN",
                "rotary_dim": cfg["d_head"], "gated_mlp": True,
                "attn_types": ["global"] * cfg["n_layers"], "clip_qkv": hf_config.clip_qkv}
    else:
        raise ValueError(f"no hand-written TransformerLens 3 config for {arch}")
    return cfg


def hooked_from_directory(directory: Path) -> Any:
    """A TL 3 ``HookedTransformer`` (float64, eval) with the weights saved in ``directory``,
    built offline as ``HookedTransformer.from_pretrained`` would, without processing (no
    LayerNorm folding or centring: the reference patches the model's own computation)."""
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.pretrained import weight_conversions as convert

    assert HookedTransformer is not None and HookedTransformerConfig is not None
    hf = reload_hf(directory)
    arch = hf.config.architectures[0]
    if arch in ("PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "OlmoForCausalLM"):
        cfg = HookedTransformerConfig(**_config_by_hand(hf.config), dtype=torch.float64,
                                      device="cpu")
    else:
        # TL 3 picks some architectures from substrings of the name ("llama", "gemma")
        assert not any(s in str(directory).lower() for s in ("llama", "gemma")), directory
        cfg = loading.get_pretrained_model_config(str(directory), dtype=torch.float64,
                                                  device="cpu")
        if arch == "GPTJForCausalLM" and hf.config.n_inner:   # TL 3 assumes 4 * d_model
            cfg.d_mlp = hf.config.n_inner
    converters = {
        "GPTNeoXForCausalLM": convert.convert_neox_weights,
        "LlamaForCausalLM": convert.convert_llama_weights,
        "Qwen2ForCausalLM": convert.convert_qwen2_weights,
        "PhiForCausalLM": convert.convert_phi_weights,
        "GemmaForCausalLM": convert.convert_gemma_weights,
        "Gemma2ForCausalLM": convert.convert_gemma_weights,
        "OlmoForCausalLM": convert.convert_olmo_weights,
        "Qwen3ForCausalLM": convert.convert_qwen3_weights,
        "MistralForCausalLM": convert.convert_mistral_weights,
        "GPTJForCausalLM": convert.convert_gptj_weights,
        "BloomForCausalLM": convert.convert_bloom_weights,
    }
    cfg.tokenizer_name = None  # the directory has no tokenizer; the reference feeds token ids
    model = HookedTransformer(cfg)
    with torch.no_grad():
        state = converters[arch](hf, cfg)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.to(torch.float64).eval()


# ------------------------------------------------------------------------------------------
# The TransformerLens 4 side (a subprocess running this file)
# ------------------------------------------------------------------------------------------

def _tl4_python() -> Path | None:
    """The TransformerLens 4 environment's interpreter, or None. Made absolute, not resolved:
    a virtual environment's python is a symlink that must not be followed."""
    path = Path(os.environ.get("ACDC_VIZ_TL4_PYTHON", REPO / ".venv" / "bin" / "python"))
    return path.absolute() if path.is_file() else None


def engine_main(jobs_file: str, results_file: str) -> None:
    """Subprocess entry (TransformerLens 4): build each family's directory, load it with
    ``load_model`` and run every case through ``Acdc``; write the steps as JSON."""
    from acdc_viz import Acdc, TokenPairs
    from acdc_viz.models.loading import load_model

    torch.set_num_threads(1)
    jobs = json.loads(Path(jobs_file).read_text())
    clean, corrupt = torch.tensor(jobs["clean"]), torch.tensor(jobs["corrupt"])
    results: dict[str, Any] = {}
    for family, directory in jobs["families"].items():
        BUILDERS[family](Path(directory))
        model = load_model(directory, dtype=torch.float64)
        for ablation, positions in jobs["cases"][family]:
            for k in jobs["hypotheses"]:
                trace = Acdc(model, TokenPairs(clean, corrupt), tau=jobs["tau"],
                             ablation=ablation, positions=positions, dtype=torch.float64,
                             batch_hypotheses=k).run()
                results[f"{family}/{ablation}/{positions}/{k}"] = [
                    [s.edge, s.removed, s.metric_before, s.metric_after] for s in trace.steps]
    Path(results_file).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The saved directories, the prompt pairs, and the engine's steps for every case."""
    python = _tl4_python()
    if python is None:
        pytest.skip("no TransformerLens 4 environment: set ACDC_VIZ_TL4_PYTHON")
    base = tmp_path_factory.mktemp("tl3")
    directories = {family: base / f"m{i}" for i, family in enumerate(CASES)}
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, VOCAB, (3, 4), generator=g)
    corrupt = torch.randint(0, VOCAB, (3, 4), generator=g)
    jobs = {"families": {f: str(d) for f, d in directories.items()}, "cases": CASES,
            "clean": clean.tolist(), "corrupt": corrupt.tolist(), "tau": TAU,
            "hypotheses": list(HYPOTHESES)}
    (base / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([str(python), __file__, str(base / "jobs.json"),
                           str(base / "results.json")], cwd=REPO, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return directories, clean, corrupt, json.loads((base / "results.json").read_text())


@pytest.fixture(scope="module")
def hooked(runs):
    """``hooked(family)``: the TL 3 model of a family's directory, built once."""
    built: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in built:
            built[family] = hooked_from_directory(runs[0][family])
        return built[family]

    return get


@pytest.mark.parametrize("family", sorted(CASES))
def test_hooked_transformer_equals_hugging_face(runs, hooked, family):
    model = hooked(family)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(tokens)
        theirs = reload_hf(runs[0][family])(tokens).logits
    assert ours.dtype == theirs.dtype == torch.float64
    err = (ours - theirs).abs().max().item()
    print(f"{family}: max |TL 3 logit - HF logit| = {err:.3g}")
    assert err <= LOGIT_TOLERANCE


@pytest.mark.parametrize(("family", "ablation", "positions"),
                         [(f, a, p) for f, cases in sorted(CASES.items()) for a, p in cases])
def test_engine_equals_the_reference_on_the_hooked_transformer(runs, hooked, family, ablation,
                                                               positions):
    """Every step's edge and decision equal; metrics within ``METRIC_TOLERANCE``; a mixed
    circuit."""
    from reference_acdc import reference_acdc

    _, clean, corrupt, results = runs
    ref = reference_acdc(hooked(family), clean, corrupt, tau=TAU, ablation=ablation,
                         positions=positions)
    assert 0 < sum(r.removed for r in ref) < len(ref), "tau should give a mixed circuit"
    for k in HYPOTHESES:
        steps = results[f"{family}/{ablation}/{positions}/{k}"]
        assert [(edge, removed) for edge, removed, _, _ in steps] == \
            [(r.edge, r.removed) for r in ref]
        worst = max(max(abs(before - r.metric_before), abs(after - r.metric_after))
                    for (_, _, before, after), r in zip(steps, ref, strict=True))
        print(f"{family} {ablation} positions={positions} K={k}: {len(ref)} edges, "
              f"{sum(r.removed for r in ref)} removed, max |metric - reference| = {worst:.3g}")
        assert worst <= METRIC_TOLERANCE


@pytest.mark.xfail(strict=True, reason="acdc_viz reads rotary embeddings only through a "
                   "TransformerLens 4 bridge: Acdc refuses a rotary HookedTransformer")
def test_engine_on_the_hooked_transformer_itself(runs, hooked):
    from reference_acdc import reference_acdc

    from acdc_viz import Acdc, TokenPairs
    from acdc_viz.errors import ModelSupportError

    _, clean, corrupt, _ = runs
    model = hooked("llama-mha")
    try:
        trace = Acdc(model, TokenPairs(clean, corrupt), tau=TAU, dtype=torch.float64).run()
    except ModelSupportError as exc:
        assert "rotary" in str(exc) and "Hugging Face original" in str(exc)
        raise
    ref = reference_acdc(model, clean, corrupt, tau=TAU)
    assert [(s.edge, s.removed) for s in trace.steps] == [(r.edge, r.removed) for r in ref]


if __name__ == "__main__":
    engine_main(*sys.argv[1:3])
