"""GridBalance: load monitoring, demand-response events and rewards, emergency mode."""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account

from contracts.client import DeviceType, LoadType, RewardKind, Side, role_id
from tests.contracts.helpers import World, events

CAPACITY_W = 40_000  # 10 kWh per slot


@pytest.fixture
def meters(world: World, device_keys: list[bytes]) -> list[tuple[bytes, str, str]]:
    """Three registered meters: (key, device, owner)."""
    out = []
    for i in range(3):
        device = Account.from_key(device_keys[i]).address
        world.suite.register_device(device, world.users[i], DeviceType.METER, CAPACITY_W)
        out.append((device_keys[i], device, world.users[i]))
    world.suite.fund_rewards(10**24)
    return out


def _read_slot(world: World, slot: int, readings: list[tuple[bytes, int]]) -> None:
    world.chain.travel_to(world.suite.slot_start(slot + 1) + 1)
    for key, wh in readings:
        world.suite.submit_reading(key, slot, wh, sender=world.stranger)


def _finalise(world: World, slot: int) -> None:
    world.chain.travel_to(world.suite.slot_start(slot + 1) + 600)


def test_slot_load_is_recorded_once_from_final_readings(
    world: World, meters: list[tuple[bytes, str, str]], reverts: Any
) -> None:
    grid = world.suite.grid
    slot = world.suite.current_slot()
    _read_slot(world, slot, [(meters[0][0], 9_000), (meters[1][0], 4_000), (meters[2][0], -2_000)])
    with reverts("GridBalanceReadingsNotFinal", slot=slot):
        world.chain.transact(grid, "recordSlotLoad", slot, sender=world.stranger)
    _finalise(world, slot)
    world.chain.transact(grid, "setTransformerLimit", 10_000, sender=world.admin)
    receipt = world.chain.transact(grid, "recordSlotLoad", slot, sender=world.stranger)
    exceeded = events(grid, "LimitExceeded", receipt)[0]
    assert (exceeded["netWh"], exceeded["limitWh"]) == (11_000, 10_000)
    assert tuple(world.chain.call(grid, "slotLoad", slot)) == (True, True, 13_000, 2_000)
    with reverts("GridBalanceSlotAlreadyRecorded", slot=slot):
        world.chain.transact(grid, "recordSlotLoad", slot, sender=world.stranger)


def _create(world: World, meters: list[tuple[bytes, str, str]], start: int, **kw: Any) -> Any:
    participants = kw.pop(
        "participants",
        [
            (m[1], int(LoadType.CURTAILABLE), prio, 5_000)
            for m, prio in zip(meters, (1, 2, 2), strict=True)
        ],
    )
    args = (
        start,
        kw.pop("duration", 2),
        kw.pop("target", 6_000),
        10**15,
        10**18,
        10**17,
        participants,
    )
    return world.chain.transact(
        world.suite.grid, "createEvent", *args, sender=kw.pop("sender", world.admin)
    )


def test_demand_response_event_rewards_reductions_against_the_baseline(
    world: World, meters: list[tuple[bytes, str, str]], reverts: Any
) -> None:
    suite, grid = world.suite, world.suite.grid
    start = suite.current_slot() + 1
    receipt = _create(world, meters, start)
    event_id = events(grid, "DemandResponseCreated", receipt)[0]["eventId"]
    assert [p[2] for p in world.chain.call(grid, "participants", event_id)] == [1, 2, 2]
    # Baseline 5,000 Wh per slot over 2 slots = 10,000 Wh. Meter 0 uses 3,000 + 3,000 (saves 4,000),
    # meter 1 uses 5,000 + 6,000 (saves nothing), meter 2 reports one slot only (earns nothing).
    _read_slot(world, start, [(meters[0][0], 3_000), (meters[1][0], 5_000), (meters[2][0], 1_000)])
    _read_slot(world, start + 1, [(meters[0][0], 3_000), (meters[1][0], 6_000)])
    with reverts("GridBalanceReadingsNotFinal", slot=start + 1):
        world.chain.transact(grid, "settleEvent", event_id, sender=world.stranger)
    _finalise(world, start + 1)
    receipt = world.chain.transact(grid, "settleEvent", event_id, sender=world.stranger)
    settled = events(grid, "DemandResponseSettled", receipt)[0]
    assert settled["totalReductionWh"] == 4_000 and settled["targetMet"] is False
    per_device = {e["device"]: e["reward"] for e in events(grid, "ParticipantSettled", receipt)}
    assert per_device == {meters[0][1]: 4_000 * 10**15 + 10**17, meters[1][1]: 0, meters[2][1]: 0}
    grants = events(suite.rewards, "RewardGranted", receipt)
    assert {(g["account"], g["kind"]) for g in grants} == {
        (meters[0][2], RewardKind.ENERGY_SAVING),
        (meters[0][2], RewardKind.DEMAND_RESPONSE),
    }
    assert world.chain.call(suite.rewards, "claimable", meters[0][2]) == 4_000 * 10**15 + 10**17


