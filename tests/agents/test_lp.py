"""The dispatch LP on cases small enough to solve by hand, and its error messages."""

from __future__ import annotations

import numpy as np
import pytest

from agents.lp import DispatchInputs, PlanInfeasible, TerminalLadder, solve_dispatch
from envs.params import BatteryParams


def battery(
    capacity: float = 10.0, power: float = 10.0, eta: float = 1.0, fade: float = 0.0
) -> BatteryParams:
    def one(x: float) -> np.ndarray:
        return np.array([x])

    return BatteryParams(
        capacity_kwh=one(capacity),
        power_kw=one(power),
        efficiency_charge=one(eta),
        efficiency_discharge=one(eta),
        soc_min=one(0.0),
        soc_max=one(1.0),
        soc_initial=one(0.0),
        fade_per_full_cycle=one(fade),
        replacement_cost_per_kwh=one(300.0),
    )


def inputs(prices: list[float], load: float = 1.0, pv: float = 0.0) -> DispatchInputs:
    t = len(prices)
    return DispatchInputs(
        load_kw=np.full((t, 1), load),
        pv_kw=np.full((t, 1), pv),
        background_net_kw=np.zeros(t),
        import_price=np.array(prices),
        feed_in_price=0.0,
        dt_h=1.0,
    )


def test_shifts_load_to_the_cheap_slot() -> None:
    plan = solve_dispatch(battery(), np.array([0.0]), inputs([0.1, 0.5]))
    np.testing.assert_allclose(plan.battery_kw[:, 0], [1.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(plan.import_kw, [2.0, 0.0], atol=1e-9)
    assert plan.energy_cost == pytest.approx(0.2)
    np.testing.assert_allclose(plan.soc[:, 0], [0.0, 0.1, 0.0], atol=1e-9)


def test_losses_and_degradation_can_make_cycling_unprofitable() -> None:
    # Round trip 0.81: storing at 0.1 to save 0.5 * 0.81 pays ...
    lossy = solve_dispatch(battery(eta=0.9), np.array([0.0]), inputs([0.1, 0.5]))
    assert lossy.battery_kw[0, 0] > 0.0
    # ... but not once each cell kWh costs 0.3 * 300 / 2 = 45 of degradation each way.
    aged = solve_dispatch(battery(eta=0.9, fade=0.3), np.array([0.0]), inputs([0.1, 0.5]))
    np.testing.assert_allclose(aged.battery_kw, 0.0, atol=1e-9)
    assert aged.degradation_cost == pytest.approx(0.0, abs=1e-9)


def test_curtails_pv_only_when_exporting_costs_money() -> None:
    x = inputs([0.3], load=0.0, pv=5.0)
    paid = solve_dispatch(battery(capacity=0.0, power=0.0), np.array([0.0]), x)
    np.testing.assert_allclose(paid.pv_curtailment, 0.0)
    negative = DispatchInputs(**{**x.__dict__, "feed_in_price": -0.05})
    charged = solve_dispatch(battery(capacity=0.0, power=0.0), np.array([0.0]), negative)
    np.testing.assert_allclose(charged.pv_curtailment, 1.0)


def test_terminal_value_prices_the_energy_left_in_the_cells() -> None:
    x, aged = inputs([0.3]), battery(fade=1e-4)  # a cycle costs a little: no idle dumping
    free = solve_dispatch(aged, np.array([0.5]), x)
    assert free.soc[-1, 0] == pytest.approx(0.4)  # covers the 1 kWh load, nothing left to do
    dear = solve_dispatch(aged, np.array([0.5]), x, terminal_value_per_kwh=1.0)
    assert dear.soc[-1, 0] == pytest.approx(1.0)  # worth more than it costs: buys to keep


def test_terminal_ladder_values_only_what_it_can_use() -> None:
    """2 kWh are worth 1.0 each, the rest nothing: the plan buys exactly up to 2 kWh."""
    ladder = TerminalLadder(np.array([2.0, 100.0]), np.array([1.0, 0.0]))
    plan = solve_dispatch(
        battery(fade=1e-4), np.array([0.0]), inputs([0.3]), terminal_ladder=ladder
    )
    assert plan.soc[-1, 0] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="values must not rise"):
        TerminalLadder(np.array([1.0, 1.0]), np.array([0.1, 0.2]))


def test_start_outside_the_window_is_infeasible_with_a_clear_message() -> None:
    small = battery(power=1.0)
    with pytest.raises(PlanInfeasible, match=r"battery home starts at soc 1\.5000 above soc_max"):
        solve_dispatch(small, np.array([1.5]), inputs([0.1]), battery_names=("home",))
    with pytest.raises(PlanInfeasible, match=r"battery #0 starts at soc -0\.5000 below soc_min"):
        solve_dispatch(small, np.array([-0.5]), inputs([0.1]))


def test_rounding_just_outside_the_window_is_tolerated() -> None:
    plan = solve_dispatch(battery(), np.array([1.0 + 1e-7]), inputs([0.1]))
    assert plan.soc[0, 0] == pytest.approx(1.0)


def test_bad_shapes_and_values_name_the_field() -> None:
    bad = DispatchInputs(**{**inputs([0.1, 0.2]).__dict__, "background_net_kw": np.zeros(3)})
    with pytest.raises(ValueError, match="background_net_kw has shape"):
        solve_dispatch(battery(), np.array([0.0]), bad)
    nan = DispatchInputs(**{**inputs([0.1]).__dict__, "import_price": np.array([np.nan])})
    with pytest.raises(ValueError, match="import_price holds non-finite"):
        solve_dispatch(battery(), np.array([0.0]), nan)
