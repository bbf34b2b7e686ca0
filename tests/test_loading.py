"""Model loading without network access (acdc_viz.models.loading)."""

from __future__ import annotations

import time

import pytest
import torch

from acdc_viz.models.loading import (
    ModelLoadError,
    build_tiny_gpt2,
    load_model,
    model_identity,
)

# A hub miss must fail at once, not after huggingface_hub's ~20 s of retries.
FAST_S = 10.0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)


def test_build_tiny_gpt2_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = load_file(build_tiny_gpt2(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(build_tiny_gpt2(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(build_tiny_gpt2(tmp_path / "c", seed=2) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dtype.is_floating_point)


def test_build_tiny_gpt2_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_gpt2(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_load_directory_matches_hf_logits(tiny_dir, tiny_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    tokens = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tiny_model(tokens)
        theirs = hf(tokens).logits
    assert ours.shape == (3, 12, 100)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_load_directory_without_tokenizer_uses_token_ids(tiny_model):
    assert tiny_model.cfg.n_layers == 2 and tiny_model.cfg.n_heads == 4
    assert tiny_model.cfg.d_vocab == 100
    # The placeholder tokenizer maps "<i>" to id i and stays inside the vocabulary.
    assert tiny_model.tokenizer.encode("<3> <17> <99>") == [3, 17, 99]
    assert len(tiny_model.tokenizer) == 100


def test_load_directory_honours_dtype(tiny_dir):
    model = load_model(tiny_dir, dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json.*save_pretrained"):
        load_model(tmp_path)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path / "missing" / "model")
    assert time.monotonic() - start < 1.0


def assert_fast_hub_failure(name: str) -> ModelLoadError:
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    elapsed = time.monotonic() - start
    assert elapsed < FAST_S, f"hub failure took {elapsed:.1f}s"
    assert info.value.__cause__ is not None
    return info.value


def test_hub_name_fails_fast_with_instructions_when_offline(monkeypatch, empty_hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = str(assert_fast_hub_failure("gpt2"))
    assert "Could not load 'gpt2' from the Hugging Face hub" in message
    assert "offline mode is set" in message
    assert "from_pretrained('gpt2').save_pretrained(DIR)" in message
    assert "load_model(DIR)" in message and "HF_HOME" in message


def test_offline_mode_is_restored_after_a_load(monkeypatch, empty_hf_cache):
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_fast_hub_failure("gpt2")
    assert constants.HF_HUB_OFFLINE == before


@pytest.mark.parametrize(
    "name",
    ["attn-only-4l", "NeelNanda/attn-only-4l"],    # redwood_attn_2l: test_paper_tasks.py
)
def test_legacy_names_go_to_boot_tl_legacy(monkeypatch, empty_hf_cache, name):
    from transformer_lens.model_bridge import TransformerBridge

    called = []

    def fake_legacy(repo, **kwargs):
        called.append(repo)
        raise OSError("offline")

    monkeypatch.setattr(TransformerBridge, "boot_tl_legacy", staticmethod(fake_legacy))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = str(assert_fast_hub_failure(name))
    assert called and called[0].startswith(("NeelNanda/", "ArthurConmy/"))
    assert called[0] in {"NeelNanda/Attn_Only_4L512W_C4_Code", "ArthurConmy/redwood_attn_2l"}
    assert "legacy TransformerLens checkpoint" in message


def test_hub_name_fails_fast_without_offline_flag(monkeypatch, empty_hf_cache):
    """No HF_HUB_OFFLINE: the reachability probe must still keep the failure fast."""
    from huggingface_hub import constants

    from acdc_viz.models import loading

    start = time.perf_counter()
    loading._hub_reachable()                      # the probe itself answers within its timeout
    assert time.perf_counter() - start < loading.HUB_PROBE_TIMEOUT_S + 2
    # Whatever the network here, take the path of a machine where the probe finds no hub.
    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    message = str(assert_fast_hub_failure("gpt2"))
    assert "no network?" in message
    assert "save_pretrained(DIR)" in message


def test_model_identity_is_stable_and_tracks_the_config(tiny_dir, tiny_model, tmp_path):
    first = model_identity(tiny_model)
    assert first == model_identity(load_model(tiny_dir))
    assert set(first) == {"name", "config_hash", "n_layers", "n_heads", "d_model", "attn_only"}
    assert (first["n_layers"], first["n_heads"], first["d_model"], first["attn_only"]) == (
        2,
        4,
        64,
        False,
    )
    assert len(first["config_hash"]) == 64
    other = model_identity(load_model(build_tiny_gpt2(tmp_path / "wide", n_head=8)))
    assert other["config_hash"] != first["config_hash"]
    assert other["n_heads"] == 8


def test_model_identity_needs_a_cfg():
    with pytest.raises(TypeError, match=r"needs a TransformerLens model with a \.cfg"):
        model_identity(torch.nn.Linear(2, 2))


def test_cached_hub_model_loads_offline(monkeypatch, empty_hf_cache, tiny_dir):
    """Offline mode only stops downloads: a model already in the HF cache still loads."""
    import shutil

    commit = "0" * 40
    repo = empty_hf_cache / "models--local--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("local/tiny")
    assert model_identity(model)["name"] == "local/tiny"
    assert model.cfg.n_layers == 2


def test_hub_error_while_online_says_to_check_the_name(monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    from acdc_viz.models import loading

    def not_found(name, **kwargs):
        raise OSError(f"{name} is not a valid model identifier")

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(not_found))
    with pytest.raises(ModelLoadError, match=r"not a valid model identifier.*Check the name") as e:
        load_model("no-such-org/no-such-model")
    assert isinstance(e.value.__cause__, OSError)
    assert "save_pretrained(DIR)" in str(e.value)
