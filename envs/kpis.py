"""Episode KPIs accumulated from step outcomes: what every evaluation table reports.

One accumulator serves the single env (batch of one) and the vector env (one row per
sub-environment), so the numbers a trainer logs and an evaluator prints are computed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from envs.dynamics import StepOutcome
from envs.params import FloatArray

OUTCOME_FIELDS: tuple[str, ...] = tuple(StepOutcome.__dataclass_fields__)
#: Step figures copied into every step's `info` (floats).
STEP_INFO: tuple[str, ...] = tuple(
    f for f in OUTCOME_FIELDS if f not in ("reward", "truncated", "diverged")
)
#: Step figures that add up over an episode (rates, prices and per-step magnitudes do not).
SUMMED: tuple[str, ...] = tuple(
    f
    for f in OUTCOME_FIELDS
    if f not in ("truncated", "diverged", "import_kw", "community_price", "battery_limited_kw")
)


#: Per-step market figures in `info` (floats; energies kWh, money in currency).
MARKET_INFO: tuple[str, ...] = (
    "market_price",
    "market_traded_kwh",
    "market_fees",
    "market_imbalance_kwh",
    "market_refused_orders",
    "market_rewards",
    "market_gas_used",
    "market_transactions",
    "dr_event",
    "emergency",
    "dr_events_created",
    "dr_events_settled",
    "dr_incentives",
)


@dataclass
class EpisodeKpis:
    """Running sums for a batch of episodes; `reset_rows` starts selected rows afresh."""

    batch: int
    sums: FloatArray = field(default_factory=lambda: np.zeros(0))
    """(batch, len(OUTCOME_FIELDS)): one column per step figure, summed."""
    peak_kw: FloatArray = field(default_factory=lambda: np.zeros(0))
    steps: FloatArray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.batch, len(OUTCOME_FIELDS)))
        self.peak_kw = np.zeros(self.batch)
        self.steps = np.zeros(self.batch)

    def add(self, o: StepOutcome) -> None:
        self.add_matrix(outcome_matrix(o))

    def add_matrix(self, m: FloatArray) -> None:
        """Add a (batch, len(OUTCOME_FIELDS)) outcome matrix: one numpy call per step."""
        self.sums += m
        np.maximum(self.peak_kw, m[:, _IMPORT_KW], out=self.peak_kw)
        self.steps += 1

    def reset_rows(self, rows: np.ndarray) -> None:
        self.sums[rows] = 0.0
        self.peak_kw[rows] = 0.0
        self.steps[rows] = 0.0

    def row(self, i: int) -> dict[str, float]:
        """The finished episode of row `i` as plain floats (what `info` carries)."""
        return self.rows(np.array([i]))[0]

    def rows(self, rows: np.ndarray) -> list[dict[str, float]]:
        """`row` of each of `rows`, computed for all of them at once (the vector env's resets)."""
        return as_dicts(ROW_KEYS, self.values(rows))

    def values(self, rows: np.ndarray) -> FloatArray:
        """(len(rows), len(ROW_KEYS)): the finished episodes of `rows`, one column per key."""
        sums = self.sums[rows]
        load = sums[:, _COL["load_kwh"]]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.clip(1.0 - sums[:, _COL["import_kwh"]] / load, 0.0, 1.0)
        extra = np.stack(
            [
                self.peak_kw[rows],
                self.steps[rows],
                np.where(load > 0, ratio, 1.0),
                sums[:, _COL["voltage_violations"]] + sums[:, _COL["thermal_violations"]],
            ],
            axis=1,
        )
        return np.concatenate([sums[:, _SUMMED_COLS], extra], axis=1)


@dataclass
class MarketKpis:
    """Running market totals for a batch of episodes (`info`'s `market_*` columns, summed).

    The episode's mean clearing price is volume-weighted: a slot that traded nothing says
    nothing about the price.
    """

    batch: int
    sums: FloatArray = field(default_factory=lambda: np.zeros(0))
    priced: FloatArray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.batch, len(MARKET_INFO)))
        self.priced = np.zeros(self.batch)

    def add(self, matrix: FloatArray) -> None:
        """Add a (batch, len(MARKET_INFO)) market matrix (`envs.exchange.market_matrix`)."""
        self.sums += matrix
        self.priced += matrix[:, 0] * matrix[:, 1]  # price x traded

    def reset_rows(self, rows: np.ndarray) -> None:
        self.sums[rows] = 0.0
        self.priced[rows] = 0.0

    def row(self, i: int) -> dict[str, float]:
        return self.rows(np.array([i]))[0]

    def rows(self, rows: np.ndarray) -> list[dict[str, float]]:
        """`row` of each of `rows`, computed for all of them at once."""
        return as_dicts(MARKET_KEYS, self.values(rows))

    def values(self, rows: np.ndarray) -> FloatArray:
        """(len(rows), len(MARKET_KEYS)): the finished episodes of `rows`, one column per key."""
        sums = self.sums[rows]
        traded = sums[:, _TRADED]
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(traded > 0, self.priced[rows] / traded, 0.0)
        return np.concatenate(
            [sums[:, _MARKET_COLS[:-2]], mean[:, None], sums[:, _MARKET_COLS[-2:]]], axis=1
        )


def as_dicts(keys: tuple[str, ...], values: FloatArray) -> list[dict[str, float]]:
    """One `{key: float}` per row of `values`.

    Each dict is a copy of one template with the keys in place, then filled: building 34 keys
    one by one resized the table four times a dict (~1.5x slower for a batch's 1,024 rows).
    Rows come from one list per column: a list per row (`values.tolist()`) is a GC-tracked
    object each, which added to what set off full collections of the heap. Dicts of floats
    are not tracked.
    """
    template = dict.fromkeys(keys, 0.0)
    out = []
    for row in zip(*values.T.tolist(), strict=True):
        d = template.copy()
        d.update(zip(keys, row, strict=True))
        out.append(d)
    return out


_COL = {name: i for i, name in enumerate(OUTCOME_FIELDS)}
_IMPORT_KW = _COL["import_kw"]
_SUMMED_COLS = [_COL[k] for k in SUMMED]
#: `EpisodeKpis.row`'s keys, in order.
ROW_KEYS = (*SUMMED, "peak_kw", "steps", "self_sufficiency", "violations")
# Market episode keys in `MarketKpis.row`'s order: the summed columns but the price, the mean
# price, then the event counts under their episode names.
_EVENTS = ("dr_event", "emergency")
_MARKET_COLS = [j for j, k in enumerate(MARKET_INFO) if k not in ("market_price", *_EVENTS)]
_MARKET_COLS += [MARKET_INFO.index(k) for k in _EVENTS]
#: `MarketKpis.row`'s keys, in order.
MARKET_KEYS = (
    *(MARKET_INFO[j] for j in _MARKET_COLS[:-2]),
    "market_mean_price",
    "dr_event_slots",
    "emergency_slots",
)
_TRADED = MARKET_INFO.index("market_traded_kwh")


def outcome_matrix(o: StepOutcome) -> FloatArray:
    """A StepOutcome as a (batch, len(OUTCOME_FIELDS)) float matrix (the kernel's layout)."""
    return np.stack([np.asarray(getattr(o, k), dtype=np.float64) for k in OUTCOME_FIELDS], axis=1)
