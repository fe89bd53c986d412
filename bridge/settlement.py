"""The prosumers' orders of each slot, settled on chain in one ``SlotSettler.run`` per slot.

The env's market, restated nowhere: when the bridge has decided slot `s`, each household bids
by the env's default rule (`envs.market.rule_book`, the code the env's gate runs) on what the
bridge holds at that moment, the same inputs the env's gate reads:

* forecast load and PV of the slot: the first lead of the observation's forecasts (with the
  bridge's persistence forecast, the last slot's telemetry, as the env's `persistence` mode);
* SoC, capacity and backlog from the devices' telemetry; the decided battery set-points (the
  shield's kW), PV curtailment and demand-response shares;
* the reference price: the `community_price` the policy observed, in contract units; emergency
  mode (no trading) when the grid sensor's transformer loading is above the scenario's limit.

The orders are then signed with the households' keys, the ones the contract would refuse left
out (escrow beyond credit), cleared with ``contracts.clearing`` and put with the slot's price
parameters into one ``SlotSettler.run`` step by ``contracts.slot_batch``: the code the env's
chain ledger builds its step with, so the transaction tested against py-evm and anvil in
tests/envs is the one the bridge sends.

When, and which slot it reconciles: the row for slot `n` is queued at `n`'s decision (its gate
closed five minutes before it began, so its orders can be settled as soon as they are known)
and, as the env's chain ledger does, it first reconciles slot n - 1 (``reconcileSlot``: traded
against metered energy, imbalance charges and payouts, the sellers' held proceeds released),
under the price parameters n - 1 was settled with, before posting n's. The contract takes that
only once n - 1's reading window has closed, which is some minutes into slot n: the outbox's
pre-flight meets ``EnergyTradingReadingsNotFinal`` until then and retries with backoff (a "not
yet", like the gate), then signs and sends. A chain whose reading window is longer than a slot
(the integration tests' accelerated clock, whose window spans years) cannot do this inside a
slot: there the rows settle only (`SlotSettlement.configure`). The previous slot's trades come
from its own stored row, so a restarted bridge reconciles what its predecessor settled.

Emergencies, by the env's rule (`contracts.slot_batch.emergency_parts`, which the env's chain
ledger runs too): the row of the first slot whose transformer loading is above
``market.emergency_loading`` declares the emergency (``PART_EMERGENCY``, after the
reconciliation: the slot trades nothing, its batch is empty), the row of the first slot below it
ends it (``PART_RECOVER``, first thing). The bridge tracks the market's state as the chain will
hold it after its queued rows (read from GridBalance at start and whenever every row is mined);
a recovery that comes before GridBalance's minimum emergency is a "not yet".

Nothing wedges the queue: a row the chain refuses is repaired, not dropped (`repair_step`, the
outbox's `repair` hook): a "not yet" waits, a part the chain already did is left out, and any
other refusal sends the slot again with no orders, so it is still cleared and the next row can
reconcile it; only a row with nothing left to send fails for good, and the next row then leaves
out its reconciliation. A row that would trade while an earlier row's end of the emergency still
waits for GridBalance's minimum (an accelerated clock: the minimum is 900 s of chain time, many
slots of wall time) waits behind it instead of settling empty (`recovery_ahead`). Each repair
is logged and counted (``bridge_outbox_repairs``). A slot that got no row at all (the bridge was
down across it) is settled empty by the next row's enqueue, in order, so every slot is still
reconciled by the next (`SlotSettlement.enqueue`).

Rewards: the reconciliation of slot n - 1 grants the renewable reward (``rewardRenewable``) of
every meter whose reading of n - 1 the bridge held at n's decision (in memory, or as its
``reading:`` row in the outbox) and which exported, as the env's ledger lists its exporters
(none where RewardSystem's rate is 0). The empty row of a missed slot reconciles the slot
before it by the readings the outbox holds for that slot (`held_readings`), so the slot whose
readings did arrive keeps its renewable rewards, granted once, by that row only. A meter whose
reading never reached the chain, or a RewardSystem without funds, loses only that reward (a
repair).

Demand response is GridBalance's own events, in the row's last part (``PART_DEMAND_RESPONSE``), by
the rule the env's chain ledger runs (`contracts.slot_batch.DemandResponseQueue`): when the grid
sensor's state at n's decision calls for demand response (`envs.market_kernel.grid_events`:
transformer loading above ``market.dr_loading`` or a voltage deviation beyond
``market.dr_voltage_pu``) and neither it nor the state before called for an emergency, row n
announces a one-slot event for slot n + 1 (the first a block of slot n may announce), with every
household expected to import taking part at a baseline of that expected import (the observation's
forecast of slot n + 1, Wh); and, when the row does not leave an emergency in force, it settles the
open events of slots up to n - 1, whose readings are final once it may reconcile n - 1 (rows that
do not reconcile, on a chain whose reading window is longer than a slot, run no demand response:
their events could not be settled): GridBalance pays each household ``market.dr_incentive_per_wh``
per Wh its meter read below its baseline. These are the env's events: the env announces the event
for slot n + 1 in slot n - 1's transaction, mined at the start of slot n from the same grid state,
and settles in slot n's transaction what row n settles. An event an emergency held 32 slots or more
is forfeited, as the env's mirror forfeits it: DeviceRegistry no longer holds its slot's readings
(`contracts.slot_batch.settles`; settling it would revert the whole row, whose repairs once
stripped the recovery row's orders and reconciliation instead). Event ids are predicted (the bridge
announces every event), and the open events are kept in the outbox's SQLite file in the same
transaction as the row that changed them (`bridge.dr_store`), so a restart settles every event its
predecessor announced.

The meters' readings stay in their own outbox rows (``reading:<device>:<slot>``): each is
signed by its device and owed to the chain whenever it arrives inside its reading window, also
after a drop-out, a broker restart or a bridge restart (the broker redelivers it); bundling
them into the slot's transaction would either hold the settlement back for the last late meter
or drop that meter's reading. Nothing is lost by the split: the chain holds the next slot's
reconciliation back until the window closed, when no further reading of the slot can count.

Exactly once: the row's key is ``slot:<n>``, queued durably at the decision; a bridge restarted
mid-slot that decides the slot again finds the key and adds nothing, and the outbox sends the
stored signed bytes with their nonce (see `bridge.outbox`). The contract is the last guard: a
slot is cleared once (``EnergyTradingSlotAlreadyCleared``) and reconciled once
(``EnergyTradingSlotAlreadyReconciled``), so even a second transaction could not do either
twice.

Credit: a buy order whose escrow exceeds the buyer's free credit makes the whole batch revert,
so such orders are left out, as the env's ledger refuses them. The bridge tracks each account's
credit as the chain will hold it: read once at start (less the payments of its own slot rows not
yet mined), less every batch's payments as it queues them (buyers pay fill x price at
settlement), and read again from the chain whenever every slot row is mined (a
reconciliation's charges and payouts are known only then). The escrow check also holds back
the most the previous slot's reconciliation in the same transaction can charge (its shortfall
at the shortfall price, `charge_bound`), so a slot never waits on a chain read, and a batch
does not revert for credit unless a household withdrew meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from coincurve import PrivateKey

from bridge import dr_store
from bridge.config import Deployment
from bridge.decision import Decision
from bridge.errors import ConfigError
from bridge.observation import Observation
from bridge.outbox import WAIT, Outbox, Repair, RowState
from bridge.signing import address_of
from bridge.site import SiteManifest, SiteMarket
from contracts.clearing import clear_book
from contracts.client import CLEARING_GAS, order_domain
from contracts.errors import ContractRevert
from contracts.model import PriceParams, Side, imbalance_prices
from contracts.settler import (
    PART_DEMAND_RESPONSE,
    PART_EMERGENCY,
    PART_RECONCILE,
    PART_RECOVER,
    PART_SETTLE,
    DemandResponse,
    OrderSigner,
    SlotStep,
)
from contracts.slot_batch import (
    Bid,
    DemandResponseQueue,
    Reconciliation,
    SignedBatch,
    emergency_parts,
    price_params,
    signed_batch,
    slot_step,
    step_trades,
)
from envs.codec import Codec
from envs.market import Book, RuleInputs, rule_book, to_units
from envs.market_kernel import grid_events

#: The key of slot `n`'s row in the outbox.
SLOT_KEY = "slot:{}"

#: The most slots without a row settled empty before the next row (a day of 15 min slots).
MAX_MISSED = 96

log = logging.getLogger("bridge.settlement")

#: "Not yet" for a slot row: the slot's gate has not closed on chain, the previous slot's
#: readings are not final yet (for its reconciliation, rewards or demand-response events), the
#: previous slot's own row has not been mined yet, or the emergency declared in an earlier row
#: has not lasted GridBalance's minimum yet.
RETRY_ON = (
    "EnergyTradingGateOpen",
    "EnergyTradingReadingsNotFinal",
    "EnergyTradingSlotNotCleared",
    "GridBalanceReadingsNotFinal",
    "GridBalanceRecoveryTooEarly",
    "RewardSystemReadingsNotFinal",
)

#: GridBalance refusals of a row's demand-response part (an event already settled or never
#: announced: the predicted ids went wrong after a repair; the announced slot already begun):
#: that part is left out, the rest of the row stands.
DR_REFUSALS = frozenset(
    {
        "GridBalanceEventClosed",
        "GridBalanceUnknownEvent",
        "GridBalanceEventNotInFuture",
        "GridBalanceNotActiveMeter",
        "GridBalanceInvalidParticipants",
    }
)

#: Reverts that refuse a row's reconciliation of the previous slot (the rest of the row stands).
RECONCILE_REFUSALS = frozenset(
    {
        "EnergyTradingSlotAlreadyReconciled",
        "EnergyTradingTradesMismatch",
        "EnergyTradingTradeAccountMismatch",
        "EnergyTradingAccountsNotSorted",
        "EnergyTradingTreasuryShort",
        # A meter's reading of the slot was overwritten by its reading 32 slots later
        # (DeviceRegistry keeps READING_HISTORY_SLOTS): the slot can never be reconciled.
        "DeviceRegistryReadingEvicted",
    }
)

#: Reward refusals that name one exporting meter (`device`): only its reward is left out. An
#: evicted reading names the meter too; when that meter is no exporter, the refusal came from
#: the reconciliation (`RECONCILE_REFUSALS`).
ONE_EXPORTER = frozenset(
    {"RewardSystemNoExport", "RewardSystemAlreadyRewarded", "DeviceRegistryReadingEvicted"}
)

#: Reverts that say the chain already is where a part would take it: that part is left out
#: (an emergency already declared, one already ended, the slot already cleared).
DONE_ALREADY = {
    "EnforcedPause": PART_EMERGENCY,
    "ExpectedPause": PART_RECOVER,
    "EnergyTradingSlotAlreadyCleared": PART_SETTLE,
}


def load_prosumer_keys(path: Path, site: SiteManifest) -> dict[str, bytes]:
    """`chain.prosumer_keys`: {prosumer name: hex key}, one for every prosumer of the site."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"chain.prosumer_keys: expected a JSON file of prosumer keys at {path} ({exc})"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError("chain.prosumer_keys: expected a mapping {prosumer name: hex key}")
    missing = [p.name for p in site.prosumers if p.name not in raw]
    if missing:
        raise ConfigError(
            f"chain.prosumer_keys: expected a key for every prosumer, {missing[:5]} have none"
        )
    try:
        return {p.name: bytes.fromhex(str(raw[p.name]).removeprefix("0x")) for p in site.prosumers}
    except ValueError:
        raise ConfigError("chain.prosumer_keys: expected hex private keys") from None


