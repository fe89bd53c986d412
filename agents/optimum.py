"""The perfect-foresight optimum: the dispatch LP solved once on the episode's true profiles.

No controller that only sees the present and forecasts can beat a plan made knowing the whole
episode's load, PV and prices, so this is the yardstick the "fraction of the optimum's savings"
is measured against. It reads the truth straight from `GridParams` (which is why it needs the
env, not just observations) and replays its plan open loop: the battery model in the LP is the
env's own, so the planned SoC trajectory is the one the env follows, up to capacity fade.
Network losses are ignored in the plan (they cost the same whichever battery supplies a kW,
to first order) and demand response stays off; see `agents.lp`.
"""

from __future__ import annotations

import numpy as np

from agents.lp import DispatchInputs, Plan, solve_dispatch
from envs.codec import Codec
from envs.microgrid_env import MicrogridEnv
from envs.params import BatteryParams, FloatArray, GridParams


def true_inputs(params: GridParams, start_slot: int, steps: int) -> DispatchInputs:
    """The LP inputs for slots start_slot .. start_slot + steps - 1 from the real profiles."""
    end = start_slot + steps
    if start_slot < 0 or end > params.prosumer_load_kw.shape[0]:
        raise ValueError(
            f"slots [{start_slot}, {end}) lie outside the profiles' "
            f"[0, {params.prosumer_load_kw.shape[0]})"
        )
    s = slice(start_slot, end)
    background = params.background_load_kw[s] - params.background_pv_kw[s]
    background = background + params.background_storage_kw[s]
    slot_of_day = np.arange(start_slot, end) % params.steps_per_day
    return DispatchInputs(
        load_kw=params.prosumer_load_kw[s],
        pv_kw=params.prosumer_pv_kw[s],
        background_net_kw=background,
        import_price=params.import_price[slot_of_day],
        feed_in_price=params.feed_in_price,
        dt_h=params.dt_h,
    )


def battery_names(params: GridParams) -> tuple[str, ...]:
    """Battery labels in the codec's order, for error messages."""
    return params.prosumer_names + (("community",) if params.has_community_battery else ())


def solve_day(
    params: GridParams,
    start_slot: int,
    soc0: FloatArray,
    *,
    steps: int | None = None,
    capacity_kwh: FloatArray | None = None,
    inputs: DispatchInputs | None = None,
    degradation_weight: float = 1.0,
    soc_final_min: FloatArray | None = None,
) -> Plan:
    """Plan an episode from `start_slot` on the true profiles (or on `inputs`, if given).

    `steps` defaults to the scenario's episode length. The final SoC is free by default: the
    episode's cost does not pay for energy left in the cells, so the true optimum of that cost
    empties them; pass `soc_final_min` to compare against controllers held to a final SoC.
    """
    n = params.episode_steps if steps is None else steps
    x = true_inputs(params, start_slot, n) if inputs is None else inputs
    return solve_dispatch(
        params.batteries,
        np.asarray(soc0, dtype=np.float64),
        x,
        capacity_kwh=capacity_kwh,
        degradation_weight=degradation_weight,
        soc_final_min=soc_final_min,
        battery_names=battery_names(params),
    )


#: SoC difference (fraction) between the env and the plan above which the plan is redone.
REPLAN_SOC_DRIFT = 1e-3


