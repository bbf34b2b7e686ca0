"""Thresholds: checking one tau, and parsing a list or a log-spaced range of them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from acdc_viz.errors import SettingsError


def check_tau(tau: Any) -> float:
    """tau must be a finite, non-negative number."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        try:
            tau = float(tau)
        except (TypeError, ValueError):
            raise SettingsError(f"tau must be a number, got {tau!r}") from None
    tau = float(tau)
    if math.isnan(tau) or math.isinf(tau) or tau < 0:
        raise SettingsError(
            f"tau must be a finite number >= 0, got {tau}. ACDC removes an edge when the metric "
            "grows by less than tau; typical values are 1e-4 .. 1e-1."
        )
    return tau


def parse_taus(spec: str) -> list[float]:
    """``"1e-5:1e-1:20"`` (log-spaced, inclusive) or ``"0.01,0.03,0.1"``."""
    if ":" in spec:
        lo, hi, n = spec.split(":")
        lo_f, hi_f, count = float(lo), float(hi), int(n)
        if not (lo_f > 0 and hi_f > lo_f and count >= 2):
            raise SettingsError(f"bad tau range {spec!r}: expected LOW:HIGH:COUNT with "
                                "0 < LOW < HIGH, COUNT >= 2")
        return [float(f"{x:.6g}") for x in np.geomspace(lo_f, hi_f, count)]
    taus = [float(x) for x in spec.split(",") if x.strip()]
    if not taus or any(math.isnan(t) or t < 0 for t in taus):
        raise SettingsError(f"bad tau list {spec!r}")
    return taus
