"""Shared helpers for the contract tests (kept out of conftest so they can be imported).

Hypothesis sizes: HYPOTHESIS_PROFILE=nightly runs 20x the default examples, ``quick`` a tenth.
The two state machines run :func:`sequences` of their share of ``STATEFUL_SEQUENCES`` (1,000 random
operation sequences in the default run, the issue's floor for CI).
Settings are applied per test (``CONTRACT_SETTINGS``) rather than by loading a global profile, so
the contract tests never change the settings of other packages' tests in the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from eth_account import Account
from hypothesis import HealthCheck, settings
from web3.contract import Contract
from web3.logs import DISCARD
from web3.types import TxReceipt

from contracts.client import Chain, DeviceType, Suite, deploy_suite, role_id
from contracts.errors import ContractRevert

_SCALE = {"quick": 0.1, "default": 1.0, "nightly": 20.0}.get(
    os.environ.get("HYPOTHESIS_PROFILE", "default"), 1.0
)
EXAMPLES = round(100 * _SCALE)
#: Random operation sequences of both state machines together in the default profile.
STATEFUL_SEQUENCES = 1_000
#: Operations per sequence: short sequences are what make 1,000 of them affordable on py-evm
#: (each operation is a few py-evm transactions); the invariants run after every one.
STATEFUL_STEPS = 6


def sequences(share: float) -> int:
    """This machine's share of :data:`STATEFUL_SEQUENCES`, scaled by the profile."""
    return max(1, round(STATEFUL_SEQUENCES * share * _SCALE))


#: Hypothesis settings for every property test here: py-evm is too slow for deadlines.
CONTRACT_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def events(contract: Contract, name: str, receipt: TxReceipt) -> list[dict[str, object]]:
    """Arguments of every ``name`` event ``contract`` emitted in ``receipt`` (others skipped)."""
    found = getattr(contract.events, name)().process_receipt(receipt, errors=DISCARD)
    return [dict(e["args"]) for e in found]


@dataclass
class World:
    """A deployed suite plus named actors, as every contract test sees it."""

    chain: Chain
    suite: Suite
    admin: str
    solver: str
    treasury: str
    users: list[str]
    stranger: str


class Reverts:
    """``with reverts("EnergyTradingGateClosed") as err:`` asserts the custom error by name."""

    def __call__(self, name: str, **expected_args: object) -> RevertCheck:
        return RevertCheck(name, expected_args)


class RevertCheck:
    def __init__(self, name: str, expected_args: dict[str, object]) -> None:
        self.name = name
        self.expected_args = expected_args
        self.error: ContractRevert | None = None

    def __enter__(self) -> RevertCheck:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if exc is None:
            raise AssertionError(f"expected revert {self.name}, but the call succeeded")
        if not isinstance(exc, ContractRevert):
            return False
        assert exc.name == self.name, f"expected {self.name}, got {exc}"
        for key, value in self.expected_args.items():
            assert exc.args_by_name[key] == value, f"{key}: expected {value!r}, got {exc}"
        self.error = exc
        return True


class SharedDeployment:
    """One deployment per test module, shared by every example through snapshots."""

    def __init__(self) -> None:
        self.chain = Chain.in_process()
        accounts = self.chain.accounts
        self.admin, self.solver, self.treasury = accounts[0], accounts[1], accounts[2]
        self.users = accounts[3:7]
        self.stranger = accounts[9]
        tester = self.chain.w3.provider.ethereum_tester  # type: ignore[attr-defined]
        #: The users' own keys: they sign orders as well as send transactions.
        self.user_keys = [k.to_bytes() for k in tester.backend.account_keys[3:7]]
        #: One meter per user, for metering reconciliation.
        self.meter_keys = [(0x3E7E_A000 + i).to_bytes(32, "big") for i in range(len(self.users))]
        self.suite: Suite = deploy_suite(
            self.chain, admin=self.admin, solver=self.solver, treasury=self.treasury
        )
        self.chain.transact(
            self.suite.trading, "grantRole", role_id("PAUSER_ROLE"), self.admin, sender=self.admin
        )
        for user in self.users:
            self.chain.transact(self.suite.payment_token, "mint", user, 10**30, sender=user)
            self.chain.transact(
                self.suite.payment_token, "approve", self.suite.trading.address, 10**30, sender=user
            )
        self.suite.register_devices(
            [
                (Account.from_key(k).address, user, DeviceType.METER, 20_000)
                for k, user in zip(self.meter_keys, self.users, strict=True)
            ]
        )
        #: The treasury's credit: it pays metering surpluses.
        self.treasury_credit = 10**22
        self.suite.fund_account(self.treasury, self.treasury_credit)
        self.suite.fund_rewards(10**9)
        for user in self.users:
            self.chain.transact(self.suite.reward_token, "mint", user, 10**6, sender=self.admin)
            self.chain.transact(
                self.suite.reward_token, "approve", self.suite.rewards.address, 10**6, sender=user
            )
        # The time-of-day multipliers are flat by default, so every slot has this band.
        self.band = self.suite.price_band(self.suite.current_slot())
        self.snapshot = self.chain.snapshot()


_deployment: SharedDeployment | None = None


def shared_deployment() -> SharedDeployment:
    global _deployment
    if _deployment is None:
        _deployment = SharedDeployment()
    return _deployment