class PerfectForesightPolicy:
    """Replays the LP optimum of the env's current episode, planned when the episode starts.

    `predict` notices a new episode (or a SoC that left the plan's path) from the env's state
    and plans then, from the SoC and capacity the env actually has; otherwise it looks up the
    set-point of the current step. It drives exactly one `MicrogridEnv`.

    With `pooled`, the fleet's planned power in each slot is shared among the batteries in
    proportion to their ratings (every battery at the same fraction of its rating). For a fleet
    whose batteries differ only in size (same C-rate, efficiencies, SoC window and ageing) that
    is another optimum of the same LP, the one with every SoC moving together; the LP alone
    picks an arbitrary split among interchangeable batteries, which is noise to a learner that
    imitates it. Drift is then judged on the fleet's stored energy.
    """

    name = "optimum"

    def __init__(
        self, env: MicrogridEnv, degradation_weight: float = 1.0, pooled: bool = False
    ) -> None:
        self.env = env
        self.params: GridParams = env.params
        self.codec: Codec = env.codec
        self.degradation_weight = degradation_weight
        self.pooled = pooled
        if pooled:
            _check_poolable(self.params.batteries)
        self.plan: Plan | None = None
        self._start_slot = -1
        self._plan_offset = 0

    def _current(self) -> tuple[Plan, int]:
        """The plan to follow and its row for the env's current step, re-planned when needed.

        It plans afresh at a new episode and whenever the env's SoC has drifted from the
        plan's (a reset to the same day with another SoC, or fade adding up), so the replay
        stays the optimum from where the env really is.
        """
        state = self.env.state
        step = int(state.step[0])
        start = int(state.slot[0]) - step
        plan, row = self.plan, step - self._plan_offset
        drifted = (
            plan is None
            or start != self._start_slot
            or not 0 <= row < plan.steps
            or self._drift(plan.soc[row], state.soc[0], state.capacity_kwh[0]) > REPLAN_SOC_DRIFT
        )
        if plan is None or drifted:
            plan = solve_day(
                self.params,
                int(state.slot[0]),
                state.soc[0],
                steps=self.params.episode_steps - step,
                capacity_kwh=state.capacity_kwh[0],
                degradation_weight=self.degradation_weight,
            )
            self.plan, self._start_slot, self._plan_offset, row = plan, start, step, 0
        return plan, row

    def _drift(self, planned: FloatArray, soc: FloatArray, capacity_kwh: FloatArray) -> float:
        """How far the env's SoC has left the plan's: per battery, or of the fleet if pooled."""
        if not self.pooled:
            return float(np.abs(planned - soc).max())
        total = max(float(capacity_kwh.sum()), 1e-12)
        return abs(float((planned - soc) @ capacity_kwh)) / total

    def predict(self, obs: np.ndarray) -> np.ndarray:
        o = np.asarray(obs)
        if o.ndim == 2 and o.shape[0] != 1:
            raise ValueError(
                f"{type(self).__name__} drives one env; got a batch of {o.shape[0]} observations"
            )
        plan, k = self._current()
        kw = plan.battery_kw[k]
        if self.pooled:
            power = self.params.batteries.power_kw
            kw = kw.sum() * power / max(float(power.sum()), 1e-12)
        a = self.codec.encode_action(kw, plan.pv_curtailment[k], np.zeros(self.params.n_prosumer))
        return a[None, :] if o.ndim == 2 else a


#: Relative spread allowed among the batteries' parameters for pooling (ratings are rounded:
#: simbench's 18.3 kW / 36.7 kWh is a C-rate of 0.4986).
POOL_TOLERANCE = 0.01


def _check_poolable(b: BatteryParams) -> None:
    """Pooling is an optimum only if batteries differ in size alone; name the field that differs."""
    c_rate = np.divide(
        b.power_kw, b.capacity_kwh, out=np.zeros_like(b.power_kw), where=b.capacity_kwh > 0
    )
    fields = {
        "c_rate (power_kw / capacity_kwh)": c_rate,
        "efficiency_charge": b.efficiency_charge,
        "efficiency_discharge": b.efficiency_discharge,
        "soc_min": b.soc_min,
        "soc_max": b.soc_max,
        "fade_per_full_cycle": b.fade_per_full_cycle,
        "replacement_cost_per_kwh": b.replacement_cost_per_kwh,
    }
    for name, values in fields.items():
        v = np.asarray(values, dtype=np.float64)
        if v.size and not np.allclose(v, v[0], rtol=POOL_TOLERANCE, atol=1e-9):
            raise ValueError(
                f"pooled optimum: batteries must share {name}; got {np.unique(v).tolist()}"
            )
