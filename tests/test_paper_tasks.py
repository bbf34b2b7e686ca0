"""The ACDC paper's tasks (acdc_viz.tasks.paper), offline: prompts, metrics, circuits, loaders."""

from __future__ import annotations

import pytest
import torch

from acdc_viz.graph import QKV, CircuitGraph
from acdc_viz.models.loading import ModelLoadError, load_model
from acdc_viz.tasks import TaskError, all_tasks, get_task
from acdc_viz.tasks import paper_docstring as docstring
from acdc_viz.tasks import paper_greaterthan as greaterthan
from acdc_viz.tasks import paper_induction as induction
from acdc_viz.tasks import paper_ioi as ioi
from acdc_viz.tasks.gpt2_tokenizer import ENDOFTEXT_ID, gpt2_tokenizer
from acdc_viz.tasks.paper import ATTN_ONLY_4L, GPT2_SMALL

PAPER_TASKS = ("ioi", "greater-than", "docstring", "induction-redwood")


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def make(task: str, n: int, seed: int, tok):
    """Prompt pairs; docstring gets GPT-2's tokenizer, since attn-only-4l's needs the hub."""
    if task == "docstring":
        return docstring.make_docstring_pairs(n, seed, tokenizer=tok)
    return get_task(task).make_pairs(n, seed)


# --- the tokenizer -------------------------------------------------------------------------


def test_offline_gpt2_tokenizer_gives_gpt2_ids(tok):
    text = "When Mary and John went to the store, John gave a drink to"
    ids = [2215, 5335, 290, 1757, 1816, 284, 262, 3650, 11, 1757, 2921, 257, 4144, 284]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text
    assert tok.encode("<|endoftext|>") == [ENDOFTEXT_ID] and len(tok) == 50257


def test_word_lists_are_single_gpt2_tokens(tok):
    for words in (ioi.NAMES, ioi.PLACES, ioi.OBJECTS, greaterthan.NOUNS):
        assert all(len(tok.encode(" " + w)) == 1 for w in words)
        assert len(set(words)) == len(words)


# --- the generators ------------------------------------------------------------------------


@pytest.mark.parametrize("task,seq_len", [("ioi", 15), ("greater-than", 12), ("docstring", 53),
                                          ("induction-redwood", 41)])
def test_prompts_have_one_length_are_distinct_and_follow_the_seed(task, seq_len, tok):
    a = make(task, 40, 3, tok)
    assert a.clean.shape == a.corrupt.shape == (40, seq_len)
    assert len({tuple(r) for r in a.clean.tolist()}) == 40
    b = make(task, 40, 3, tok)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt)
    assert not torch.equal(a.clean, make(task, 40, 4, tok).clean)


def test_ioi_every_frame_and_order_lines_up(tok):
    pairs = make("ioi", 3000, 0, tok)  # covers all 6 frames x 2 orders many times over
    text = {tok.decode(r) for r in pairs.clean[:, :2].tolist()}
    assert len(text) == len(ioi.TEMPLATES)
    a, b, s = (pairs.clean[:, p] for p in ioi.NAME_POSITIONS)
    assert bool(((a == s) ^ (b == s)).all())
    assert 0 < int((a == s).sum()) < 3000  # both ABBA and BABA


def test_ioi_abc_corruption_changes_only_the_three_names(tok):
    pairs = make("ioi", 200, 1, tok)
    differ = pairs.clean != pairs.corrupt
    names = list(ioi.NAME_POSITIONS)
    assert bool(differ[:, names].all())
    assert not bool(differ[:, [p for p in range(15) if p not in names]].any())
    io, s = ioi.answers(pairs)
    for row, i, j in zip(pairs.corrupt[:, names].tolist(), io.tolist(), s.tolist(), strict=True):
        assert len(set(row)) == 3 and i not in row and j not in row
    assert tok.decode(pairs.clean[0]).endswith(" to")


