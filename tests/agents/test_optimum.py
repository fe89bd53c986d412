"""The perfect-foresight optimum: the limit every controller is measured against."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from agents import PerfectForesightPolicy, solve_day
from agents.lp import PlanInfeasible
from agents.optimum import _check_poolable
from envs import MicrogridEnv
from tests.agents.conftest import Episode, run

BASELINES = ("idle", "rule_based", "arbitrage", "mpc")


def test_optimum_cost_is_below_every_baseline_on_test_days(
    episodes: dict[str, list[Episode]],
) -> None:
    """Per day, in the real env (AC losses included), on the energy cost every table reports
    and on energy + degradation cost, which is what the LP minimises."""
    for i, best in enumerate(episodes["optimum"]):
        for name in BASELINES:
            other = episodes[name][i].kpis
            assert best.kpis["cost"] <= other["cost"], (name, i)
            total = best.kpis["cost"] + best.kpis["degradation_cost"]
            assert total <= other["cost"] + other["degradation_cost"], (name, i)


def test_every_controller_saves_a_share_of_the_optimum_savings(
    episodes: dict[str, list[Episode]],
) -> None:
    """fraction = (cost_idle - cost_x) / (cost_idle - cost_optimum) lies in (0, 1] for all."""

    def mean_cost(name: str) -> float:
        return float(np.mean([e.kpis["cost"] for e in episodes[name]]))

    idle, best = mean_cost("idle"), mean_cost("optimum")
    assert best < idle
    for name in ("rule_based", "arbitrage", "mpc"):
        fraction = (idle - mean_cost(name)) / (idle - best)
        assert 0.0 < fraction <= 1.0, (name, fraction)


def test_the_env_follows_the_plan(test_env: MicrogridEnv, days: list[int]) -> None:
    """The LP's battery model is the env's: SoC and degradation match the replay, and the
    energy cost differs only by what the network losses cost (the LP ignores them)."""
    policy = PerfectForesightPolicy(test_env)
    obs, _ = test_env.reset(seed=0, options={"day": days[0]})
    soc = [test_env.state.soc[0].copy()]
    while True:
        obs, _, _, truncated, info = test_env.step(policy.predict(obs))
        soc.append(info["soc"])
        if truncated:
            break
    plan = policy.plan
    assert plan is not None and plan.steps == test_env.params.episode_steps
    np.testing.assert_allclose(np.array(soc), plan.soc, atol=2e-3)
    kpis = info["episode_kpis"]
    assert kpis["degradation_cost"] == pytest.approx(plan.degradation_cost, rel=1e-2)
    loss_cost = kpis["losses_kwh"] * float(test_env.params.import_price.max())
    assert abs(kpis["cost"] - plan.energy_cost) <= loss_cost + 1e-6


def test_plan_keeps_every_constraint(test_env: MicrogridEnv, days: list[int]) -> None:
    p = test_env.params
    bat = p.batteries
    start = days[1] * p.steps_per_day
    plan = solve_day(p, start, bat.soc_initial)
    assert np.all(plan.soc >= bat.soc_min - 1e-9) and np.all(plan.soc <= bat.soc_max + 1e-9)
    assert np.all(plan.charge_kw <= bat.power_kw + 1e-9)
    assert np.all(plan.discharge_kw <= bat.power_kw + 1e-9)
    s = slice(start, start + p.episode_steps)
    pv = p.prosumer_pv_kw[s] * (1.0 - plan.pv_curtailment)
    net = p.prosumer_load_kw[s].sum(1) - pv.sum(1) + plan.battery_kw.sum(1)
    net += p.background_load_kw[s] - p.background_pv_kw[s] + p.background_storage_kw[s]
    np.testing.assert_allclose(plan.import_kw - plan.export_kw, net, atol=1e-6)


def test_actions_lie_in_the_action_space(
    test_env: MicrogridEnv, episodes: dict[str, list[Episode]]
) -> None:
    for name in ("optimum", "mpc", "arbitrage"):
        for e in episodes[name]:
            assert e.actions.dtype == np.float32
            assert all(test_env.action_space.contains(a) for a in e.actions), name


def test_replans_when_a_new_episode_starts(test_env: MicrogridEnv, days: list[int]) -> None:
    policy = PerfectForesightPolicy(test_env)
    first = []
    for day in days[:2]:
        obs, _ = test_env.reset(seed=0, options={"day": day, "soc": 0.3})
        policy.predict(obs)
        assert policy.plan is not None
        first.append(policy.plan)
        np.testing.assert_allclose(policy.plan.soc[0], 0.3)
    assert first[0].energy_cost != first[1].energy_cost
    with pytest.raises(ValueError, match="drives one env"):
        policy.predict(np.stack([obs, obs]))


def test_unreachable_final_soc_names_the_battery(test_env: MicrogridEnv) -> None:
    p = test_env.params
    with pytest.raises(PlanInfeasible, match=r"battery .* must end at soc >= 0\.9000"):
        solve_day(p, 0, p.batteries.soc_min, steps=4, soc_final_min=p.batteries.soc_max)


def test_pooled_optimum_moves_every_battery_together_at_the_same_cost(
    test_env: MicrogridEnv, days: list[int], episodes: dict[str, list[Episode]]
) -> None:
    """Sharing the fleet's power by rating is another optimum: one consistent split to imitate."""
    policy = PerfectForesightPolicy(test_env, pooled=True)
    n_battery = test_env.params.batteries.n
    for i, day in enumerate(days):
        pooled = run(test_env, policy, day)
        battery = pooled.actions[:, :n_battery]
        np.testing.assert_allclose(battery, battery[:, :1].repeat(n_battery, axis=1), atol=1e-6)
        # Every SoC follows the same path (ratings differ by rounding only).
        assert np.ptp(pooled.soc, axis=1).max() < 0.01
        best = episodes["optimum"][i].kpis
        assert pooled.kpis["cost"] + pooled.kpis["degradation_cost"] == pytest.approx(
            best["cost"] + best["degradation_cost"], rel=0.01
        )


def test_pooling_refuses_batteries_that_differ_in_more_than_size(test_env: MicrogridEnv) -> None:

    batteries = test_env.params.batteries
    eta = batteries.efficiency_charge.copy()
    eta[0] = 0.8
    with pytest.raises(ValueError, match="efficiency_charge"):
        _check_poolable(replace(batteries, efficiency_charge=eta))
