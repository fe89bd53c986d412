"""Hypothesis stateful test of RewardSystem (property 9): claims never exceed funding, no claim
is paid twice, staking shares never over-allocate the budget. Runs on the real contracts (py-evm).

It found a real bug: debiting only the rounded-down staking share let per-staker rounding over
the accumulated rate pay out one wei more than had been debited.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from contracts.errors import ContractRevert
from tests.contracts.helpers import (
    CONTRACT_SETTINGS,
    STATEFUL_STEPS,
    sequences,
    shared_deployment,
)

users = st.integers(0, 3)


pytestmark = pytest.mark.usefixtures("deployed_before_hypothesis")


class RewardMachine(RuleBasedStateMachine):
    """Random grants, stakes, distributions and claims against a funded RewardSystem."""

    def __init__(self) -> None:
        super().__init__()
        self.d = shared_deployment()
        self.d.chain.revert(self.d.snapshot)
        self.rewards = self.d.suite.rewards
        self.token = self.d.suite.reward_token
        self.claimed = 0

    def _tx(self, fn: str, *args: object, sender: str) -> None:
        self.d.chain.transact(self.rewards, fn, *args, sender=sender)

    def _refused(self, error: str, fn: str, *args: object, sender: str) -> None:
        """Assert that ``fn`` reverts with ``error``; an eth_call proves it without mining."""
        with pytest.raises(ContractRevert) as err:
            self.d.chain.call(self.rewards, fn, *args, sender=sender)
        assert err.value.name == error, err.value

    @rule(user=users, amount=st.integers(1, 10**7))
    def grant(self, user: int, amount: int) -> None:
        self._tx("grantReward", self.d.users[user], amount, 0, sender=self.d.admin)

    @rule(user=users, amount=st.integers(1, 10**5))
    def stake(self, user: int, amount: int) -> None:
        self._tx("stake", amount, sender=self.d.users[user])

    @rule(user=users, amount=st.integers(1, 10**5))
    def unstake(self, user: int, amount: int) -> None:
        account = self.d.users[user]
        if amount > self.d.chain.call(self.rewards, "stakedOf", account):
            self._refused("RewardSystemInsufficientStake", "unstake", amount, sender=account)
            return
        self._tx("unstake", amount, sender=account)

    @rule(amount=st.integers(1, 10**7))
    def distribute(self, amount: int) -> None:
        if self.d.chain.call(self.rewards, "totals")[2] == 0:
            self._refused(
                "RewardSystemNothingStaked", "distributeStakingReward", amount, sender=self.d.admin
            )
            return
        self._tx("distributeStakingReward", amount, sender=self.d.admin)

    @rule(user=users)
    def claim(self, user: int) -> None:
        account = self.d.users[user]
        owed = self.d.chain.call(self.rewards, "claimable", account)
        before = self.d.chain.call(self.token, "balanceOf", account)
        if owed == 0:
            self._refused("RewardSystemNothingToClaim", "claim", sender=account)
            return
        self._tx("claim", sender=account)
        assert self.d.chain.call(self.token, "balanceOf", account) == before + owed
        assert self.d.chain.call(self.rewards, "claimable", account) == 0  # no double claim
        self.claimed += owed

    @invariant()
    def claims_never_exceed_funding(self) -> None:
        funded, claimed, _ = self.d.chain.call(self.rewards, "totals")
        assert claimed == self.claimed <= funded  # property 9

    def teardown(self) -> None:
        # The full budget check reads every account; once per sequence keeps the run quick.
        funded, claimed, staked = self.d.chain.call(self.rewards, "totals")
        owed = sum(self.d.chain.call(self.rewards, "claimable", u) for u in self.d.users)
        unallocated = self.d.chain.call(self.rewards, "unallocated")
        assert unallocated + owed + claimed <= funded
        balance = self.d.chain.call(self.token, "balanceOf", self.rewards.address)
        assert balance >= staked + unallocated + owed  # everything owed is covered


TestRewards = RewardMachine.TestCase
# 400 of the 1,000 default sequences (the market machine runs the other 600).
TestRewards.settings = settings(
    CONTRACT_SETTINGS, max_examples=sequences(0.4), stateful_step_count=STATEFUL_STEPS
)
