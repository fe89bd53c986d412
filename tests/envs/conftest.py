"""Fixtures for the environment tests: the default scenario's env and grid, built once."""

from __future__ import annotations

import pytest

from envs import MicrogridEnv, Scenario
from envs.grid import build_grid
from envs.params import GridParams


@pytest.fixture(scope="session")
def params() -> GridParams:
    return build_grid(Scenario())


@pytest.fixture()
def env() -> MicrogridEnv:
    return MicrogridEnv()