def test_greaterthan_corruption_is_the_01_year(tok):
    pairs = make("greater-than", 300, 0, tok)
    differ = pairs.clean != pairs.corrupt
    assert bool(differ[:, greaterthan.YEAR_POSITION].all())
    assert int(differ.sum()) == 300
    assert bool((pairs.corrupt[:, greaterthan.YEAR_POSITION] == tok.encode("01")[0]).all())
    assert bool((pairs.clean[:, 6] == pairs.clean[:, 11]).all())  # same century twice
    yy = greaterthan.start_years(pairs)
    assert int(yy.min()) >= 2 and int(yy.max()) <= 98
    first = tok.decode(pairs.clean[0])
    assert first.startswith("The ") and " lasted from the year " in first
    assert " to the year " in first


def test_docstring_corruption_and_answers(tok):
    pairs = make("docstring", 30, 0, tok)
    assert bool(((pairs.clean != pairs.corrupt).sum(1) == 5).all())
    assert bool((pairs.clean[:, 0] == ENDOFTEXT_ID).all())
    correct, wrong = docstring.answers(pairs)
    assert wrong.shape == (30, 10)
    assert not bool((wrong == correct[:, None]).any())
    text = tok.decode(pairs.clean[0])
    answer = tok.decode(correct[:1])
    assert text.endswith("    :param") and f",{answer}," in text.split("\n")[1]


def test_induction_prompts_repeat_and_corrupt_with_another_row():
    pairs = make("induction-redwood", 12, 0, None)
    s = induction.SEGMENT
    assert torch.equal(pairs.clean[:, 1:1 + s], pairs.clean[:, 1 + s:])
    assert bool((pairs.clean[:, 0] == ENDOFTEXT_ID).all())
    rows = {tuple(r): i for i, r in enumerate(pairs.clean.tolist())}
    moved = [rows[tuple(r)] for r in pairs.corrupt.tolist()]
    assert sorted(moved) == list(range(12)) and all(i != j for i, j in enumerate(moved))


@pytest.mark.parametrize("task,n", [("ioi", ioi.available_prompts() + 1), ("greater-than", 10**6),
                                    ("ioi", 0), ("greater-than", -1), ("induction-redwood", 1)])
def test_impossible_prompt_requests_are_task_errors(task, n):
    with pytest.raises(TaskError, match="at most|positive|at least 2"):
        get_task(task).make_pairs(n, 0)


def test_foreign_pairs_are_refused_by_the_metrics(tok):
    gt = make("greater-than", 4, 0, tok)
    with pytest.raises(TaskError, match="not IOI prompts"):
        ioi.logit_diff_metric(gt)
    with pytest.raises(TaskError, match="not greater-than prompts"):
        greaterthan.prob_diff_metric(make("ioi", 4, 0, tok))
    with pytest.raises(TaskError, match="not docstring prompts"):
        docstring.docstring_metric(gt)


# --- the metrics ---------------------------------------------------------------------------


def test_logit_diff_is_minus_io_minus_s(tok):
    pairs = make("ioi", 5, 0, tok)
    io, s = ioi.answers(pairs)
    logits = torch.zeros(5, 50257)
    logits[torch.arange(5), io] = 3.0
    logits[torch.arange(5), s] = 1.0
    metric = get_task("ioi").metrics["logit_diff"](pairs)
    assert metric.last_position_only and metric(logits, logits) == pytest.approx(-2.0)


def test_prob_diff_sums_the_years_above_minus_the_rest(tok):
    pairs = make("greater-than", 3, 0, tok)
    yy = greaterthan.start_years(pairs)
    digits = greaterthan.two_digit_ids(tok)
    logits = torch.full((3, 50257), -1e9)
    logits[0, digits[int(yy[0]) + 1]] = 0.0           # all mass just above: +1
    logits[1, digits[int(yy[1])]] = 0.0               # all mass on YY itself: -1
    logits[2, [digits[0], digits[99]]] = 0.0          # half below, half above: 0
    metric = greaterthan.prob_diff_metric(pairs)
    assert metric(logits, logits) == pytest.approx(-(1 - 1 + 0) / 3, abs=1e-6)


