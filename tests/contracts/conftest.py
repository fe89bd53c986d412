"""Fixtures for the contract tests: one py-evm chain per test module, reverted per test.

Deploying the suite costs about a second on py-evm, so each module deploys once and every test
starts from a snapshot of that fresh deployment (eth-tester snapshots are cheap and exact).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from contracts.client import Chain, deploy_suite
from tests.contracts.helpers import Reverts, World, shared_deployment


@pytest.fixture(scope="session")
def device_keys() -> list[bytes]:
    """Private keys of simulated devices: fixed, so failures reproduce."""
    return [bytes.fromhex(f"{i + 1:064x}") for i in range(8)]


@pytest.fixture(scope="module")
def world_module() -> World:
    chain = Chain.in_process()
    accounts = chain.accounts
    admin, solver, treasury, stranger = accounts[0], accounts[1], accounts[2], accounts[9]
    suite = deploy_suite(chain, admin=admin, solver=solver, treasury=treasury)
    return World(chain, suite, admin, solver, treasury, accounts[3:9], stranger)


@pytest.fixture
def world(world_module: World) -> Iterator[World]:
    """The module's deployment, 5 s into a fresh slot, restored afterwards.

    Starting every test just after a slot boundary keeps "the next slot" stable for 15 minutes
    of chain time, so no test can straddle a boundary by bad luck with the wall clock.
    """
    chain, suite = world_module.chain, world_module.suite
    snapshot = chain.snapshot()
    now = max(chain.timestamp(), int(time.time()))
    chain.travel_to(suite.slot_start((now - suite.genesis) // 900 + 1) + 5)
    yield world_module
    chain.revert(snapshot)


@pytest.fixture
def reverts() -> Reverts:
    """``with reverts("EnergyTradingGateClosed", slot=3):`` asserts a custom error by name."""
    return Reverts()


@pytest.fixture(scope="module")
def deployed_before_hypothesis() -> None:
    """Deploy outside Hypothesis's run: py-evm raises the recursion limit on first use, which
    Hypothesis would otherwise report as a change made during the test."""
    shared_deployment()
