"""The bundled induction models: loading, head identification, canonical circuits, ACDC on them.

The Llama model's own format (a Hugging Face directory) and its grouped-query names are tested
in ``test_induction_llama.py``; the tests here run on all three models."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from acdc_viz import Acdc
from acdc_viz.graph import CircuitGraph
from acdc_viz.models.adapter import from_model
from acdc_viz.tasks import induction
from acdc_viz.tasks.base import TaskError
from acdc_viz.tasks.bundled import BundledModelError, bundled_meta, load_bundled

TASKS = {t.name: t for t in induction.TASKS}
MODELS = {t.name: t.model_name for t in induction.TASKS}


def kv(task, head: str) -> str:
    """Where ``head`` reads its keys and values: itself, or its KV group (the Llama model)."""
    return induction.kv_inputs(head, induction.kv_group_size(task.model_name))


@pytest.fixture(scope="module", params=sorted(TASKS))
def loaded(request):
    task = TASKS[request.param]
    return task, task.load_model("cpu")


def test_three_bundled_tasks_one_attention_only():
    assert sorted(TASKS) == ["induction", "induction-gpt2", "induction-llama"]
    assert all(t.bundled for t in TASKS.values())
    attn_only, gpt2 = (bundled_meta(MODELS[name])["config"] for name in ("induction",
                                                                          "induction-gpt2"))
    assert attn_only["attn_only"] is True and attn_only["normalization_type"] is None
    assert gpt2["attn_only"] is False and gpt2["normalization_type"] == "LN"


def test_bundled_files_are_small():
    from acdc_viz.tasks.bundled import BUNDLED_DIR

    for model_name in MODELS.values():
        folder = BUNDLED_DIR / model_name  # a Hugging Face directory, or one safetensors file
        files = list(folder.iterdir()) if folder.is_dir() else [folder.with_suffix(".safetensors")]
        assert sum(f.stat().st_size for f in files) < 2_000_000


def test_model_loads_and_the_adapter_accepts_it(loaded):
    task, model = loaded
    task.check_model(model)
    pairs = task.make_pairs(8, 0)
    weights = from_model(model, pairs.clean)  # raises if our forward differs from the model's
    with torch.no_grad():
        torch.testing.assert_close(weights.forward(pairs.clean), model(pairs.clean), atol=1e-4,
                                   rtol=1e-4)


def test_model_does_induction(loaded):
    task, model = loaded
    pairs = task.make_pairs(50, 7)
    metric = task.metrics["nll_repeated"](pairs)
    with torch.no_grad():
        assert metric(model(pairs.clean), model(pairs.clean)) < 0.05


def test_corrupt_weights_are_refused(tmp_path):
    from acdc_viz.tasks.bundled import BUNDLED_DIR

    name = MODELS["induction"]
    for suffix in (".json", ".safetensors"):
        shutil.copy(BUNDLED_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    load_bundled(name, directory=tmp_path)
    weights = tmp_path / f"{name}.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundledModelError, match="sha256"):
        load_bundled(name, directory=tmp_path)


def test_head_identification_reproduces_the_recorded_heads(loaded):
    task, model = loaded
    build = bundled_meta(task.model_name)["build"]
    tokens = induction.make_pairs(build["score_prompts"], build["seeds"]["scores"]).clean
    scores = induction.head_scores(model, tokens)
    for kind in ("previous_token", "induction"):
        torch.testing.assert_close(torch.tensor(scores[kind]),
                                   torch.tensor(build["head_scores"][kind]), atol=1e-3, rtol=0)
    heads = induction.identify_heads(scores)
    assert heads == build["heads"] == induction.recorded_heads(task.model_name)
    assert heads["previous_token"] and heads["induction"]
    assert all(h.startswith("A0.") for h in heads["previous_token"])
    assert all(h.startswith("A1.") for h in heads["induction"])


@pytest.mark.parametrize("positions", [False, True])
def test_canonical_circuit_is_a_subgraph(loaded, positions):
    task, model = loaded
    seq_len = induction.SEQ_LEN
    canonical = task.canonical_edges(positions, seq_len)
    graph = CircuitGraph.from_config(model.cfg, n_positions=seq_len if positions else None)
    assert canonical and canonical <= set(graph.edge_index)
    heads = induction.recorded_heads(task.model_name)
    for prev in heads["previous_token"]:
        for ind in heads["induction"]:
            key = f"{prev}->{kv(task, ind)}.k"
            assert (key in canonical) if not positions else (f"{key}@{seq_len // 2}" in canonical)
    if positions:
        assert {e.split("@")[0] for e in canonical} == task.canonical_edges(False, seq_len)


def test_canonical_circuit_does_the_task_alone(loaded):
    task, model = loaded
    pairs = task.make_pairs(task.default_prompts, 0)
    weights = from_model(model, pairs.clean[:4])
    metric = task.metrics["nll_repeated"](pairs)
    full = induction.circuit_metric(weights, pairs, None, metric)
    empty = induction.circuit_metric(weights, pairs, set(), metric)
    for positions in (False, True):
        edges = task.canonical_edges(positions, pairs.seq_len)
        canonical = induction.circuit_metric(weights, pairs, edges, metric)
        recovered = (empty - canonical) / (empty - full)
        assert recovered > 0.8, (positions, full, canonical, empty)


def test_default_run_keeps_the_key_edges(loaded):
    task, model = loaded
    pairs = task.make_pairs(task.default_prompts, 0)
    start = time.perf_counter()
    metric = task.metrics[task.default_metric](pairs)
    trace = Acdc(model, pairs, tau=task.default_tau, metric=metric,
                 ablation=task.default_ablation).run()
    seconds = time.perf_counter() - start
    kept = set(trace.final_kept_edges)
    heads = induction.recorded_heads(task.model_name)
    # The induction heads are redundant, so ACDC may drop one of them whole; every induction head
    # it keeps must still read a previous-token head through its key and the token through its
    # query.
    kept_heads = [i for i in heads["induction"] if f"{i}->Out" in kept]
    assert len(kept_heads) >= len(heads["induction"]) - 1
    for ind in kept_heads:
        assert any(f"{p}->{kv(task, ind)}.k" in kept for p in heads["previous_token"]), ind
        assert f"Embed->{ind}.q" in kept, ind
    build = bundled_meta(task.model_name)["build"]
    scores = build["head_scores"]["previous_token"][0]
    strongest = max(heads["previous_token"], key=lambda h: scores[int(h[3:])])
    assert f"Embed->{kv(task, strongest)}.v" in kept
    assert len({kv(task, ind) for ind in heads["induction"]
                if f"{strongest}->{kv(task, ind)}.k" in kept}) >= 2
    canonical = task.canonical_edges(False, pairs.seq_len)
    assert len(kept & canonical) >= 0.6 * len(canonical), sorted(canonical - kept)
    assert len(kept & canonical) >= 0.5 * len(kept), sorted(kept - canonical)
    assert seconds < 60


def test_make_pairs_is_deterministic_and_well_formed():
    a, b, c = induction.make_pairs(30, 5), induction.make_pairs(30, 5), induction.make_pairs(30, 6)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt)
    assert not torch.equal(a.clean, c.clean)
    L = induction.SEGMENT_LEN
    assert a.clean.shape == a.corrupt.shape == (30, 2 * L)
    assert (a.clean[:, 0] == induction.BOS).all() and (a.corrupt[:, 0] == induction.BOS).all()
    assert torch.equal(a.clean[:, L + 1:], a.clean[:, 1:L])
    assert len({tuple(r) for r in a.clean.tolist()}) == 30
    for row in a.clean[:, 1:L + 1].tolist() + a.corrupt[:, 1:].tolist():
        assert len(set(row)) == len(row) and induction.BOS not in row
    assert int(a.clean.max()) < induction.D_VOCAB


def test_make_pairs_refuses_impossible_requests():
    limit = induction.distinct_prompt_count(2)
    assert limit == (induction.D_VOCAB - 1) * (induction.D_VOCAB - 2)
    pairs = induction.make_pairs(limit, 0, segment_len=2)
    assert len({tuple(r) for r in pairs.clean.tolist()}) == limit
    with pytest.raises(TaskError, match="distinct"):
        induction.make_pairs(limit + 1, 0, segment_len=2)
    for bad in (0, -1, 2.5):
        with pytest.raises(TaskError):
            induction.make_pairs(bad, 0)  # type: ignore[arg-type]


def test_metrics_and_labels():
    pairs = induction.make_pairs(4, 0)
    labels = induction.token_labels(pairs)
    assert labels[0] == "BOS" and labels[1] == f"t{int(pairs.clean[0, 1])}"
    assert len(labels) == pairs.seq_len
    logits = torch.randn(4, pairs.seq_len, induction.D_VOCAB)
    assert induction.kl_metric(pairs)(logits, logits) == pytest.approx(0.0, abs=1e-6)
    assert not induction.nll_metric(pairs).last_position_only


def test_check_model_rejects_the_other_architecture():
    gpt2 = TASKS["induction-gpt2"].load_model("cpu")
    with pytest.raises(TaskError, match="does not fit"):
        TASKS["induction"].check_model(gpt2)


def test_canonical_edges_need_an_induction_prompt_length():
    with pytest.raises(TaskError):
        TASKS["induction"].canonical_edges(True, 7)


def test_registry_knows_the_tasks():
    from acdc_viz.tasks import get_task

    assert get_task("induction").model_name == "induction-attn-only-2l"
    assert get_task("induction-gpt2").bundled
