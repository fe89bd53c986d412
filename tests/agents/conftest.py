"""Fixtures for the controller tests: one test-split env and every controller's episodes.

Running each controller once per day and sharing the KPIs keeps the whole module fast: the
comparisons, the fraction-of-optimum checks and the replay checks all read the same episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from agents import Policy, all_baselines
from envs import MicrogridEnv

#: How many of the default scenario's test days the comparisons run on.
N_DAYS = 3


@dataclass
class Episode:
    """One controller's run of one day: KPIs and what it did each step."""

    kpis: dict[str, float]
    actions: np.ndarray
    soc: np.ndarray
    """(steps + 1, n_battery) SoC at the start of each step and after the last."""


def run(env: MicrogridEnv, policy: Policy, day: int, seed: int = 0) -> Episode:
    obs, _ = env.reset(seed=seed, options={"day": day})
    actions, soc = [], [env.state.soc[0].copy()]
    while True:
        action = policy.predict(obs)
        actions.append(action)
        obs, _, terminated, truncated, info = env.step(action)
        soc.append(info["soc"])
        if terminated or truncated:
            return Episode(info["episode_kpis"], np.array(actions), np.array(soc))


@pytest.fixture(scope="session")
def test_env() -> MicrogridEnv:
    return MicrogridEnv(split="test")


@pytest.fixture(scope="session")
def days(test_env: MicrogridEnv) -> list[int]:
    return [int(d) for d in test_env.params.test_days[:N_DAYS]]


@pytest.fixture(scope="session")
def episodes(test_env: MicrogridEnv, days: list[int]) -> dict[str, list[Episode]]:
    """Every controller on the same test days with the same seed (same forecast noise)."""
    return {p.name: [run(test_env, p, d) for d in days] for p in all_baselines(test_env)}
