"""RewardSystem and RewardToken: funded grants, renewable rewards, staking, votes, re-entrancy."""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak

from contracts.client import DeviceType, RewardKind, role_id
from contracts.model import READING_HISTORY_SLOTS
from tests.contracts.helpers import World, events

BUDGET = 10**21


@pytest.fixture
def funded(world: World) -> World:
    world.suite.fund_rewards(BUDGET)
    return world


def _grant(
    world: World, account: str, amount: int, kind: RewardKind = RewardKind.ENERGY_SAVING
) -> Any:
    return world.chain.transact(
        world.suite.rewards, "grantReward", account, amount, int(kind), sender=world.admin
    )


def _claim(world: World, account: str) -> Any:
    return world.chain.transact(world.suite.rewards, "claim", sender=account)


def test_grants_come_out_of_the_funded_budget(funded: World, reverts: Any) -> None:
    world, rewards = funded, funded.suite.rewards
    _grant(world, world.users[0], 300)
    assert world.chain.call(rewards, "unallocated") == BUDGET - 300
    with reverts("RewardSystemInsufficientFunding", requested=BUDGET, available=BUDGET - 300):
        _grant(world, world.users[1], BUDGET)
    with reverts("RewardSystemZeroAmount"):
        _grant(world, world.users[1], 0)
    with reverts("AccessControlUnauthorizedAccount", neededRole=role_id("REWARDER_ROLE")):
        world.chain.transact(rewards, "grantReward", world.stranger, 1, 0, sender=world.stranger)


def test_claim_pays_once(funded: World, reverts: Any) -> None:
    world = funded
    user = world.users[0]
    _grant(world, user, 300, RewardKind.PEAK_REDUCTION)
    _grant(world, user, 200, RewardKind.DEMAND_RESPONSE)
    receipt = _claim(world, user)
    assert events(world.suite.rewards, "RewardClaimed", receipt)[0]["amount"] == 500
    assert world.suite.token_balance(user, world.suite.reward_token) == 500
    with reverts("RewardSystemNothingToClaim", account=user):
        _claim(world, user)
    funded_total, claimed, _ = world.chain.call(world.suite.rewards, "totals")
    assert (funded_total, claimed) == (BUDGET, 500)


def test_fund_needs_allowance_and_a_positive_amount(world: World, reverts: Any) -> None:
    with reverts("RewardSystemZeroAmount"):
        world.chain.transact(world.suite.rewards, "fund", 0, sender=world.admin)
    with reverts("ERC20InsufficientAllowance"):
        world.chain.transact(world.suite.rewards, "fund", 5, sender=world.admin)


def test_staking_shares_distributions_by_stake(funded: World, reverts: Any) -> None:
    world = funded
    suite, rewards, token = funded.suite, funded.suite.rewards, funded.suite.reward_token
    a, b = world.users[0], world.users[1]
    for user, amount in ((a, 300), (b, 100)):
        world.chain.transact(token, "mint", user, amount, sender=world.admin)
        world.chain.transact(token, "approve", rewards.address, amount, sender=user)
        world.chain.transact(rewards, "stake", amount, sender=user)
    world.chain.transact(rewards, "distributeStakingReward", 4_000, sender=world.admin)
    assert world.chain.call(rewards, "claimable", a) == 3_000
    assert world.chain.call(rewards, "claimable", b) == 1_000
    world.chain.transact(rewards, "unstake", 100, sender=b)  # b leaves; a takes the next one
    world.chain.transact(rewards, "distributeStakingReward", 600, sender=world.admin)
    assert world.chain.call(rewards, "claimable", a) == 3_600
    assert world.chain.call(rewards, "claimable", b) == 1_000
    _claim(world, a)
    assert (
        suite.token_balance(a, token) == 3_600 and world.chain.call(rewards, "stakedOf", a) == 300
    )
    with reverts("RewardSystemInsufficientStake", requested=101, staked=0):
        world.chain.transact(rewards, "unstake", 101, sender=b)
    with reverts("AccessControlUnauthorizedAccount"):
        world.chain.transact(rewards, "distributeStakingReward", 1, sender=world.stranger)
    with reverts("RewardSystemInsufficientFunding"):
        world.chain.transact(rewards, "distributeStakingReward", BUDGET, sender=world.admin)


