"""DeviceRegistry: registration, signed readings (replay, cross-chain, cross-contract), upkeep."""

from __future__ import annotations

import time
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.client import DeviceType, SuiteConfig, deploy_suite, role_id, sign_reading
from contracts.errors import ContractRevert
from contracts.model import READING_HISTORY_SLOTS, DeviceRegistryModel
from tests.contracts.helpers import CONTRACT_SETTINGS, EXAMPLES, World, events

CAPACITY_W = 4_000  # 1,000 Wh per 15-minute slot at most


@pytest.fixture
def meter(world: World, device_keys: list[bytes]) -> tuple[bytes, str, str]:
    """A registered meter: (private key, device address, owner)."""
    key = device_keys[0]
    device = Account.from_key(key).address
    owner = world.users[0]
    world.suite.register_device(device, owner, DeviceType.METER, CAPACITY_W)
    return key, device, owner


def _after_slot(world: World, slot: int, seconds: int = 1) -> None:
    world.chain.travel_to(world.suite.slot_start(slot + 1) + seconds)


def _submit(world: World, key: bytes, slot: int, wh: int, **kw: Any) -> Any:
    return world.suite.submit_reading(key, slot, wh, sender=world.stranger, **kw)


def test_register_stores_the_device_and_emits(world: World, device_keys: list[bytes]) -> None:
    device = Account.from_key(device_keys[1]).address
    receipt = world.suite.register_device(device, world.users[1], DeviceType.BATTERY, 5_000)
    registered = events(world.suite.registry, "DeviceRegistered", receipt)
    assert registered[0]["device"] == device and registered[0]["capacityW"] == 5_000
    record = world.suite.device(device)
    assert record.owner == world.users[1] and record.device_type is DeviceType.BATTERY
    assert record.active and record.readings == 0


def test_register_needs_the_registrar_role(world: World, reverts: Any) -> None:
    with reverts(
        "AccessControlUnauthorizedAccount",
        account=world.stranger,
        neededRole=role_id("REGISTRAR_ROLE"),
    ):
        world.suite.register_device(
            world.users[2], world.users[2], DeviceType.METER, 1, sender=world.stranger
        )


@pytest.mark.parametrize(
    ("device", "owner", "capacity", "error"),
    [
        ("0x" + "00" * 20, "owner", 1_000, "DeviceRegistryZeroAddress"),
        ("device", "0x" + "00" * 20, 1_000, "DeviceRegistryZeroAddress"),
        ("device", "owner", 0, "DeviceRegistryZeroCapacity"),
    ],
)
def test_register_rejects_bad_arguments(
    world: World, reverts: Any, device: str, owner: str, capacity: int, error: str
) -> None:
    device = world.users[4] if device == "device" else device
    owner = world.users[5] if owner == "owner" else owner
    with reverts(error):
        world.suite.register_device(device, owner, DeviceType.METER, capacity)


def test_register_twice_is_refused(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    _, device, owner = meter
    with reverts("DeviceRegistryAlreadyRegistered", device=device):
        world.suite.register_device(device, owner, DeviceType.METER, CAPACITY_W)


def test_signed_reading_is_recorded_and_totalled(
    world: World, meter: tuple[bytes, str, str]
) -> None:
    key, device, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot)
    receipt = _submit(world, key, slot, 700)
    assert events(world.suite.registry, "ReadingRecorded", receipt)[0]["energyWh"] == 700
    assert world.chain.call(world.suite.registry, "readingOf", device, slot) == [700, True]
    assert tuple(world.chain.call(world.suite.registry, "slotTotals", slot)) == (700, 0)
    assert world.chain.call(world.suite.registry, "nonces", device) == 1
    record = world.suite.device(device)
    assert record.readings == 1 and record.last_slot == slot and record.missed_slots == 0
    assert record.next_nonce == 1


def test_export_readings_count_as_export(world: World, meter: tuple[bytes, str, str]) -> None:
    key, _, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot)
    _submit(world, key, slot, -400)
    assert tuple(world.chain.call(world.suite.registry, "slotTotals", slot)) == (0, 400)


