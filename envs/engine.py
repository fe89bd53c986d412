"""The engine both environment shells share: params, codec, kernel dispatch, reset draws.

`MicrogridEnv` is this engine with a batch of one, `MicrogridVectorEnv` with a batch of N. Keeping
the draws (day, forecast-noise offset) and the step dispatch here is what makes a batched
environment equal to N single ones, step for step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from envs.codec import Codec, DecodedAction
from envs.dynamics import GridState, Solver, StepOutcome, observe, reset_state, step
from envs.errors import ActionError
from envs.forecast import NOISE_TABLE_SIZE
from envs.grid import build_grid
from envs.kernel import (
    CompiledParams,
    field_starts,
    observe_kernel,
    outcome_from_matrix,
    step_kernel,
)
from envs.kpis import outcome_matrix
from envs.params import FloatArray
from envs.scenario import Scenario, load_scenario


def resolve_scenario(scenario: Scenario | str | Path | None) -> Scenario:
    """Accept a Scenario, a YAML path or None (the default scenario)."""
    if isinstance(scenario, Scenario):
        return scenario
    return load_scenario(scenario)


class Engine:
    """One scenario compiled for stepping batches of grids on one split of the year's days."""

    def __init__(
        self,
        scenario: Scenario | str | Path | None = None,
        split: str = "train",
        solver: Solver | None = None,
    ) -> None:
        self.scenario = resolve_scenario(scenario)
        self.params = build_grid(self.scenario)
        self.split_days = self.params.days(split)  # validates the split name
        self.split = split
        self.codec = Codec.from_params(self.params)
        self.solver = solver
        # The compiled kernel is the fast path; a custom solver (e.g. pandapower's, for the
        # benchmark) runs the numpy reference model instead.
        self.compiled = CompiledParams(self.params) if solver is None else None
        self._starts = field_starts(self.codec.field_sizes())
        self._scaling = self.codec.scaling()
        self._allowed_days = set(self.split_days.tolist())

    # ---- reset -------------------------------------------------------------------------
    def parse_options(self, options: dict[str, Any] | None) -> tuple[int | None, FloatArray | None]:
        """Validate `reset(options=...)`: `day` (a day of this split) and `soc`."""
        options = dict(options or {})
        unknown = set(options) - {"day", "soc"}
        if unknown:
            raise ValueError(f"reset options: unknown keys {sorted(unknown)}; allowed: day, soc")
        day = options.get("day")
        if day is not None:
            if int(day) not in self._allowed_days:
                raise ValueError(
                    f"reset options: day {day} is not a {self.split} day of this scenario; "
                    f"allowed: {self.split_days.tolist()}"
                )
            day = int(day)
        soc = options.get("soc")
        if soc is None:
            return day, None
        bat = self.params.batteries
        try:
            soc_arr = np.broadcast_to(np.asarray(soc, dtype=np.float64), (bat.n,)).copy()
        except ValueError:
            raise ValueError(
                f"reset options: soc must be a number or {bat.n} numbers, got {soc!r}"
            ) from None
        if not np.all((soc_arr >= bat.soc_min) & (soc_arr <= bat.soc_max)):
            raise ValueError(
                f"reset options: soc {soc_arr.tolist()} must lie within [soc_min, soc_max] = "
                f"[{bat.soc_min.tolist()}, {bat.soc_max.tolist()}]"
            )
        return day, soc_arr

    def draw_start(self, rng: np.random.Generator, day: int | None) -> tuple[int, int]:
        """Day and forecast-noise offset of a new episode, always drawn in this order."""
        drawn = int(rng.choice(self.split_days))
        offset = int(rng.integers(NOISE_TABLE_SIZE))
        return (drawn if day is None else day), offset

    def reset(self, days: np.ndarray, soc: FloatArray | None, offsets: np.ndarray) -> GridState:
        kwargs = {} if self.solver is None else {"solver": self.solver}
        return reset_state(self.params, days, soc, offsets, **kwargs)

    # ---- step --------------------------------------------------------------------------
    def decode(self, actions: np.ndarray) -> DecodedAction:
        """Check shape and finiteness (errors name the component), then clip and decode."""
        a = np.asarray(actions, dtype=np.float64)
        dim = self.codec.act_dim
        if a.ndim != 2 or a.shape[1] != dim:
            raise ActionError(
                f"action: expected {dim} components per grid, got shape {a.shape[1:]}; "
                f"layout: {', '.join(self.codec.action_names())}"
            )
        if not np.isfinite(a).all():
            cols = np.flatnonzero(~np.isfinite(a).all(axis=0)).tolist()
            names = self.codec.action_names()
            raise ActionError(f"action: non-finite values in {[names[i] for i in cols]}")
        return self.codec.decode_action(a)

    def step(
        self, state: GridState, decoded: DecodedAction
    ) -> tuple[GridState, StepOutcome, FloatArray]:
        """Advance a batch; returns the new state, the outcome and its matrix form."""
        if self.compiled is None:
            kwargs = {} if self.solver is None else {"solver": self.solver}
            new_state, out = step(self.params, state, decoded, **kwargs)
            return new_state, out, outcome_matrix(out)
        # The kernel advances `state` in place.
        matrix, _ = step_kernel(
            self.compiled, self.params, state, decoded.battery_kw,
            decoded.pv_curtailment, decoded.dr_share, decoded.price_multiplier,
        )  # fmt: skip
        return state, outcome_from_matrix(matrix), matrix

    def observe(self, state: GridState) -> np.ndarray:
        """Encoded float32 observations (B, obs_dim)."""
        if self.compiled is not None:
            return observe_kernel(self.compiled, self.params, state, self._starts, self._scaling)
        return self.codec.encode(observe(self.params, state), state.slot.shape[0])