@dataclass(frozen=True)
class SlotBook:
    """One slot's orders by the env's rule, in prosumer (codec) order, and what fixed them."""

    book: Book
    reference: int
    """Money units per Wh (>= 1)."""
    emergency: bool
    dr_event: bool = False
    """The grid sensor's reading calls for demand response (`grid_events`, the env's rule)."""
    dr_baseline_wh: np.ndarray | None = None
    """(n,) prosumer order: each household's expected import in the next slot (Wh, >= 0), its
    baseline in the event the row announces."""


class SlotSettlement:
    """Builds each slot's ``SlotSettler.run`` for one site (see the module docstring)."""

    def __init__(
        self, site: SiteManifest, deployment: Deployment, keys: Mapping[str, bytes]
    ) -> None:
        if site.market is None:
            raise ConfigError(
                "site: expected a `market` section to submit orders (write the manifest again "
                "with `microgrid devices site`), or leave chain.prosumer_keys unset"
            )
        missing = [
            name
            for name in ("SlotSettler", "EnergyTrading", "GridBalance", "RewardSystem")
            if name not in deployment.addresses
        ]
        if missing:
            raise ConfigError(
                f"chain.deployment: expected {' and '.join(missing)} addresses to submit orders "
                "(a manifest written by `deployment_manifest` has them)"
            )
        self.site = site
        self.market: SiteMarket = site.market
        self.n = n = len(site.prosumers)
        owners = [address_of(keys[p.name]) for p in site.prosumers]
        self.order = sorted(range(n), key=lambda k: int(owners[k], 16))
        """Batch order: prosumers (codec indices) by increasing owner address."""
        self.accounts = [owners[k] for k in self.order]
        self.keys = [PrivateKey(keys[site.prosumers[k].name]) for k in self.order]
        trading = deployment.addresses["EnergyTrading"]
        self.signer = OrderSigner(order_domain(deployment.chain_id, trading))
        self.batteries = site.batteries.params()
        self.credit = np.zeros(n, dtype=np.int64)
        """Free credit by batch position, as the chain will hold it after every row enqueued."""
        self.meters = {site.prosumers[k].meter: owners[k] for k in range(n)}
        """Meter device id -> the account it meters to."""
        by_id = {d.id: d.address for d in site.devices}
        self.meter_of = {owners[k]: by_id[site.prosumers[k].meter] for k in range(n)}
        """Account -> its meter's device address, in prosumer (codec) order, as the env lists
        exporters."""
        self.renewable_rate = 0
        """RewardSystem's reward per exported Wh (`configure`): 0 grants nothing."""
        self.owners = owners
        """Accounts in prosumer (codec) order."""
        self.dr_queue = DemandResponseQueue()
        """GridBalance events announced by the rows queued and not settled yet, as the chain
        will hold them after every row enqueued (loaded from, and saved with the rows in, the
        outbox's file: `bridge.dr_store`)."""
        self._dr_loaded = False
        meter_cap = {d.id: d.capacity_w * 900 // 3600 for d in site.devices}
        self.cap_wh = [meter_cap[site.prosumers[k].meter] for k in self.order]
        self.reconciles = False
        """Whether a slot's transaction reconciles the previous slot: only where the chain's
        reading window is at most a slot (`configure`)."""
        self.announces = False
        """Whether a row may announce a demand-response event: only where the chain's reading
        window is shorter than a slot (`configure`)."""
        self.unannounced = 0
        """Rows whose grid state called for demand response and that announced nothing, as
        GridBalance would refuse the event (`configure`)."""
        self.paused = False
        """Whether the chain's market will be in an emergency after every row enqueued."""

    def configure(self, reading_window_s: int, slot_seconds: int, renewable_rate: int = 0) -> None:
        """The chain's reading window decides whether slot `n`'s transaction may reconcile slot
        n - 1: it can be mined once n - 1's window closed, inside slot n, only if the window is
        at most a slot (the integration tests' accelerated clock uses a window of years).
        `renewable_rate` is RewardSystem's: with 0 no row lists exporters (each would revert
        for a zero grant), as the env's ledger lists none.

        Row n announces the event of slot n + 1, which GridBalance takes only from a block of
        slot n or earlier (``GridBalanceEventNotInFuture``), and the row can be mined only once
        n - 1's readings are final, `reading_window_s` into slot n: a window of a whole slot
        leaves no block for it, so every announcement would revert (and be repaired away, with
        the row's settlements). Such rows announce nothing; they still settle earlier events,
        and each one that would have announced is counted (`unannounced`) and logged."""
        self.reconciles = reading_window_s <= slot_seconds
        self.announces = reading_window_s < slot_seconds
        self.renewable_rate = renewable_rate
        if self.reconciles and not self.announces:
            log.warning(
                "demand-response events not announced: the reading window leaves no block of a "
                "slot in which its row may announce the next slot's event",
                extra={"reading_window_s": reading_window_s, "slot_seconds": slot_seconds},
            )

    def exporters(self, metered: Mapping[str, int]) -> list[str]:
        """The meters (device addresses) that exported in the reconciled slot, by the readings
        held (`metered`, Wh by account), in the env's order: what earns the renewable reward."""
        if not self.renewable_rate:
            return []
        return [m for a, m in self.meter_of.items() if metered.get(a, 0) < 0]

    def book(self, obs: Observation, decision: Decision, codec: Codec) -> SlotBook:
        """The slot's orders by the env's default rule on the decision's inputs."""
        n, m, h = self.n, self.market, self.site.horizon
        raw = obs.raw
        action = codec.decode_action(np.asarray(decision.action, dtype=np.float64)[None])
        reference = max(int(to_units(np.asarray(raw["community_price"][0, 0]))), 1)
        inputs = RuleInputs(
            load_kw=np.asarray(raw["load_forecast"]).reshape(n, h)[:, 0],
            pv_kw=np.asarray(raw["pv_forecast"]).reshape(n, h)[:, 0],
            dr_share=action.dr_share[0],
            curtailment=action.pv_curtailment[0],
            backlog_kwh=raw["backlog"][0],
            soc=obs.soc[:n],
            capacity_kwh=obs.capacity_kwh[:n],
            battery_kw=np.asarray(decision.report.applied_kw, dtype=np.float64)[:n],
        )
        book = rule_book(
            inputs, reference, batteries=self.batteries, dt_h=self.site.dt_h,
            flexible_share=m.flexible_share, rebound_per_step=m.rebound_per_step,
            bid_markup=m.bid_markup, band_low_bps=m.band_low_bps, band_high_bps=m.band_high_bps,
        )  # fmt: skip
        grid = np.asarray(raw["grid"])[0]
        dr, emergency = grid_events(
            float(grid[0]), float(grid[1]), float(grid[3]),
            m.dr_loading, m.dr_voltage_pu, m.emergency_loading,
        )  # fmt: skip
        # The next slot's expected import (the forecast's second lead): the env's baseline is
        # its observation's forecast of the slot it announces (`announce_range`), the same.
        lead = min(1, h - 1)
        net_kw = (
            np.asarray(raw["load_forecast"]).reshape(n, h)[:, lead]
            - np.asarray(raw["pv_forecast"]).reshape(n, h)[:, lead]
        )
        baseline = np.maximum(np.rint(net_kw * self.site.dt_h * 1000.0), 0).astype(np.int64)
        return SlotBook(book, reference, bool(emergency), bool(dr), baseline)

    def batch(
        self,
        slot: int,
        b: SlotBook,
        previous: SlotStep | None = None,
        metered: Mapping[str, int] | None = None,
    ) -> SignedBatch:
        """Sign and clear the slot's orders in batch order against the tracked credit, less
        what reconciling `previous` in the same transaction may charge (`charge_bound`)."""
        book = b.book
        bids = [
            Bid(self.accounts[j], int(book.side[0, k]), int(book.qty_wh[0, k]),
                int(book.limit[0, k]))
            for j, k in enumerate(self.order)
        ]  # fmt: skip
        credit = self.credit.copy()
        if previous is not None and self.reconciles:
            credit -= self.charge_bound(previous, metered or {})
        return signed_batch(
            slot, bids, [int(c) for c in credit], b.emergency, self.keys, self.signer
        )

    def charge_bound(self, previous: SlotStep, metered: Mapping[str, int]) -> np.ndarray:
        """Per account (batch order), the most that reconciling the `previous` slot can take
        from its credit: its shortfall (metered - bought + sold, `metered` by owner address;
        an unknown meter counts at its registered cap) at the slot's shortfall price."""
        params, tod = previous.price_params
        posted = PriceParams(
            base_rate=int(params[0]), demand_factor_bps=int(params[1]),
            grid_stress_factor_bps=int(params[2]), band_low_bps=int(params[3]),
            band_high_bps=int(params[4]), imbalance_penalty_bps=int(params[5]),
            tod_multiplier_bps=tuple(int(t) for t in tod),
        )  # fmt: skip
        bids = [(str(o[0]), int(o[2])) for o in previous.orders]
        volume = sum(f for (_, side), f in zip(bids, previous.fills, strict=True) if side == 0)
        short, _ = imbalance_prices(posted, previous.settle_slot, previous.price, volume)
        net = np.array([metered.get(a, self.cap_wh[j]) for j, a in enumerate(self.accounts)])
        index = {a: j for j, a in enumerate(self.accounts)}
        for (owner, side), fill in zip(bids, previous.fills, strict=True):
            net[index[owner]] += -int(fill) if side == int(Side.BUY) else int(fill)
        return np.maximum(net, 0).astype(np.int64) * short

    def step(
        self,
        batch: SignedBatch,
        b: SlotBook,
        previous: SlotStep | None = None,
        metered: Mapping[str, int] | None = None,
        demand_response: DemandResponse | None = None,
    ) -> SlotStep:
        """The slot's ``run`` step: reconcile the `previous` slot (its stored step) when the
        chain's reading window lets a slot's transaction do so, with the renewable reward of
        its exporters by the readings held (`metered`), post this slot's reference price,
        settle its batch, then settle and announce demand-response events
        (`demand_response`, `dr_part`)."""
        m = self.market
        params = price_params(b.reference, m.band_low_bps, m.band_high_bps, m.imbalance_penalty_bps)
        reconcile = None
        if previous is not None and self.reconciles:
            trades = step_trades(previous, self.accounts)
            reconcile = Reconciliation(
                previous.settle_slot,
                trades,
                self.accounts,
                self.exporters(metered or {}),
            )
        declare, recover = emergency_parts(b.emergency, self.paused)
        return slot_step(
            params, batch, reconcile=reconcile, declare_emergency=declare, recover=recover,
            demand_response=demand_response,
        )  # fmt: skip

    def dr_part(self, slot: int, b: SlotBook, queue: DemandResponseQueue) -> DemandResponse | None:
        """Row `slot`'s demand-response part, taken from `queue` (see the module docstring):
        none in an emergency (GridBalance refuses it while paused); the open events up to
        slot - 1 settled when the row reconciles slot - 1 (their readings are final then);
        an event for slot + 1 announced when the grid calls for demand response and neither
        this row's state nor the last one's was an emergency (the env's rule), with the
        households expected to import, in batch order. None either where rows do not
        reconcile (a reading window longer than a slot): their events could never be settled."""
        if b.emergency or not self.reconciles:
            return None
        baselines: list[tuple[str, int]] = []
        if b.dr_event and not self.paused and not self.announces:
            self.unannounced += 1
            log.info(
                "demand-response event not announced (GridBalance would refuse it)",
                extra={"slot": slot, "announced_slot": slot + 1, "reason": "reading_window"},
            )
        elif b.dr_event and not self.paused and b.dr_baseline_wh is not None:
            baselines = [
                (self.meter_of[self.owners[k]], int(b.dr_baseline_wh[k])) for k in self.order
            ]
        forfeited = queue.forfeited(slot - 1)
        if forfeited:  # an emergency held them past the registry's history of readings
            log.warning(
                "demand-response events forfeited",
                extra={"slot": slot, "events": [e for e, _ in forfeited]},
            )
        return queue.part(slot - 1, slot + 1, self.market.dr_incentive_per_wh, baselines)

    def enqueue(
        self, outbox: Outbox, slot: int, b: SlotBook, metered: Mapping[str, int] | None = None
    ) -> int:
        """Queue slot `slot`'s row (``SLOT_KEY``); returns how many rows were queued.

        Every slot since the last slot row that has none (the bridge was down across it, or
        decided nothing) is first settled empty, in order, as the paused market settles a slot:
        each such row reconciles the slot before it and clears its own, so the slot rows stay
        one a slot and every settled slot is reconciled by the next. After a longer absence
        than `MAX_MISSED` slots only the first `MAX_MISSED` are: the last row's slot, the one
        that holds trades, is reconciled, and the last empty one is not. A key already there
        (decided again after a restart) queues nothing. The rows and the demand-response
        queue they leave are committed together (`bridge.dr_store`)."""
        if outbox.row(SLOT_KEY.format(slot)) is not None:
            return 0
        if not self._dr_loaded:  # the queue as this outbox's rows left it, before a restart
            self.dr_queue = dr_store.load(outbox.db)
            self._dr_loaded = True
        queued = 0
        with outbox.transaction():
            latest = outbox.latest("slot:")
            if latest is not None:
                first = int(latest.split(":")[1]) + 1
                for missed in range(first, min(slot, first + MAX_MISSED)):
                    held_before = self.held_readings(outbox, missed - 1)
                    queued += self._queue(outbox, missed, None, held_before)
            held = self.held_readings(outbox, slot - 1, skip=metered or {})
            queued += self._queue(outbox, slot, b, {**held, **(metered or {})})
            dr_store.save(outbox.db, self.dr_queue)
        return queued

    def held_readings(
        self, outbox: Outbox, slot: int, skip: Mapping[str, int] | None = None
    ) -> dict[str, int]:
        """The meters' readings of `slot` the outbox holds (their ``reading:<device>:<slot>``
        rows, not failed), Wh by owner account, leaving out the accounts in `skip`.

        Why: the row that reconciles a slot lists its exporters by the readings held, and the
        row of a missed slot is built without any telemetry in memory; the outbox still has the
        readings of the slot before it (they arrived, and are owed to the chain), so its
        renewable rewards are granted as the env's ledger grants them, by the same rows that
        put the readings on chain. A failed row's reading never reached the chain: its reward
        would revert, so it is not counted."""
        out: dict[str, int] = {}
        for meter, owner in self.meters.items():
            if skip is not None and owner in skip:
                continue
            key = f"reading:{meter}:{slot}"
            row = outbox.row(key)
            if row is None or row.state is RowState.FAILED:
                continue
            args = outbox.args(key)
            if args:
                out[owner] = int(args[0][2])
        return out

    def _queue(
        self, outbox: Outbox, slot: int, b: SlotBook | None, metered: Mapping[str, int]
    ) -> int:
        previous = None
        key = SLOT_KEY.format(slot - 1)
        row, args = outbox.row(key), outbox.args(key)
        if row is not None and args is not None and row.state is not RowState.FAILED:
            previous = step_of_args(args)
        if b is None:  # a missed slot: no orders, the last posted price, the emergency as is
            reference = 1 if previous is None else int(previous.price_params[0][1])
            empty = np.zeros((1, self.n), dtype=np.int64)
            b = SlotBook(Book(empty, empty, empty), max(reference, 1), self.paused)
        batch = self.batch(slot, b, previous, metered)
        queue = dataclasses.replace(self.dr_queue, open=list(self.dr_queue.open))
        step = self.step(batch, b, previous, metered, self.dr_part(slot, b, queue))
        if not outbox.enqueue(
            SLOT_KEY.format(slot), "SlotSettler", "run", (step.value(),),
            gas=CLEARING_GAS, retry_on=RETRY_ON,
        ):  # fmt: skip
            return 0
        self.charge(batch)
        self.paused = b.emergency
        self.dr_queue = queue
        return 1

    def repairer(self, outbox: Outbox) -> Repair:
        """The outbox's repair hook for slot rows (`repair_step`), reading the rows of
        `outbox` (the worker's: the hook runs on its thread); each repair is logged."""

        def repair(
            key: str, err: ContractRevert, args: list[Any]
        ) -> tuple[Any, str] | Literal["wait"] | None:
            if not key.startswith("slot:"):
                return None
            step = step_of_args(args)
            if err.name == "EnforcedPause" and recovery_ahead(outbox, step):
                return WAIT  # settled once the earlier row ended the emergency, in order
            previous = None
            if step.parts & PART_RECONCILE:
                prev_key = SLOT_KEY.format(step.reconcile_slot)
                row, prev_args = outbox.row(prev_key), outbox.args(prev_key)
                if row is not None and prev_args is not None:
                    previous = (row.state, step_of_args(prev_args))
            fixed = repair_step(step, err.name, previous, self.accounts, err.args_by_name)
            if fixed is None:
                return None
            new, dropped = fixed
            log.warning(
                "slot row repaired",
                extra={"key": key, "error": err.name, "dropped": dropped, "detail": str(err)},
            )
            return (new.value(),), dropped

        return repair

    def charge(self, batch: SignedBatch) -> None:
        """Deduct what the batch's buyers pay at settlement from the tracked credit."""
        bids = [(o.owner, int(o.side)) for o in batch.orders]
        self.credit -= payments(bids, batch.fills, batch.price, self.accounts)

    def start_paused(self, on_chain: bool, unconfirmed: Sequence[SlotStep]) -> None:
        """The market's emergency as the chain holds it, then as the outbox's slot steps not
        yet mined will leave it."""
        self.paused = on_chain
        for step in unconfirmed:
            if step.parts & PART_RECOVER:
                self.paused = False
            if step.parts & PART_EMERGENCY:
                self.paused = True

    def start_credit(self, on_chain: Sequence[int], unconfirmed: Sequence[SlotStep]) -> None:
        """The accounts' credit (batch order) as read from the chain, less what the outbox's
        slot steps not yet mined will charge."""
        self.credit = np.asarray([int(c) for c in on_chain], dtype=np.int64)
        for step in unconfirmed:
            bids = [(str(o[0]), int(o[2])) for o in step.orders]
            self.credit -= payments(bids, step.fills, step.price, self.accounts)


def recovery_ahead(outbox: Outbox, step: SlotStep) -> bool:
    """Whether `step` meets a paused market (it trades, or declares an emergency of its own)
    only because an earlier slot row that ends the emergency (``PART_RECOVER``) is not mined
    yet.

    Why: the chain ends an emergency only after GridBalance's minimum (``minEmergencySeconds``,
    900 s), in chain time. Under an accelerated bridge clock (tests, demos: a slot of 1-2 wall
    seconds) the recovery row waits ("recovery too early") for many slots, and where the rows
    do not reconcile (a reading window longer than a slot) nothing else orders the rows behind
    it: each would meet the pause, be repaired to an empty batch and its trades silently lost.
    A row that declares a new emergency would be repaired to "declared already" and then be
    undone by the late recovery. So such a row waits behind the recovery, and the slots settle
    in order, as decided."""
    for args in outbox.unfinished_args("slot:"):
        earlier = step_of_args(args)
        if earlier.settle_slot < step.settle_slot and earlier.parts & PART_RECOVER:
            return True
    return False


def chain_dr_queue(
    get_event: Callable[[int], Sequence[Any]], predicted: DemandResponseQueue
) -> DemandResponseQueue:
    """GridBalance's open events as the chain holds them, read with `get_event` (``getEvent``:
    start slot, duration, cancelled, settled, ...; an unknown id has duration 0): a row whose
    demand-response part was repaired away leaves the predicted ids wrong, and this puts them
    right once every row is mined. The open events are the last ids (events are settled in
    slot order, which is id order, and the bridge cancels none): from the lowest id
    `predicted` holds open, find the last id that exists, then walk back while open."""

    def exists(event_id: int) -> bool:
        return event_id >= 1 and int(get_event(event_id)[1]) != 0

    last = min([e for e, _ in predicted.open], default=predicted.next_id)
    if exists(last):
        while exists(last + 1):
            last += 1
    else:
        while last >= 1 and not exists(last):
            last -= 1
    queue = DemandResponseQueue(open=[], next_id=last + 1)
    for event_id in range(last, 0, -1):
        ev = get_event(event_id)
        if ev[2] or ev[3]:
            break
        queue.open.insert(0, (event_id, int(ev[0])))
    return queue


def payments(
    bids: Sequence[tuple[str, int]], fills: Sequence[int], price: int, accounts: Sequence[str]
) -> np.ndarray:
    """What each account (position in `accounts`) pays at settlement for (owner, side) bids:
    fill x price for a buy; a sale's proceeds wait for the slot's reconciliation."""
    index = {a: j for j, a in enumerate(accounts)}
    out = np.zeros(len(accounts), dtype=np.int64)
    for (owner, side), fill in zip(bids, fills, strict=True):
        if side == int(Side.BUY):
            out[index[owner]] += int(fill) * int(price)
    return out


def step_of_args(args: Sequence[Any]) -> SlotStep:
    """The `SlotStep` an outbox row of ``SlotSettler.run`` holds (its stored args), whole: a
    repaired row is sent as this step less a part."""
    value: Sequence[Any] = args[0]
    parts, reconcile, params, tod, settle = value[0], value[1], value[2], value[3], value[4]
    readings, reading_signatures = value[5], value[6]
    r_slot, trades, accounts, exporters, grants = reconcile
    slot, price, orders, signatures, fills = settle
    dr = DemandResponse()
    if len(value) > 7:
        d = value[7]
        dr = DemandResponse(
            settle=[int(x) for x in d[0]], start_slot=int(d[1]), duration_slots=int(d[2]),
            target_reduction_wh=int(d[3]), incentive_per_wh=int(d[4]), peak_bonus=int(d[5]),
            participation_reward=int(d[6]),
            participants=[(str(p[0]), int(p[1]), int(p[2]), int(p[3])) for p in d[7]],
        )  # fmt: skip
    return SlotStep(
        parts=int(parts), reconcile_slot=int(r_slot), trades=[tuple(t) for t in trades],
        accounts=[str(a) for a in accounts], exporters=[str(e) for e in exporters],
        grants=[tuple(g) for g in grants], price_params=(params, tod), settle_slot=int(slot),
        price=int(price), orders=[tuple(o) for o in orders],
        signatures=[tuple(s) for s in signatures], fills=[int(f) for f in fills],
        readings=[tuple(x) for x in readings], reading_signatures=[bytes(x) for x in
                                                                   reading_signatures],
        demand_response=dr,
    )  # fmt: skip


def repair_step(
    step: SlotStep,
    error: str,
    previous: tuple[RowState, SlotStep] | None,
    accounts: Sequence[str],
    args: Mapping[str, Any] | None = None,
) -> tuple[SlotStep, str] | None:
    """What a slot row sends instead after its call reverted with `error`, and a word for what
    it leaves out; None: retry it as it is (a "not yet", `RETRY_ON`), or give it up.

    `previous` is the state and stored step of the row of the slot `step` reconciles, `args`
    the revert's decoded arguments. Nothing is ever added, so repairs end: a "not yet" is
    waited for; a reconciliation the chain refuses (`RECONCILE_REFUSALS`, or a previous slot
    that will never be cleared: its row failed or there is none) is left out, unless the
    previous row was itself repaired meanwhile (its trade list is then rebuilt from it); a part
    the chain already did (`DONE_ALREADY`) is left out; a demand-response part GridBalance
    refuses (`DR_REFUSALS`, or its pause where the row declares none) is left out (an
    announcement refused as too late, only the announcement: its settlements stand); a reward
    refused (a meter whose reading
    did not reach the chain: its reward; an unfunded RewardSystem: every reward) is left out;
    any other refusal drops the slot's orders, and the slot is cleared empty (as in an
    emergency) so the next slot's row can still reconcile it; with no orders left, the
    reconciliation goes; with neither, the row fails for good.
    """
    args = args or {}
    reconciles = bool(step.parts & PART_RECONCILE)
    announces = bool(step.parts & PART_DEMAND_RESPONSE)
    if announces and error == "GridBalanceEventNotInFuture" and step.demand_response.settle:
        # A row mined after its slot ended: only the announcement is late; the events it
        # settles are still owed (left out, they would wait for the next read-back of
        # GridBalance's open events).
        dr = DemandResponse(settle=list(step.demand_response.settle))
        return dataclasses.replace(step, demand_response=dr), "demand-response announcement"
    if announces and (
        error in DR_REFUSALS or (error == "EnforcedPause" and not step.parts & PART_EMERGENCY)
    ):
        return _without(step, PART_DEMAND_RESPONSE), "demand response"
    if (
        error == "DeviceRegistryReadingEvicted"
        and announces
        and step.demand_response.settle
        and not (reconciles and int(args.get("slot", -1)) == step.reconcile_slot)
    ):
        # An event's reading, not the reconciled slot's: a row mined so late that an event
        # `settles` allowed has lost its readings. The events go unsettled (they stay open on
        # chain, and the next rows forfeit them if GridBalance still lists them); the
        # announcement, the orders and the reconciliation stand.
        dr = dataclasses.replace(step.demand_response, settle=[])
        if not dr.participants:
            return _without(step, PART_DEMAND_RESPONSE), "demand-response settlements"
        return dataclasses.replace(step, demand_response=dr), "demand-response settlements"
    if error == "EnergyTradingSlotNotCleared" and reconciles:
        if previous is not None and previous[0] is not RowState.FAILED:
            return None  # the previous slot's row is still on its way
        return _without(step, PART_RECONCILE), "reconciliation"
    if error in RETRY_ON:
        return None
    device = str(args.get("device", "")).lower()
    if error in ONE_EXPORTER and reconciles and device in [e.lower() for e in step.exporters]:
        exporters = [e for e in step.exporters if e.lower() != device]
        return dataclasses.replace(step, exporters=exporters), f"reward of {device}"
    if error.startswith("RewardSystem") and reconciles and (step.exporters or step.grants):
        return dataclasses.replace(step, exporters=[], grants=[]), "rewards"
    if error in RECONCILE_REFUSALS and reconciles:
        if error == "EnergyTradingTradesMismatch" and previous is not None:
            state, prev = previous
            trades = step_trades(prev, accounts)
            if state is not RowState.FAILED and [tuple(t) for t in trades] != [
                tuple(t) for t in step.trades
            ]:
                return dataclasses.replace(step, trades=trades), "stale trade list"
        return _without(step, PART_RECONCILE), "reconciliation"
    part = DONE_ALREADY.get(error)
    if part is not None and step.parts & part:
        return _without(step, part), "done already"
    if step.parts & PART_SETTLE and step.orders:
        price = int(clear_book([], [], []).price)
        empty = dataclasses.replace(step, price=price, orders=[], signatures=[], fills=[])
        return empty, "orders"
    if reconciles:
        return _without(step, PART_RECONCILE), "reconciliation"
    return None


def _without(step: SlotStep, part: int) -> SlotStep:
    """`step` less one part (its fields stay; the contract reads only the parts set)."""
    return dataclasses.replace(step, parts=step.parts & ~part)
