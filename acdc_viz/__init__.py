"""acdc_viz: Automatic Circuit Discovery (Conmy et al. 2023) on TransformerLens models, step
by step.

    from acdc_viz import Acdc, TokenPairs
    acdc = Acdc(model, TokenPairs(clean, corrupt), tau=1e-2)
    for step in acdc.steps():      # one tested edge per step; stop whenever you like
        ...
    trace = acdc.trace             # save_trace(trace, "run.json"); load_trace(...) to resume
"""

from typing import TYPE_CHECKING

from acdc_viz.acdc import Acdc, DecisionMismatch, run_acdc
from acdc_viz.compat import EdgeScores, acdc_prune_scores
from acdc_viz.data import TokenPairs, load_token_pairs, save_token_pairs
from acdc_viz.errors import (
    AcdcVizError,
    DataError,
    ModelLoadError,
    ModelSupportError,
    RunOutOfMemory,
    SettingsError,
)
from acdc_viz.graph import CircuitGraph, Destination, Edge, Source
from acdc_viz.metrics import Metric
from acdc_viz.models.loading import load_model

# Eager on purpose: ``acdc_viz.sweep`` names both the function and its module, and a lazy
# export would be shadowed by the module once anything imported it. The module itself imports
# ray only when a sweep asks for executor="ray".
from acdc_viz.sweep import SweepResult, SweepRun, sweep
from acdc_viz.trace import Step, Trace, TraceError, load_trace, save_trace

if TYPE_CHECKING:
    from acdc_viz.widget import Explorer

__version__ = "0.1.0"


def __getattr__(name: str):
    # The widget pulls in ipywidgets and plotly: load it only when asked for.
    if name == "Explorer":
        from acdc_viz.widget import Explorer

        return Explorer
    raise AttributeError(f"module 'acdc_viz' has no attribute {name!r}")


__all__ = [
    "Acdc",
    "AcdcVizError",
    "CircuitGraph",
    "DataError",
    "DecisionMismatch",
    "Destination",
    "Edge",
    "EdgeScores",
    "Explorer",
    "Metric",
    "ModelLoadError",
    "ModelSupportError",
    "RunOutOfMemory",
    "SettingsError",
    "Source",
    "Step",
    "SweepResult",
    "SweepRun",
    "TokenPairs",
    "Trace",
    "TraceError",
    "acdc_prune_scores",
    "load_model",
    "load_token_pairs",
    "load_trace",
    "run_acdc",
    "save_token_pairs",
    "save_trace",
    "sweep",
]
