"""`microgrid demo`: a rule-based controller against doing nothing, on held-out test days."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import Progress

from agents import IdlePolicy, Policy, RuleBasedPolicy
from envs import MicrogridEnv, Scenario

KPI_KEYS = (
    "cost",
    "import_kwh",
    "export_kwh",
    "peak_kw",
    "self_sufficiency",
    "losses_kwh",
    "violations",
    "degradation_cost",
    "reward",
)


def run_episode(env: MicrogridEnv, policy: Policy, day: int, seed: int = 0) -> dict[str, float]:
    """One episode on `day`; the last step's `episode_kpis`."""
    obs, _ = env.reset(seed=seed, options={"day": day})
    while True:
        obs, _, terminated, truncated, info = env.step(policy.predict(obs))
        if terminated or truncated:
            kpis: dict[str, float] = info["episode_kpis"]
            return kpis


def compare_on_test_days(
    scenario: Scenario | str | Path | None = None, days: int = 1, progress: Progress | None = None
) -> dict[str, Any]:
    """Mean KPIs per controller over the first `days` test days of the scenario."""
    env = MicrogridEnv(scenario, split="test")
    chosen = [int(d) for d in env.params.test_days[:days]]
    policies: list[Policy] = [IdlePolicy(env.codec), RuleBasedPolicy(env.codec)]
    task = progress.add_task("episodes", total=len(chosen) * len(policies)) if progress else None
    results: dict[str, Any] = {"grid": env.params.grid_code, "test_days": chosen}
    for policy in policies:
        sums = dict.fromkeys(KPI_KEYS, 0.0)
        for day in chosen:
            kpis = run_episode(env, policy, day)
            for k in KPI_KEYS:
                sums[k] += kpis[k]
            if progress and task is not None:
                progress.advance(task)
        results[policy.name] = {k: v / len(chosen) for k, v in sums.items()}
    idle_cost = results["idle"]["cost"]
    for policy in policies:
        cost = results[policy.name]["cost"]
        results[policy.name]["savings_vs_idle"] = (
            (idle_cost - cost) / abs(idle_cost) if idle_cost else 0.0
        )
    return results
