"""The bridge's slot transactions on anvil with a real reading window, the chain's clock driven
slot by slot: each ``SlotSettler.run`` row reconciles the previous slot, posts the price and
settles the slot's orders, once; afterwards every account's credit is what the env's mirror
ledger (`envs.ledger.MirrorLedger`, the suite's rules) gives for the same books and readings.

No broker here: the books are drawn at random (limit prices distinct on each side, so no two
marginal orders share a remainder and the batch order cannot matter), the readings signed with
the meters' keys and relayed by the same outbox, as the run loop does.
"""

from __future__ import annotations

import dataclasses
import json
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
from bridge.registration import enrol_market, owner_of, prosumer_keys, register_site
from bridge.settlement import (
    MAX_MISSED,
    RETRY_ON,
    SlotBook,
    SlotSettlement,
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
    PART_EMERGENCY,
    PART_PRICE,
    PART_RECONCILE,
    PART_RECOVER,
    PART_SETTLE,
    ReadingSigner,
    SlotStep,
)
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
    site = build_site(build_grid(load_scenario()), site="site1", seed="0")
    with anvil() as url:
        chain = Chain.rpc(url)
        # RewardSystem's rate and budget as the env's chain ledger deploys them.
        rate = per_wh(MarketConfig().renewable_reward_per_kwh)
        suite = deploy_suite(chain, config=SuiteConfig(renewable_rate_per_wh=rate))
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
    """A demand-response event (every emergency is one too: its threshold is lower)."""
    cancel: bool = False
    missed: bool = False


def drive(c: Chainside, plans: list[Plan]) -> tuple[range, MirrorLedger, dict[int, np.ndarray]]:
    """Slot by slot, as the run loop: the previous slot's signed readings relayed, then this
    slot's row queued (`SlotSettlement.enqueue`) and mined once the previous slot's readings
    are final; the mirror ledger settles the same slots as the chain should have. One more
    slot, without orders, reconciles the last. Returns the slots, the mirror and the rewards
    it granted for each slot."""
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
    loads = [rng.uniform(0.2, 3.0, n) for _ in plans]
    shares = [rng.uniform(0.0, 0.8, n) * p.dr for p in plans]
    flexible, dt = market.market.flexible_share, site.dt_h
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
            rewards[slot - 1] = mirror.settle(
                SlotInput(
                    slot=np.array([slot - 1]), book=settled_book,
                    reference=np.array([REFERENCE]), metered_wh=metered[None].copy(),
                    dr_event=np.array([plans[k - 1].dr]),
                    dr_reduction_wh=np.rint(
                        shares[k - 1] * flexible * loads[k - 1] * dt * 1000.0
                    ).astype(np.int64)[None],
                    emergency=np.array([emergency]),
                )
            ).rewards[0]  # fmt: skip
            assert outbox.drain(timeout_s=30)
            # Every row mined: the tracked credit becomes the chain's, as the run loop does.
            market.credit = np.array([suite.credit_of(a) for a in market.accounts])
        if plan.missed:  # no row: the next one settles this slot empty
            settled_book = empty
            continue
        # What the run loop knows of the previous slot's meters when it decides this one.
        known = {market.accounts[j]: int(metered[i]) for j, i in enumerate(market.order)}
        last_load = loads[k - 1] if k else None
        b = SlotBook(book, REFERENCE, plan.emergency, plan.dr, shares[k], last_load)
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
    return slots, mirror, rewards


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


def check_ledger(
    c: Chainside, slots: range, mirror: MirrorLedger, rewards: dict[int, np.ndarray]
) -> set[int]:
    """Every slot settled once and reconciled by the next slot's row; the chain's credits and
    treasury afterwards are the mirror's, and so are the rewards granted for the slots in
    `rewards` (the env's ledger grants them at the reconciliation). Returns the reward kinds
    granted."""
    chain, suite, site = c.chain, c.suite, c.site
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
    want = np.sum(list(rewards.values()), axis=0)
    assert [granted[a] for a in owners] == [int(x) for x in want]
    assert want.sum() > 0  # some households exported
    return kinds


def test_slot_rows_reconcile_the_previous_slot_and_settle_as_the_mirror(
    chainside: Chainside,
) -> None:
    slots, mirror, rewards = drive(chainside, [Plan()] * 5)
    check_ledger(chainside, slots, mirror, rewards)
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
    slots, mirror, rewards = drive(c, plans)
    # The missed slot's empty row reconciles the slot before it without readings held: that
    # slot's renewable rewards are not granted (the one loss, see bridge.settlement).
    del rewards[slots.start + 4]
    kinds = check_ledger(c, slots, mirror, rewards)
    assert kinds == {int(RewardKind.RENEWABLE), int(RewardKind.DEMAND_RESPONSE)}
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
    market.configure(600, 900)
    market.start_credit([units(CREDIT)] * len(site.prosumers), [])
    nowhere = Chain(Web3(Web3.HTTPProvider("http://127.0.0.1:9")))
    box = Outbox(tmp_path / "o.db", nowhere, dict(dep.addresses), ANVIL_KEYS[1])
    n = len(site.prosumers)
    book = Book(np.full((1, n), 500), np.full((1, n), REFERENCE), np.zeros((1, n), np.int64))
    assert market.enqueue(box, 10, SlotBook(book, REFERENCE, False)) == 1
    assert market.enqueue(box, 13, SlotBook(book, REFERENCE, False)) == 3
    steps = {s: step_of_args(box.args(f"slot:{s}") or []) for s in range(10, 14)}
    assert [st.orders == [] for st in steps.values()] == [False, True, True, False]
    assert [st.reconcile_slot for st in steps.values()] == [0, 10, 11, 12]
    assert market.enqueue(box, 14 + MAX_MISSED + 50, SlotBook(book, REFERENCE, False)) == 97
    assert box.row(f"slot:{13 + MAX_MISSED}") is not None
    assert box.row(f"slot:{14 + MAX_MISSED}") is None
    box.close()
