"""The trace: the record of one ACDC run, step by step (format in docs/trace-format.md).

A trace is the single input for rendering and replay, so a figure never needs the model, and
a stopped run can be continued later. That only works if a loaded trace can be trusted:
``load_trace`` checks the structure against ``trace_schema.json`` and then checks that the
parts agree with each other (the edges are the graph's visit order, step ``i`` tests edge
``i``, the kept counts and metrics follow from the steps). A file that fails any check raises
``TraceError`` naming the file, the JSON path and what to do, instead of drawing a wrong
circuit.

Traces are JSON, never pickle, so loading a file from someone else cannot run code.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any, NoReturn

from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from acdc_viz.errors import AcdcVizError
from acdc_viz.files import write_atomic
from acdc_viz.graph import CircuitGraph

FORMAT_VERSION = 1
"""The trace format this acdc_viz reads and writes; bumped on any incompatible change."""

STATES = ("complete", "stopped")

TIMING_SETTINGS = frozenset(
    {"timing", "started_at", "finished_at", "created_at", "elapsed_seconds", "wall_seconds"}
)
"""Settings keys that hold wall-clock values: ``canonical_dict`` drops them (with ``seconds``)
so two runs on the same inputs compare equal. Put any wall-clock setting under one of these."""

REL_TOL = 1e-9
"""Relative tolerance of the metric checks: ``delta`` against ``metric_after - metric_before``
and each ``metric_before`` against the current metric after the previous step. Both are
copies of numbers the engine already had, so anything looser would hide a bookkeeping bug."""

_MAX_MESSAGE = 300


class TraceError(AcdcVizError, ValueError):
    """A trace that cannot be loaded, saved or trusted; the message names the source and problem."""


@dataclass(frozen=True)
class Step:
    """One tested edge.

    ``metric_after`` is the metric of the circuit *without this edge* (and without all earlier
    removals), whether or not the edge was then removed; the current circuit's metric after
    the step is ``Trace.metric_after(index)``.
    """

    index: int
    edge: str
    metric_before: float
    metric_after: float
    delta: float
    removed: bool
    kept_edges: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": int(self.index),
            "edge": self.edge,
            "metric_before": float(self.metric_before),
            "metric_after": float(self.metric_after),
            "delta": float(self.delta),
            "removed": bool(self.removed),
            "kept_edges": int(self.kept_edges),
            "seconds": float(self.seconds),
        }


def _finite(x: Any) -> bool:
    """A finite real number; numpy and torch scalars count (the engine may hand those over)."""
    if isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)


def _delta_ok(delta: float, before: float, after: float) -> bool:
    # Tolerance relative to the metrics, not to delta: a tiny difference of two large
    # numbers may carry their rounding error.
    scale = max(abs(before), abs(after))
    return math.isclose(delta, after - before, rel_tol=REL_TOL, abs_tol=REL_TOL * scale)


@dataclass(eq=False)
class Trace:
    """One ACDC run: the settings, the graph, and one ``Step`` per tested edge.

    Step ``i`` tests ``graph.edges[i]``: ACDC tests every edge once, in visit order, so the
    removed set, the kept counts and the current metric all follow from the steps, and a
    stopped trace holds everything needed to continue from ``resume_from``.
    """

    settings: dict[str, Any]
    graph: CircuitGraph
    steps: list[Step]
    initial_metric: float
    status: str = "stopped"
    tokens: list[str] | None = None
    final_metric: float | None = None

    # No __hash__: defining __eq__ makes a Trace unhashable, as it should be (steps are
    # appended during a run).

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        return (
            self.graph == other.graph
            and self.settings == other.settings
            and self.steps == other.steps
            and self.initial_metric == other.initial_metric
            and self.status == other.status
            and self.tokens == other.tokens
            and self.final_metric == other.final_metric
        )

    # -- derived views -------------------------------------------------------------------

    @property
    def n_edges(self) -> int:
        return len(self.graph.edges)

    @property
    def resume_from(self) -> int:
        """The index of the next edge to test (``len(steps)``)."""
        return len(self.steps)

    @property
    def last_step(self) -> int:
        """The index of the last recorded step; -1 before any."""
        return len(self.steps) - 1

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"

    def check_step(self, step: int) -> None:
        """Raise an IndexError naming the valid range unless ``-1 <= step < len(steps)``."""
        if not -1 <= step < len(self.steps):
            raise IndexError(
                f"step {step} is out of range: this trace has {len(self.steps)} steps, so step "
                f"must be in -1..{len(self.steps) - 1} (-1 means before any step)"
            )

    def removed_after(self, step: int) -> set[str]:
        """Edge names removed by steps ``0..step`` (``step=-1``: before any step)."""
        self.check_step(step)
        return {s.edge for s in self.steps[: step + 1] if s.removed}

    def kept_after(self, step: int) -> set[str]:
        """Edge names still in the circuit after steps ``0..step``, untested edges included."""
        removed = self.removed_after(step)
        return {e.name for e in self.graph.edges if e.name not in removed}

    @property
    def final_kept_edges(self) -> list[str]:
        """The kept edges after all recorded steps, in visit order."""
        removed = {s.edge for s in self.steps if s.removed}
        return [e.name for e in self.graph.edges if e.name not in removed]

    def kept_count(self, step: int) -> int:
        """How many edges are in the circuit after step ``step`` (all of them for -1)."""
        self.check_step(step)
        return self.n_edges if step == -1 else self.steps[step].kept_edges

    def metric_after(self, step: int) -> float:
        """The current circuit's metric after step ``step`` (``initial_metric`` for -1).

        Unlike ``Step.metric_after`` (the metric without the tested edge), this is the metric
        of the circuit ACDC goes on with: ``metric_after`` if the edge was removed, else
        ``metric_before``.
        """
        self.check_step(step)
        if step == -1:
            return float(self.initial_metric)
        s = self.steps[step]
        return float(s.metric_after if s.removed else s.metric_before)

    # -- building ------------------------------------------------------------------------

    def record(self, metric_after: float, removed: bool, seconds: float = 0.0) -> Step:
        """Append the test of the next edge, deriving index, edge, delta and counts.

        The engine only measures ``metric_after`` and decides ``removed``; deriving the rest
        here keeps the bookkeeping in one place, so it always passes ``validate``.
        """
        i = len(self.steps)
        if self.status != "stopped":
            raise TraceError(f"cannot record step {i}: the trace is {self.status!r}, not 'stopped'")
        if i >= self.n_edges:
            raise TraceError(
                f"cannot record step {i}: all {self.n_edges} edges are already tested; "
                "call finish() instead"
            )
        before = self.metric_after(i - 1)
        after = float(metric_after)
        kept_before = self.steps[-1].kept_edges if self.steps else self.n_edges
        step = Step(
            index=i,
            edge=self.graph.edges[i].name,
            metric_before=before,
            metric_after=after,
            delta=after - before,
            removed=bool(removed),
            kept_edges=kept_before - (1 if removed else 0),
            seconds=float(seconds),
        )
        self.steps.append(step)
        return step

    def finish(self) -> None:
        """Mark the run complete; the final metric is the current metric after the last step."""
        if len(self.steps) != self.n_edges:
            raise TraceError(
                f"cannot finish: {len(self.steps)} of {self.n_edges} edges tested; test the "
                f"rest first (resume from edge {self.resume_from})"
            )
        self.status = "complete"
        self.final_metric = self.metric_after(len(self.steps) - 1)

    # -- consistency ---------------------------------------------------------------------

    def validate(self, source: str = "<trace>") -> None:
        """Check that the parts agree; raise ``TraceError`` naming ``source`` otherwise.

        Paths in the messages (``$.steps[3].delta``) point at the field in the JSON file.
        """

        def fail(msg: str) -> NoReturn:
            raise TraceError(f"{source}: {msg}")

        if self.status not in STATES:
            fail(f"$.status.state is {self.status!r}; expected 'complete' or 'stopped'")
        self._validate_settings(fail)
        g = self.graph
        n_pos = g.n_positions
        if self.tokens is not None and n_pos is not None and len(self.tokens) != n_pos:
            fail(
                f"$.tokens has {len(self.tokens)} tokens but the graph is split into "
                f"{g.n_positions} positions; give one token string per position"
            )
        if not _finite(self.initial_metric):
            fail(f"$.initial_metric is {self.initial_metric!r}; a metric must be a finite number")

        edges = g.edges
        n = len(edges)
        if len(self.steps) > n:
            fail(f"$.steps has {len(self.steps)} steps but the graph has only {n} edges; "
                 "ACDC tests each edge once")
        current = float(self.initial_metric)
        kept = n
        for i, s in enumerate(self.steps):
            p = f"$.steps[{i}]"
            if s.index != i:
                fail(f"{p}.index is {s.index!r}; expected {i} (indices run 0, 1, 2, ... in order)")
            for name in ("metric_before", "metric_after", "delta"):
                value = getattr(s, name)
                if not _finite(value):
                    fail(f"{p}.{name} is {value!r}; a metric must be a finite number (JSON "
                         "cannot hold NaN or infinity; check the metric for a diverging run)")
            if not _finite(s.seconds) or s.seconds < 0:
                fail(f"{p}.seconds is {s.seconds!r}; expected a finite number >= 0")
            expected = edges[i].name
            if s.edge != expected:
                j = g.edge_index.get(s.edge)
                if j is None:
                    fail(f"{p}.edge {s.edge!r} is not an edge of {g!r}; expected {expected!r}")
                fail(f"{p}.edge is {s.edge!r} (edge {j} of the visit order) but step {i} must "
                     f"test edge {i}, {expected!r}: ACDC tests every edge once, in visit order")
            if not _close(s.metric_before, current):
                fail(f"{p}.metric_before is {s.metric_before!r} but the current metric after the "
                     f"previous step is {current!r} (initial_metric, or the last removal's "
                     "metric_after)")
            if not _delta_ok(s.delta, s.metric_before, s.metric_after):
                fail(f"{p}.delta is {s.delta!r} but metric_after - metric_before is "
                     f"{s.metric_after - s.metric_before!r}")
            if s.removed:
                kept -= 1
                current = float(s.metric_after)
            if s.kept_edges != kept:
                fail(f"{p}.kept_edges is {s.kept_edges!r}; expected {kept} ({n} edges minus "
                     f"{n - kept} removed in steps 0..{i})")

        if self.status == "complete":
            if len(self.steps) != n:
                fail(f"the status is 'complete' but only {len(self.steps)} of {n} edges were "
                     f"tested; mark it 'stopped' with resume_from {len(self.steps)}")
            if self.final_metric is None:
                fail("the status is 'complete' but $.final is null; a complete trace records "
                     "the kept edges and the final metric (Trace.finish() sets them)")
            if not _finite(self.final_metric):
                fail(f"$.final.metric is {self.final_metric!r}; expected a finite number")
            if not _close(self.final_metric, current):
                fail(f"$.final.metric is {self.final_metric!r} but the metric after the last "
                     f"step is {current!r}; they must agree")
        elif self.final_metric is not None:
            fail(f"$.final is set (metric {self.final_metric!r}) but the status is 'stopped'; "
                 "a stopped trace has final null (call finish() once every edge is tested)")

    def _validate_settings(self, fail: Callable[[str], NoReturn]) -> None:
        """The settings describe the same model and split as the graph."""
        settings = self.settings
        if not isinstance(settings, dict):
            fail(f"$.settings is a {type(settings).__name__}; expected a dict")
        model = settings.get("model")
        if not isinstance(model, dict):
            fail("$.settings.model is missing; expected the model identity "
                 "{name, config_hash, n_layers, n_heads, d_model, attn_only}")
        if not any(isinstance(model.get(k), str) for k in ("name", "config_hash")):
            fail("$.settings.model has neither a name nor a config_hash; record at least one "
                 "so the trace says which model it belongs to")
        g = self.graph
        for key, value in (("n_layers", g.n_layers), ("n_heads", g.n_heads),
                           ("attn_only", bool(g.attn_only))):
            if model.get(key) != value:
                fail(f"$.settings.model.{key} is {model.get(key)!r} but the graph has "
                     f"{key}={value!r}; the trace mixes two models")
        if "tau" in settings and not _finite(settings["tau"]):
            fail(f"$.settings.tau is {settings['tau']!r}; expected a finite number")
        split = g.n_positions is not None
        if "positions" in settings and settings["positions"] != split:
            fail(f"$.settings.positions is {settings['positions']!r} but the graph has "
                 f"n_positions={g.n_positions!r}; they must agree")
        seq_len = settings.get("seq_len")
        if split and seq_len is not None and seq_len != g.n_positions:
            fail(f"$.settings.seq_len is {seq_len!r} but the graph is split into "
                 f"{g.n_positions} positions; they must agree")

    # -- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, as plain Python values (no validation; ``to_json`` validates)."""
        g = self.graph
        complete_or_final = self.status == "complete" or self.final_metric is not None
        final = (
            {
                "kept_edges": self.final_kept_edges,
                "metric": None if self.final_metric is None else float(self.final_metric),
            }
            if complete_or_final
            else None
        )
        return {
            "format_version": FORMAT_VERSION,
            "settings": copy.deepcopy(self.settings),
            "graph": {
                "n_layers": g.n_layers,
                "n_heads": g.n_heads,
                "attn_only": bool(g.attn_only),
                "n_positions": g.n_positions,
                **({"parallel": True} if g.parallel else {}),   # absent: sequential blocks
                **({"n_kv_heads": g.n_kv_heads} if g.grouped else {}),  # absent: one per head
                **({"sandwich": True} if g.sandwich else {}),   # absent: heads are sources
                "nodes": [
                    {"name": n.name, "kind": n.kind, "layer": n.layer, "head": n.head,
                     "position": n.position}
                    for n in g.nodes
                ],
                "edges": [e.name for e in g.edges],
            },
            "initial_metric": float(self.initial_metric),
            "steps": [s.to_dict() for s in self.steps],
            "status": {"state": self.status, "resume_from": self.resume_from},
            "final": final,
            "tokens": None if self.tokens is None else list(self.tokens),
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> Trace:
        """Build and fully validate a trace from a parsed JSON document."""
        _check_header(d, source)
        _check_schema(d, source)
        gd = d["graph"]
        graph = CircuitGraph(gd["n_layers"], gd["n_heads"], attn_only=gd["attn_only"],
                             n_positions=gd["n_positions"], parallel=gd.get("parallel", False),
                             n_kv_heads=gd.get("n_kv_heads"), sandwich=gd.get("sandwich", False))
        _check_graph_lists(gd, graph, source)
        final = d["final"]
        trace = cls(
            settings=copy.deepcopy(d["settings"]),
            graph=graph,
            steps=[
                Step(int(s["index"]), s["edge"], float(s["metric_before"]),
                     float(s["metric_after"]), float(s["delta"]), s["removed"],
                     int(s["kept_edges"]), float(s["seconds"]))
                for s in d["steps"]
            ],
            initial_metric=float(d["initial_metric"]),
            status=d["status"]["state"],
            tokens=None if d["tokens"] is None else list(d["tokens"]),
            final_metric=None if final is None else float(final["metric"]),
        )
        resume_from = d["status"]["resume_from"]
        if resume_from != len(trace.steps):
            raise TraceError(f"{source}: $.status.resume_from is {resume_from} but the trace has "
                             f"{len(trace.steps)} steps; it must be the index of the next edge "
                             f"to test, {len(trace.steps)}")
        trace.validate(source)
        if final is not None:
            expected = trace.final_kept_edges
            got = final["kept_edges"]
            if got != expected:
                i = next((k for k, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                         min(len(got), len(expected)))
                raise TraceError(
                    f"{source}: $.final.kept_edges disagrees with the steps at item {i} "
                    f"(has {len(got)} edges, the steps leave {len(expected)}; item {i} is "
                    f"{got[i] if i < len(got) else None!r}, expected "
                    f"{expected[i] if i < len(expected) else None!r}); it must list the edges "
                    "no step removed, in visit order"
                )
        return trace

    def to_json(self, source: str = "<trace>") -> str:
        """The validated JSON text: deterministic, one step per line, floats exact.

        ``source`` names the trace in a ``TraceError`` (a file name when saving).
        """
        d = self.to_dict()
        _check_schema(d, source)
        self.validate(source)
        try:
            return _layout(d, 0) + "\n"
        except (TypeError, ValueError) as e:
            raise TraceError(
                f"{source}: the settings or tokens hold a value JSON cannot hold ({e}); use "
                "plain str, int, float (finite), bool, None, list and dict with str keys"
            ) from e

    def canonical_dict(self, exclude_timings: bool = True) -> dict[str, Any]:
        """``to_dict`` without wall-clock values, for comparing two runs of the same inputs.

        With ``exclude_timings`` the steps lose ``seconds`` and the settings lose the keys in
        ``TIMING_SETTINGS``; everything else must be identical for a deterministic engine.
        """
        d = self.to_dict()
        if exclude_timings:
            d["settings"] = {k: v for k, v in d["settings"].items() if k not in TIMING_SETTINGS}
            for s in d["steps"]:
                del s["seconds"]
        return d

    def canonical_json(self, exclude_timings: bool = True) -> str:
        """``canonical_dict`` as text, so two runs can be compared byte for byte."""
        return _layout(self.canonical_dict(exclude_timings), 0) + "\n"


def steps_equal(a: Trace, b: Trace) -> bool:
    """Whether two traces tested the same graph with the same metrics and decisions.

    Timings (``seconds``) are ignored; settings, tokens and status are not compared.
    """
    if a.graph != b.graph or a.initial_metric != b.initial_metric:
        return False
    return [s.to_dict() | {"seconds": 0.0} for s in a.steps] == [
        s.to_dict() | {"seconds": 0.0} for s in b.steps
    ]


# -- validation helpers --------------------------------------------------------------------


def _check_header(d: Any, source: str) -> None:
    """Tell 'not a trace at all' and 'a trace of another format' apart from schema errors."""
    if not isinstance(d, dict) or "format_version" not in d:
        what = (f"a JSON {type(d).__name__}" if not isinstance(d, dict)
                else "a JSON object without format_version")
        raise TraceError(f"{source}: this is not an acdc_viz trace ({what}); a trace is a JSON "
                         "object starting with \"format_version\", written by save_trace")
    version = d["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise TraceError(f"{source}: this is not an acdc_viz trace: format_version is "
                         f"{version!r}, expected an integer")
    if version != FORMAT_VERSION:
        advice = "upgrade acdc_viz" if version > FORMAT_VERSION else (
            "downgrade acdc_viz to the version that wrote it, or re-run")
        raise TraceError(f"{source}: written by format {version}, this acdc_viz reads format "
                         f"{FORMAT_VERSION}; {advice}")


@lru_cache(maxsize=1)
def trace_schema() -> dict[str, Any]:
    """The JSON Schema of the format (``acdc_viz/trace_schema.json``)."""
    text = resources.files("acdc_viz").joinpath("trace_schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _validator() -> Validator:
    schema = trace_schema()
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


_NUM = (int, float)
_STEP_KEYS = frozenset(
    ("index", "edge", "metric_before", "metric_after", "delta", "removed", "kept_edges", "seconds")
)
_NODE_KEYS = frozenset(("name", "kind", "layer", "head", "position"))


def _fast_step(s: Any) -> bool:
    return (
        type(s) is dict
        and s.keys() == _STEP_KEYS
        and type(s["index"]) is int and s["index"] >= 0
        and type(s["edge"]) is str
        and type(s["metric_before"]) in _NUM
        and type(s["metric_after"]) in _NUM
        and type(s["delta"]) in _NUM
        and type(s["removed"]) is bool
        and type(s["kept_edges"]) is int and s["kept_edges"] >= 0
        and type(s["seconds"]) in _NUM and s["seconds"] >= 0
    )


def _fast_node(n: Any) -> bool:
    return (
        type(n) is dict
        and n.keys() == _NODE_KEYS
        and type(n["name"]) is str
        and n["kind"] in ("embed", "head", "attn", "mlp", "out")
        and type(n["layer"]) is int and n["layer"] >= -1
        and (n["head"] is None or (type(n["head"]) is int and n["head"] >= 0))
        and (n["position"] is None or (type(n["position"]) is int and n["position"] >= 0))
    )


def _all_str(xs: Any) -> bool:
    return type(xs) is list and all(type(x) is str for x in xs)


def _light_copy(d: dict[str, Any]) -> dict[str, Any] | None:
    """``d`` with its long arrays cut to one item, if a fast check passes all their items.

    jsonschema takes ~30 us per step, seconds for a position-split GPT-2 trace. The fast
    checks here are at least as strict as the schema's item rules, so when they pass, checking
    one item of each array with jsonschema is as good as checking all. The schema must keep
    array rules to ``items`` and ``minItems: 1`` for this to hold. Returns None to fall back.
    """
    try:
        steps, graph, final, tokens = d["steps"], d["graph"], d["final"], d["tokens"]
        if type(steps) is not list or not all(_fast_step(s) for s in steps):
            return None
        if type(graph) is not dict:
            return None
        nodes, edges = graph["nodes"], graph["edges"]
        if type(nodes) is not list or not all(_fast_node(n) for n in nodes):
            return None
        if not _all_str(edges):
            return None
        if tokens is not None and not _all_str(tokens):
            return None
        if type(final) is dict and not _all_str(final.get("kept_edges")):
            return None
    except (KeyError, TypeError, AttributeError):
        return None
    light = dict(d)
    light["steps"] = steps[:1]
    light["graph"] = graph | {"nodes": nodes[:1], "edges": edges[:1]}
    if tokens is not None:
        light["tokens"] = tokens[:1]
    if type(final) is dict:
        light["final"] = final | {"kept_edges": final["kept_edges"][:1]}
    return light


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _check_schema(d: dict[str, Any], source: str) -> None:
    """Structural validation; the error names the JSON path of the offending field."""
    validator = _validator()
    light = _light_copy(d)
    if light is not None and validator.is_valid(light):
        return
    errors = validator.iter_errors(d)
    error = best_match(errors)
    if error is None:  # the fast check was stricter than the schema: the document is fine
        return
    more = sum(1 for _ in islice(validator.iter_errors(d), 101)) - 1
    if more <= 0:
        extra = ""
    else:
        extra = f" (and {'100+' if more >= 100 else more} more problem{'s' if more > 1 else ''})"
    raise TraceError(f"{source}: {error.json_path}: {_short(error.message)}{extra}; "
                     "see docs/trace-format.md for the format")


def _check_graph_lists(gd: dict[str, Any], graph: CircuitGraph, source: str) -> None:
    """Nodes and edges must be exactly what CircuitGraph builds, in its order."""
    spec = (f"CircuitGraph({graph.n_layers}, {graph.n_heads}, attn_only={graph.attn_only}, "
            f"n_positions={graph.n_positions}{', parallel=True' if graph.parallel else ''}"
            f"{f', n_kv_heads={graph.n_kv_heads}' if graph.grouped else ''}"
            f"{', sandwich=True' if graph.sandwich else ''})")
    expected_edges = [e.name for e in graph.edges]
    got_edges = gd["edges"]
    if got_edges != expected_edges:
        pairs = zip(got_edges, expected_edges, strict=False)
        i = next((k for k, (a, b) in enumerate(pairs) if a != b), None)
        if i is None:
            raise TraceError(f"{source}: $.graph.edges has {len(got_edges)} edges but {spec} has "
                             f"{len(expected_edges)}; the trace was edited or cut")
        raise TraceError(f"{source}: $.graph.edges[{i}] is {got_edges[i]!r}, expected "
                         f"{expected_edges[i]!r}: the edges must be {spec}.edges in visit "
                         "order; the trace was edited or written by an incompatible acdc_viz")
    expected_nodes = [
        {"name": n.name, "kind": n.kind, "layer": n.layer, "head": n.head, "position": n.position}
        for n in graph.nodes
    ]
    got_nodes = gd["nodes"]
    if got_nodes != expected_nodes:
        i = next((k for k, (a, b) in enumerate(zip(got_nodes, expected_nodes, strict=False))
                  if a != b),
                 min(len(got_nodes), len(expected_nodes)))
        want = expected_nodes[i] if i < len(expected_nodes) else "no node"
        raise TraceError(f"{source}: $.graph.nodes[{i}] disagrees with {spec}.nodes: expected "
                         f"{want}; the nodes must be exactly the graph's nodes, in order")


# -- text layout ---------------------------------------------------------------------------


_ENCODER = json.JSONEncoder(allow_nan=False, separators=(", ", ": "))


def _layout(value: Any, depth: int) -> str:
    """JSON text with top-level fields, steps, nodes and edges one per line.

    Deterministic (insertion order kept, nothing sorted), diff-friendly and far smaller than
    ``indent=1`` for long traces. Floats use ``repr``, so they round-trip exactly.
    """
    expand = (type(value) is dict and depth <= 1) or (type(value) is list and depth <= 2)
    if not expand or not value:
        return _ENCODER.encode(value)
    pad, end = " " * (depth + 1), " " * depth
    if type(value) is dict:
        parts = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"dict key {k!r} is not a str")
            parts.append(f"{pad}{json.dumps(k)}: {_layout(v, depth + 1)}")
        return "{\n" + ",\n".join(parts) + "\n" + end + "}"
    return "[\n" + ",\n".join(pad + _layout(v, depth + 1) for v in value) + "\n" + end + "]"


# -- files ---------------------------------------------------------------------------------


def save_trace(trace: Trace, path: str | os.PathLike[str]) -> None:
    """Validate and write ``trace`` to ``path`` atomically.

    The text goes to a temporary file in the same directory, is fsynced, then replaces
    ``path`` in one step, so a crash or an invalid trace never leaves a half-written file or
    clobbers the previous save; on error the temporary file is removed.
    """
    write_atomic(path, trace.to_json(f"{path} (not saved)").encode("ascii"))


class _NonFinite(Exception):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and fully validate a trace file; never unpickles.

    Raises ``TraceError`` (naming the file) for an unreadable file, bytes that are not JSON,
    a JSON document that is not a trace or is of another format version, a schema violation
    (with its JSON path), or parts that disagree with each other.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TraceError(f"{path}: cannot read the trace file ({e.strerror or e})") from e
    if raw[:1] == b"\x80" or raw[:4] == b"PK\x03\x04":
        raise TraceError(f"{path}: truncated or not JSON: this looks like a pickle or torch.save "
                         "file; acdc_viz never unpickles; traces are JSON written by save_trace")
    if not raw.strip():
        raise TraceError(f"{path}: the file is empty (truncated or not JSON); an interrupted "
                         "copy? save_trace itself never leaves an empty file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: truncated or not JSON: byte {e.start} is not UTF-8 text; "
                         "this is not a trace file") from None
    try:
        d = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}: truncated or not JSON (line {e.lineno}, column {e.colno}: "
                         f"{e.msg}); the file may have been cut off while copying") from None
    except _NonFinite as e:
        raise TraceError(f"{path}: holds {e.args[0]}, which a trace never contains (metrics are "
                         "finite); the file was not written by save_trace") from None
    except RecursionError:
        raise TraceError(f"{path}: JSON nested too deeply; this is not an acdc_viz trace") from None
    return Trace.from_dict(d, source=str(path))
