"""SlotSettler: the operator's one transaction per slot, and the fast client path that sends it.

The settler adds no rule of its own: every test here either checks its own two guards (the
operator role, the parts mask) or that the suite's rules still hold through it, with their own
custom errors (an emergency declared through it pauses the market as GridBalance's own call
does). The client path (hand-rolled ABI encoding, coincurve signatures over
precomputed EIP-712 digests, raw logs) is held bit for bit to eth_abi, eth-account and the
contracts' own digests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from coincurve import PrivateKey
from eth_account import Account
from eth_typing import HexStr
from eth_utils import to_checksum_address

from contracts.clearing import clear_book
from contracts.client import (
    TX_GAS_CAP,
    DeviceType,
    RewardKind,
    order_digest,
    role_id,
    sign_order,
    sign_reading,
)
from contracts.errors import ContractRevert
from contracts.model import (
    DrParticipant,
    GridBalanceModel,
    LoadType,
    PriceParams,
    Side,
    SignedOrder,
)
from contracts.settler import (
    PART_DEMAND_RESPONSE,
    PART_EMERGENCY,
    PART_PRICE,
    PART_READINGS,
    PART_RECONCILE,
    PART_RECOVER,
    PART_SETTLE,
    DemandResponse,
    OrderSigner,
    ReadingSigner,
    SlotSender,
    SlotStep,
    compact_signature,
    decode_logs,
)
from contracts.slot_batch import step_trades
from tests.contracts.helpers import World

FUNDS = 10**20
ZERO = "0x" + "00" * 20


@dataclass
class Member:
    key: bytes
    address: str
    meter_key: bytes
    meter: str


@pytest.fixture
def members(world: World) -> list[Member]:
    """Three prosumers funded by the admin, each with a registered meter."""
    suite = world.suite
    suite.chain.transact(suite.payment_token, "mint", world.admin, 10**25, sender=world.admin)
    suite.chain.transact(
        suite.payment_token, "approve", suite.trading.address, 10**25, sender=world.admin
    )
    suite.deposit_for(world.admin, world.treasury, FUNDS)  # it pays metering surpluses
    suite.fund_rewards(10**30)
    out = []
    for i in range(3):
        key = bytes.fromhex(f"{0x5E7700 + i:064x}")
        meter_key = bytes.fromhex(f"{0x5E7E00 + i:064x}")
        address, meter = Account.from_key(key).address, Account.from_key(meter_key).address
        suite.deposit_for(world.admin, address, FUNDS)
        suite.register_device(meter, address, DeviceType.METER, 20_000)
        out.append(Member(key, address, meter_key, meter))
    out.sort(key=lambda m: int(m.address, 16))  # batch and reconciliation order
    return out


def _sender(world: World, operator: str | None = None) -> SlotSender:
    return SlotSender(world.chain, operator or world.solver, world.suite.settler.address)


def _step(
    world: World, members: list[Member], slot: int, metered: list[int], nonce: int = 0
) -> SlotStep:
    """Price, settle (one buyer, one seller) and readings of `slot` (the meters' `nonce`)."""
    suite = world.suite
    low, high = suite.price_band(slot)
    sides = [Side.BUY, Side.SELL, Side.SELL]
    orders = [
        SignedOrder(m.address, slot, side, 300, high if side == Side.BUY else low)
        for m, side in zip(members[:2], sides, strict=False)
    ]
    solved = clear_book(
        [o.energy_wh for o in orders], [o.limit_price for o in orders], [int(s) for s in sides[:2]]
    )
    signer = ReadingSigner(int(world.chain.w3.eth.chain_id), suite.registry.address)
    readings = [(m.meter, slot, wh, nonce) for m, wh in zip(members, metered, strict=True)]
    return SlotStep(
        parts=PART_PRICE | PART_SETTLE | PART_READINGS,
        price_params=PriceParams().as_args(),
        settle_slot=slot,
        price=solved.price,
        orders=[o.as_tuple() for o in orders],
        signatures=[
            sign_order(m.key, suite.order_domain, o).as_tuple()
            for m, o in zip(members, orders, strict=False)
        ],
        fills=[int(f) for f in solved.fills],
        readings=readings,
        reading_signatures=[
            signer.sign(PrivateKey(m.meter_key), *r) for m, r in zip(members, readings, strict=True)
        ],
    )  # fmt: skip


def test_deploy_suite_wires_the_settlers_roles(world: World) -> None:
    suite, chain = world.suite, world.chain
    settler = suite.settler.address
    assert chain.call(suite.trading, "hasRole", role_id("SOLVER_ROLE"), settler)
    assert chain.call(suite.trading, "hasRole", role_id("PARAMETER_ROLE"), settler)
    assert chain.call(suite.rewards, "hasRole", role_id("REWARDER_ROLE"), settler)
    assert chain.call(suite.grid, "hasRole", role_id("EMERGENCY_ROLE"), settler)
    assert chain.call(suite.grid, "hasRole", role_id("OPERATOR_ROLE"), settler)
    assert chain.call(suite.settler, "gridBalance") == suite.grid.address
    assert chain.call(suite.settler, "hasRole", role_id("OPERATOR_ROLE"), world.solver)
    assert not chain.call(suite.settler, "hasRole", role_id("OPERATOR_ROLE"), world.stranger)
    assert chain.call(suite.settler, "suite") == [
        suite.trading.address,
        suite.registry.address,
        suite.rewards.address,
    ]


def test_only_the_operator_may_run_a_step(world: World, reverts: Any) -> None:
    step = SlotStep(parts=PART_PRICE, price_params=PriceParams().as_args())
    with reverts(
        "AccessControlUnauthorizedAccount",
        account=world.stranger,
        neededRole=role_id("OPERATOR_ROLE"),
    ):
        _sender(world, world.stranger).send(step.calldata(), world.chain.timestamp() + 5)
    # The roles the settler holds do not pass to its operator directly.
    with reverts("AccessControlUnauthorizedAccount", neededRole=role_id("PARAMETER_ROLE")):
        world.chain.transact(
            world.suite.trading, "setPriceParams", *PriceParams().as_args(), sender=world.solver
        )


@pytest.mark.parametrize("parts", [0, 128, 255])
def test_parts_must_select_something_that_exists(world: World, reverts: Any, parts: int) -> None:
    with reverts("SlotSettlerInvalidParts", parts=parts):
        _sender(world).send(SlotStep(parts=parts).calldata(), world.chain.timestamp() + 5)


def test_the_constructor_refuses_zero_addresses(world: World) -> None:
    suite, chain = world.suite, world.chain
    good = [world.admin, world.solver, suite.trading.address, suite.registry.address]
    good += [suite.rewards.address, suite.grid.address]
    for i in range(len(good)):
        args = [*good[:i], ZERO, *good[i + 1 :]]
        data = _bytecode() + chain.w3.codec.encode(["address"] * 6, args).hex()
        with pytest.raises(ContractRevert, match="SlotSettlerZeroAddress"):
            try:
                chain.w3.eth.call({"from": world.admin, "data": HexStr(data)})
            except Exception as exc:
                raise chain.decode(exc) from exc


def _bytecode() -> str:
    from contracts.compile import load_artifact

    return str(load_artifact("SlotSettler")["bytecode"])


def _trades(step: SlotStep) -> list[tuple[str, int, int, int]]:
    """The committed trade list of `step`'s settlement (orders by the first members)."""
    return step_trades(step, [str(o[0]) for o in step.orders])


def test_a_slot_settles_then_reconciles_one_transaction_later(
    world: World, members: list[Member]
) -> None:
    suite = world.suite
    slot = suite.current_slot() + 2
    sender = _sender(world)
    before = [suite.credit_of(m.address) for m in members]
    metered = [250, -300, -40]  # the buyer took 250 of its 300, the seller delivered its 300
    first = _step(world, members, slot, metered)
    receipt = sender.send(first.calldata(), suite.slot_start(slot + 1))
    assert receipt.gas_used < TX_GAS_CAP
    (settled,) = decode_logs(receipt.logs)["SignedBatchSettled"]
    assert settled["price"] == first.price and settled["volume"] == 300 and settled["slot"] == slot
    assert world.chain.call(suite.registry, "readingOf", members[2].meter, slot) == [-40, True]
    assert suite.credit_of(members[0].address) == before[0] - 300 * first.price

    # Next slot's transaction reconciles this one first (its readings are final by then).
    trades = _trades(first)
    second = SlotStep(
        parts=PART_RECONCILE,
        reconcile_slot=slot,
        trades=trades,
        accounts=[m.address for m in members],
        exporters=[members[1].meter, members[2].meter],
        grants=[(members[0].address, 5, int(RewardKind.DEMAND_RESPONSE))],
    )
    receipt = sender.send(second.calldata(), suite.slot_start(slot + 2))
    events = decode_logs(receipt.logs)
    (totals,) = events["SlotReconciled"]
    assert totals["complete"] and totals["slot"] == slot
    reconciled = {e["account"]: e for e in events["AccountReconciled"]}
    assert reconciled[members[0].address]["imbalance"] == -50  # bought 300, metered 250
    assert reconciled[members[2].address]["imbalance"] == -40
    assert suite.slot_result(slot).reconciled
    rate = int(world.chain.call(suite.rewards, "renewableRate"))
    granted = {(e["account"], e["amount"]) for e in events["RewardGranted"]}
    assert granted == {
        (members[1].address, 300 * rate),
        (members[2].address, 40 * rate),
        (members[0].address, 5),
    }
    credits, escrow = suite.ledger_totals()
    assert credits + escrow == suite.token_balance(suite.trading.address)


def test_readings_and_reconciliation_of_one_slot_never_share_a_block(
    world: World, members: list[Member], reverts: Any
) -> None:
    suite = world.suite
    slot = suite.current_slot() + 2
    first = _step(world, members, slot, [1, 2, 3])
    late = SlotStep(**{**first.__dict__, "parts": first.parts | PART_RECONCILE})
    late = SlotStep(
        **{**late.__dict__, "reconcile_slot": slot, "accounts": [m.address for m in members]}
    )
    final_at = suite.slot_start(slot + 1) + 600
    with reverts("EnergyTradingSlotNotCleared", slot=slot):  # reconciliation runs first
        _sender(world).send(late.calldata(), suite.slot_start(slot + 1) - 10)
    _sender(world).send(first.calldata(), suite.slot_start(slot + 1))
    trades = _trades(first)
    early = SlotStep(
        parts=PART_RECONCILE,
        reconcile_slot=slot,
        trades=trades,
        accounts=[m.address for m in members],
    )
    with reverts("EnergyTradingReadingsNotFinal", slot=slot, finalAt=final_at):
        _sender(world).send(early.calldata(), final_at - 1)
    # A settlement before its gate closes is refused through the settler too.
    with reverts("EnergyTradingGateOpen"):
        ahead = _step(world, members, slot + 3, [0, 0, 0])
        _sender(world).send(
            SlotStep(**{**ahead.__dict__, "parts": PART_SETTLE}).calldata(), final_at + 1
        )


def test_an_emergency_stops_trading_but_not_the_meters(
    world: World, members: list[Member], reverts: Any
) -> None:
    """Declared in a step, the emergency pauses the market before that step's settlement: only
    an empty batch settles, yet readings go in and the slot reconciles while paused; the next
    calm step ends it first, and trading resumes in the same transaction."""
    suite, chain = world.suite, world.chain
    sender = _sender(world)
    slot = suite.current_slot() + 2
    calm = _step(world, members, slot, [0, 0, 0])
    with reverts("EnforcedPause"):  # a batch with orders cannot settle in an emergency
        sender.send(
            SlotStep(**{**calm.__dict__, "parts": calm.parts | PART_EMERGENCY}).calldata(),
            suite.slot_start(slot + 1),
        )
    empty = SlotStep(
        **{**calm.__dict__, "parts": calm.parts | PART_EMERGENCY, "price": 0}
        | {"orders": [], "signatures": [], "fills": []}
    )
    declared_at = suite.slot_start(slot + 1) + 1
    receipt = sender.send(empty.calldata(), declared_at)
    events = decode_logs(receipt.logs)
    assert len(events["EmergencyDeclared"]) == 1 and events["SignedBatchSettled"][0]["volume"] == 0
    assert chain.call(suite.grid, "paused") and chain.call(suite.trading, "paused")
    assert world.chain.call(suite.registry, "readingOf", members[0].meter, slot) == [0, True]

    with reverts("GridBalanceRecoveryTooEarly"):  # GridBalance's minimum emergency holds
        sender.send(SlotStep(parts=PART_RECOVER).calldata(), declared_at + 700)

    # Still stressed: the emergency slot reconciles while the market stays paused.
    still = SlotStep(
        parts=PART_RECONCILE,
        reconcile_slot=slot,
        accounts=[m.address for m in members],
    )
    receipt = sender.send(still.calldata(), suite.slot_start(slot + 2))
    assert decode_logs(receipt.logs)["SlotReconciled"][0]["complete"]
    assert chain.call(suite.trading, "paused")

    # Calm again: recover first, then this step's orders trade.
    later = _step(world, members, slot + 3, [0, 0, 0], nonce=1)
    receipt = sender.send(
        SlotStep(**{**later.__dict__, "parts": later.parts | PART_RECOVER}).calldata(),
        suite.slot_start(slot + 4),
    )
    events = decode_logs(receipt.logs)
    assert len(events["Recovered"]) == 1 and events["SignedBatchSettled"][0]["volume"] == 300
    assert not chain.call(suite.grid, "paused") and not chain.call(suite.trading, "paused")


def test_demand_response_events_are_announced_and_settled_in_the_slot_step(
    world: World, members: list[Member], reverts: Any
) -> None:
    """The step's last part announces an event for a later slot from the operator's view of
    this one, and settles an earlier event once its readings are final: GridBalance pays what
    its model (`GridBalanceModel`) predicts, by the baselines fixed at announcement. An
    emergency declared in a step refuses both, with GridBalance's own error."""
    suite, chain = world.suite, world.chain
    sender = _sender(world)
    slot = suite.current_slot() + 2
    model = GridBalanceModel(suite.genesis, {m.meter: m.address for m in members})
    people = [
        DrParticipant(m.meter, LoadType.CURTAILABLE, prio, 500)
        for m, prio in zip(members, (0, 1, 1), strict=True)
    ]
    announce = DemandResponse(
        start_slot=slot + 1, duration_slots=1, target_reduction_wh=800, incentive_per_wh=10**6,
        peak_bonus=10**8, participation_reward=7, participants=[p.as_tuple() for p in people],
    )  # fmt: skip
    # Mined inside `slot`: the next slot is still ahead, its baselines fixed before it starts.
    inside = suite.slot_start(slot + 1) - 1
    with reverts("GridBalanceEventNotInFuture", startSlot=slot, currentSlot=slot):
        too_late = DemandResponse(**{**announce.__dict__, "start_slot": slot})
        sender.send(
            SlotStep(parts=PART_DEMAND_RESPONSE, demand_response=too_late).calldata(), inside - 2
        )
    with reverts("EnforcedPause"):  # an emergency step may not announce
        step = SlotStep(parts=PART_EMERGENCY | PART_DEMAND_RESPONSE, demand_response=announce)
        sender.send(step.calldata(), inside - 1)
    receipt = sender.send(
        SlotStep(parts=PART_DEMAND_RESPONSE, demand_response=announce).calldata(), inside
    )
    (created,) = decode_logs(receipt.logs)["DemandResponseCreated"]
    event_id = model.create_event(inside, slot + 1, 1, 800, 10**6, 10**8, 7, people)
    assert (created["event_id"], created["start_slot"], created["participants"]) == (
        event_id,
        slot + 1,
        3,
    )

    # The event's slot: meter 0 uses 200 Wh (saves 300), meter 1 uses 600 (saves nothing),
    # meter 2 exports 100 (saves 600): 900 Wh together meets the 800 Wh target.
    metered = [200, 600, -100]
    signer = ReadingSigner(int(chain.w3.eth.chain_id), suite.registry.address)
    readings = [(m.meter, slot + 1, wh, 0) for m, wh in zip(members, metered, strict=True)]
    relay = SlotStep(
        parts=PART_READINGS,
        readings=readings,
        reading_signatures=[
            signer.sign(PrivateKey(m.meter_key), *r) for m, r in zip(members, readings, strict=True)
        ],
    )
    sender.send(relay.calldata(), suite.slot_start(slot + 2) + 1)
    settle = SlotStep(parts=PART_DEMAND_RESPONSE, demand_response=DemandResponse([event_id]))
    final_at = suite.slot_start(slot + 2) + 600
    with reverts("GridBalanceReadingsNotFinal", slot=slot + 1):
        sender.send(settle.calldata(), final_at - 2)
    receipt = sender.send(settle.calldata(), final_at)
    want = model.settle_event(event_id, final_at, {(r[0], r[1]): r[2] for r in readings})
    events = decode_logs(receipt.logs)
    assert want.reductions == [300, 0, 600] and want.target_met
    assert [(e["device"], e["reduction"], e["reward"]) for e in events["ParticipantSettled"]] == [
        (p.device, r, w) for p, r, w in zip(people, want.reductions, want.rewards, strict=True)
    ]
    assert [(e["account"], e["amount"]) for e in events["RewardGranted"]] == [
        (owner, amount) for owner, amount, _ in want.grants
    ]
    (settled,) = events["DemandResponseSettled"]
    assert (settled["total"], settled["target_met"]) == (900, True)
    with reverts("GridBalanceEventClosed", eventId=event_id):  # settles once
        sender.send(settle.calldata(), final_at + 1)


def test_fast_calldata_is_eth_abis(world: World, members: list[Member]) -> None:
    step = _step(world, members, world.suite.current_slot() + 2, [5, -6, 0])
    step = SlotStep(
        **{
            **step.__dict__,
            "parts": 79,
            "reconcile_slot": 3,
            "trades": [(members[0].address, 1, 7, 2)],
            "accounts": [m.address for m in members],
            "exporters": [members[1].meter],
            "grants": [(members[2].address, 10**24, 2)],
            "demand_response": DemandResponse(
                [3, 2**200], 9, 2, 800, 2**100, 5, 6, [(members[1].meter, 1, 4, 2**63)]
            ),
        }
    )
    assert step.calldata() == step.calldata_reference()
    assert SlotStep(parts=1).calldata() == SlotStep(parts=1).calldata_reference()


def test_fast_signatures_are_eth_accounts_and_the_contracts(
    world: World, members: list[Member]
) -> None:
    suite, chain = world.suite, world.chain
    chain_id = int(chain.w3.eth.chain_id)
    signer = ReadingSigner(chain_id, suite.registry.address)
    m = members[0]
    for slot, wh, nonce in ((7, -1234, 0), (2**40, 2**62, 2**200)):
        reading, reference = sign_reading(
            m.meter_key,
            chain_id=chain_id,
            registry=suite.registry.address,
            slot=slot,
            energy_wh=wh,
            nonce=nonce,
        )
        assert signer.sign(PrivateKey(m.meter_key), m.meter, slot, wh, nonce) == reference
        digest = chain.call(suite.registry, "readingDigest", reading)
        assert bytes(digest) == signer.digest(m.meter, slot, wh, nonce)
    order = SignedOrder(m.address, 12, Side.SELL, 250, 10**14, 7)
    want = sign_order(m.key, suite.order_domain, order)
    got = compact_signature(PrivateKey(m.key), order_digest(suite.order_domain, order))
    assert got == want.as_tuple() == OrderSigner(suite.order_domain).sign(PrivateKey(m.key), order)
    onchain = chain.call(suite.trading, "signedOrderDigest", order.as_tuple())
    assert bytes(onchain) == OrderSigner(suite.order_domain).digest(order)
    assert to_checksum_address(m.address) == m.address