def test_docstring_metric_uses_the_best_wrong_name(tok):
    pairs = make("docstring", 2, 0, tok)
    correct, wrong = docstring.answers(pairs)
    logits = torch.zeros(2, 50257)
    logits[torch.arange(2), correct] = 5.0
    logits[0, wrong[0, 3]] = 7.0   # a wrong name beats the answer by 2
    logits[1, wrong[1, 9]] = 1.0   # the answer wins by 4
    assert docstring.docstring_metric(pairs)(logits, logits) == pytest.approx(-(-2 + 4) / 2)


# --- the canonical circuits ----------------------------------------------------------------


@pytest.mark.parametrize("task,arch,ours,internal,paper", [
    ("ioi", GPT2_SMALL, 963, 78, 1041),
    ("greater-than", GPT2_SMALL, 235, 27, 262),
    ("docstring", ATTN_ONLY_4L, 24, 13, 37),
])
def test_canonical_circuits_are_subgraphs_with_the_paper_counts(task, arch, ours, internal, paper):
    edges = get_task(task).canonical_edges(False, 0)
    graph = CircuitGraph(*arch.graph_shape[:2], attn_only=arch.attn_only)
    assert edges <= set(graph.edge_index)
    assert len(edges) == ours
    # The paper's graph adds one edge per used head input (q/k/v input -> q/k/v); a head input
    # is used exactly when an edge of ours reaches it.
    used_inputs = {e.split("->")[1] for e in edges} - {"Out"}
    used_inputs = {d for d in used_inputs if d.rsplit(".", 1)[-1] in QKV}
    assert len(used_inputs) == internal
    assert len(edges) + len(used_inputs) == paper


def test_ioi_circuit_equals_the_papers_subtractive_construction():
    """The paper builds IOI's circuit by subtraction: start from the full graph, drop every
    head outside the circuit, cut the circuit heads' inputs from Embed and from heads and their
    edges to Out, then add the class connections back. Ours is written additively."""
    graph = CircuitGraph(12, 12)
    heads = {f"A{lay}.{h}" for cls in ioi.HEAD_CLASSES.values() for lay, h in cls}
    outside = {f"A{lay}.{h}" for lay in range(12) for h in range(12)} - heads
    kept = set()
    for e in graph.edges:
        if {e.src.name, e.dest.node} & outside:
            continue
        if e.dest.node in heads and e.src.kind in ("embed", "head"):
            continue
        if e.src.name in heads and e.dest.kind == "out":
            continue
        kept.add(e.name)
    layer = {f"A{lay}.{h}": lay for cls in ioi.HEAD_CLASSES.values() for lay, h in cls}
    senders = {"IN": [("Embed", -1)] + [(f"MLP{m}", m) for m in range(12)]}
    for cls, letters in ioi.READS_EMBED.items():
        for h in ioi._heads(cls):
            kept |= {f"{s}->{h}.{x}" for s, lay in senders["IN"] for x in letters if lay < layer[h]}
    for writer, reader, letters in ioi.CLASS_EDGES:
        kept |= {f"{w}->{r}.{x}" for w in ioi._heads(writer) for r in ioi._heads(reader)
                 for x in letters if layer[w] < layer[r]}
    kept |= {f"{h}->Out" for cls in ioi.WRITES_OUT for h in ioi._heads(cls)}
    assert kept == ioi.canonical_edges()


def test_canonical_circuits_split_by_position():
    for task, arch in (("ioi", GPT2_SMALL), ("docstring", ATTN_ONLY_4L)):
        plain = get_task(task).canonical_edges(False, 0)
        split = get_task(task).canonical_edges(True, 2)
        graph = CircuitGraph(*arch.graph_shape[:2], attn_only=arch.attn_only, n_positions=2)
        assert len(split) == 2 * len(plain) and split <= set(graph.edge_index)


