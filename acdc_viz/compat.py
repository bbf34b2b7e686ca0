"""auto-circuit's ACDC entry point, ``acdc_prune_scores``, on top of ``acdc_viz.sweep``.

Its own module so that the engine (``acdc_viz.acdc``) never imports the sweeps that run it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from acdc_viz.data import TokenPairs
from acdc_viz.errors import SettingsError
from acdc_viz.sweep import sweep
from acdc_viz.taus import check_tau
from acdc_viz.trace import Trace

log = logging.getLogger(__name__)

EdgeScores = dict[str, float]
"""ACDC scores keyed by edge name (``"A0.3->A1.2.k"``, with ``"@pos"`` in position mode).

An edge's score is the smallest tau at which ACDC removed it, or ``+inf`` if no tau removed it.
Higher means more important, as with auto-circuit's ``PruneScores`` (which keys tensors by module
instead: here every edge has its own entry, so a score is looked up by the name a trace uses).
"""

_FAITHFULNESS = {"kl_div": "kl", "kl": "kl", "mse": "mse"}


def acdc_prune_scores(
    model: Any,
    dataloader: Any,
    official_edges: Any = None,
    tao_exps: list[int] | tuple[int, ...] = (-5, -4, -3, -2),
    tao_bases: list[int] | tuple[int, ...] = (1, 3, 5, 7, 9),
    faithfulness_target: str = "kl_div",
    test_mode: bool = False,
    *,
    ablation: str = "resample",
    positions: bool = False,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = torch.float32,
    callback: Callable[[float, Trace], None] | None = None,
    executor: str = "local",
) -> EdgeScores:
    """auto-circuit's entry point: run ACDC at every tau = base * 10**exp and score the edges.

    Args:
        model: a TransformerLens model (4.x bridge or 3.x HookedTransformer).
        dataloader: an iterable of batches with ``.clean``/``.corrupt`` token tensors
            (auto-circuit's ``PromptDataLoader``), dicts or tuples; only the first batch is used,
            as in auto-circuit.
        official_edges: edge names of a known circuit, or None; only used for logging how many of
            them each tau keeps.
        tao_exps, tao_bases: the grid of thresholds (auto-circuit's spelling).
        faithfulness_target: ``"kl_div"`` or ``"mse"``.
        test_mode: re-check every decision with a hooked full forward pass (slow).
        callback: called with ``(tau, trace)`` after each run, e.g. to save the traces.
        executor: ``"local"`` (one run after another) or ``"ray"`` (see ``acdc_viz.sweep``).

    Returns:
        ``EdgeScores``: edge name -> smallest tau that removed it, ``+inf`` if none did.
    """
    if faithfulness_target not in _FAITHFULNESS:
        raise SettingsError(
            f"unknown faithfulness_target {faithfulness_target!r}: expected 'kl_div' or 'mse'"
        )
    pairs = TokenPairs.from_dataloader(dataloader)
    taus = sorted({check_tau(float(f"{base}e{exp}")) for exp in tao_exps for base in tao_bases})
    if not taus:
        raise SettingsError("tao_exps and tao_bases give no thresholds")
    official = {getattr(e, "name", e) for e in official_edges} if official_edges else set()
    result = sweep(model, taus, pairs, metric=_FAITHFULNESS[faithfulness_target],
                   ablation=ablation, positions=positions, device=device, dtype=dtype,
                   test_mode=test_mode, executor=executor, progress=False)
    result.raise_for_failures()
    scores: EdgeScores = {}
    for run in result.runs:                       # in tau order
        tau, trace = run.job.tau, run.trace
        assert trace is not None
        if not scores:
            scores = {e.name: math.inf for e in trace.graph.edges}
        for step in trace.steps:
            if step.removed and scores[step.edge] == math.inf:
                scores[step.edge] = tau
        kept = set(trace.final_kept_edges)
        log.info("tau=%g: %d edges kept%s", tau, len(kept),
                 f", {len(kept & official)}/{len(official)} official" if official else "")
        if callback is not None:
            callback(tau, trace)
    return scores
