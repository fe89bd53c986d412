"""The bridge's slot transactions on anvil with a real reading window, the chain's clock driven
slot by slot: each ``SlotSettler.run`` row reconciles the previous slot, posts the price and
settles the slot's orders, once; afterwards every account's credit is what the env's mirror
ledger (`envs.ledger.MirrorLedger`, the suite's rules) gives for the same books and readings,
and GridBalance's demand-response events (announced, settled, each household's incentive) are
the ones the mirror's GridBalance rule gives for the same grid states, baselines and readings.

No broker here: the books are drawn at random (limit prices distinct on each side, so no two
marginal orders share a remainder and the batch order cannot matter), the readings signed with
the meters' keys and relayed by the same outbox, as the run loop does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from coincurve import PrivateKey
from eth_account import Account
from web3 import Web3

from bridge.config import Deployment
from bridge.errors import ConfigError
from bridge.outbox import Outbox, RowState
from bridge.reading_rows import log_lost, lost_readings
from bridge.registration import enrol_market, owner_of, prosumer_keys, register_site
from bridge.settlement import (
    MAX_MISSED,
    RETRY_ON,
    SlotBook,
    SlotSettlement,
    chain_dr_queue,
    load_prosumer_keys,
    repair_step,
    step_of_args,
)
from bridge.signing import address_of
from bridge.site import SiteManifest
from bridge.site_builder import build_site, device_key
from contracts.client import (
    Chain,
    RewardKind,
    Suite,
    SuiteConfig,
    deploy_suite,
    deployment_manifest,
)
from contracts.settler import (
    PART_DEMAND_RESPONSE,
    PART_EMERGENCY,
    PART_PRICE,
    PART_RECONCILE,
    PART_RECOVER,
    PART_SETTLE,
    DemandResponse,
    ReadingSigner,
    SlotStep,
)
from contracts.slot_batch import DemandResponseQueue
from envs import load_scenario
from envs.grid import build_grid
from envs.ledger import MirrorLedger, SlotInput, per_wh, units
from envs.market import BUY, SELL, Book
from envs.scenario import MarketConfig
from tests.bridge.services import ANVIL_KEYS, anvil

CREDIT = 100.0
TREASURY = 100_000.0
REFERENCE = 250_000
"""0.25 currency per kWh, in money units per Wh."""


@dataclass
class Chainside:
    chain: Chain
    suite: Suite
    site: SiteManifest
    market: SlotSettlement
    outbox: Outbox
    window: int


@pytest.fixture
def chainside(tmp_path: Path) -> Iterator[Chainside]:
    with open_chainside(tmp_path) as c:
        yield c


@contextlib.contextmanager
def open_chainside(tmp_path: Path, **config: int) -> Iterator[Chainside]:
    """anvil with the suite deployed (`config`: other `SuiteConfig` fields), the site
    registered and enrolled, and the bridge's settlement and outbox over it."""
    site = build_site(build_grid(load_scenario()), site="site1", seed="0")
    with anvil() as url:
        chain = Chain.rpc(url)
        # RewardSystem's rate and budget as the env's chain ledger deploys them.
        rate = per_wh(MarketConfig().renewable_reward_per_kwh)
        suite = deploy_suite(chain, config=SuiteConfig(renewable_rate_per_wh=rate, **config))
        suite.fund_rewards(10**30)
        register_site(chain, suite.registry.address, site)
        enrol_market(
            chain, suite.addresses(), site, chain.accounts[1], credit=units(CREDIT),
            treasury_credit=units(TREASURY),
        )  # fmt: skip
        dep = Deployment.model_validate(json.loads(json.dumps(deployment_manifest(suite))))
        market = SlotSettlement(site, dep, prosumer_keys(site))
        window = int(chain.call(suite.registry, "readingWindow"))
        market.configure(window, dep.slot_seconds, rate)
        outbox = Outbox(tmp_path / "outbox.db", chain, dict(dep.addresses), ANVIL_KEYS[1])
        outbox.backoff_s, outbox.backoff_max_s = 0.05, 0.2
        market.start_credit([units(CREDIT)] * len(site.prosumers), [])
        outbox.repair = market.repairer(outbox)
        yield Chainside(chain, suite, site, market, outbox, window)
        outbox.close()


def random_book(rng: np.random.Generator, n: int) -> Book:
    side = rng.choice([BUY, SELL], n)
    qty = rng.integers(200, 3_000, n) * (rng.random(n) < 0.9)
    # Distinct limits on each side, inside the band [0.2, 3] x the reference.
    limit = (REFERENCE * (0.7 + 0.05 * np.arange(n))).astype(np.int64)
    rng.shuffle(limit)
    return Book(qty[None].astype(np.int64), limit[None], side[None].astype(np.int64))


@dataclass(frozen=True)
class Plan:
    """How the run loop meets one slot: its orders drawn or none, its grid stressed
    (emergency), a household cancelling its signed order once the row is queued (the chain then
    refuses the batch), or the bridge down across the slot (no row of its own)."""

    orders: bool = True
    emergency: bool = False
    dr: bool = False
    """The grid calls for demand response (every emergency does too: its threshold is lower)."""
    cancel: bool = False
    missed: bool = False


@dataclass
class Driven:
    """What `drive` settled, and what the mirror says the chain must show for it."""

    slots: range
    mirror: MirrorLedger
    rewards: dict[int, np.ndarray]
    """Slot -> the renewable rewards the mirror granted for it (prosumer order)."""
    dr_paid: dict[int, np.ndarray]
    """Slot -> the demand-response incentives the mirror's transaction of that slot paid."""
    dr_created: list[int]
    """The slots of the events the mirror announced."""


