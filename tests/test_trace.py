"""The trace record: round trips, atomic saves, and a clear TraceError for every bad file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from acdc_viz import trace as trace_mod
from acdc_viz.graph import CircuitGraph
from acdc_viz.trace import (
    FORMAT_VERSION,
    Step,
    Trace,
    TraceError,
    load_trace,
    save_trace,
    steps_equal,
    trace_schema,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "trace-format.md"


def make_settings(graph: CircuitGraph, **extra: Any) -> dict[str, Any]:
    settings = {
        "model": {"name": "toy", "config_hash": "c0ffee", "n_layers": graph.n_layers,
                  "n_heads": graph.n_heads, "d_model": 8, "attn_only": graph.attn_only},
        "tau": 0.01,
        "metric": "kl",
        "ablation": "resample",
        "positions": graph.n_positions is not None,
        "abs_delta": False,
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 4,
        "seq_len": graph.n_positions or 3,
        "data_hash": "deadbeef",
        "versions": {"acdc_viz": "0.1.0", "torch": "2.4.0"},
    }
    settings.update(extra)
    return settings


# Awkward floats on purpose: they must survive JSON exactly.
AFTERS = [0.1 + 0.2, 0.3, 1e-300, 0.7, 2 / 3, 0.5, 1 / 7, 0.3000000000000001]
REMOVE = [False, True, True, False, True, False, True, True]


def make_trace(n_steps: int = 5, *, n_positions: int | None = None, complete: bool = False,
               **settings: Any) -> Trace:
    """A consistent trace of a CircuitGraph(2, 2), built with Trace.record."""
    graph = CircuitGraph(2, 2, n_positions=n_positions)
    tokens = None if n_positions is None else ["The", " cat", " sat"][:n_positions]
    t = Trace(make_settings(graph, **settings), graph, [], initial_metric=0.25, tokens=tokens)
    n = len(graph.edges) if complete else n_steps
    for i in range(n):
        t.record(AFTERS[i % len(AFTERS)], REMOVE[i % len(REMOVE)], seconds=0.001 * (i + 1))
    if complete:
        t.finish()
    return t


def write_dict(tmp_path: Path, d: Any, name: str = "t.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


def load_error(tmp_path: Path, d: Any) -> str:
    p = write_dict(tmp_path, d)
    with pytest.raises(TraceError) as info:
        load_trace(p)
    assert str(p) in str(info.value)
    return str(info.value)


# -- round trips ---------------------------------------------------------------------------


def test_hand_built_steps_validate() -> None:
    g = CircuitGraph(2, 2)
    names = [e.name for e in g.edges]
    n = len(names)
    steps = [
        Step(0, names[0], 0.5, 0.9, 0.9 - 0.5, False, n, 0.01),
        Step(1, names[1], 0.5, 0.51, 0.51 - 0.5, True, n - 1, 0.02),
        Step(2, names[2], 0.51, 0.4, 0.4 - 0.51, True, n - 2, 0.01),
    ]
    t = Trace(make_settings(g), g, steps, initial_metric=0.5)
    t.validate()
    assert t.resume_from == 3
    assert t.metric_after(2) == 0.4


@pytest.mark.parametrize("complete", [False, True])
def test_round_trip(tmp_path: Path, complete: bool) -> None:
    t = make_trace(6, complete=complete)
    p = tmp_path / "run.json"
    save_trace(t, p)
    back = load_trace(p)
    assert back == t
    assert back.status == ("complete" if complete else "stopped")
    assert [s.metric_after for s in back.steps] == [s.metric_after for s in t.steps]
    # Deterministic bytes: saving the loaded trace gives the same file.
    save_trace(back, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == p.read_bytes()
    d = json.loads(p.read_text())
    assert d["format_version"] == FORMAT_VERSION
    assert d["status"] == {"state": back.status, "resume_from": len(t.steps)}
    if complete:
        assert d["final"] == {"kept_edges": t.final_kept_edges, "metric": t.final_metric}
    else:
        assert d["final"] is None


def test_saved_file_is_valid_against_the_schema(tmp_path: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(trace_schema())
    p = tmp_path / "run.json"
    save_trace(make_trace(complete=True), p)
    jsonschema.validate(json.loads(p.read_text()), trace_schema())


def test_positions_graph_round_trip(tmp_path: Path) -> None:
    t = make_trace(9, n_positions=3)
    assert t.steps[0].edge == "MLP1->Out@2"  # positions run last to first
    p = tmp_path / "pos.json"
    save_trace(t, p)
    back = load_trace(p)
    assert back == t
    assert back.graph.n_positions == 3
    assert back.tokens == ["The", " cat", " sat"]
    assert {n.position for n in back.graph.nodes} == {0, 1, 2}


def test_resume_state() -> None:
    t = make_trace(4)
    assert t.resume_from == 4 and not t.is_complete
    t.record(0.3, False)  # continuing is just recording the next edge
    assert t.steps[-1].edge == t.graph.edges[4].name
    with pytest.raises(TraceError, match="5 of 46 edges tested"):
        t.finish()


def test_record_refuses_past_the_end() -> None:
    t = make_trace(complete=True)
    with pytest.raises(TraceError, match="'complete'"):
        t.record(0.1, False)


# -- derived views -------------------------------------------------------------------------


def test_removed_and_kept_after() -> None:
    t = make_trace(5)  # REMOVE = F T T F T
    names = [e.name for e in t.graph.edges]
    assert t.removed_after(-1) == set()
    assert t.kept_after(-1) == set(names)
    assert t.removed_after(0) == set()
    assert t.removed_after(1) == {names[1]}
    assert t.removed_after(4) == {names[1], names[2], names[4]}
    assert t.kept_after(4) == set(names) - {names[1], names[2], names[4]}
    assert t.final_kept_edges == [n for n in names if n not in {names[1], names[2], names[4]}]
    assert [s.kept_edges for s in t.steps] == [46, 45, 44, 44, 43]
    with pytest.raises(IndexError, match=r"-1\.\.4"):
        t.removed_after(5)
    with pytest.raises(IndexError):
        t.kept_after(-2)


def test_metric_after_is_the_current_circuit() -> None:
    t = make_trace(5)
    assert t.metric_after(-1) == 0.25
    assert t.metric_after(0) == 0.25  # kept: the circuit did not change
    assert t.metric_after(1) == AFTERS[1]  # removed: the circuit is now the one without it
    assert t.metric_after(3) == AFTERS[2]
    assert t.steps[4].metric_before == AFTERS[2]


# -- atomic save ---------------------------------------------------------------------------


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "run.json"
    save_trace(make_trace(3), p)
    old = p.read_bytes()
    bad = make_trace(3)
    s = bad.steps[2]
    bad.steps[2] = Step(s.index, s.edge, s.metric_before, float("nan"), float("nan"), s.removed,
                        s.kept_edges, s.seconds)
    with pytest.raises(TraceError, match=r"\$\.steps\[2\]\.metric_after is nan"):
        save_trace(bad, p)
    assert p.read_bytes() == old
    assert os.listdir(tmp_path) == ["run.json"]


def test_save_rejects_infinite_initial_metric(tmp_path: Path) -> None:
    t = make_trace(0)
    t.initial_metric = float("inf")
    with pytest.raises(TraceError, match="initial_metric is inf"):
        save_trace(t, tmp_path / "x.json")
    assert os.listdir(tmp_path) == []


def test_save_rejects_unserialisable_settings(tmp_path: Path) -> None:
    t = make_trace(2, extra_setting={"x": object()})
    with pytest.raises(TraceError, match="JSON cannot hold"):
        save_trace(t, tmp_path / "x.json")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("broken", ["fsync", "replace"])
def test_os_failure_mid_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            broken: str) -> None:
    p = tmp_path / "run.json"
    save_trace(make_trace(3), p)
    old = p.read_bytes()

    def boom(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trace_mod.os, broken, boom)
    with pytest.raises(OSError, match="No space"):
        save_trace(make_trace(5), p)
    monkeypatch.undo()
    assert p.read_bytes() == old
    assert os.listdir(tmp_path) == ["run.json"]


def test_save_keeps_permissions(tmp_path: Path) -> None:
    p = tmp_path / "run.json"
    p.write_text("old")
    p.chmod(0o640)
    save_trace(make_trace(1), p)
    assert p.stat().st_mode & 0o777 == 0o640


# -- bad files -----------------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read the trace file"):
        load_trace(tmp_path / "missing.json")


def test_corrupt_bytes(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    p.write_bytes(b'{"format_version": 1, \xff\xfe\x00garbage')
    with pytest.raises(TraceError, match=r"truncated or not JSON.*not UTF-8"):
        load_trace(p)


def test_pickle_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "t.pkl"
    p.write_bytes(b"\x80\x04\x95 whatever")
    with pytest.raises(TraceError, match="never unpickles"):
        load_trace(p)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    p.write_bytes(b"")
    with pytest.raises(TraceError, match="empty"):
        load_trace(p)


def test_truncated_file(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    save_trace(make_trace(5), p)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TraceError, match=r"truncated or not JSON \(line \d+, column \d+"):
        load_trace(p)


def test_nan_literal(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    p.write_text(make_trace(2).to_json().replace('"initial_metric": 0.25', '"initial_metric": NaN'))
    with pytest.raises(TraceError, match="NaN"):
        load_trace(p)


@pytest.mark.parametrize("doc", [[1, 2, 3], "trace", {"steps": []}])
def test_not_a_trace(tmp_path: Path, doc: Any) -> None:
    assert "this is not an acdc_viz trace" in load_error(tmp_path, doc)


@pytest.mark.parametrize("version, advice", [(2, "upgrade"), (0, "downgrade")])
def test_other_format_version(tmp_path: Path, version: int, advice: str) -> None:
    d = make_trace(2).to_dict()
    d["format_version"] = version
    msg = load_error(tmp_path, d)
    assert f"written by format {version}, this acdc_viz reads format 1" in msg
    assert advice in msg


def test_missing_field(tmp_path: Path) -> None:
    d = make_trace(2).to_dict()
    del d["settings"]["tau"]
    msg = load_error(tmp_path, d)
    assert "$.settings" in msg and "'tau' is a required property" in msg


def test_wrong_type_reports_json_path(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["steps"][1]["removed"] = "yes"
    assert "$.steps[1].removed: 'yes' is not of type 'boolean'" in load_error(tmp_path, d)


def test_unknown_step_field(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["steps"][2]["colour"] = "red"
    msg = load_error(tmp_path, d)
    assert "$.steps[2]" in msg and "colour" in msg


def test_step_out_of_order(tmp_path: Path) -> None:
    d = make_trace(4).to_dict()
    d["steps"][1]["edge"], d["steps"][2]["edge"] = d["steps"][2]["edge"], d["steps"][1]["edge"]
    msg = load_error(tmp_path, d)
    assert "$.steps[1].edge" in msg and "visit order" in msg


def test_step_indices_must_be_consecutive(tmp_path: Path) -> None:
    d = make_trace(4).to_dict()
    d["steps"][3]["index"] = 7
    assert "$.steps[3].index is 7; expected 3" in load_error(tmp_path, d)


def test_inconsistent_kept_edges(tmp_path: Path) -> None:
    d = make_trace(4).to_dict()
    d["steps"][2]["kept_edges"] += 1
    assert "$.steps[2].kept_edges is 45; expected 44" in load_error(tmp_path, d)


def test_unknown_edge_name(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["steps"][0]["edge"] = "A9.9->Out"
    msg = load_error(tmp_path, d)
    assert "'A9.9->Out' is not an edge of CircuitGraph(n_layers=2, n_heads=2" in msg


def test_graph_edges_must_match_the_visit_order(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["graph"]["edges"][5] = "A9.9->Out"
    assert "$.graph.edges[5] is 'A9.9->Out'" in load_error(tmp_path, d)
    d = make_trace(3).to_dict()
    d["graph"]["edges"].pop()
    assert "$.graph.edges has 45 edges" in load_error(tmp_path, d)


def test_graph_nodes_must_match(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["graph"]["nodes"][1]["head"] = 1
    assert "$.graph.nodes[1] disagrees" in load_error(tmp_path, d)


def test_delta_must_match(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["steps"][1]["delta"] += 1e-6
    assert "$.steps[1].delta" in load_error(tmp_path, d)


def test_metric_before_must_follow(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    s = d["steps"][2]
    s["metric_before"] += 0.5
    s["delta"] = s["metric_after"] - s["metric_before"]
    assert "$.steps[2].metric_before" in load_error(tmp_path, d)


def test_resume_from_must_be_next_edge(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["status"]["resume_from"] = 1
    assert "$.status.resume_from is 1" in load_error(tmp_path, d)


def test_complete_needs_every_edge(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["status"]["state"] = "complete"
    assert "only 3 of 46 edges were tested" in load_error(tmp_path, d)


def test_complete_needs_final(tmp_path: Path) -> None:
    d = make_trace(complete=True).to_dict()
    d["final"] = None
    assert "$.final is null" in load_error(tmp_path, d)


def test_final_must_agree(tmp_path: Path) -> None:
    d = make_trace(complete=True).to_dict()
    d["final"]["kept_edges"] = d["final"]["kept_edges"][::-1]
    assert "$.final.kept_edges disagrees" in load_error(tmp_path, d)
    d = make_trace(complete=True).to_dict()
    d["final"]["metric"] += 1.0
    assert "$.final.metric" in load_error(tmp_path, d)


def test_stopped_has_no_final(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["final"] = {"kept_edges": [], "metric": 0.1}
    assert "the status is 'stopped'" in load_error(tmp_path, d)


def test_settings_must_describe_the_graph(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["settings"]["model"]["n_heads"] = 12
    assert "$.settings.model.n_heads is 12" in load_error(tmp_path, d)
    d = make_trace(3).to_dict()
    d["settings"]["positions"] = True
    assert "$.settings.positions is True" in load_error(tmp_path, d)


def test_settings_must_name_the_model(tmp_path: Path) -> None:
    d = make_trace(3).to_dict()
    d["settings"]["model"]["name"] = None
    del d["settings"]["model"]["config_hash"]
    assert "neither a name nor a config_hash" in load_error(tmp_path, d)


def test_tokens_must_match_positions(tmp_path: Path) -> None:
    d = make_trace(3, n_positions=3).to_dict()
    d["tokens"] = ["only", "two"]
    assert "$.tokens has 2 tokens" in load_error(tmp_path, d)


def test_fast_schema_path_agrees_with_jsonschema() -> None:
    """The fast item checks may only accept what the schema accepts."""
    step_schema = {"$ref": "#/$defs/step", "$defs": trace_schema()["$defs"]}
    node_schema = {"$ref": "#/$defs/node", "$defs": trace_schema()["$defs"]}
    good = make_trace(1).to_dict()["steps"][0]
    variants = [good, {**good, "index": -1}, {**good, "index": 1.0}, {**good, "removed": 1},
                {**good, "seconds": -0.1}, {**good, "delta": True}, {**good, "edge": None},
                {**good, "kept_edges": -1}, {k: v for k, v in good.items() if k != "delta"},
                {**good, "extra": 1}]
    for v in variants:
        if trace_mod._fast_step(v):
            assert jsonschema.Draft202012Validator(step_schema).is_valid(v), v
    node = make_trace(1).to_dict()["graph"]["nodes"][1]
    for v in [node, {**node, "kind": "attn"}, {**node, "layer": -2}, {**node, "head": -1},
              {**node, "position": 1.5}]:
        if trace_mod._fast_node(v):
            assert jsonschema.Draft202012Validator(node_schema).is_valid(v), v


# -- comparing runs ------------------------------------------------------------------------


def test_canonical_dict_ignores_timings() -> None:
    a = make_trace(5, started_at="2025-01-01T00:00:00")
    b = make_trace(5, started_at="2025-06-30T12:00:00")
    b.steps[:] = [Step(s.index, s.edge, s.metric_before, s.metric_after, s.delta, s.removed,
                       s.kept_edges, s.seconds * 3) for s in b.steps]
    assert a != b
    assert a.canonical_dict() == b.canonical_dict()
    assert a.canonical_json() == b.canonical_json()
    assert a.canonical_dict(exclude_timings=False) != b.canonical_dict(exclude_timings=False)
    assert "seconds" not in a.canonical_json()
    assert steps_equal(a, b)

    c = make_trace(5)
    s = c.steps[4]
    c.steps[4] = Step(s.index, s.edge, s.metric_before, s.metric_after + 1e-3,
                      s.delta + 1e-3, s.removed, s.kept_edges, s.seconds)
    assert not steps_equal(a, c)
    assert a.canonical_dict() != c.canonical_dict()


# -- the documentation ---------------------------------------------------------------------


@pytest.mark.skipif(not DOC.exists(), reason="docs/ not shipped with the package")
def test_documented_example_loads(tmp_path: Path) -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert blocks, "docs/trace-format.md has no ```json example"
    p = tmp_path / "example.json"
    p.write_text(blocks[0])
    t = load_trace(p)
    assert t.status == "stopped" and t.resume_from == len(t.steps) > 0


def test_numpy_scalars_are_accepted(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    g = CircuitGraph(1, 1)
    name = g.edges[0].name
    t = Trace(make_settings(g), g, [Step(0, name, np.float32(0.5), np.float32(0.75),
                                         np.float32(0.25), np.bool_(False), 8, np.float64(0.1))],
              initial_metric=np.float32(0.5))
    save_trace(t, tmp_path / "np.json")
    back = load_trace(tmp_path / "np.json")
    assert back.steps[0].metric_after == 0.75
    assert isinstance(back.steps[0].metric_after, float)


def test_trace_error_is_a_value_error() -> None:
    from acdc_viz.errors import AcdcVizError

    assert issubclass(TraceError, ValueError)
    assert issubclass(TraceError, AcdcVizError)
