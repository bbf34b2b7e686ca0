"""tracr-reverse and tracr-proportion: the conversion, the canonical circuit, and ACDC's AUC of
1.000."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acdc_viz import Acdc, CircuitGraph
from acdc_viz.evaluate import sweep_rocs
from acdc_viz.models.adapter import from_model
from acdc_viz.tasks import TaskError, get_task
from acdc_viz.tasks import tracr as tt
from acdc_viz.tasks.bundled import BUNDLED_DIR, BundledModelError, bundled_meta, load_bundled

NAMES = ("tracr-reverse", "tracr-proportion")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core machine, torch's intra-op threads made the small
    einsums of the engine up to 300x slower (10 s instead of 0.03 s for one derivation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return {name: load_bundled(name) for name in NAMES}


def reference(name):
    return json.loads((tt.REFERENCE_DIR / f"{name}.json").read_text())


def assert_matches_tracr(model, ref):
    """The bridge's logits are tracr's output space; its argmax (or value) is tracr's decoding."""
    checked = 0
    for key, rows in ref["inputs"].items():
        with torch.no_grad():
            ours = model(torch.tensor(rows))
        torch.testing.assert_close(ours, torch.tensor(ref["outputs"][key]), atol=1e-5, rtol=0)
        decoded = ref["decoded"][key]
        assert all(row[0] == "BOS" for row in decoded)
        if ref["tokens_out"] is not None:
            ours_decoded = [["BOS"] + [ref["tokens_out"][i] for i in row[1:]]
                            for row in ours.argmax(-1).tolist()]
            assert ours_decoded == decoded
        else:
            values = torch.tensor([row[1:] for row in decoded], dtype=torch.float32)
            torch.testing.assert_close(ours[:, 1:, 0], values.view(len(rows), -1), atol=1e-5,
                                       rtol=0)
        checked += len(rows)
    return checked


# ----- conversion -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_equals_tracr_on_every_input(models, name):
    ref = reference(name)
    for key, rows in ref["inputs"].items():   # the recording covers every input of every length
        assert rows == tt.all_inputs(name, int(key)).tolist()
    checked = assert_matches_tracr(models[name], ref)
    assert checked == {"tracr-reverse": 1 + 3 + 9 + 27 + 81 + 243,
                       "tracr-proportion": 1 + 4 + 16 + 64 + 256 + 1024}[name]


def _build_script():
    spec = importlib.util.spec_from_file_location("build_tracr",
                                                  ROOT / "scripts" / "build_tracr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_converted_model_equals_tracr_run_now(models, name):
    """With tracr installed (the dev extra): compile again, rerun tracr, rebuild the weights."""
    pytest.importorskip("tracr")
    build = _build_script()
    program, compiled = build.compile_program(name)
    ref = build.tracr_reference(program, compiled)
    ref["tokens_out"] = build.output_directions(program, compiled)[1]
    assert_matches_tracr(models[name], ref)
    bridge, config = build.convert(program, compiled)
    assert config == bundled_meta(name)["config"]
    bundled = models[name].state_dict()
    for key, value in bridge.state_dict().items():
        assert torch.equal(value, bundled[key]), key


def test_package_never_imports_jax():
    """JAX, haiku and tracr are build-time only: no module of acdc_viz imports them."""
    import ast

    for path in (ROOT / "acdc_viz").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] in ("jax", "haiku", "tracr")], path