def test_ioi_circuit_has_the_papers_26_heads_in_7_classes():
    heads = [h for cls in ioi.HEAD_CLASSES.values() for h in cls]
    assert len(ioi.HEAD_CLASSES) == 7 and len(heads) == len(set(heads)) == 26
    edges = ioi.canonical_edges()
    assert "A9.9->Out" in edges and "A5.5->Out" not in edges
    assert "A2.2->A5.5.k" in edges and "A2.2->A5.5.q" not in edges
    assert "A7.3->A9.9.q" in edges and "A7.3->A9.9.v" not in edges


def test_induction_redwood_has_no_canonical_circuit():
    assert get_task("induction-redwood").canonical_edges is None


# --- registry, loaders and architecture checks ---------------------------------------------


def test_registry_lists_the_papers_tasks_with_their_shapes():
    tasks = all_tasks()
    for name in PAPER_TASKS:
        assert not tasks[name].bundled and tasks[name].graph_shape is not None
    assert tasks["ioi"].default_tau == 0.0575 and tasks["docstring"].default_tau == 0.095
    assert tasks["greater-than"].default_tau == 0.01585
    assert tasks["induction-redwood"].default_tau == 0.5623


def test_token_labels_spell_the_first_prompt(tok):
    pairs = make("ioi", 2, 0, tok)
    labels = get_task("ioi").token_labels(pairs)
    assert len(labels) == 15 and "".join(labels) == tok.decode(pairs.clean[0])