def test_replayed_reading_is_refused(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    key, device, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot)
    reading, signature = sign_reading(
        key,
        chain_id=world.chain.w3.eth.chain_id,
        registry=world.suite.registry.address,
        slot=slot,
        energy_wh=5,
        nonce=0,
    )
    world.chain.transact(
        world.suite.registry, "submitReading", reading, signature, sender=world.stranger
    )
    with reverts("DeviceRegistryNonceTooLow", device=device, nonce=0, nextNonce=1):
        world.chain.transact(
            world.suite.registry, "submitReading", reading, signature, sender=world.stranger
        )


def test_old_readings_leave_the_ring_and_are_not_accepted_again(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    """The registry keeps READING_HISTORY_SLOTS slots of readings and totals: the reading of slot
    s + 32 takes the entry of slot s, which is then refused (never read as a silent zero), and the
    same signed reading cannot be recorded again: its nonce and slot guard it, not the record."""
    key, device, owner = meter
    registry = world.suite.registry
    assert world.chain.call(registry, "HISTORY_SLOTS") == READING_HISTORY_SLOTS
    slot = world.suite.current_slot()
    later = slot + READING_HISTORY_SLOTS
    _after_slot(world, slot)
    reading, signature = sign_reading(
        key,
        chain_id=world.chain.w3.eth.chain_id,
        registry=registry.address,
        slot=slot,
        energy_wh=300,
        nonce=0,
    )
    world.chain.transact(registry, "submitReading", reading, signature, sender=world.stranger)
    _after_slot(world, later - 1)
    _submit(world, key, later - 1, 100)
    assert world.chain.call(registry, "readingOf", device, slot) == [300, True]
    _after_slot(world, later)
    _submit(world, key, later, -200)
    assert world.chain.call(registry, "readingOf", device, later) == [-200, True]
    assert world.chain.call(registry, "readingOf", device, slot + 1) == [0, False]  # none sent
    assert tuple(world.chain.call(registry, "slotTotals", later)) == (0, 200)
    with reverts("DeviceRegistryReadingEvicted", device=device, slot=slot, heldSlot=later):
        world.chain.call(registry, "readingOf", device, slot)
    with reverts("DeviceRegistryReadingEvicted", device=device, slot=slot, heldSlot=later):
        world.suite.net_metered_wh([owner], slot)
    with reverts("DeviceRegistrySlotTotalsEvicted", slot=slot, heldSlot=later):
        world.chain.call(registry, "slotTotals", slot)
    with reverts("DeviceRegistryNonceTooLow", device=device, nonce=0, nextNonce=3):
        world.chain.transact(registry, "submitReading", reading, signature, sender=world.stranger)


def test_a_late_reading_never_lands_in_a_later_slots_totals(
    world: World, device_keys: list[bytes], reverts: Any
) -> None:
    """With a reading window of 32 slots or more (the bridge's tests: accelerated slots on a
    chain whose time stands still) a slot's totals entry can be taken by a slot 32 later while
    the older slot's window is still open: a late reading of the older slot is refused
    (evicted), never added to the later slot's totals."""
    now = world.chain.timestamp()
    suite = deploy_suite(
        world.chain,
        admin=world.admin,
        solver=world.solver,
        treasury=world.treasury,
        genesis=now - 5 * 900,  # the meters register in slot 5
        config=SuiteConfig(reading_window_seconds=10**8),
    )
    keys = device_keys[2:4]
    for key, owner in zip(keys, world.users, strict=False):
        suite.register_device(Account.from_key(key).address, owner, DeviceType.METER, CAPACITY_W)
    slot, later = 10, 10 + READING_HISTORY_SLOTS
    world.chain.travel_to(suite.slot_start(later + 5))  # both ended, both inside the window
    suite.submit_reading(keys[0], later, 300, sender=world.stranger)
    with reverts("DeviceRegistrySlotTotalsEvicted", slot=slot, heldSlot=later):
        suite.submit_reading(keys[1], slot, 200, sender=world.stranger)
    assert tuple(world.chain.call(suite.registry, "slotTotals", later)) == (300, 0)
    suite.submit_reading(keys[1], later + 1, -50, sender=world.stranger)  # later slots go on
    assert tuple(world.chain.call(suite.registry, "slotTotals", later + 1)) == (0, 50)


def test_a_later_slot_cannot_reuse_an_old_nonce(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    key, device, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot)
    _submit(world, key, slot, 5, nonce=4)
    _after_slot(world, slot + 1)
    for old in (0, 4):  # skipped, and used
        with reverts("DeviceRegistryNonceTooLow", device=device, nonce=old, nextNonce=5):
            _submit(world, key, slot + 1, 5, nonce=old)
    _submit(world, key, slot + 1, 5, nonce=5)


def test_a_lost_reading_does_not_block_the_later_ones(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    """Nonces may skip: a signed reading that never reaches the chain (failed in a relayer's
    outbox, lost by the device) costs only itself. It cannot land afterwards either: a later
    reading of the device took its nonce's place and its slot's (readings only move forward)."""
    key, device, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot)
    _submit(world, key, slot, 5, nonce=0)
    _after_slot(world, slot + 1)
    lost = sign_reading(
        key,
        chain_id=world.chain.w3.eth.chain_id,
        registry=world.suite.registry.address,
        slot=slot + 1,
        energy_wh=7,
        nonce=1,
    )  # signed, never relayed in time
    _after_slot(world, slot + 2)
    receipt = _submit(world, key, slot + 2, 9, nonce=2)
    assert events(world.suite.registry, "ReadingRecorded", receipt)[0]["nonce"] == 2
    record = world.suite.device(device)
    assert record.readings == 2 and record.next_nonce == 3 and record.missed_slots == 1
    assert world.chain.call(world.suite.registry, "readingOf", device, slot + 2) == [9, True]
    with reverts("DeviceRegistryNonceTooLow", device=device, nonce=1, nextNonce=3):
        world.chain.transact(world.suite.registry, "submitReading", *lost, sender=world.stranger)
    assert world.chain.call(world.suite.registry, "readingOf", device, slot + 1) == [0, False]


def test_nonces_stay_within_64_bits(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    key, device, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot)
    for nonce in (2**64 - 1, 2**200):
        with reverts("DeviceRegistryNonceTooHigh", device=device, nonce=nonce):
            _submit(world, key, slot, 5, nonce=nonce)
    _submit(world, key, slot, 5, nonce=2**64 - 2)  # the last one: nothing after it
    assert world.chain.call(world.suite.registry, "nonces", device) == 2**64 - 1


@pytest.mark.parametrize("forgery", ["other_chain", "other_contract", "other_key"])
def test_signatures_bound_to_another_domain_or_key_are_refused(
    world: World,
    meter: tuple[bytes, str, str],
    device_keys: list[bytes],
    reverts: Any,
    forgery: str,
) -> None:
    key, device, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot)
    chain_id = world.chain.w3.eth.chain_id + (forgery == "other_chain")
    registry = (
        world.suite.trading.address if forgery == "other_contract" else world.suite.registry.address
    )
    signer = device_keys[5] if forgery == "other_key" else key
    _, signature = sign_reading(
        signer, chain_id=chain_id, registry=registry, slot=slot, energy_wh=5, nonce=0
    )
    with reverts("DeviceRegistryInvalidSignature", device=device) as err:
        world.chain.transact(
            world.suite.registry,
            "submitReading",
            (device, slot, 5, 0),
            signature,
            sender=world.stranger,
        )
    assert err.error is not None and err.error.args_by_name["recovered"] != device


