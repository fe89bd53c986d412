"""Run controllers over whole days and collect KPIs: shared by training callbacks and `evaluate`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from envs import MicrogridEnv

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class EpisodeTrace:
    """One evaluated day: KPIs plus the per-step series the plots draw."""

    day: int
    kpis: dict[str, float]
    series: dict[str, list[float]] = field(default_factory=dict)


def run_day(env: MicrogridEnv, predict: Predict, day: int, trace: bool = False) -> EpisodeTrace:
    """Roll one day out with `predict`; `trace` keeps per-step flows, SoC and prices."""
    obs, _ = env.reset(seed=day, options={"day": day})
    series: dict[str, list[float]] = {}
    while True:
        obs, _, terminated, truncated, info = env.step(predict(obs))
        if trace:
            for key in ("import_kwh", "export_kwh", "load_kwh", "pv_kwh", "charge_kwh",
                        "discharge_kwh", "community_price", "cost"):  # fmt: skip
                series.setdefault(key, []).append(float(info[key]))
            series.setdefault("mean_soc", []).append(float(np.mean(info["soc"])))
        if terminated or truncated:
            return EpisodeTrace(day, dict(info["episode_kpis"]), series)


def mean_kpis(traces: Sequence[EpisodeTrace]) -> dict[str, float]:
    keys = traces[0].kpis.keys()
    return {k: float(np.mean([t.kpis[k] for t in traces])) for k in keys}