def test_distribution_needs_stakers(funded: World, reverts: Any) -> None:
    with reverts("RewardSystemNothingStaked"):
        funded.chain.transact(
            funded.suite.rewards, "distributeStakingReward", 1, sender=funded.admin
        )
    with reverts("RewardSystemZeroAmount"):
        funded.chain.transact(funded.suite.rewards, "stake", 0, sender=funded.admin)


def _inverter(world: World, device_keys: list[bytes]) -> tuple[bytes, str, str]:
    """A registered PV inverter that exports: (private key, device address, owner)."""
    key = device_keys[3]
    device = Account.from_key(key).address
    owner = world.users[2]
    world.suite.register_device(device, owner, DeviceType.INVERTER, 8_000)
    return key, device, owner


def test_renewable_rewards_follow_metered_export_once(
    funded: World, device_keys: list[bytes], reverts: Any
) -> None:
    world, suite, rewards = funded, funded.suite, funded.suite.rewards
    key, device, owner = _inverter(funded, device_keys)
    slot = suite.current_slot()
    world.chain.travel_to(suite.slot_start(slot + 1) + 1)
    suite.submit_reading(key, slot, -1_500, sender=world.stranger)
    with reverts("RewardSystemReadingsNotFinal", slot=slot):
        world.chain.transact(rewards, "rewardRenewable", slot, [device], sender=world.stranger)
    world.chain.travel_to(suite.slot_start(slot + 1) + 600)
    world.chain.transact(rewards, "rewardRenewable", slot, [device], sender=world.stranger)
    assert world.chain.call(rewards, "claimable", owner) == 1_500 * 10**14
    with reverts("RewardSystemAlreadyRewarded", device=device, slot=slot):
        world.chain.transact(rewards, "rewardRenewable", slot, [device], sender=world.stranger)
    with reverts("RewardSystemNoExport", device=world.stranger, slot=slot):
        world.chain.transact(
            rewards, "rewardRenewable", slot, [world.stranger], sender=world.stranger
        )


def test_a_renewable_reward_is_not_paid_again_once_its_records_are_reused(
    funded: World, device_keys: list[bytes], reverts: Any
) -> None:
    """The reward flags and the readings live in rings of READING_HISTORY_SLOTS entries: the
    reading and reward of slot s + 32 take the entries of slot s. The reward of s is then still
    refused, by the flag while it stands and by the registry's eviction once it is gone."""
    world, suite, rewards = funded, funded.suite, funded.suite.rewards
    key, device, owner = _inverter(funded, device_keys)
    slot = suite.current_slot()
    later = slot + READING_HISTORY_SLOTS

    def reward(s: int) -> None:
        world.chain.transact(rewards, "rewardRenewable", s, [device], sender=world.stranger)

    world.chain.travel_to(suite.slot_start(slot + 1) + 1)
    suite.submit_reading(key, slot, -1_500, sender=world.stranger)
    world.chain.travel_to(suite.slot_start(slot + 1) + 600)
    reward(slot)
    world.chain.travel_to(suite.slot_start(later + 1) + 1)
    suite.submit_reading(key, later, -500, sender=world.stranger)
    world.chain.travel_to(suite.slot_start(later + 1) + 600)
    with reverts("RewardSystemAlreadyRewarded", device=device, slot=slot):
        reward(slot)  # the flag of slot still holds its entry
    reward(later)  # takes the flag's entry over
    assert world.chain.call(rewards, "claimable", owner) == 2_000 * 10**14
    with reverts("DeviceRegistryReadingEvicted", device=device, slot=slot, heldSlot=later):
        reward(slot)
    with reverts("RewardSystemAlreadyRewarded", device=device, slot=later):
        reward(later)
    assert world.chain.call(rewards, "claimable", owner) == 2_000 * 10**14


def test_renewable_rate_is_governed(world: World, reverts: Any) -> None:
    with reverts("AccessControlUnauthorizedAccount", neededRole=role_id("PARAMETER_ROLE")):
        world.chain.transact(world.suite.rewards, "setRenewableRate", 1, sender=world.stranger)
    world.chain.transact(world.suite.rewards, "setRenewableRate", 7, sender=world.admin)
    assert world.chain.call(world.suite.rewards, "renewableRate") == 7


