"""The price-threshold arbitrage baseline charges when cheap and discharges when dear."""

from __future__ import annotations

import numpy as np
import pytest

from agents import Policy, PriceThresholdPolicy, all_baselines
from envs import MicrogridEnv
from tests.agents.conftest import Episode


def test_charges_in_cheap_slots_and_discharges_in_dear_ones(
    test_env: MicrogridEnv, episodes: dict[str, list[Episode]]
) -> None:
    p = test_env.params
    scaled = p.import_price / p.import_price.max()
    battery = test_env.codec.decode_action(episodes["arbitrage"][0].actions).battery_kw
    cheap, dear = scaled <= 0.6, scaled >= 0.9
    assert np.all(battery[cheap] > 0)
    assert np.all(battery[dear] <= 0) and np.any(battery[dear] < 0)
    assert np.all(battery[~cheap & ~dear] == 0)
    # It never pushes more than the community's forecast net load out through the feeder.
    assert np.all(-battery[dear].sum(axis=1) <= p.batteries.power_kw.sum())


def test_thresholds_must_be_ordered(test_env: MicrogridEnv) -> None:
    with pytest.raises(ValueError, match="charge_below < discharge_above"):
        PriceThresholdPolicy(test_env.codec, charge_below=0.9, discharge_above=0.5)


def test_every_controller_satisfies_the_policy_protocol(
    test_env: MicrogridEnv, episodes: dict[str, list[Episode]]
) -> None:
    controllers = all_baselines(test_env)
    assert [c.name for c in controllers] == ["idle", "rule_based", "arbitrage", "mpc", "optimum"]
    assert all(isinstance(c, Policy) for c in controllers)
    assert sorted(c.name for c in controllers) == sorted(episodes)
