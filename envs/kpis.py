"""Episode KPIs accumulated from step outcomes: what every evaluation table reports.

One accumulator serves the single env (batch of one) and the vector env (one row per
sub-environment), so the numbers a trainer logs and an evaluator prints are computed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from envs.dynamics import StepOutcome
from envs.params import FloatArray

#: Step figures summed over the episode.
SUMMED = (
    "reward",
    "cost",
    "import_kwh",
    "export_kwh",
    "load_kwh",
    "pv_kwh",
    "pv_curtailed_kwh",
    "charge_kwh",
    "discharge_kwh",
    "losses_kwh",
    "voltage_violations",
    "thermal_violations",
    "degradation_cost",
    "fade_kwh",
    "discomfort_cost",
    "dr_curtailed_kwh",
    "unserved_kwh",
    "penalty_cost",
)


@dataclass
class EpisodeKpis:
    """Running sums for a batch of episodes; `reset_rows` starts selected rows afresh."""

    batch: int
    sums: dict[str, FloatArray] = field(default_factory=dict)
    peak_kw: FloatArray = field(default_factory=lambda: np.zeros(0))
    steps: FloatArray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.sums = {k: np.zeros(self.batch) for k in SUMMED}
        self.peak_kw = np.zeros(self.batch)
        self.steps = np.zeros(self.batch)

    def add(self, o: StepOutcome) -> None:
        for k in SUMMED:
            self.sums[k] += getattr(o, k)
        self.peak_kw = np.maximum(self.peak_kw, o.import_kw)
        self.steps += 1

    def reset_rows(self, rows: np.ndarray) -> None:
        for v in self.sums.values():
            v[rows] = 0.0
        self.peak_kw[rows] = 0.0
        self.steps[rows] = 0.0

    def row(self, i: int) -> dict[str, float]:
        """The finished episode of row `i` as plain floats (what `info` carries)."""
        out = {k: float(v[i]) for k, v in self.sums.items()}
        out["peak_kw"] = float(self.peak_kw[i])
        out["steps"] = float(self.steps[i])
        load = out["load_kwh"]
        out["self_sufficiency"] = (
            float(np.clip(1.0 - out["import_kwh"] / load, 0.0, 1.0)) if load > 0 else 1.0
        )
        out["violations"] = out["voltage_violations"] + out["thermal_violations"]
        return out