@pytest.mark.parametrize("wh", [1_001, -1_001])
def test_capacity_cap_holds(
    world: World, meter: tuple[bytes, str, str], reverts: Any, wh: int
) -> None:
    key, device, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot)
    assert world.chain.call(world.suite.registry, "maxReadingWh", CAPACITY_W) == 1_000
    with reverts("DeviceRegistryCapacityExceeded", device=device, energyWh=wh, maxWh=1_000):
        _submit(world, key, slot, wh)
    _submit(world, key, slot, 1_000 if wh > 0 else -1_000)  # exactly the cap is fine


def test_reading_for_a_running_slot_is_refused(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    key, _, _ = meter
    slot = world.suite.current_slot()
    with reverts("DeviceRegistrySlotNotEnded", slot=slot):
        _submit(world, key, slot, 5)


def test_reading_after_the_window_is_refused(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    key, _, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot, seconds=599)
    assert not world.chain.call(world.suite.registry, "readingsFinal", slot)
    world.chain.travel_to(world.suite.slot_start(slot + 1) + 600)
    assert world.chain.call(world.suite.registry, "readingsFinal", slot)
    with reverts("DeviceRegistryReadingTooLate", slot=slot):
        _submit(world, key, slot, 5)


def test_readings_must_move_forward_and_gaps_count_as_missed(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    key, device, _ = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot + 3)
    _submit(world, key, slot + 3, 5)
    assert world.suite.device(device).missed_slots == 3
    # A second, freshly signed reading for the same slot is refused (one reading per slot).
    with reverts("DeviceRegistrySlotNotAfterLast", device=device, slot=slot + 3, lastSlot=slot + 3):
        _submit(world, key, slot + 3, 6)
    _after_slot(world, slot + 4)
    _submit(world, key, slot + 4, 5)
    assert world.suite.device(device).missed_slots == 3


def test_inactive_and_unknown_devices_cannot_report(
    world: World, meter: tuple[bytes, str, str], device_keys: list[bytes], reverts: Any
) -> None:
    key, device, owner = meter
    slot = world.suite.current_slot()
    _after_slot(world, slot)
    world.chain.transact(world.suite.registry, "deactivateDevice", device, sender=owner)
    with reverts("DeviceRegistryInactiveDevice", device=device):
        _submit(world, key, slot, 5)
    unknown = device_keys[6]
    with reverts("DeviceRegistryUnknownDevice", device=Account.from_key(unknown).address):
        _submit(world, unknown, slot, 5, nonce=0)


def test_deactivation_by_owner_registrar_but_not_strangers(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    _, device, owner = meter
    registry = world.suite.registry
    with reverts("DeviceRegistryNotOwnerOrRegistrar", device=device, caller=world.stranger):
        world.chain.transact(registry, "deactivateDevice", device, sender=world.stranger)
    world.chain.transact(registry, "deactivateDevice", device, sender=owner)
    assert not world.suite.device(device).active
    with reverts("DeviceRegistryInactiveDevice"):
        world.chain.transact(registry, "deactivateDevice", device, sender=world.admin)
    with reverts("AccessControlUnauthorizedAccount"):
        world.chain.transact(registry, "reactivateDevice", device, sender=owner)
    world.chain.transact(registry, "reactivateDevice", device, sender=world.admin)
    assert world.suite.device(device).active
    with reverts("DeviceRegistryAlreadyActive"):
        world.chain.transact(registry, "reactivateDevice", device, sender=world.admin)
    with reverts("DeviceRegistryUnknownDevice"):
        world.chain.transact(registry, "reactivateDevice", world.stranger, sender=world.admin)


def test_maintenance_alerts(world: World, meter: tuple[bytes, str, str], reverts: Any) -> None:
    _, device, _ = meter
    registry = world.suite.registry
    receipt = world.chain.transact(
        registry, "raiseAlert", device, b"inverter-fault".ljust(32, b"\0"), sender=world.admin
    )
    args = events(registry, "MaintenanceAlert", receipt)[0]
    assert args["reason"].rstrip(b"\0") == b"inverter-fault" and args["raisedBy"] == world.admin
    with reverts("AccessControlUnauthorizedAccount", neededRole=role_id("MAINTENANCE_ROLE")):
        world.chain.transact(registry, "raiseAlert", device, bytes(32), sender=world.stranger)
    with reverts("DeviceRegistryUnknownDevice"):
        world.chain.transact(registry, "raiseAlert", world.stranger, bytes(32), sender=world.admin)


def test_stale_devices_can_be_flagged_by_anyone(
    world: World, meter: tuple[bytes, str, str], reverts: Any
) -> None:
    _, device, _ = meter
    registry = world.suite.registry
    with reverts("DeviceRegistryNotStale", device=device):
        world.chain.transact(registry, "flagStale", device, sender=world.stranger)
    world.chain.travel_to(world.suite.device(device).last_seen + 8 * 900)
    receipt = world.chain.transact(registry, "flagStale", device, sender=world.stranger)
    reason = events(registry, "MaintenanceAlert", receipt)[0]["reason"]
    assert isinstance(reason, bytes) and reason.startswith(b"stale")


def test_digest_matches_eip712_in_python(world: World, meter: tuple[bytes, str, str]) -> None:
    _, device, _ = meter
    reading = (device, 12, -34, 5)
    on_chain = world.chain.call(world.suite.registry, "readingDigest", reading)
    message = encode_typed_data(
        {
            "name": "DeviceRegistry",
            "version": "1",
            "chainId": world.chain.w3.eth.chain_id,
            "verifyingContract": world.suite.registry.address,
        },
        {
            "Reading": [
                {"name": "device", "type": "address"},
                {"name": "slot", "type": "uint64"},
                {"name": "energyWh", "type": "int64"},
                {"name": "nonce", "type": "uint256"},
            ]
        },
        {"device": device, "slot": 12, "energyWh": -34, "nonce": 5},
    )
    from eth_utils import keccak

    assert on_chain == keccak(b"\x19\x01" + message.header + message.body)


#: One operation of the differential test: (meter, slot relative to its last slot, Wh, nonce
#: relative to its next nonce or an absolute one near the 64-bit end, seconds the chain moves on
#: first: within the slot, past its end, past the reading window).
reading_op = st.tuples(
    st.integers(0, 1),
    st.integers(-2, 3),
    st.integers(-1_100, 1_100),
    st.one_of(st.integers(-2, 3), st.sampled_from([2**64 - 2, 2**64 - 1])),
    st.sampled_from([0, 1, 300, 900, 1_200, 1_800]),
)


@settings(CONTRACT_SETTINGS, max_examples=max(1, EXAMPLES // 4))
@given(ops=st.lists(reading_op, min_size=1, max_size=8))
def test_the_mirror_takes_and_refuses_readings_as_the_contract(
    world_module: World, device_keys: list[bytes], ops: list[tuple[int, int, int, int, int]]
) -> None:
    """`DeviceRegistryModel` against the contract: the same readings taken, the same refusals
    with the same arguments (replays, skipped nonces, old slots, late and early readings), the
    same device records and totals after each."""
    world = world_module
    chain, suite = world.chain, world.suite
    snapshot = chain.snapshot()
    try:
        now = max(chain.timestamp(), int(time.time()))
        chain.travel_to(suite.slot_start((now - suite.genesis) // 900 + 1) + 5)
        keys = device_keys[:2]
        devices = [Account.from_key(k).address for k in keys]
        model = DeviceRegistryModel(genesis=suite.genesis)
        for device in devices:
            model.register(device, CAPACITY_W, chain.timestamp() + 1)
            suite.register_device(device, world.users[0], DeviceType.METER, CAPACITY_W)
        for which, slot_step, wh, nonce_step, wait in ops:
            if wait:
                chain.travel_to(chain.timestamp() + wait)
            device, d = devices[which], model.devices[devices[which]]
            slot = max(0, d.last_slot + slot_step)
            nonce = nonce_step if nonce_step >= 2**63 else max(0, d.next_nonce + nonce_step)
            expected: ContractRevert | None = None
            try:
                model.submit_reading(device, slot, wh, nonce, chain.timestamp() + 1)
            except ContractRevert as err:
                expected = err
            if expected is None:
                _submit(world, keys[which], slot, wh, nonce=nonce)
            else:
                with pytest.raises(ContractRevert) as got:
                    _submit(world, keys[which], slot, wh, nonce=nonce)
                assert (got.value.name, got.value.args_by_name) == (
                    expected.name,
                    expected.args_by_name,
                )
            record = suite.device(device)
            assert (record.last_slot, record.readings, record.missed_slots, record.next_nonce) == (
                d.last_slot,
                d.readings,
                d.missed_slots,
                d.next_nonce,
            )
            if expected is None:
                assert tuple(chain.call(suite.registry, "slotTotals", slot)) == model.slot_totals(
                    slot
                )
    finally:
        chain.revert(snapshot)
