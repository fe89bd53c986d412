"""Controllers: the `Policy` protocol, the baselines every learned policy is compared with
(idle, rule-based, tariff arbitrage, MPC, the perfect-foresight optimum), frozen ONNX policies
and the safety shield.

Names are imported lazily (PEP 562) so that `import agents.shield` in the live bridge does not
pull in the environment, gymnasium or scipy through this package's `__init__`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agents.baselines import IdlePolicy, PriceThresholdPolicy, RuleBasedPolicy
    from agents.frozen import OnnxPolicy, Sb3Policy
    from agents.lp import DispatchInputs, Plan, PlanInfeasible, TerminalLadder, solve_dispatch
    from agents.mpc import MPCPolicy
    from agents.optimum import PerfectForesightPolicy, solve_day
    from agents.policy import Policy
    from agents.roster import all_baselines
    from agents.shield import Shield, ShieldReport

_WHERE = {
    "IdlePolicy": "agents.baselines",
    "PriceThresholdPolicy": "agents.baselines",
    "RuleBasedPolicy": "agents.baselines",
    "OnnxPolicy": "agents.frozen",
    "Sb3Policy": "agents.frozen",
    "DispatchInputs": "agents.lp",
    "Plan": "agents.lp",
    "PlanInfeasible": "agents.lp",
    "solve_dispatch": "agents.lp",
    "TerminalLadder": "agents.lp",
    "MPCPolicy": "agents.mpc",
    "PerfectForesightPolicy": "agents.optimum",
    "solve_day": "agents.optimum",
    "Policy": "agents.policy",
    "all_baselines": "agents.roster",
    "Shield": "agents.shield",
    "ShieldReport": "agents.shield",
}

__all__ = [
    "DispatchInputs",
    "IdlePolicy",
    "MPCPolicy",
    "OnnxPolicy",
    "PerfectForesightPolicy",
    "Plan",
    "PlanInfeasible",
    "Policy",
    "PriceThresholdPolicy",
    "RuleBasedPolicy",
    "Sb3Policy",
    "Shield",
    "ShieldReport",
    "TerminalLadder",
    "all_baselines",
    "solve_day",
    "solve_dispatch",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")
