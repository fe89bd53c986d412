"""Controllers: the `Policy` protocol and the baselines every learned policy is compared with."""

from agents.baselines import IdlePolicy, RuleBasedPolicy
from agents.policy import Policy

__all__ = ["IdlePolicy", "Policy", "RuleBasedPolicy"]