def drive(c: Chainside, plans: list[Plan]) -> Driven:
    """Slot by slot, as the run loop: the previous slot's signed readings relayed, then this
    slot's row queued (`SlotSettlement.enqueue`) and mined once the previous slot's readings
    are final; the mirror ledger settles the same slots as the chain should have. One more
    slot, without orders, reconciles the last.

    Demand response: the mirror's transaction of slot s - 1 announces what the bridge's row of
    slot s does (the event of slot s + 1, from the grid state both see), and the mirror's
    transaction of slot s settles what row s settles; a copy of the mirror runs the one
    transaction more that matches the last row."""
    chain, suite, site, market, outbox = c.chain, c.suite, c.site, c.market, c.outbox
    n = len(site.prosumers)
    assert market.reconciles  # the suite's default window is shorter than a slot
    rng = np.random.default_rng(5)
    config = MarketConfig(initial_credit=CREDIT, treasury_credit=TREASURY)
    mirror = MirrorLedger(1, n, config)
    signer = ReadingSigner(int(chain.w3.eth.chain_id), suite.registry.address)
    meters = [site.device(p.meter) for p in site.prosumers]
    nonces = [0] * n
    metered = np.zeros(n, dtype=np.int64)
    empty = Book(*(np.zeros((3, 1, n), np.int64)))
    first = suite.current_slot() + 2
    slots = range(first, first + len(plans))
    settled_book, emergency = empty, False  # what the chain settled for the previous slot
    rewards: dict[int, np.ndarray] = {}
    plans = [*plans, Plan(orders=False)]
    books = [random_book(rng, n) if p.orders else empty for p in plans]
    # Each slot's household loads (kW, prosumer order) and decided demand-response shares.
    # Each slot's baselines: the households' expected import of the slot after it (Wh).
    baselines = [rng.integers(-300, 2_000, n).clip(0) for _ in plans]
    dr_paid: dict[int, np.ndarray] = {}
    dr_created: list[int] = []
    for k, slot in enumerate([*slots, slots.stop]):
        plan, book = plans[k], books[k]
        chain.travel_to(suite.slot_start(slot) + 1)  # the gate closed, the slot began
        if k:  # the previous slot's signed readings, relayed by the outbox as the run loop does
            for i, meter in enumerate(meters):
                assert meter is not None
                cap = meter.capacity_w * 900 // 3600
                wh = int(rng.integers(-cap // 2, cap // 2))
                metered[i] = wh
                reading = (meter.address, slot - 1, wh, nonces[i])
                key = PrivateKey(device_key("0", meter.id))
                sig = signer.sign(key, *reading)
                outbox.enqueue(f"reading:{meter.id}:{slot - 1}", "DeviceRegistry",
                               "submitReading", (reading, sig))  # fmt: skip
                nonces[i] += 1
            # The grid state row `slot` decides on is the one slot - 1 left.
            announce = plan.dr and not plan.emergency and not plan.missed
            out = mirror.settle(
                SlotInput(
                    slot=np.array([slot - 1]), book=settled_book,
                    reference=np.array([REFERENCE]), metered_wh=metered[None].copy(),
                    dr_announce=np.array([announce]), dr_baseline_wh=baselines[k][None],
                    emergency=np.array([emergency]),
                )
            )  # fmt: skip
            rewards[slot - 1] = out.rewards[0] - out.dr_paid[0]
            dr_paid[slot - 1] = out.dr_paid[0]
            dr_created += [slot + 1] * int(out.dr_created[0])
            assert outbox.drain(timeout_s=30)
            # Every row mined: the tracked credit becomes the chain's, as the run loop does.
            market.credit = np.array([suite.credit_of(a) for a in market.accounts])
        if plan.missed:  # no row: the next one settles this slot empty
            settled_book = empty
            continue
        # What the run loop knows of the previous slot's meters when it decides this one.
        known = {market.accounts[j]: int(metered[i]) for j, i in enumerate(market.order)}
        b = SlotBook(book, REFERENCE, plan.emergency, plan.dr, baselines[k])
        assert market.enqueue(outbox, slot, b, known)
        args = outbox.args(f"slot:{slot - 1}")  # a missed slot's row is there now
        assert market.enqueue(outbox, slot, SlotBook(book, REFERENCE, plan.emergency)) == 0
        settled_book, emergency = (empty if plan.cancel else book), plan.emergency
        if k + 1 < len(plans) and plans[k + 1].cancel:  # before the next slot's gate closes
            cancel_signed_orders(c, slot + 1, books[k + 1])
        outbox.step()
        row = outbox.row(f"slot:{slot}")
        assert row is not None
        if args is not None:  # the previous slot's readings are not final yet: it waits
            assert row.state is RowState.PENDING, row
            # (an emergency declared last slot cannot end before GridBalance's minimum either)
            assert any(e in str(row.last_error) for e in RETRY_ON), row
            chain.travel_to(suite.slot_start(slot) + c.window + 1)
        assert outbox.drain(timeout_s=30), outbox.row(f"slot:{slot}")
        assert outbox.row(f"slot:{slot}").state is RowState.CONFIRMED  # type: ignore[union-attr]
    # The mirror's transaction of the last row's slot, on a copy (it would reconcile a slot the
    # chain does not): what that row settles of demand response.
    last = copy.deepcopy(mirror).settle(
        SlotInput(
            slot=np.array([slots.stop]), book=empty, reference=np.array([REFERENCE]),
            metered_wh=np.zeros((1, n), np.int64), dr_announce=np.array([False]),
            dr_baseline_wh=np.zeros((1, n), np.int64), emergency=np.array([emergency]),
        )
    )  # fmt: skip
    dr_paid[slots.stop] = last.dr_paid[0]
    return Driven(slots, mirror, rewards, dr_paid, dr_created)


def cancel_signed_orders(c: Chainside, slot: int, book: Book) -> None:
    """The first household with an order in `book` cancels its signed orders for `slot` on
    chain (its own transaction, before the gate closes): the bridge does not know, signs the
    order by the rule as usual, and the chain refuses the batch."""
    i = int(np.flatnonzero(book.qty_wh[0] > 0)[0])
    name = c.site.prosumers[i].name
    key = prosumer_keys(c.site)[name]
    owner = address_of(key)
    w3 = c.chain.w3
    w3.eth.wait_for_transaction_receipt(
        w3.eth.send_transaction({"from": c.chain.accounts[0], "to": owner, "value": 10**18})
    )
    tx = c.suite.trading.functions.cancelSignedOrders(slot, 255).build_transaction(
        {"from": owner, "nonce": w3.eth.get_transaction_count(owner)}
    )
    signed = Account.from_key(key).sign_transaction(tx)
    sent = w3.eth.send_raw_transaction(signed.raw_transaction)
    assert w3.eth.wait_for_transaction_receipt(sent)["status"] == 1


def check_ledger(c: Chainside, d: Driven) -> set[int]:
    """Every slot settled once and reconciled by the next slot's row; the chain's credits and
    treasury afterwards are the mirror's, and so are the renewable rewards granted for the
    slots in `d.rewards` (the env's ledger grants them at the reconciliation); GridBalance
    announced events for the slots the mirror did and paid each household the mirror's
    incentives. Returns the reward kinds granted."""
    chain, suite, site = c.chain, c.suite, c.site
    slots, mirror, rewards = d.slots, d.mirror, d.rewards
    trading = suite.trading
    settled = [
        int(e["args"]["slot"]) for e in trading.events.SignedBatchSettled().get_logs(from_block=0)
    ]
    reconciled = [
        int(e["args"]["slot"]) for e in trading.events.SlotReconciled().get_logs(from_block=0)
    ]
    assert settled == [*slots, slots.stop]  # each slot once, in order
    assert reconciled == list(slots)
    # The chain's ledger after the last reconciliation is the mirror's.
    owners = [owner_of(site, p.name, chain.accounts[0]) for p in site.prosumers]
    on_chain = [suite.credit_of(a) for a in owners]
    assert on_chain == [int(x) for x in mirror.credits()[0]]
    assert len(set(on_chain)) > 1  # trading and imbalances moved the credits apart
    assert suite.credit_of(chain.accounts[0]) == int(mirror.treasury[0])
    granted = dict.fromkeys(owners, 0)
    kinds: set[int] = set()
    for e in suite.rewards.events.RewardGranted().get_logs(from_block=0):
        granted[str(e["args"]["account"])] += int(e["args"]["amount"])
        kinds.add(int(e["args"]["kind"]))
    dr_want = np.sum(list(d.dr_paid.values()), axis=0)
    want = np.sum(list(rewards.values()), axis=0) + dr_want
    assert [granted[a] for a in owners] == [int(x) for x in want]
    assert want.sum() > 0  # some households exported
    # GridBalance's events: the slots announced and what each household was paid.
    grid = chain.contract("GridBalance", suite.addresses()["GridBalance"])
    created = [
        int(e["args"]["startSlot"])
        for e in grid.events.DemandResponseCreated().get_logs(from_block=0)
    ]
    assert created == d.dr_created
    owner_of_meter = {m: a for a, m in c.market.meter_of.items()}
    paid = dict.fromkeys(owners, 0)
    for e in grid.events.ParticipantSettled().get_logs(from_block=0):
        paid[owner_of_meter[str(e["args"]["device"])]] += int(e["args"]["reward"])
    assert [paid[a] for a in owners] == [int(x) for x in dr_want]
    return kinds


def test_slot_rows_reconcile_the_previous_slot_and_settle_as_the_mirror(
    chainside: Chainside,
) -> None:
    """With demand response called for in two slots: each row announces the next slot's event,
    the row after that slot settles it, as the mirror's GridBalance rule."""
    calm, dr = Plan(), Plan(dr=True)
    driven = drive(chainside, [calm, dr, calm, dr, calm])
    kinds = check_ledger(chainside, driven)
    assert len(driven.dr_created) == 2 and sum(driven.dr_paid.values()).sum() > 0
    assert kinds == {int(RewardKind.RENEWABLE), int(RewardKind.ENERGY_SAVING)}
    assert chainside.outbox.repairs() == {}


def test_emergencies_refused_batches_and_missed_slots_settle_as_the_env(
    chainside: Chainside,
) -> None:
    """The grid's stress declares an emergency on chain and its end recovers, in the rows, by
    the env's rule (`emergency_parts`); a batch the chain refuses for good (a household
    cancelled its signed order) is sent again without its orders, so the slot is still cleared
    and the next row, which reconciles it, is not wedged; a slot the bridge missed entirely is
    settled empty by the next row's enqueue, so every slot is reconciled. The ledger ends where
    the mirror's does, for the same emergencies, refused and missed slots."""
    c = chainside
    stress = Plan(emergency=True, dr=True)
    plans = [
        Plan(), stress, stress, Plan(), Plan(cancel=True), Plan(missed=True), Plan(dr=True),
        stress,
    ]  # fmt: skip
    driven = drive(c, plans)
    slots = driven.slots
    # The missed slot's empty row reconciles the slot before it by the readings the outbox
    # holds for it: that slot's renewable rewards are granted, once, as the mirror grants them.
    missed = step_of_args(c.outbox.args(f"slot:{slots.start + 5}") or [])
    assert missed.reconcile_slot == slots.start + 4 and missed.exporters
    assert driven.rewards[slots.start + 4].sum() > 0
    kinds = check_ledger(c, driven)
    # No event is announced in or right after an emergency: only the calm DR slot's.
    assert driven.dr_created == [slots.start + 7]
    assert kinds == {int(RewardKind.RENEWABLE), int(RewardKind.ENERGY_SAVING)}
    assert c.outbox.repairs() == {"EnergyTradingSignedOrderCancelled": 1}
    parts = {s: step_of_args(c.outbox.args(f"slot:{s}") or []).parts for s in [*slots, slots.stop]}
    declared = [s for s, p in parts.items() if p & PART_EMERGENCY]
    recovered = [s for s, p in parts.items() if p & PART_RECOVER]
    first = slots.start
    assert declared == [first + 1, first + 7] and recovered == [first + 3, first + 8]
    grid = c.chain.contract("GridBalance", c.suite.addresses()["GridBalance"])
    assert len(grid.events.EmergencyDeclared().get_logs(from_block=0)) == 2
    assert len(grid.events.Recovered().get_logs(from_block=0)) == 2
    assert not c.chain.call(grid, "paused")
    # The refused batch went out empty, the missed slot's row is there and empty.
    for s in (first + 4, first + 5):
        assert step_of_args(c.outbox.args(f"slot:{s}") or []).orders == []


def test_an_emergency_longer_than_the_readings_history_forfeits_the_events_it_held(
    chainside: Chainside,
) -> None:
    """Two demand-response events (slots first + 2 and first + 3) are held by an emergency
    declared at first + 3 and ended 32 rows later, at first + 35. DeviceRegistry keeps 32 slots
    of readings: by then the reading of first + 2 is gone (GridBalance's ``settleEvent`` reverts
    ``DeviceRegistryReadingEvicted``, and with it the whole row), and the rule
    (`contracts.slot_batch.settles`) forfeits first + 3's too, as the env's mirror does. The
    recovering row settles no event, and its recovery, orders and reconciliation stand: no
    repair, nothing settled empty, the chain's ledger the mirror's. (Before, the row carried
    both settlements; the evicted reading, taken for the reconciliation's, had the row repaired
    to no reconciliation, then to an empty batch, then failed for good: the emergency never
    ended on chain. The whole-day parity run met it: an emergency from 08:00 to 17:30.) That an
    event 31 slots old is still settled is tests/envs/test_demand_response.py's."""
    c = chainside
    stress = Plan(emergency=True, dr=True)
    plans = [Plan(), Plan(dr=True), Plan(dr=True), *[stress] * 32, Plan(), Plan()]
    driven = drive(c, plans)
    first = driven.slots.start
    check_ledger(c, driven)
    assert c.outbox.repairs() == {} and c.outbox.failures() == {}
    assert driven.dr_created == [first + 2, first + 3]
    recovery = step_of_args(c.outbox.args(f"slot:{first + 35}") or [])
    assert recovery.parts & PART_RECOVER and recovery.parts & PART_RECONCILE and recovery.orders
    assert not recovery.parts & PART_DEMAND_RESPONSE  # nothing left to settle or announce
    grid = c.chain.contract("GridBalance", c.suite.addresses()["GridBalance"])
    assert grid.events.DemandResponseSettled().get_logs(from_block=0) == []
    assert sum(driven.dr_paid.values()).sum() == 0
    assert not c.chain.call(grid, "paused")


def test_a_reading_window_of_a_whole_slot_announces_no_event_the_chain_would_refuse(
    tmp_path: Path,
) -> None:
    """Row n may be mined only once slot n - 1's readings are final, `readingWindow` into slot
    n; with a window of a whole slot that is the first second of slot n + 1, where GridBalance
    refuses row n's announcement of slot n + 1 (``GridBalanceEventNotInFuture``): every
    announcing row was repaired, losing its settlements with it. The bridge now announces
    nothing under such a window and counts the events it did not announce; the rows are mined
    as built, each reconciling the slot before it."""
    with open_chainside(tmp_path, reading_window_seconds=900) as c:
        assert c.market.reconciles and not c.market.announces
        n = len(c.site.prosumers)
        empty = Book(*(np.zeros((3, 1, n), np.int64)))
        first = c.suite.current_slot() + 2
        slots = range(first, first + 3)
        for slot in slots:
            if c.chain.timestamp() <= c.suite.slot_start(slot):
                c.chain.travel_to(c.suite.slot_start(slot) + 1)  # the slot began
            b = SlotBook(empty, REFERENCE, False, True, np.full(n, 1_000))  # DR called for
            assert c.market.enqueue(c.outbox, slot, b, {}) == 1
            if slot > first:  # it reconciles the slot before: final a whole slot later
                c.outbox.step()
                row = c.outbox.row(f"slot:{slot}")
                assert row is not None and "ReadingsNotFinal" in str(row.last_error), row
                c.chain.travel_to(c.suite.slot_start(slot) + c.window)
            assert c.outbox.drain(timeout_s=30), c.outbox.row(f"slot:{slot}")
        assert c.outbox.repairs() == {} and c.outbox.failures() == {}
        assert c.market.unannounced == len(slots)
        for slot in slots:
            step = step_of_args(c.outbox.args(f"slot:{slot}") or [])
            assert not step.parts & PART_DEMAND_RESPONSE
            assert step.parts & PART_RECONCILE or slot == first
        grid = c.chain.contract("GridBalance", c.suite.addresses()["GridBalance"])
        assert grid.events.DemandResponseCreated().get_logs(from_block=0) == []


def test_repairs_leave_out_what_the_chain_refuses_and_wait_for_what_is_not_yet() -> None:
    """Per revert, what a slot row sends instead (`repair_step`)."""
    accounts = ["0x" + "1" * 40, "0x" + "2" * 40]
    order = (accounts[0], 9, 0, 100, 5, 0)
    trades = [(accounts[0], 0, 100, 0)]
    step = SlotStep(
        parts=PART_RECONCILE | PART_PRICE | PART_SETTLE | PART_EMERGENCY, reconcile_slot=8,
        trades=trades, accounts=accounts, settle_slot=9, price=5, orders=[order],
        signatures=[(b"r", b"s")], fills=[100],
    )  # fmt: skip
    prev = SlotStep(parts=PART_PRICE | PART_SETTLE, settle_slot=8, orders=[order], fills=[100])
    for state in (RowState.PENDING, RowState.SIGNED):  # the previous row is on its way: wait
        assert repair_step(step, "EnergyTradingSlotNotCleared", (state, prev), accounts) is None
    for error in ("EnergyTradingReadingsNotFinal", "GridBalanceRecoveryTooEarly"):
        assert repair_step(step, error, (RowState.CONFIRMED, prev), accounts) is None
    # The previous slot will never be cleared (its row failed, or there is none).
    for previous in ((RowState.FAILED, prev), None):
        fixed = repair_step(step, "EnergyTradingSlotNotCleared", previous, accounts)
        assert fixed is not None and fixed[0].parts == step.parts & ~PART_RECONCILE
    # The previous row was repaired to an empty batch: the trade list follows it.
    emptied = dataclasses.replace(prev, orders=[], fills=[])
    fixed = repair_step(
        step, "EnergyTradingTradesMismatch", (RowState.CONFIRMED, emptied), accounts
    )
    assert fixed is not None and fixed[0].trades == [] and fixed[0].parts == step.parts
    fixed = repair_step(step, "EnergyTradingTradesMismatch", (RowState.CONFIRMED, prev), accounts)
    assert fixed is not None and fixed[0].parts == step.parts & ~PART_RECONCILE
    # Already done on chain: that part goes.
    fixed = repair_step(step, "EnforcedPause", None, accounts)
    assert fixed is not None and fixed[0].parts == step.parts & ~PART_EMERGENCY
    fixed = repair_step(step, "EnergyTradingSlotAlreadyCleared", None, accounts)
    assert fixed is not None and fixed[0].parts == step.parts & ~PART_SETTLE
    # A reading evicted from the registry's history: the exporter's reward goes when it names
    # an exporter, else (the reconciliation's own meters) the reconciliation goes.
    exporting = dataclasses.replace(step, exporters=[accounts[1]])
    evicted = {"device": accounts[1], "slot": 8, "heldSlot": 40}
    fixed = repair_step(exporting, "DeviceRegistryReadingEvicted", None, accounts, evicted)
    assert fixed is not None and fixed[0].exporters == [] and fixed[0].parts == step.parts
    fixed = repair_step(fixed[0], "DeviceRegistryReadingEvicted", None, accounts, evicted)
    assert fixed is not None and fixed[0].parts == step.parts & ~PART_RECONCILE
    # Anything else: the orders go, then the reconciliation, then the row fails for good.
    fixed = repair_step(step, "EnergyTradingBatchInsufficientCredit", None, accounts)
    assert fixed is not None and fixed[0].orders == [] and fixed[0].fills == []
    assert fixed[0].parts == step.parts and fixed[1] == "orders"
    fixed = repair_step(fixed[0], "SomethingElse", None, accounts)
    assert fixed is not None and fixed[0].parts == step.parts & ~PART_RECONCILE
    assert repair_step(fixed[0], "SomethingElse", None, accounts) is None


def test_a_refused_demand_response_part_is_left_out_and_the_rest_stands() -> None:
    """GridBalance refusing a row's demand-response part (an id the chain does not hold, its
    pause where the row declares none) drops that part only; a stored row keeps its part."""
    accounts = ["0x" + "1" * 40]
    dr = DemandResponse(
        settle=[3], start_slot=10, duration_slots=1, incentive_per_wh=100,
        participants=[("0x" + "a" * 40, 0, 0, 500)],
    )  # fmt: skip
    step = SlotStep(
        parts=PART_PRICE | PART_SETTLE | PART_DEMAND_RESPONSE, settle_slot=9, demand_response=dr
    )
    assert step_of_args([step.value()]).value() == step.value()  # the part is stored whole
    for error in ("GridBalanceUnknownEvent", "GridBalanceEventClosed", "EnforcedPause"):
        fixed = repair_step(step, error, None, accounts)
        assert fixed == (
            dataclasses.replace(step, parts=PART_PRICE | PART_SETTLE),
            "demand response",
        )
    assert repair_step(step, "GridBalanceReadingsNotFinal", None, accounts) is None  # not yet
    # A row mined after its slot ended: its announcement of the next slot is refused as not in
    # the future; the settlement of event 3 stands. Without settlements the part goes.
    fixed = repair_step(step, "GridBalanceEventNotInFuture", None, accounts)
    assert fixed == (
        dataclasses.replace(step, demand_response=DemandResponse(settle=[3])),
        "demand-response announcement",
    )
    announcing = dataclasses.replace(step, demand_response=dataclasses.replace(dr, settle=[]))
    fixed = repair_step(announcing, "GridBalanceEventNotInFuture", None, accounts)
    without = dataclasses.replace(announcing, parts=PART_PRICE | PART_SETTLE)
    assert fixed == (without, "demand response")
    # A row mined so late that an event's reading is gone from the registry: the settlements
    # go, the announcement, orders and reconciliation stay; the reconciled slot's own reading
    # is the reconciliation's refusal.
    reconciling = dataclasses.replace(
        step, parts=step.parts | PART_RECONCILE, reconcile_slot=8, accounts=accounts,
        orders=[(accounts[0], 9, 0, 100, 5, 0)], fills=[100],
    )  # fmt: skip
    event_gone = {"device": "0x" + "a" * 40, "slot": 2, "heldSlot": 34}
    fixed = repair_step(reconciling, "DeviceRegistryReadingEvicted", None, accounts, event_gone)
    assert fixed is not None and fixed[1] == "demand-response settlements"
    assert fixed[0].demand_response == dataclasses.replace(dr, settle=[])
    assert fixed[0].parts == reconciling.parts and fixed[0].orders == reconciling.orders
    settling_only = dataclasses.replace(reconciling, demand_response=DemandResponse(settle=[3]))
    fixed = repair_step(settling_only, "DeviceRegistryReadingEvicted", None, accounts, event_gone)
    assert fixed is not None and fixed[0].parts == reconciling.parts & ~PART_DEMAND_RESPONSE
    own = {**event_gone, "slot": 8}
    fixed = repair_step(reconciling, "DeviceRegistryReadingEvicted", None, accounts, own)
    assert fixed is not None and fixed[0].parts == reconciling.parts & ~PART_RECONCILE


def test_the_open_events_are_read_back_from_grid_balance() -> None:
    """With every row mined the bridge reads GridBalance's open events back: a repaired-away
    announcement leaves its predicted ids too high, and they are put right (the open ones, the
    next id)."""
    # On chain: 1 and 2 settled, 3 open (slot 8), 4 open (slot 9); nothing after.
    chain = {1: (5, 1, False, True), 2: (6, 1, False, True), 3: (8, 1, False, False)}
    chain[4] = (9, 1, False, False)

    def get_event(event_id: int) -> tuple[int, int, bool, bool]:
        return chain.get(event_id, (0, 0, False, False))

    for predicted in (
        DemandResponseQueue(open=[(3, 8), (5, 9)], next_id=6),  # one announcement left out
        DemandResponseQueue(open=[(7, 9)], next_id=8),  # ids far beyond the chain's
        DemandResponseQueue(open=[(3, 8)], next_id=4),  # one more announced meanwhile
    ):
        read = chain_dr_queue(get_event, predicted)
        assert read.open == [(3, 8), (4, 9)] and read.next_id == 5, predicted
    assert chain_dr_queue(get_event, DemandResponseQueue()).next_id == 5


def test_order_keys_need_a_trading_site_and_a_key_per_household(
    site: SiteManifest, tmp_path: Path
) -> None:
    """Bad input is refused before anything connects, naming the field."""
    dep = Deployment.model_validate(
        {"chainId": 1, "addresses": {"DeviceRegistry": "0x" + "1" * 40, "SlotSettler": "0x"
         + "2" * 40, "EnergyTrading": "0x" + "3" * 40}, "genesis": 0, "slotSeconds": 900}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="expected a `market` section"):
        SlotSettlement(site, dep, prosumer_keys(site))  # the tiny stand-in site trades nothing
    full = build_site(build_grid(load_scenario()), site="site1", seed="0")
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({full.prosumers[0].name: "ab" * 32}))
    with pytest.raises(ConfigError, match=r"chain\.prosumer_keys: expected a key for every"):
        load_prosumer_keys(path, full)
    with pytest.raises(ConfigError, match="expected GridBalance and RewardSystem addresses"):
        SlotSettlement(full, dep, prosumer_keys(full))


def test_missed_slots_are_settled_empty_in_order_at_most_a_day(tmp_path: Path) -> None:
    """No chain needed to queue: the rows for the slots without one come before the next row,
    each reconciling the one before; after a longer absence only the first `MAX_MISSED`."""
    site = build_site(build_grid(load_scenario()), site="site1", seed="0")
    names = ["DeviceRegistry", "SlotSettler", "EnergyTrading", "GridBalance", "RewardSystem"]
    addresses = {name: "0x" + str(k + 1) * 40 for k, name in enumerate(names)}
    dep = Deployment.model_validate(
        {"chainId": 31337, "addresses": addresses, "genesis": 0, "slotSeconds": 900}
    )
    market = SlotSettlement(site, dep, prosumer_keys(site))
    market.configure(600, 900, renewable_rate=3)
    market.start_credit([units(CREDIT)] * len(site.prosumers), [])
    nowhere = Chain(Web3(Web3.HTTPProvider("http://127.0.0.1:9")))
    box = Outbox(tmp_path / "o.db", nowhere, dict(dep.addresses), ANVIL_KEYS[1])
    n = len(site.prosumers)
    book = Book(np.full((1, n), 500), np.full((1, n), REFERENCE), np.zeros((1, n), np.int64))
    assert market.enqueue(box, 10, SlotBook(book, REFERENCE, False)) == 1
    # Slot 10's readings arrive (two meters exported, one imported), then the bridge is down
    # across slots 11 and 12: the row of slot 11, built at slot 13's decision, reconciles slot
    # 10 by the readings the outbox holds, so the two exporters keep their renewable reward.
    meters = [site.device(p.meter) for p in site.prosumers[:3]]
    for meter, wh in zip(meters, (-120, 80, -5), strict=True):
        assert meter is not None
        box.enqueue(f"reading:{meter.id}:10", "DeviceRegistry", "submitReading",
                    ((meter.address, 10, wh, 0), b"sig"))  # fmt: skip
    assert market.enqueue(box, 13, SlotBook(book, REFERENCE, False)) == 3
    steps = {s: step_of_args(box.args(f"slot:{s}") or []) for s in range(10, 14)}
    assert [st.orders == [] for st in steps.values()] == [False, True, True, False]
    assert [st.reconcile_slot for st in steps.values()] == [0, 10, 11, 12]
    exporters = [m.address for m in (meters[0], meters[2]) if m is not None]
    assert sorted(steps[11].exporters) == sorted(exporters)  # each once, in slot 11's row only
    assert steps[12].exporters == [] and steps[13].exporters == []
    assert market.enqueue(box, 14 + MAX_MISSED + 50, SlotBook(book, REFERENCE, False)) == 97
    assert box.row(f"slot:{13 + MAX_MISSED}") is not None
    assert box.row(f"slot:{14 + MAX_MISSED}") is None
    box.close()


def test_an_emergency_ends_in_order_under_an_accelerated_clock(tmp_path: Path) -> None:
    """Under an accelerated bridge clock (a slot of 1-2 wall seconds; the chain's reading window
    longer than a slot, so the rows settle only) an emergency declared in one slot cannot end
    in the next: GridBalance's minimum is 900 s of chain time. The recovery row waits for it
    ("recovery too early"), and the rows behind it, which would trade or declare a new
    emergency on the still paused market, wait behind it instead of being repaired to empty
    batches: nothing wedges, nothing is dropped, every slot settles once, in order, with the
    orders decided for it."""
    with open_chainside(tmp_path, reading_window_seconds=10**8) as c:
        chain, suite, market, outbox = c.chain, c.suite, c.market, c.outbox
        assert not market.reconciles
        n = len(c.site.prosumers)
        rng = np.random.default_rng(11)
        empty = Book(*(np.zeros((3, 1, n), np.int64)))
        first = suite.current_slot() + 2
        chain.travel_to(suite.slot_start(first + 4))  # every gate below has closed
        assert market.enqueue(outbox, first, SlotBook(empty, REFERENCE, True)) == 1
        assert outbox.drain(timeout_s=30)
        declared_at = chain.timestamp()
        books = [random_book(rng, n), random_book(rng, n)]
        # Two wall seconds later, the grid is calm again for two slots, then stressed again.
        for k, b in enumerate([*(SlotBook(x, REFERENCE, False) for x in books),
                               SlotBook(empty, REFERENCE, True)]):  # fmt: skip
            assert market.enqueue(outbox, first + 1 + k, b) == 1
        for _ in range(5):
            outbox.step()
        rows = {s: outbox.row(f"slot:{s}") for s in range(first + 1, first + 4)}
        assert all(r is not None and r.state is RowState.PENDING for r in rows.values()), rows
        assert "GridBalanceRecoveryTooEarly" in str(rows[first + 1].last_error)  # type: ignore[union-attr]
        for s in (first + 2, first + 3):  # behind the recovery in the outbox's slot lane
            assert rows[s].attempts == 0 and rows[s].last_error is None  # type: ignore[union-attr]
        assert outbox.repairs() == {}
        # GridBalance's minimum has passed on chain: the rows go, in order, as decided.
        chain.travel_to(declared_at + 900)
        assert outbox.drain(timeout_s=30)
        for s in range(first, first + 4):
            assert outbox.row(f"slot:{s}").state is RowState.CONFIRMED  # type: ignore[union-attr]
        assert outbox.repairs() == {}
        trading = suite.trading
        events = trading.events.SignedBatchSettled().get_logs(from_block=0)
        settled = {int(e["args"]["slot"]): int(e["args"]["orderCount"]) for e in events}
        assert [int(e["args"]["slot"]) for e in events] == list(range(first, first + 4))
        for k, book in enumerate(books):
            assert settled[first + 1 + k] == int((book.qty_wh[0] > 0).sum()) > 0
        grid = chain.contract("GridBalance", suite.addresses()["GridBalance"])
        assert len(grid.events.EmergencyDeclared().get_logs(from_block=0)) == 2
        assert len(grid.events.Recovered().get_logs(from_block=0)) == 1
        assert chain.call(grid, "paused")


def _queue_reading(c: Chainside, meter_id: str, slot: int, nonce: int) -> None:
    """A meter's signed reading of `slot`, queued as the core queues it."""
    meter = c.site.device(meter_id)
    assert meter is not None
    signer = ReadingSigner(int(c.chain.w3.eth.chain_id), c.suite.registry.address)
    reading = (meter.address, slot, -100 - nonce, nonce)
    c.outbox.enqueue(
        f"reading:{meter_id}:{slot}",
        "DeviceRegistry",
        "submitReading",
        (reading, signer.sign(PrivateKey(device_key("0", meter_id)), *reading)),
        retry_on=("DeviceRegistrySlotNotEnded",),
    )


def test_a_reading_lost_for_good_does_not_block_the_meters_later_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The node is away until a meter's reading of one slot is past its window: that reading
    fails for good. DeviceRegistry takes any nonce above the last used, so the meter's next
    readings land over the gap (under the old exact-nonce rule each was refused, for good, and
    the meter was lost to the chain); the lost one is counted and logged by its revert."""
    with open_chainside(tmp_path) as c:
        chain, suite, outbox = c.chain, c.suite, c.outbox
        outbox.on_failed = log_lost
        meter_id = c.site.prosumers[0].meter
        first = suite.current_slot() + 1
        _queue_reading(c, meter_id, first, 0)
        _queue_reading(c, meter_id, first + 1, 1)
        # Back after the first slot's window (600 s) closed, inside the second's.
        chain.travel_to(suite.slot_start(first + 2) + 1)
        with caplog.at_level(logging.WARNING, logger="bridge.readings"):
            assert outbox.drain(timeout_s=30)
        lost, landed = (outbox.row(f"reading:{meter_id}:{s}") for s in (first, first + 1))
        assert lost is not None and lost.state is RowState.FAILED
        assert landed is not None and landed.state is RowState.CONFIRMED
        assert lost_readings(outbox) == {"DeviceRegistryReadingTooLate": 1}
        [record] = [r for r in caplog.records if r.getMessage() == "reading lost"]
        assert (record.device, record.slot, record.error) == (  # type: ignore[attr-defined]
            meter_id, str(first), "DeviceRegistryReadingTooLate",
        )  # fmt: skip
        chain.travel_to(suite.slot_start(first + 3) + 1)
        _queue_reading(c, meter_id, first + 2, 2)  # and so on: the meter is not lost
        assert outbox.drain(timeout_s=30)
        logs = suite.registry.events.ReadingRecorded().get_logs(from_block=0)
        assert [(int(e["args"]["slot"]), int(e["args"]["nonce"])) for e in logs] == [
            (first + 1, 1), (first + 2, 2),
        ]  # fmt: skip
        meter = c.site.device(meter_id)
        assert meter is not None
        assert chain.call(suite.registry, "nonces", meter.address) == 3
        assert lost_readings(outbox) == {"DeviceRegistryReadingTooLate": 1}


def test_a_meters_readings_reach_the_chain_in_nonce_order(tmp_path: Path) -> None:
    """A reading that met "slot not ended" sits out its backoff while the meter's next reading
    arrives: the registry takes nonces only upwards, so were the next one to go first the
    earlier one would be refused for good. It waits behind the earlier one in the meter's
    outbox lane and both land in order."""
    # A reading window longer than a slot: the first reading is still welcome when the second
    # slot has ended.
    with open_chainside(tmp_path, reading_window_seconds=3 * 900) as c:
        chain, suite, outbox = c.chain, c.suite, c.outbox
        outbox.backoff_s = outbox.backoff_max_s = 3.0
        meter = c.site.device(c.site.prosumers[0].meter)
        assert meter is not None
        signer = ReadingSigner(int(chain.w3.eth.chain_id), suite.registry.address)
        key = PrivateKey(device_key("0", meter.id))
        first = suite.current_slot() + 1
        for nonce, slot in enumerate((first, first + 1)):
            if nonce:  # the first slot ended long ago: the second reading can go at once
                chain.travel_to(suite.slot_start(first + 2) + 1)
            reading = (meter.address, slot, -100 - nonce, nonce)
            outbox.enqueue(
                f"reading:{meter.id}:{slot}",
                "DeviceRegistry",
                "submitReading",
                (reading, signer.sign(key, *reading)),
                retry_on=("DeviceRegistrySlotNotEnded",),
            )  # as the core queues it
            outbox.step()
        first_row, second_row = (outbox.row(f"reading:{meter.id}:{s}") for s in (first, first + 1))
        assert first_row is not None and "DeviceRegistrySlotNotEnded" in str(first_row.last_error)
        assert second_row is not None and second_row.state is RowState.PENDING, second_row
        assert second_row.attempts == 0  # behind the first in the meter's outbox lane
        assert outbox.drain(timeout_s=60)
        for s in (first, first + 1):
            assert outbox.row(f"reading:{meter.id}:{s}").state is RowState.CONFIRMED  # type: ignore[union-attr]
        registry = suite.registry
        logs = registry.events.ReadingRecorded().get_logs(from_block=0)
        assert [(int(e["args"]["slot"]), int(e["args"]["nonce"])) for e in logs] == [
            (first, 0), (first + 1, 1),
        ]  # fmt: skip


def test_open_demand_response_events_survive_a_restart(tmp_path: Path) -> None:
    """The events announced by queued rows and not settled yet are stored with the rows: a
    bridge restarted on the same outbox file settles them (by their predicted ids) and numbers
    its next announcement after them, as the chain will."""
    site = build_site(build_grid(load_scenario()), site="site1", seed="0")
    names = ["DeviceRegistry", "SlotSettler", "EnergyTrading", "GridBalance", "RewardSystem"]
    addresses = {name: "0x" + str(k + 1) * 40 for k, name in enumerate(names)}
    dep = Deployment.model_validate(
        {"chainId": 31337, "addresses": addresses, "genesis": 0, "slotSeconds": 900}
    )
    nowhere = Chain(Web3(Web3.HTTPProvider("http://127.0.0.1:9")))
    n = len(site.prosumers)
    empty = Book(*(np.zeros((3, 1, n), dtype=np.int64)))
    baselines = np.arange(n, dtype=np.int64) * 100  # the first household expects to export
    stressed = SlotBook(empty, REFERENCE, False, True, baselines)

    def bridge() -> tuple[SlotSettlement, Outbox]:
        market = SlotSettlement(site, dep, prosumer_keys(site))
        market.configure(600, 900)
        market.start_credit([units(CREDIT)] * n, [])
        return market, Outbox(tmp_path / "o.db", nowhere, dict(dep.addresses), ANVIL_KEYS[1])

    def part(box: Outbox, slot: int) -> tuple[list[int], int, int]:
        step = step_of_args(box.args(f"slot:{slot}") or [])
        dr = step.demand_response
        announced = len(dr.participants) if step.parts & PART_DEMAND_RESPONSE else 0
        return [int(x) for x in dr.settle], int(dr.start_slot), announced

    market, box = bridge()
    assert market.enqueue(box, 10, stressed) == 1
    assert market.enqueue(box, 11, stressed) == 1
    assert part(box, 10) == ([], 11, n - 1)  # every household but the exporter takes part
    assert part(box, 11) == ([], 12, n - 1)  # slot 11's event is not over yet
    box.close()
    market, box = bridge()  # restarted: nothing in memory
    assert market.enqueue(box, 12, stressed) == 1
    assert part(box, 12) == ([1], 13, n - 1)
    assert market.dr_queue.open == [(2, 12), (3, 13)] and market.dr_queue.next_id == 4
    # A row decided again after the restart queues nothing and leaves the queue as it was.
    assert market.enqueue(box, 12, stressed) == 0
    assert market.dr_queue.open == [(2, 12), (3, 13)]
    box.close()