@pytest.mark.slow
def test_runtime_never_imports_jax():
    code = ("import sys; from acdc_viz.tasks import get_task; t = get_task('tracr-reverse'); "
            "m = t.load_model('cpu'); t.canonical_edges(False, 4); t.make_pairs(4, 0); "
            "bad = [k for k in ('jax', 'haiku', 'tracr') if k in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ----- the canonical circuit --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_canonical_circuit_is_a_subgraph(models, name):
    cfg = models[name].cfg
    for seq_len in range(2, 7):
        graph = {e.name for e in CircuitGraph.from_config(cfg).edges}
        assert tt.canonical_edges(name, False, seq_len) <= graph
        split = {e.name for e in CircuitGraph.from_config(cfg, n_positions=seq_len).edges}
        assert tt.canonical_edges(name, True, seq_len) <= split


@pytest.mark.parametrize("name", NAMES)
def test_canonical_circuit_follows_from_the_weights(models, name):
    """Re-derive it here: residual bookkeeping, then zero ablation on every input checks that the
    circuit suffices and that each edge (each edge at each position) is needed."""
    build = bundled_meta(name)["build"]
    derived = tt.derive_circuit(models[name], build["residual_labels"],
                                tt.all_inputs(name, tt.PROMPT_TOKENS))
    assert derived.flow == build["circuit"]["flow"]
    assert derived.edges == build["circuit"]["edges"][str(tt.PROMPT_TOKENS)]
    assert derived.by_position == build["circuit"]["by_position"][str(tt.PROMPT_TOKENS)]


# The ACDC paper's circuits as its code lists them: (receiving hook, sending hook), leaving out the
# PLACEHOLDER edges (hook_result <- hook_q/k/v, hook_mlp_out <- hook_mlp_in) that its counts skip.
PAPER = {
    "tracr-reverse": [
        ("blocks.3.hook_resid_post", "blocks.3.attn.hook_result"),
        ("blocks.3.attn.hook_q", "blocks.3.hook_q_input"),
        ("blocks.3.attn.hook_k", "blocks.3.hook_k_input"),
        ("blocks.3.attn.hook_v", "blocks.3.hook_v_input"),
        ("blocks.3.hook_q_input", "blocks.2.hook_mlp_out"),
        ("blocks.3.hook_k_input", "hook_pos_embed"),
        ("blocks.3.hook_v_input", "hook_embed"),
        ("blocks.2.hook_mlp_in", "blocks.1.hook_mlp_out"),
        ("blocks.1.hook_mlp_in", "blocks.0.hook_mlp_out"),
        ("blocks.1.hook_mlp_in", "hook_embed"),
        ("blocks.1.hook_mlp_in", "hook_pos_embed"),
        ("blocks.0.hook_mlp_in", "blocks.0.attn.hook_result"),
        ("blocks.0.hook_mlp_in", "hook_embed"),
        ("blocks.0.attn.hook_v", "blocks.0.hook_v_input"),
        ("blocks.0.hook_v_input", "hook_embed"),
    ],
    "tracr-proportion": [
        ("blocks.1.hook_resid_post", "blocks.1.attn.hook_result"),
        ("blocks.1.attn.hook_q", "blocks.1.hook_q_input"),
        ("blocks.1.attn.hook_k", "blocks.1.hook_k_input"),
        ("blocks.1.attn.hook_v", "blocks.1.hook_v_input"),
        ("blocks.1.hook_q_input", "hook_embed"),
        ("blocks.1.hook_q_input", "hook_pos_embed"),
        ("blocks.1.hook_k_input", "hook_embed"),
        ("blocks.1.hook_k_input", "hook_pos_embed"),
        ("blocks.1.hook_v_input", "blocks.0.hook_mlp_out"),
        ("blocks.0.hook_mlp_in", "hook_embed"),
    ],
}


def _paper_to_ours(receiver: str, sender: str) -> str | None:
    """One of the paper's edges in our names; None for an edge inside a head (input -> q/k/v)."""
    parts = receiver.split(".")
    if receiver.startswith("blocks.") and parts[2] == "attn":
        return None                                           # hook_q_input -> hook_q: internal
    if sender in ("hook_embed", "hook_pos_embed"):
        src = "Embed"                                         # one source: token + position
    elif sender.endswith("hook_mlp_out"):
        src = f"MLP{sender.split('.')[1]}"
    else:
        src = f"A{sender.split('.')[1]}.0"
    if receiver.endswith("hook_resid_post"):
        dest = "Out"
    elif receiver.endswith("hook_mlp_in"):
        dest = f"MLP{parts[1]}"
    else:
        dest = f"A{parts[1]}.0.{parts[2][5]}"                 # hook_q_input -> q
    return f"{src}->{dest}"


@pytest.mark.parametrize(("name", "paper_count", "internal", "embed_split"),
                         [("tracr-reverse", 15, 4, 1), ("tracr-proportion", 10, 3, 2)])
def test_canonical_circuit_is_the_papers(name, paper_count, internal, embed_split):
    """Same circuit; the paper counts 15 and 10 because its graph has head-internal edges and
    separate token and position embeddings (docs/tracr.md)."""
    paper = PAPER[name]
    assert len(paper) == paper_count
    mapped = [_paper_to_ours(r, s) for r, s in paper]
    assert mapped.count(None) == internal
    ours = tt.canonical_edges(name, False, tt.PROMPT_TOKENS)
    assert {m for m in mapped if m} == ours
    assert len(ours) == paper_count - internal - embed_split


def test_bookkeeping_edges_outside_the_circuit_carry_nothing_used():
    """tracr-reverse's flow has 3 more edges: the BOS default of A3's query and the query and key
    of A0 (a TRUE selector attends uniformly whatever they say)."""
    circuit = bundled_meta("tracr-reverse")["build"]["circuit"]
    extra = set(circuit["flow"]) - set(circuit["edges"][str(tt.PROMPT_TOKENS)])
    assert extra == {"Embed->A3.0.q", "Embed->A0.0.q", "Embed->A0.0.k"}
    assert circuit["flow"]["Embed->A3.0.q"] == ["one"]
    effects = circuit["effects"][str(tt.PROMPT_TOKENS)]
    assert all(effects[e] < tt.EFFECT_TOL for e in extra)
    assert min(effects[e] for e in circuit["edges"][str(tt.PROMPT_TOKENS)]) > 0.5


# ----- ACDC recovers it -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "positions"), [
    ("tracr-reverse", False), ("tracr-proportion", False), ("tracr-proportion", True),
    ("tracr-reverse", True),
])
def test_acdc_zero_ablation_recovers_the_circuit_with_auc_1(models, name, positions):
    """The paper's Table 3: zero ablation and the task metric give edge AUC 1.000.

    The smallest tau keeps exactly the canonical circuit, larger ones keep parts of it.
    """
    task = get_task(name)
    pairs = task.make_pairs(task.default_prompts, 0)
    metric = task.metrics[task.default_metric](pairs)
    weights = from_model(models[name], pairs.clean[:4])
    canonical = task.canonical_edges(positions, pairs.seq_len)
    taus = [1e-6, 1e-4, 1e-2, 1e-1, 1.0]
    kept = {}
    for tau in taus:
        trace = Acdc(weights, pairs, tau=tau, metric=metric, ablation=task.default_ablation,
                     positions=positions).run()
        kept[tau] = trace.final_kept_edges
    rocs = sweep_rocs(kept, [e.name for e in trace.graph.edges], canonical)
    assert rocs["edge"].auc == pytest.approx(1.0, abs=1e-12)
    assert rocs["node"].auc == pytest.approx(1.0, abs=1e-12)
    assert set(kept[1e-6]) == canonical
    assert set(kept[1.0]) == set()


