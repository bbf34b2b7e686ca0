"""Loading real model names and every decoder family offline (issue 13, items 3, 5 and 7).

- The hub names of the README (Pythia, Qwen2.5, Llama 3.2, Gemma 2, Phi-2) go through the real
  TransformerLens 4 loader, ``TransformerBridge.boot_transformers``. Without the weights they fail
  at once (hub offline mode, no 20 s of retries) with the message that says how to bring them;
  with the weights in the local Hugging Face cache they load offline, even when the cache holds
  no tokenizer files.
- A local directory without tokenizer files (``tests/model_families.py``) loads through
  ``load_model`` for every family, with a placeholder tokenizer; the adapter then reads it or
  refuses it by name. A model TransformerLens cannot wrap is a ``ModelLoadError``, not a
  traceback.
- ``acdc-viz run --model DIR`` runs a supported family end to end and refuses another with the
  feature and the families that work.
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from model_families import FAMILIES, KNOWN_BROKEN, VOCAB, reload_hf
from test_adapter_families import REFUSED

from acdc_viz.cli import EXIT_ERROR, EXIT_OK, main
from acdc_viz.data import TokenPairs, save_token_pairs
from acdc_viz.errors import ModelSupportError
from acdc_viz.models.adapter import TransformerWeights, from_model
from acdc_viz.models.loading import ModelLoadError, load_model
from acdc_viz.models.support import SUPPORTED_FAMILIES
from acdc_viz.trace import load_trace

torch.set_num_threads(1)

#: A hub failure must come at once, not after huggingface_hub's ~20 s of retries.
FAST_S = 10.0
#: The README's example models, and the tiny family that stands in for each in a local cache.
HUB_MODELS = {
    "EleutherAI/pythia-70m": "gpt_neox",
    "Qwen/Qwen2.5-0.5B": "qwen2",
    "meta-llama/Llama-3.2-1B": "llama",
    "google/gemma-2-2b": "gemma2",
    "microsoft/phi-2": "phi",
}
#: Families whose directory TransformerLens 4.3 cannot boot at all.
UNBOOTABLE = {name for name, (exc, _) in KNOWN_BROKEN.items() if exc is RuntimeError}
# REFUSED (tests/test_adapter_families.py): the families the adapter refuses, with the words
# its message must contain.
#: HF's eager attention takes its softmax in float32; these bridges re-implement it in float64.
FLOAT32_SOFTMAX_IN_HF_ONLY = {"gpt_neox", "gpt_neox-sequential", "falcon"}
TOKENS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def boot_calls(monkeypatch):
    """The model names ``TransformerBridge.boot_transformers`` is called with (it still runs)."""
    from transformer_lens.model_bridge import TransformerBridge

    calls: list[str] = []
    real = TransformerBridge.boot_transformers

    def spy(model_name, **kwargs):
        calls.append(model_name)
        return real(model_name, **kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(spy))
    return calls


def _instructions_in(message: str, name: str) -> None:
    assert f"Could not load {name!r} from the Hugging Face hub" in message
    assert f"from_pretrained({name!r}).save_pretrained(DIR)" in message
    assert "--model DIR" in message and "load_model(DIR)" in message and "HF_HOME" in message


@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_hub_names_go_through_boot_transformers_and_fail_fast_offline(
        name, monkeypatch, empty_hf_cache, boot_calls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    assert time.monotonic() - start < FAST_S
    assert boot_calls == [name]
    assert isinstance(info.value.__cause__, OSError)
    message = str(info.value)
    _instructions_in(message, name)
    assert "offline mode is set" in message


@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_cli_run_with_a_hub_name_and_no_network(name, monkeypatch, empty_hf_cache, boot_calls,
                                                tmp_path, capsys):
    """No offline flag: the reachability probe (forced to find no hub) keeps it fast."""
    from huggingface_hub import constants

    from acdc_viz.models import loading

    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    out = tmp_path / "trace.json"
    start = time.monotonic()
    assert main(["run", "--model", name, "--out", str(out), "--quiet"]) == EXIT_ERROR
    assert time.monotonic() - start < FAST_S
    assert boot_calls == [name]
    err = capsys.readouterr().err
    assert "acdc-viz: error: " in err and "no network?" in err and "Traceback" not in err
    _instructions_in(err, name)
    assert not out.exists()


def _cache(cache_root, name, directory) -> None:
    """Put ``directory`` into the Hugging Face cache as hub model ``name`` (revision main)."""
    commit = "0" * 40
    repo = cache_root / f"models--{name.replace('/', '--')}"
    shutil.copytree(directory, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("name", sorted(HUB_MODELS))
def test_cached_hub_model_without_tokenizer_loads_offline(name, family, monkeypatch,
                                                           empty_hf_cache, boot_calls):
    """Weights in the cache but no tokenizer files: a placeholder tokenizer, as for a
    directory (boot_transformers alone fails for Llama and gives Qwen2 a one-token one)."""
    fm = family(HUB_MODELS[name])
    boot_calls.clear()                                # the fixture may have just booted it
    _cache(empty_hf_cache, name, fm.directory)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(name, dtype=torch.float64)
    assert boot_calls == [name]
    assert len(model.tokenizer) == VOCAB and model.tokenizer.encode("<3> <17>") == [3, 17]
    with torch.no_grad():
        err = (model(TOKENS) - reload_hf(fm.directory)(TOKENS).logits).abs().max().item()
    assert err <= 1e-6
    if HUB_MODELS[name] in REFUSED:
        with pytest.raises(ModelSupportError, match=REFUSED[HUB_MODELS[name]][0]):
            from_model(model)
    else:
        assert isinstance(from_model(model), TransformerWeights)


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - UNBOOTABLE))
def test_every_family_loads_from_a_directory_without_tokenizer(name, family):
    """``load_model(DIR)``: the logits of the saved model, a placeholder tokenizer; then the
    adapter reads it or refuses it, naming the feature and the families that work."""
    fm = family(name)
    assert not any(fm.directory.glob("tokenizer*")) and not any(fm.directory.glob("vocab*"))
    model = load_model(fm.directory, dtype=torch.float64)
    assert len(model.tokenizer) == VOCAB and model.tokenizer.encode("<3> <17>") == [3, 17]
    if name not in KNOWN_BROKEN:
        with torch.no_grad():
            err = (model(TOKENS) - reload_hf(fm.directory)(TOKENS).logits).abs().max().item()
        assert err <= (1e-6 if name in FLOAT32_SOFTMAX_IN_HF_ONLY else 1e-12), err
    if name in REFUSED:
        with pytest.raises(ModelSupportError) as info:
            from_model(model)
        message = str(info.value)
        assert all(words in message for words in REFUSED[name]) and SUPPORTED_FAMILIES in message
    else:
        assert isinstance(from_model(model), TransformerWeights)


@pytest.mark.parametrize("name", sorted(UNBOOTABLE))
def test_a_model_transformerlens_cannot_wrap_is_a_clear_error(name, tmp_path):
    """Phi with qk_layernorm: the directory is saved, boot_transformers raises RuntimeError."""
    with pytest.raises(RuntimeError):
        FAMILIES[name](tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "TransformerLens 4 could not wrap the model" in message and "RuntimeError" in message
    assert "acdc_viz would refuse it in any case: q/k norms" in message
    assert SUPPORTED_FAMILIES in message


@pytest.mark.parametrize(("name", "expected"),
                         [("gpt_neox", EXIT_OK), ("falcon-alibi", EXIT_ERROR)])
def test_cli_run_on_a_family_directory(name, expected, family, tmp_path, capsys, monkeypatch):
    """``acdc-viz run --model DIR --data FILE``: Pythia-style runs to a complete trace; Falcon-RW
    is refused before any edge is tested, naming the features and the families that work."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = torch.Generator().manual_seed(0)
    data = save_token_pairs(TokenPairs(torch.randint(0, VOCAB, (4, 5), generator=g),
                                       torch.randint(0, VOCAB, (4, 5), generator=g)),
                            tmp_path / "pairs.json")
    out = tmp_path / "trace.json"
    argv = ["run", "--model", str(family(name).directory), "--data", str(data), "--tau", "1e-2",
            "--out", str(out), "--quiet"]
    assert main(argv) == expected
    captured = capsys.readouterr()
    if expected == EXIT_OK:
        trace = load_trace(out)
        assert trace.is_complete and "edges tested" in captured.out
    else:
        assert not out.exists() and "Traceback" not in captured.err
        assert "acdc-viz: error: acdc_viz cannot give per-head access" in captured.err
        assert "ALiBi" in captured.err and "GPT-NeoX/Pythia" in captured.err