def test_meeting_the_target_pays_the_peak_bonus_and_settles_once(
    world: World, meters: list[tuple[bytes, str, str]], reverts: Any
) -> None:
    grid = world.suite.grid
    start = world.suite.current_slot() + 1
    _create(world, meters, start, duration=1, target=3_000)
    _read_slot(world, start, [(m[0], 3_000) for m in meters])  # each saves 2,000 Wh
    _finalise(world, start)
    receipt = world.chain.transact(grid, "settleEvent", 1, sender=world.stranger)
    assert events(grid, "DemandResponseSettled", receipt)[0]["targetMet"] is True
    kinds = [g["kind"] for g in events(world.suite.rewards, "RewardGranted", receipt)]
    assert kinds.count(RewardKind.PEAK_REDUCTION) == 3
    for _, _, owner in meters:
        assert (
            world.chain.call(world.suite.rewards, "claimable", owner)
            == 2_000 * 10**15 + 10**17 + 10**18
        )
    with reverts("GridBalanceEventClosed", eventId=1):
        world.chain.transact(grid, "settleEvent", 1, sender=world.stranger)
    with reverts("GridBalanceUnknownEvent", eventId=7):
        world.chain.transact(grid, "settleEvent", 7, sender=world.stranger)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ("past", "GridBalanceEventNotInFuture"),
        ("duration0", "GridBalanceInvalidDuration"),
        ("duration17", "GridBalanceInvalidDuration"),
        ("nobody", "GridBalanceInvalidParticipants"),
        ("unsorted", "GridBalanceUnsortedPriorities"),
        ("not_meter", "GridBalanceNotActiveMeter"),
        ("stranger", "AccessControlUnauthorizedAccount"),
    ],
)
def test_bad_events_are_refused(
    world: World, meters: list[tuple[bytes, str, str]], reverts: Any, change: str, error: str
) -> None:
    start = world.suite.current_slot() + 1
    kw: dict[str, Any] = {}
    if change == "past":
        start -= 1
    elif change.startswith("duration"):
        kw["duration"] = int(change.removeprefix("duration"))
    elif change == "nobody":
        kw["participants"] = []
    elif change == "unsorted":
        kw["participants"] = [(meters[0][1], 0, 2, 1), (meters[1][1], 0, 1, 1)]
    elif change == "not_meter":
        kw["participants"] = [(world.stranger, 0, 0, 1)]
    elif change == "stranger":
        kw["sender"] = world.stranger
    with reverts(error):
        _create(world, meters, start, **kw)


def test_events_can_be_cancelled_only_before_they_start(
    world: World, meters: list[tuple[bytes, str, str]], reverts: Any
) -> None:
    grid = world.suite.grid
    start = world.suite.current_slot() + 1
    _create(world, meters, start)
    _create(world, meters, start)
    with reverts("AccessControlUnauthorizedAccount", neededRole=role_id("OPERATOR_ROLE")):
        world.chain.transact(grid, "cancelEvent", 1, sender=world.stranger)
    receipt = world.chain.transact(grid, "cancelEvent", 1, sender=world.admin)
    assert events(grid, "DemandResponseCancelled", receipt)[0]["eventId"] == 1
    assert world.chain.call(grid, "getEvent", 1)[2] is True  # cancelled
    with reverts("GridBalanceEventClosed", eventId=1):
        world.chain.transact(grid, "cancelEvent", 1, sender=world.admin)
    world.chain.travel_to(world.suite.slot_start(start))
    with reverts("GridBalanceEventStarted", eventId=2):
        world.chain.transact(grid, "cancelEvent", 2, sender=world.admin)


def test_emergency_pauses_the_market_and_events_until_recovery(
    world: World, meters: list[tuple[bytes, str, str]], reverts: Any
) -> None:
    suite, grid = world.suite, world.suite.grid
    suite.fund_account(world.users[0], 10**20)
    slot = suite.current_slot() + 4  # still open after the emergency
    low, _ = suite.price_band(slot)
    with reverts("AccessControlUnauthorizedAccount", neededRole=role_id("EMERGENCY_ROLE")):
        world.chain.transact(
            grid, "declareEmergency", b"fault".ljust(32, b"\0"), sender=world.stranger
        )
    world.chain.transact(grid, "declareEmergency", b"fault".ljust(32, b"\0"), sender=world.admin)
    assert world.chain.call(suite.trading, "paused") and world.chain.call(grid, "paused")
    with reverts("EnforcedPause"):
        suite.create_order(
            world.users[0], start_slot=slot, energy_wh=1, limit_price=low, side=Side.SELL
        )
    with reverts("EnforcedPause"):
        _create(world, meters, suite.current_slot() + 1)
    suite.withdraw(world.users[0], 10**19)  # money never locked in
    with reverts("GridBalanceRecoveryTooEarly"):
        world.chain.transact(grid, "recover", sender=world.admin)
    world.chain.travel_to(world.chain.timestamp() + 900)
    with reverts("AccessControlUnauthorizedAccount"):
        world.chain.transact(grid, "recover", sender=world.stranger)
    world.chain.transact(grid, "recover", sender=world.admin)
    assert not world.chain.call(suite.trading, "paused") and not world.chain.call(grid, "paused")
    with reverts("ExpectedPause"):
        world.chain.transact(grid, "recover", sender=world.admin)
    suite.create_order(
        world.users[0], start_slot=slot, energy_wh=1, limit_price=low, side=Side.SELL
    )


def test_transformer_limit_is_set_by_the_operator(world: World, reverts: Any) -> None:
    grid = world.suite.grid
    with reverts("AccessControlUnauthorizedAccount"):
        world.chain.transact(grid, "setTransformerLimit", 1, sender=world.stranger)
    world.chain.transact(grid, "setTransformerLimit", 42, sender=world.admin)
    assert world.chain.call(grid, "transformerLimit") == 42
