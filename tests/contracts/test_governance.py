"""MicrogridGovernor + MicrogridTimelock: token holders change market parameters, slowly."""

from __future__ import annotations

from typing import Any

import pytest
from eth_utils import keccak

from contracts.client import Governance, deploy_governance
from contracts.errors import ContractRevert
from tests.contracts.helpers import World, events

SUCCEEDED, DEFEATED, EXECUTED = 4, 3, 7
DELAY = 600


@pytest.fixture
def gov(world: World) -> Governance:
    return deploy_governance(
        world.suite, voting_delay_blocks=1, voting_period_blocks=5, min_delay_seconds=DELAY
    )


def _holder(world: World, account: str, amount: int) -> None:
    token = world.suite.reward_token
    world.chain.transact(token, "mint", account, amount, sender=world.admin)
    world.chain.transact(token, "delegate", account, sender=account)


def _propose_fee(world: World, gov: Governance, fee_bps: int, proposer: str) -> tuple[Any, ...]:
    trading = world.suite.trading
    proposal = (
        [trading.address],
        [0],
        [trading.encode_abi("setFee", [fee_bps, world.treasury])],
        f"set the trading fee to {fee_bps} bps",
    )
    receipt = world.chain.transact(gov.governor, "propose", *proposal, sender=proposer)
    proposal_id = events(gov.governor, "ProposalCreated", receipt)[0]["proposalId"]
    return (proposal_id, *proposal[:3], keccak(text=proposal[3]))


def test_a_passed_proposal_changes_the_fee_after_the_timelock(
    world: World, gov: Governance
) -> None:
    chain, governor = world.chain, gov.governor
    voter = world.users[0]
    _holder(world, voter, 1_000)
    chain.mine(1)
    proposal_id, targets, values, calldatas, description = _propose_fee(world, gov, 120, voter)
    chain.mine(2)  # past the voting delay: the snapshot is fixed
    chain.transact(governor, "castVote", proposal_id, 1, sender=voter)
    chain.mine(6)  # past the voting period
    assert chain.call(governor, "state", proposal_id) == SUCCEEDED
    chain.transact(
        governor, "queue", targets, values, calldatas, description, sender=world.stranger
    )
    with pytest.raises(ContractRevert) as early:
        chain.transact(
            governor, "execute", targets, values, calldatas, description, sender=world.stranger
        )
    assert early.value.name == "TimelockUnexpectedOperationState"
    chain.travel_to(chain.timestamp() + DELAY + 1)
    chain.transact(
        governor, "execute", targets, values, calldatas, description, sender=world.stranger
    )
    assert chain.call(governor, "state", proposal_id) == EXECUTED
    assert chain.call(world.suite.trading, "fee") == [120, world.treasury]


def test_a_proposal_without_quorum_is_defeated(world: World, gov: Governance, reverts: Any) -> None:
    chain, governor = world.chain, gov.governor
    voter, whale = world.users[0], world.users[1]
    _holder(world, voter, 1_000)
    _holder(world, whale, 1_000_000)  # never votes: 4 % quorum is out of the voter's reach
    chain.mine(1)
    proposal_id, targets, values, calldatas, description = _propose_fee(world, gov, 120, voter)
    chain.mine(2)
    chain.transact(governor, "castVote", proposal_id, 1, sender=voter)
    chain.mine(6)
    assert chain.call(governor, "state", proposal_id) == DEFEATED
    with reverts("GovernorUnexpectedProposalState"):
        chain.transact(governor, "queue", targets, values, calldatas, description, sender=voter)
    assert chain.call(world.suite.trading, "fee")[0] == 50


def test_votes_count_at_the_snapshot(world: World, gov: Governance) -> None:
    chain, governor = world.chain, gov.governor
    early, late = world.users[0], world.users[1]
    _holder(world, early, 1_000)
    chain.mine(1)
    proposal_id = _propose_fee(world, gov, 80, early)[0]
    chain.mine(2)
    _holder(world, late, 5_000)  # bought in after the snapshot
    receipt = chain.transact(governor, "castVote", proposal_id, 0, sender=late)
    assert events(governor, "VoteCast", receipt)[0]["weight"] == 0
    receipt = chain.transact(governor, "castVote", proposal_id, 1, sender=early)
    assert events(governor, "VoteCast", receipt)[0]["weight"] == 1_000


def test_only_the_timelock_path_is_added(world: World, gov: Governance, reverts: Any) -> None:
    timelock = gov.timelock
    proposer = keccak(text="PROPOSER_ROLE")
    assert world.chain.call(timelock, "hasRole", proposer, gov.governor.address)
    assert not world.chain.call(timelock, "hasRole", bytes(32), world.admin)  # admin renounced
    with reverts("AccessControlUnauthorizedAccount"):
        world.chain.transact(
            timelock,
            "schedule",
            world.suite.trading.address,
            0,
            b"",
            bytes(32),
            bytes(32),
            DELAY,
            sender=world.stranger,
        )