def test_default_tau_finds_exactly_the_circuit(models):
    task = get_task("tracr-reverse")
    pairs = task.make_pairs(task.default_prompts, 0)
    trace = Acdc(models["tracr-reverse"], pairs, tau=task.default_tau,
                 metric=task.metrics["l2"](pairs), ablation="zero").run()
    assert set(trace.final_kept_edges) == task.canonical_edges(False, pairs.seq_len)


# ----- the task: prompts, metric, registry, bad input -------------------------------------------


@pytest.mark.parametrize(("name", "distinct"), [("tracr-reverse", 27), ("tracr-proportion", 64)])
def test_make_pairs(name, distinct):
    task = get_task(name)
    pairs = task.make_pairs(distinct, 3)
    assert pairs.clean.shape == (distinct, tt.PROMPT_TOKENS)
    bos = tt.vocabulary(name).index("BOS")
    assert (pairs.clean[:, 0] == bos).all() and (pairs.corrupt[:, 0] == bos).all()
    assert len({tuple(r) for r in pairs.clean.tolist()}) == distinct
    assert sorted(pairs.corrupt.tolist()) == sorted(pairs.clean.tolist())   # a permutation ...
    assert not (pairs.clean == pairs.corrupt).all(1).any()                  # ... no fixed points
    again = task.make_pairs(distinct, 3)
    assert torch.equal(again.clean, pairs.clean) and torch.equal(again.corrupt, pairs.corrupt)
    assert not torch.equal(task.make_pairs(distinct, 4).clean, pairs.clean)
    with pytest.raises(TaskError, match=f"only {distinct} distinct inputs"):
        task.make_pairs(distinct + 1, 0)
    with pytest.raises(TaskError, match="at least 2"):
        task.make_pairs(1, 0)


def test_l2_metric_is_the_acdc_codes():
    full = torch.randn(5, 4, 3)
    circuit = torch.randn(5, 4, 3)
    assert tt.L2(full, full) == 0.0
    expected = ((circuit[:, 1:] - full[:, 1:]) ** 2).mean().item()
    assert tt.L2(circuit, full) == pytest.approx(expected)
    assert not tt.L2.last_position_only


def test_registry_entries(models):
    for name in NAMES:
        task = get_task(name)
        assert task.bundled and task.model_name == name
        assert (task.default_ablation, task.default_metric) == ("zero", "l2")
        task.check_model(models[name])
    pairs = get_task("tracr-reverse").make_pairs(2, 0)
    labels = get_task("tracr-reverse").token_labels(pairs)
    assert labels[0] == "BOS" and set(labels[1:]) <= {"1", "2", "3"}


def test_model_of_another_task_is_refused(models):
    with pytest.raises(TaskError, match="does not fit tracr-proportion"):
        get_task("tracr-proportion").check_model(models["tracr-reverse"])


def test_canonical_circuit_for_an_unrecorded_length():
    with pytest.raises(TaskError, match="recorded for prompts of"):
        get_task("tracr-reverse").canonical_edges(False, 9)


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_or_missing_weights(tmp_path, name):
    for suffix in (".json", ".safetensors"):
        shutil.copy(BUNDLED_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    load_bundled(name, directory=tmp_path)                     # the copy itself loads
    weights = tmp_path / f"{name}.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundledModelError, match="sha256"):
        load_bundled(name, directory=tmp_path)
    weights.unlink()
    with pytest.raises(BundledModelError, match="missing"):
        load_bundled(name, directory=tmp_path)
