"""Every baseline controller for one environment, in the order tables show them.

Evaluation, the demo and the tests all compare the same set; building it in one place keeps a new
baseline from reaching one of them and not the others.
"""

from __future__ import annotations

from agents.baselines import IdlePolicy, PriceThresholdPolicy, RuleBasedPolicy
from agents.mpc import MPCPolicy
from agents.optimum import PerfectForesightPolicy
from agents.policy import Policy
from envs.microgrid_env import MicrogridEnv


def all_baselines(env: MicrogridEnv, include_mpc: bool = True) -> list[Policy]:
    """idle, rule_based, arbitrage, (mpc,) optimum: the optimum drives exactly this `env`."""
    codec = env.codec
    roster: list[Policy] = [IdlePolicy(codec), RuleBasedPolicy(codec), PriceThresholdPolicy(codec)]
    if include_mpc:
        roster.append(MPCPolicy(env.params, codec))
    roster.append(PerfectForesightPolicy(env))
    return roster
