"""The bundled Llama induction model: a Hugging Face directory loaded offline through
TransformerLens 4, its hash checks, its tokenizer, its grouped-query circuit, and the CLI on it.

What it shares with the other two induction models (head scores, the circuit recovering the
task, ACDC's default run) is tested for all three in ``test_induction.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket

import pytest
import torch

from acdc_viz.cli import main
from acdc_viz.graph import CircuitGraph
from acdc_viz.models.adapter import from_model
from acdc_viz.tasks import get_task, induction
from acdc_viz.tasks.base import TaskError
from acdc_viz.tasks.bundled import BUNDLED_DIR, BundledModelError, bundled_meta, load_bundled

NAME = induction.LLAMA_MODEL


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails: what loads here loads offline."""

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def model():
    return get_task("induction-llama").load_model("cpu")


def test_it_is_a_small_hugging_face_llama_directory():
    from transformers import AutoConfig

    meta = bundled_meta(NAME)
    folder = BUNDLED_DIR / NAME
    assert meta["format"] == "transformers"
    assert sorted(meta["sha256"]) == sorted(p.name for p in folder.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(meta["sha256"])
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    expected = induction.HF_MODEL_CONFIGS[NAME]
    assert config.model_type == "llama"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size"):
        assert getattr(config, key) == expected[key], key


def test_loads_offline_through_boot_transformers(no_network):
    from transformer_lens.model_bridge import TransformerBridge

    reloaded = load_bundled(NAME)
    assert isinstance(reloaded, TransformerBridge)
    assert reloaded.cfg.n_key_value_heads == 2 and reloaded.cfg.n_heads == 4
    assert reloaded.cfg.model_name == NAME  # not the path it is installed at
    weights = from_model(reloaded, induction.make_pairs(4, 0).clean)  # checks our forward
    assert weights.kv_group == (0, 0, 1, 1) and weights.rotary is not None
    assert weights.layers[0].W_gate is not None  # SwiGLU
    get_task("induction-llama").check_model(reloaded)


def test_tokenizer_writes_the_task_tokens(model):
    pairs = induction.make_pairs(2, 0)
    assert model.to_str_tokens(pairs.clean[0]) == induction.token_labels(pairs)
    assert model.to_tokens("t5 t9 t5").tolist() == [[induction.BOS, 5, 9, 5]]


def test_does_induction(model):
    pairs = induction.make_pairs(200, 7)
    positions = list(induction.repeated_positions(pairs.seq_len))
    targets = pairs.clean[:, [p - pairs.seq_len // 2 + 1 for p in positions]]
    with torch.no_grad():
        predicted = model(pairs.clean)[:, positions].argmax(-1)
    assert (predicted == targets).float().mean() > 0.99
    assert bundled_meta(NAME)["build"]["induction_accuracy"] > 0.99


def _copy(tmp_path):
    shutil.copy(BUNDLED_DIR / f"{NAME}.json", tmp_path / f"{NAME}.json")
    shutil.copytree(BUNDLED_DIR / NAME, tmp_path / NAME)
    load_bundled(NAME, directory=tmp_path)  # the copy itself loads
    return tmp_path / NAME


@pytest.mark.parametrize("file", ["model.safetensors", "config.json", "tokenizer.json"])
def test_every_file_is_hash_checked(tmp_path, file):
    path = _copy(tmp_path) / file
    path.write_bytes(path.read_bytes() + b" ")  # a trailing byte: still readable, not the same
    with pytest.raises(BundledModelError, match="sha256"):
        load_bundled(NAME, directory=tmp_path)
    path.unlink()
    with pytest.raises(BundledModelError, match="missing"):
        load_bundled(NAME, directory=tmp_path)


def test_a_stray_file_is_refused(tmp_path):
    (_copy(tmp_path) / "pytorch_model.bin").write_bytes(b"not listed")
    with pytest.raises(BundledModelError, match="does not list"):
        load_bundled(NAME, directory=tmp_path)


def test_canonical_circuit_names_the_kv_groups(model):
    task = get_task("induction-llama")
    heads = induction.recorded_heads(NAME)
    assert heads == {"previous_token": ["A0.0", "A0.1"],
                     "induction": ["A1.0", "A1.1", "A1.2", "A1.3"]}
    canonical = task.canonical_edges(False, induction.SEQ_LEN)
    assert canonical == set(bundled_meta(NAME)["build"]["canonical_edges"])
    assert {"A0.0->A1.kv0.k", "A0.1->A1.kv1.k", "Embed->A0.kv0.v", "Embed->A1.kv1.v",
            "Embed->A1.3.q", "A1.3->Out"} <= canonical
    assert len(canonical) == 15
    assert not [e for e in canonical if re.search(r"A\d+\.\d+\.[kv]$", e)]  # no per-head k/v
    graph = CircuitGraph.from_config(model.cfg)
    assert len(graph) == 82 and canonical <= set(graph.edge_index)


def test_check_model_wants_the_kv_groups():
    with pytest.raises(TaskError, match="n_key_value_heads"):
        get_task("induction-llama").check_model(get_task("induction-gpt2").load_model("cpu"))


def test_cli_run_finds_the_canonical_circuit(no_network, tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert main(["run", "--task", "induction-llama", "--out", str(out), "--quiet"]) == 0
    assert "edges kept 15 of 82" in capsys.readouterr().out
    trace = json.loads(out.read_text())
    kept = set(trace["final"]["kept_edges"])
    assert kept == get_task("induction-llama").canonical_edges(False, induction.SEQ_LEN)
