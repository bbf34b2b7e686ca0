"""ROC and AUC on hand-made circuits and scores."""

from __future__ import annotations

import math

import pytest

from acdc_viz.evaluate import (
    edge_nodes,
    roc_figure,
    roc_from_circuits,
    roc_from_scores,
    sweep_rocs,
)
from acdc_viz.taus import parse_taus

EDGES = ["A1.0->Out", "A0.1->A1.0.k", "Embed->A1.0.q", "MLP0->Out", "A0.0->Out", "Embed->Out"]
CANON = {"A1.0->Out", "A0.1->A1.0.k", "Embed->A1.0.q"}


def test_perfect_sweep_has_auc_one():
    roc = roc_from_circuits({0.1: CANON, 0.01: CANON | {"MLP0->Out"}}, EDGES, CANON)
    assert roc.auc == 1.0
    assert (roc.points[0].fpr, roc.points[0].tpr) == (0.0, 0.0)


def test_hand_computed_auc():
    # one circuit: TPR 2/3 at FPR 1/3 -> area = 1/2*(1/3)(2/3) + (2/3)(2/3 + 1)/2 = 1/9 + 5/9
    roc = roc_from_circuits({0.1: {"A1.0->Out", "A0.1->A1.0.k", "MLP0->Out"}}, EDGES, CANON)
    assert roc.auc == pytest.approx(2 / 3)


def test_scores_auc_is_the_ranking_probability():
    scores = {"A1.0->Out": math.inf, "A0.1->A1.0.k": 0.5, "Embed->A1.0.q": 0.1,
              "MLP0->Out": 0.3, "A0.0->Out": 0.01, "Embed->Out": 0.0}
    # positives beat negatives in 8 of 9 pairs (0.1 < 0.3)
    assert roc_from_scores(scores, CANON).auc == pytest.approx(8 / 9)
    assert roc_from_scores({k: float(k in CANON) for k in EDGES}, CANON).auc == 1.0


def test_nodes_and_sweeps():
    assert edge_nodes(["A0.1->A1.0.k@3", "Embed->MLP2"]) == {"A0.1", "A1.0", "MLP2"}
    rocs = sweep_rocs({0.1: CANON}, EDGES, CANON)
    assert rocs["edge"].auc == 1.0 and rocs["node"].auc == 1.0
    assert len(roc_figure(rocs).data) == 3


def test_bad_input():
    with pytest.raises(ValueError, match="not in the graph"):
        roc_from_circuits({0.1: CANON}, EDGES, CANON | {"A9.9->Out"})
    with pytest.raises(ValueError, match="both"):
        roc_from_circuits({0.1: CANON}, EDGES, set(EDGES))
    assert parse_taus("1e-3:1e-1:3") == [0.001, 0.01, 0.1]
    assert parse_taus("0.5, 0.1") == [0.5, 0.1]
    with pytest.raises(ValueError):
        parse_taus("1:0.1:3")