def test_votes_come_from_the_snapshot(world: World) -> None:
    token = world.suite.reward_token
    a, b = world.users[0], world.users[1]
    world.chain.transact(token, "mint", a, 1_000, sender=world.admin)
    world.chain.transact(token, "delegate", a, sender=a)
    world.chain.transact(token, "delegate", b, sender=b)
    snapshot_block = world.chain.w3.eth.block_number
    world.chain.travel_to(world.chain.timestamp() + 1)  # one more block so the snapshot is past
    world.chain.transact(token, "transfer", b, 1_000, sender=a)  # moved after the snapshot
    assert world.chain.call(token, "getPastVotes", a, snapshot_block) == 1_000
    assert world.chain.call(token, "getPastVotes", b, snapshot_block) == 0
    assert (
        world.chain.call(token, "getVotes", a) == 0
        and world.chain.call(token, "getVotes", b) == 1_000
    )
    with_role = world.chain.call(token, "hasRole", keccak(text="MINTER_ROLE"), world.stranger)
    assert with_role is False


def test_only_minters_mint(world: World, reverts: Any) -> None:
    with reverts("AccessControlUnauthorizedAccount", neededRole=role_id("MINTER_ROLE")):
        world.chain.transact(
            world.suite.reward_token, "mint", world.stranger, 1, sender=world.stranger
        )


# ---------------------------------------------------------------- re-entrancy (property 7)


def _attacker(world: World) -> tuple[Any, Any]:
    token = world.chain.deploy("ReentrantToken", sender=world.admin)
    attacker = world.chain.deploy("ReentrancyAttacker", sender=world.admin)
    return token, attacker


def test_a_malicious_receiver_cannot_withdraw_twice(world: World) -> None:
    chain = world.chain
    token, attacker = _attacker(world)
    trading = chain.deploy(
        "EnergyTrading",
        world.admin,
        token.address,
        world.suite.registry.address,
        world.treasury,
        world.suite.genesis,
        300,
        0,
        (10**14, 5_000, 5_000, 1, 100_000, 0),
        [10_000] * 24,
        sender=world.admin,
    )
    chain.transact(token, "mint", attacker.address, 2_000, sender=world.admin)
    chain.transact(attacker, "approve", token.address, trading.address, 2_000, sender=world.admin)
    chain.transact(
        attacker,
        "call",
        trading.address,
        trading.encode_abi("deposit", [2_000]),
        sender=world.admin,
    )
    chain.transact(
        attacker,
        "attack",
        trading.address,
        trading.encode_abi("withdraw", [700]),
        sender=world.admin,
    )
    assert chain.call(attacker, "attempts") == 1 and chain.call(attacker, "successes") == 0
    assert (
        chain.call(attacker, "lastError")[:4] == keccak(text="ReentrancyGuardReentrantCall()")[:4]
    )
    assert chain.call(token, "balanceOf", attacker.address) == 700
    assert chain.call(trading, "creditOf", attacker.address) == 1_300
    assert chain.call(token, "balanceOf", trading.address) == 1_300


def test_a_malicious_receiver_cannot_claim_twice(world: World) -> None:
    chain = world.chain
    token, attacker = _attacker(world)
    rewards = chain.deploy(
        "RewardSystem",
        world.admin,
        token.address,
        world.suite.registry.address,
        1,
        sender=world.admin,
    )
    chain.transact(rewards, "grantRole", role_id("REWARDER_ROLE"), world.admin, sender=world.admin)
    chain.transact(token, "mint", world.admin, 5_000, sender=world.admin)
    chain.transact(token, "approve", rewards.address, 5_000, sender=world.admin)
    chain.transact(rewards, "fund", 5_000, sender=world.admin)
    chain.transact(rewards, "grantReward", attacker.address, 800, 0, sender=world.admin)
    chain.transact(
        attacker, "attack", rewards.address, rewards.encode_abi("claim", []), sender=world.admin
    )
    assert chain.call(attacker, "attempts") == 1 and chain.call(attacker, "successes") == 0
    assert chain.call(token, "balanceOf", attacker.address) == 800
    assert chain.call(token, "balanceOf", rewards.address) == 4_200