@pytest.fixture(scope="module")
def gpt2_standin(tmp_path_factory, tok):
    """GPT-2 small's shape (12 x 12, MLPs, 50257 tokens) with a tiny width, and the shipped
    GPT-2 tokenizer saved next to it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("gpt2-standin")
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=24, n_positions=32,
                               vocab_size=50257)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return load_model(directory)


def native(n_layers, n_heads, d_vocab, d_model=16):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=d_model, d_head=d_model // n_heads, n_layers=n_layers,
                                  n_ctx=64, n_heads=n_heads, d_vocab=d_vocab, attn_only=True,
                                  normalization_type="LN", seed=0, act_fn="gelu")
    return TransformerBridge.boot_native(cfg).eval()


def test_gpt2_tasks_accept_a_gpt2_shaped_model_and_score_it(gpt2_standin, tok):
    for task in ("ioi", "greater-than"):
        get_task(task).check_model(gpt2_standin)
    pairs = make("ioi", 4, 0, tok)
    assert gpt2_standin.to_str_tokens(tok.decode(pairs.clean[0]), prepend_bos=False) == (
        get_task("ioi").token_labels(pairs))
    with torch.no_grad():
        logits = gpt2_standin(pairs.clean)[:, -1]
    io, s = ioi.answers(pairs)
    expected = -(logits[torch.arange(4), io] - logits[torch.arange(4), s]).mean()
    assert ioi.logit_diff_metric(pairs)(logits, logits) == pytest.approx(float(expected))
    with pytest.raises(TaskError, match="attn-only-4l's architecture"):
        get_task("docstring").check_model(gpt2_standin)


def test_attention_only_tasks_check_their_shapes():
    docstring_like = native(4, 8, 48262)
    get_task("docstring").check_model(docstring_like)
    with pytest.raises(TaskError, match=r"12 layers, 12 heads.*4 layers, 8 heads.*load_model"):
        get_task("ioi").check_model(docstring_like)
    redwood_like = native(2, 8, 50259)
    get_task("induction-redwood").check_model(redwood_like)
    with pytest.raises(TaskError, match="48262 tokens.*50259 tokens"):
        get_task("docstring").check_model(native(4, 8, 50259))


def test_kl_repeated_reads_only_the_second_copy():
    model = native(2, 8, 50259)
    pairs = make("induction-redwood", 3, 0, None)
    with torch.no_grad():
        full = model(pairs.clean)
    metric = get_task("induction-redwood").metrics["kl_repeated"](pairs)
    assert not metric.last_position_only
    first_copy_changed = full.clone()
    first_copy_changed[:, : 1 + induction.SEGMENT] += torch.randn(3, 1 + induction.SEGMENT, 50259)
    assert metric(first_copy_changed, full) == pytest.approx(0.0, abs=1e-6)
    second_copy_changed = full.clone()
    second_copy_changed[:, -1] += torch.randn(3, 50259)
    assert metric(second_copy_changed, full) > 0


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docstring.docstring_tokenizer.cache_clear()
    yield cache
    docstring.docstring_tokenizer.cache_clear()


def test_gpt2_tasks_fail_offline_with_instructions(offline_empty_cache):
    with pytest.raises(ModelLoadError) as info:
        get_task("ioi").load_model("cpu")
    message = str(info.value)
    assert "'gpt2'" in message and "save_pretrained" in message and "load_model(DIR)" in message


def test_docstring_fails_offline_with_instructions(offline_empty_cache):
    with pytest.raises(ModelLoadError, match="attn-only-4l|Attn_Only_4L512W_C4_Code"):
        get_task("docstring").load_model("cpu")
    with pytest.raises(ModelLoadError, match="gpt-neox-tokenizer-digits.*tokenizer=AutoTokenizer"):
        get_task("docstring").make_pairs(4, 0)


def test_induction_redwood_fails_offline_with_instructions(offline_empty_cache, monkeypatch):
    from acdc_viz.models.shortformer import PATH_ENV

    monkeypatch.delenv(PATH_ENV, raising=False)
    with pytest.raises(ModelLoadError) as info:
        get_task("induction-redwood").load_model("cpu")
    message = str(info.value)
    assert "ArthurConmy/redwood_attn_2l" in message and "final.pth" in message
    assert "offline mode is set" in message and PATH_ENV in message and "HF_HOME" in message
    with pytest.raises(ModelLoadError, match="shortformer.*load_redwood_weights"):
        load_model("redwood_attn_2l")
    monkeypatch.setenv(PATH_ENV, str(offline_empty_cache / "nowhere"))
    with pytest.raises(ModelLoadError, match=rf"\${PATH_ENV}: .*nowhere does not exist"):
        get_task("induction-redwood").load_model("cpu")


def test_induction_redwood_runs_on_a_local_checkpoint(tmp_path, monkeypatch):
    """A random checkpoint with redwood_attn_2l's key names and shape (narrower), found through
    $ACDC_VIZ_REDWOOD_PATH as a copy of the real one would be."""
    from conftest import shortformer_checkpoint

    from acdc_viz import Acdc, SettingsError
    from acdc_viz.models.adapter import TransformerWeights
    from acdc_viz.models.shortformer import PATH_ENV

    directory, _, _ = shortformer_checkpoint(tmp_path, n_heads=8, d_model=16, d_head=2,
                                             d_vocab=50259, n_ctx=64)
    monkeypatch.setenv(PATH_ENV, str(directory))
    task = get_task("induction-redwood")
    model = task.load_model("cpu")
    assert isinstance(model, TransformerWeights) and model.W_pos_qk is not None
    task.check_model(model)
    pairs = task.make_pairs(3, 0)
    metric = task.metrics[task.default_metric](pairs)
    acdc = Acdc(model, pairs, tau=task.default_tau, metric=metric, model_name=task.name)
    assert acdc.current_metric == 0.0 and len(acdc.graph.edges) == 257
    steps = [step for _, step in zip(range(3), acdc.steps(), strict=False)]
    assert [s.edge for s in steps] == ["A1.7->Out", "A1.6->Out", "A1.5->Out"]
    with pytest.raises(SettingsError, match="test_mode"):
        Acdc(model, pairs, tau=task.default_tau, metric=metric, test_mode=True)
