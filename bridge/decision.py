"""One slot's decision: policy, else the rule-based fallback, and the shield over either.

A learned policy is trusted only while its inputs and outputs are sound. It is bypassed, and the
reason recorded, when telemetry is missing (the observation would hold guesses), when it raises,
or when it answers NaN/infinity or the wrong shape. The fallback is `agents.baselines`'
rule-based controller, which reads the same observation. Whatever answered, `agents.shield`
bounds the battery set-points by the measured SoC, the ratings and the ramp limit: the same
shield object class the env and the evaluator use.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from agents.policy import Policy
from agents.shield import Shield, ShieldReport
from bridge.observation import Observation


class Source(StrEnum):
    POLICY = "policy"
    FALLBACK = "fallback"


class FallbackReason(StrEnum):
    """Why the rule-based controller decided instead of the policy."""

    STALE_DATA = "stale_data"
    POLICY_ERROR = "policy_error"
    NON_FINITE = "non_finite"
    BAD_SHAPE = "bad_shape"


@dataclass(frozen=True)
class Decision:
    """The shielded action of one slot, who produced it and why."""

    action: np.ndarray
    """float32 (act_dim,), after the shield."""
    source: Source
    reason: FallbackReason | None
    detail: str
    report: ShieldReport


def decide(
    observation: Observation,
    policy: Policy,
    fallback: Policy,
    shield: Shield,
    last_setpoint_kw: np.ndarray | None = None,
) -> Decision:
    """Run the policy (or the fallback) on `observation` and project the result with `shield`."""
    act_dim = shield.codec.act_dim
    reason: FallbackReason | None = None
    detail = ""
    action: np.ndarray | None = None
    if observation.missing:
        reason = FallbackReason.STALE_DATA
        shown = ", ".join(observation.missing[:5])
        more = len(observation.missing) - 5
        detail = f"no telemetry this slot from {shown}" + (f" and {more} more" if more > 0 else "")
    else:
        try:
            out = np.asarray(policy.predict(observation.obs), dtype=np.float64)
        except Exception as exc:
            reason, detail = FallbackReason.POLICY_ERROR, f"{type(exc).__name__}: {exc}"
        else:
            if out.shape != (act_dim,):
                reason = FallbackReason.BAD_SHAPE
                detail = f"action: expected shape ({act_dim},), got {out.shape}"
            elif not np.isfinite(out).all():
                reason = FallbackReason.NON_FINITE
                bad = np.flatnonzero(~np.isfinite(out)).tolist()
                detail = f"action: expected finite values, got NaN/inf at {bad}"
            else:
                action = out
    source = Source.POLICY
    if action is None:
        source = Source.FALLBACK
        action = np.asarray(fallback.predict(observation.obs), dtype=np.float64)
    shielded, report = shield.project(
        action, observation.soc, last_setpoint_kw, observation.capacity_kwh
    )
    return Decision(shielded, source, reason, detail, report)
