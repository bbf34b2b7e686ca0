"""ROC curves and AUC of discovered circuits against a canonical circuit (the paper's §4).

ACDC gives one circuit per tau, not a score per edge, so its ROC curve is the set of points
(false-positive rate, true-positive rate) of the circuits of a tau sweep, joined with (0, 0) and
(1, 1); the AUC is the area under it (trapezoids). Edge level: a kept edge is a positive
prediction. Node level: a head or MLP is predicted when a kept edge touches it (``Embed`` and
``Out`` are in every circuit and are not counted).

``roc_from_scores`` gives the usual threshold ROC for methods that do score every edge (for
example ``acdc_prune_scores``' output).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RocPoint:
    """One circuit (one tau) on the ROC plane."""

    tau: float | None
    fpr: float
    tpr: float
    predicted: int


@dataclass(frozen=True)
class Roc:
    points: tuple[RocPoint, ...]   # sorted by (fpr, tpr), endpoints included
    auc: float


def _rates(predicted: set[str], universe: set[str], positives: set[str]) -> tuple[float, float]:
    negatives = universe - positives
    tp = len(predicted & positives)
    fp = len(predicted & negatives)
    tpr = tp / len(positives) if positives else 0.0
    fpr = fp / len(negatives) if negatives else 0.0
    return fpr, tpr


def _check(universe: set[str], positives: set[str]) -> None:
    unknown = positives - universe
    if unknown:
        raise ValueError(f"{len(unknown)} canonical items are not in the graph, e.g. "
                         f"{sorted(unknown)[:3]}")
    if not positives or positives == universe:
        raise ValueError("a ROC needs both canonical and non-canonical items")


def _area(points: list[tuple[float, float]]) -> float:
    xs, ys = zip(*sorted(points), strict=True)
    return float(np.trapezoid(ys, xs))


def roc_from_circuits(circuits: Mapping[float, Iterable[str]], universe: Iterable[str],
                      canonical: Iterable[str]) -> Roc:
    """ROC of a sweep: ``circuits`` maps tau to the kept items (edges or nodes) at that tau."""
    universe_set, positives = set(universe), set(canonical)
    _check(universe_set, positives)
    pts = [RocPoint(None, 0.0, 0.0, 0), RocPoint(None, 1.0, 1.0, len(universe_set))]
    for tau, kept in circuits.items():
        kept_set = set(kept)
        fpr, tpr = _rates(kept_set, universe_set, positives)
        pts.append(RocPoint(tau, fpr, tpr, len(kept_set)))
    pts.sort(key=lambda p: (p.fpr, p.tpr))
    return Roc(tuple(pts), _area([(p.fpr, p.tpr) for p in pts]))


def roc_from_scores(scores: Mapping[str, float], canonical: Iterable[str]) -> Roc:
    """Threshold ROC for per-item scores (higher = more likely in the circuit); ties count half."""
    positives = set(canonical)
    _check(set(scores), positives)
    values = np.array([scores[k] for k in scores], dtype=float)
    labels = np.array([k in positives for k in scores])
    finite_max = values[np.isfinite(values)].max(initial=0.0)
    values = np.where(np.isposinf(values), finite_max + 1.0, values)
    pts = [RocPoint(None, 0.0, 0.0, 0)]
    for threshold in sorted(set(values.tolist()), reverse=True):
        pred = values >= threshold
        tpr = float((pred & labels).sum() / labels.sum())
        fpr = float((pred & ~labels).sum() / (~labels).sum())
        pts.append(RocPoint(threshold, fpr, tpr, int(pred.sum())))
    pts.append(RocPoint(None, 1.0, 1.0, len(values)))
    pts.sort(key=lambda p: (p.fpr, p.tpr))
    return Roc(tuple(pts), _area([(p.fpr, p.tpr) for p in pts]))


def edge_nodes(edges: Iterable[str]) -> set[str]:
    """The heads and MLPs that the given edges touch, by name (``A1.2``, ``MLP0``)."""
    nodes = set()
    for name in edges:
        src, dest = name.split("@")[0].split("->")
        for node in (src, dest):
            if node.startswith("A"):
                node = ".".join(node.split(".")[:2])        # A1.2.k -> A1.2
            if node not in ("Embed", "Out"):
                nodes.add(node)
    return nodes


def sweep_rocs(kept_by_tau: Mapping[float, Iterable[str]], all_edges: Iterable[str],
               canonical_edges: Iterable[str]) -> dict[str, Roc]:
    """Edge- and node-level ROC of a tau sweep."""
    all_edges = list(all_edges)
    kept_by_tau = {t: list(k) for t, k in kept_by_tau.items()}
    return {
        "edge": roc_from_circuits(kept_by_tau, all_edges, canonical_edges),
        "node": roc_from_circuits({t: edge_nodes(k) for t, k in kept_by_tau.items()},
                                  edge_nodes(all_edges), edge_nodes(canonical_edges)),
    }


def roc_figure(rocs: Mapping[str, Roc], title: str = "ROC against the canonical circuit"):
    """A plotly figure of one or more ROC curves (legend: name and AUC)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    colours = ("#0072B2", "#E69F00", "#009E73", "#CC79A7")
    for (name, roc), colour in zip(rocs.items(), colours, strict=False):
        fig.add_scatter(
            x=[p.fpr for p in roc.points], y=[p.tpr for p in roc.points], mode="lines+markers",
            name=f"{name} (AUC {roc.auc:.3f})", line={"color": colour, "shape": "linear"},
            text=[("" if p.tau is None else f"tau={p.tau:.3g}") + f"<br>{p.predicted} predicted"
                  for p in roc.points],
            hovertemplate="FPR %{x:.3f}, TPR %{y:.3f}<br>%{text}<extra></extra>",
        )
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#999"},
                    showlegend=False, hoverinfo="skip")
    fig.update_layout(title=title, xaxis_title="false-positive rate",
                      yaxis_title="true-positive rate", xaxis_range=[0, 1],
                      yaxis_range=[0, 1.02], width=520, height=480, template="plotly_white")
    return fig
