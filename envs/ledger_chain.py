"""`ChainLedger`: the deployed contract suite as the environment's ledger, one transaction a slot.

Each step is one call of the operator's ``SlotSettler.run`` (``contracts.settler``), mined at
the start of the next slot, that in this order

0. ends an emergency (``GridBalance.recover``) when this slot's grid is no longer stressed;
1. reconciles the previous slot against its meter readings (``reconcileSlot``) and grants that
   slot's renewable reward to every exporting meter (``rewardRenewable``, from the signed
   readings); then declares an emergency (``GridBalance.declareEmergency``, which
   pauses the market) when this slot's grid stress crossed the emergency threshold: the slot
   trades nothing (its batch is empty, as the mirror refuses every order) while its meters are
   settled as in any slot;
2. posts this slot's reference price (``setPriceParams``);
3. settles this slot's EIP-712 signed orders in one batch (``settleSignedBatch``; the gate
   closed five minutes before the slot started);
4. relays every smart meter's signed reading of this slot (``DeviceRegistry.submitReadings``;
   the slot has ended and its reading window is open);
5. unless the step leaves an emergency in force, settles GridBalance's demand-response events
   of the slots up to the previous one (``settleEvent``, paying each participant's incentive
   per Wh below its baseline) and announces the event the grid state this slot left calls for,
   for the slot after the next (``createEvent``; `contracts.slot_batch.DemandResponseQueue`).

A slot's readings must arrive inside its reading window and it may be reconciled only once the
window has closed, so no single block can do both: reconciliation runs one transaction late.
Everything else a step reports comes from its own transaction. The step's figures must still be
reported at once (the environment's reward needs them), so the ledger predicts them with the
mirror's rules (`envs.ledger.MirrorLedger`, the same code the `mirror` ledger runs) and checks
every figure against the chain's events: the settlement's price, volume and fee in the same
step, the demand-response events announced and settled (ids, slots, each participant's
reward) in the same step, each account's imbalance, credit change and unpaid charge, the
treasury's change and the renewable rewards one step later, when the reconciliation is mined.
Any difference raises `LedgerError` naming the slot, the field and both values. The last slot
of an episode is reconciled (and checked) by one extra transaction at reset or when `on_chain`
reads the state.

``evm`` runs in process on revm (``contracts.revm``, the default) or py-evm (eth-tester), as
``market.evm_engine`` says; ``rpc`` on any JSON-RPC node (anvil locally).
On ``rpc`` a slot's transaction is written to the node's connection and its answer (the
receipt) read when the next slot is settled, so the node executes while the environment
steps on in the same thread (`SlotSender.submit`; no worker thread, whose GIL hand-overs
delayed both the send and the read); the next slot's request is encoded before the previous
answer is awaited (`SlotSender.prepare`), so it leaves as soon as that answer is read; its
events are checked once the next slot's transaction
is on its way, so the node mines meanwhile: a revert then raises one step later (before the
next transaction is sent), a difference from the mirror one step later too, and a
step's ``gas_used`` is that of the transaction mined during it (the previous slot's). ``evm``
runs in this process and waits for each transaction.
An episode reset reverts to the snapshot taken after deployment instead of redeploying. One
grid per ledger: chain state is not batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from coincurve import PrivateKey

from contracts.client import Chain, DeviceType, SuiteConfig, deploy_suite
from contracts.model import PriceParams
from contracts.revm import RevmChain
from contracts.settler import (
    PART_EMERGENCY,
    PART_RECONCILE,
    PART_RECOVER,
    OrderSigner,
    ReadingSigner,
    SentSlot,
    SlotSender,
    SlotStep,
    decode_logs,
)
from contracts.slot_batch import (
    Bid,
    DemandResponseQueue,
    emergency_parts,
    price_params,
    signed_batch,
    slot_step,
)
from envs.accounts import batch_order, meter_key, prosumer_addresses, prosumer_key
from envs.errors import LedgerError
from envs.ledger import MirrorLedger, Settlement, SlotInput, per_wh, units
from envs.market import BUY
from envs.params import IntArray
from envs.scenario import MarketConfig

#: Reward tokens put in RewardSystem's budget at deployment (far beyond any simulated year).
_REWARD_BUDGET = 10**30


@dataclass(frozen=True)
class _Pending:
    """A settled slot waiting for its reconciliation, and what the ledger reported for it."""

    slot: int
    trades: list[tuple[str, int, int, int]]
    exporters: list[str]
    credited: IntArray
    """(n,) expected credit change at reconciliation (reported cash less buyers' payments)."""
    imbalance: IntArray
    unpaid: IntArray
    rewards: IntArray
    """(n,) the slot's renewable rewards (what the reconciling transaction grants besides the
    demand-response events it settles)."""
    treasury: int
    """Expected charged - paid of the treasury."""


#: A sent transaction: its receipt to come, the step, the slot it reconciles, the figures reported.
_InFlight = tuple[SentSlot, SlotStep, "_Pending | None", "Settlement | None"]


class ChainLedger:
    """Settles one grid's slots on the contracts deployed to `chain` (see the module docstring)."""

    def __init__(
        self, n: int, config: MarketConfig, chain: Chain, meter_capacity_w: list[int]
    ) -> None:
        self.name = "rpc" if chain.engine == "rpc" else "evm"
        self.batch = 1
        self.n = n
        self.config = config
        self.chain = chain
        self._rates = (per_wh(config.dr_incentive_per_kwh), per_wh(config.renewable_reward_per_kwh))
        self.suite = suite = deploy_suite(
            chain,
            config=SuiteConfig(
                fee_bps=config.fee_bps,
                price=self._price_params(1),
                renewable_rate_per_wh=self._rates[1],
            ),
        )
        self.admin = admin = suite.admin
        self.addresses = prosumer_addresses(n)
        self._order = [int(k) for k in batch_order(n)]
        self._accounts = [self.addresses[k] for k in self._order]
        self._keys = [PrivateKey(prosumer_key(k)) for k in range(n)]
        self._meter_keys = [PrivateKey(meter_key(k)) for k in range(n)]
        self._devices = [_address(meter_key(k)) for k in range(n)]
        initial = units(config.initial_credit)
        treasury = units(config.treasury_credit)
        total = treasury + n * initial
        token, trading = suite.payment_token, suite.trading
        chain.transact(token, "mint", admin, total, sender=admin)
        chain.transact(token, "approve", trading.address, total, sender=admin)
        # The admin is the treasury: its credit pays imbalance surpluses.
        if treasury:
            suite.deposit(admin, treasury)
        if initial:
            suite.deposit_for_many(admin, list(self.addresses), [initial] * n)
        suite.register_devices(
            [
                (self._devices[k], owner, DeviceType.METER, meter_capacity_w[k])
                for k, owner in enumerate(self.addresses)
            ]
        )
        self._first_slot = suite.current_slot() + 2
        suite.fund_rewards(_REWARD_BUDGET)
        self._window = int(chain.call(suite.registry, "readingWindow"))
        self._orders = OrderSigner(suite.order_domain)
        self._readings = ReadingSigner(int(chain.w3.eth.chain_id), suite.registry.address)
        self._sender = SlotSender(chain, admin, suite.settler.address)
        # On a node the transaction runs in another process: read its receipt a step later and
        # let the environment step on meanwhile. revm and py-evm run in this process: no gain.
        self._overlap = chain.engine == "rpc"
        self._inflight: _InFlight | None = None
        self._mirror = MirrorLedger(1, n, config)
        self.treasury = self._mirror.treasury
        """The treasury's credit (the mirror's array: predicted, checked against the chain)."""
        self._snapshot = chain.snapshot()
        self._deployed_at = int(chain.timestamp())
        self._start()
        credits, treasury = self._read_chain()
        if not (np.array_equal(credits, self._mirror.credits()) and treasury == self.treasury[0]):
            raise LedgerError(
                "market.ledger: the deployed ledger does not start from the scenario's "
                "initial_credit and treasury_credit"
            )

    def _price_params(self, reference: int) -> PriceParams:
        c = self.config
        return price_params(reference, c.band_low_bps, c.band_high_bps, c.imbalance_penalty_bps)

    def _start(self) -> None:
        """Start an episode from the post-deployment snapshot.

        The snapshot's block time and credits are known: a revert restores that very state, so
        neither is read again at a reset (the reads cost ~50 ms of a reset, ~0.5 ms a step at
        96 steps an episode). The credits are checked against the scenario once, at deployment.
        """
        self._slot = self._first_slot
        self._now = self._deployed_at
        self._nonces = [0] * self.n
        self._paused = False  # GridBalance's emergency, as the last step left it
        self._pending: _Pending | None = None
        self._dr = DemandResponseQueue()  # event ids restart with the snapshot
        self._next_event_seen = 1  # the id the next DemandResponseCreated must carry
        self._mirror.reset(np.zeros(1, dtype=np.int64))

    def _read_chain(self) -> tuple[IntArray, int]:
        suite = self.suite
        rows = [(a,) for a in self.addresses] + [(self.admin,)]
        values = [int(v) for v in self.chain.call_many(suite.trading, "creditOf", rows)]
        return np.array([values[:-1]], dtype=np.int64), values[-1]

    def on_chain(self) -> tuple[IntArray, int]:
        """(credits, treasury) read from the contract: what the reported figures must equal.

        Reconciles (and checks) a pending slot first, so the state is complete.
        """
        self._flush()
        return self._read_chain()

    def reset(self, rows: IntArray) -> None:
        self._flush()  # the episode's last slot is checked too
        # anvil consumes a snapshot when reverting: take the next one at once.
        self._snapshot = self._sender.revert_and_snapshot(self._snapshot)
        self._start()

    def credits(self) -> IntArray:
        return self._mirror.credits()

    def settle(self, slot: SlotInput) -> Settlement:
        if slot.book.qty_wh.shape[0] != 1:
            raise LedgerError(
                f"market.ledger: {self.name} settles one grid, got a batch of "
                f"{slot.book.qty_wh.shape[0]}; use the mirror ledger for batches"
            )
        c = self._slot
        self._slot += 1
        book = slot.book
        credit = self._mirror.credits()[0]
        treasury_before = int(self.treasury[0])
        want = self._mirror.settle(slot)  # the figures to report; the chain must agree

        # The batch and the step: the code the bridge builds its slot transaction with.
        order = self._order
        batch = signed_batch(
            c,
            [
                Bid(self.addresses[k], int(book.side[0, k]), int(book.qty_wh[0, k]),
                    int(book.limit[0, k]))
                for k in order
            ],
            [int(credit[k]) for k in order],
            bool(slot.emergency[0]),
            [self._keys[k] for k in order],
            self._orders,
        )  # fmt: skip
        submitted = [order[j] for j in batch.submitted]
        fills = batch.fills
        mirror_fills = [int(want.fill_wh[0, k]) for k in submitted]
        if batch.price != int(want.price[0]) or fills != mirror_fills:
            raise LedgerError(
                f"market.ledger: slot {c}: the solver clears at {batch.price} with fills "
                f"{fills}, the mirror at {int(want.price[0])} with {mirror_fills}"
            )
        metered = [int(x) for x in slot.metered_wh[0]]
        readings = [(self._devices[k], c, metered[k], self._nonces[k]) for k in range(self.n)]
        reading_sigs = [
            self._readings.sign(self._meter_keys[k], *readings[k]) for k in range(self.n)
        ]
        self._nonces = [x + 1 for x in self._nonces]
        emergency = bool(slot.emergency[0])
        declare, recover = emergency_parts(emergency, self._paused)
        self._paused = emergency
        demand_response = None
        if not emergency:  # GridBalance, paused, would refuse both settling and announcing
            baselines = [
                (self._devices[k], int(slot.dr_baseline_wh[0, k])) for k in order
            ] if want.dr_created[0] else []  # fmt: skip
            demand_response = self._dr.part(c - 1, c + 2, self._rates[0], baselines)
        step = slot_step(
            self._price_params(int(slot.reference[0])), batch, readings, reading_sigs,
            declare_emergency=declare, recover=recover, demand_response=demand_response,
        )  # fmt: skip
        pending, self._pending = self._pending, self._pending_of(c, slot, want, treasury_before)
        self._pending.trades.extend(batch.trades(self._accounts))
        # With overlap (rpc) this is the gas of the previous slot's transaction, mined meanwhile.
        gas = self._run(step, pending, self._suite_slot_end(c), want)

        one = np.ones(1, dtype=np.int64)
        return Settlement(
            price=want.price,
            volume_wh=want.volume_wh,
            fill_wh=want.fill_wh,
            cash=want.cash,
            fees=want.fees,
            imbalance_wh=want.imbalance_wh,
            unpaid=want.unpaid,
            refused=want.refused,
            rewards=want.rewards,
            gas_used=one * gas,
            transactions=one,
            dr_event=want.dr_event,
            dr_created=want.dr_created,
            dr_settled=want.dr_settled,
            dr_paid=want.dr_paid,
        )

    def _suite_slot_end(self, c: int) -> int:
        """The block time of slot `c`'s transaction: its end, inside its reading window."""
        return self.suite.slot_start(c + 1)

    def _pending_of(self, c: int, slot: SlotInput, want: Settlement, before: int) -> _Pending:
        """What reconciling slot `c` next step must do and show, from the mirror's figures."""
        n = self.n
        buyer = slot.book.side[0] == BUY
        paid = np.where(buyer, want.fill_wh[0] * want.price[0], 0)
        exporters = [self._devices[k] for k in range(n) if slot.metered_wh[0, k] < 0]
        return _Pending(
            slot=c,
            trades=[],
            exporters=exporters if self._rates[1] else [],
            credited=want.cash[0] + paid,
            imbalance=want.imbalance_wh[0].copy(),
            unpaid=want.unpaid[0].copy(),
            rewards=want.rewards[0] - want.dr_paid[0],
            treasury=int(self.treasury[0]) - before - int(want.fees[0]),
        )

    def _run(
        self,
        step: SlotStep,
        pending: _Pending | None,
        timestamp: int,
        want: Settlement | None = None,
    ) -> int:
        """Send `step` (reconciling `pending` first); with overlap, return without waiting (0),
        else wait, check the chain's events and return the gas."""
        if pending is not None:
            step = SlotStep(
                **{
                    **step.__dict__,
                    "parts": step.parts | PART_RECONCILE,
                    "reconcile_slot": pending.slot,
                    "trades": pending.trades,
                    "accounts": self._accounts,
                    "exporters": pending.exporters,
                    "grants": [],
                }
            )
        if timestamp <= self._now:
            raise LedgerError(f"market.ledger: chain time would go back to {timestamp}")
        prepared = self._sender.prepare(step.calldata(), timestamp)
        previous, self._inflight = self._inflight, None
        if previous is not None:
            # Only wait for the previous transaction (a revert raises here, before this one is
            # sent); its events are checked once this one is on its way: on a node, the node
            # then mines while this thread checks, instead of idling until the checks are done.
            previous[0].result()
        sent = self._sender.submit_prepared(prepared)
        self._now = timestamp
        self._inflight = (sent, step, pending, want)
        gas = self._check(previous) if previous is not None else 0
        return gas if self._overlap else self._collect()

    def _collect(self) -> int:
        """Wait for the transaction in flight, check its events; returns its gas (0 if none)."""
        if self._inflight is None:
            return 0
        inflight, self._inflight = self._inflight, None
        return self._check(inflight)

    def _check(self, inflight: _InFlight) -> int:
        """Check a sent transaction's events against the figures reported; returns its gas."""
        sent, step, pending, want = inflight
        receipt = sent.result()
        events = decode_logs(receipt.logs)
        for name, part in (("EmergencyDeclared", PART_EMERGENCY), ("Recovered", PART_RECOVER)):
            if len(events[name]) != bool(step.parts & part):
                raise LedgerError(
                    f"market.ledger: slot {step.settle_slot}: {len(events[name])} {name} events, "
                    f"{int(bool(step.parts & part))} expected"
                )
        if want is not None:
            self._check_settlement(step, want, events["SignedBatchSettled"])
            self._check_demand_response(step, want, events)
        if pending is not None:
            self._check_reconciliation(pending, events)
        self._check_rewards(step, pending, want, events["RewardGranted"])
        return receipt.gas_used

    def _check_settlement(
        self, step: SlotStep, want: Settlement, settled: list[dict[str, Any]]
    ) -> None:
        c = step.settle_slot
        if len(settled) != 1:
            raise LedgerError(f"market.ledger: slot {c}: {len(settled)} SignedBatchSettled events")
        event = settled[0]
        _same(c, "clearing price", event["price"], int(want.price[0]))
        _same(c, "volume", event["volume"], int(want.volume_wh[0]))
        _same(c, "fee", event["fee"], int(want.fees[0]))

    def _check_reconciliation(self, p: _Pending, events: dict[str, list[dict[str, Any]]]) -> None:
        n, index = self.n, {a: k for k, a in enumerate(self.addresses)}
        credited = np.zeros(n, dtype=np.int64)
        imbalance = np.zeros(n, dtype=np.int64)
        unpaid = np.zeros(n, dtype=np.int64)
        for e in events["AccountReconciled"]:
            k = index[str(e["account"])]
            credited[k], imbalance[k], unpaid[k] = e["credited"], e["imbalance"], e["unpaid"]
        if len(events["SlotReconciled"]) != 1:
            raise LedgerError(f"market.ledger: slot {p.slot} was not reconciled")
        totals = events["SlotReconciled"][0]
        for field, got, want in (
            ("credit change", credited, p.credited),
            ("imbalance", imbalance, p.imbalance),
            ("unpaid charge", unpaid, p.unpaid),
        ):
            _same_each(p.slot, field, got, want)
        _same(p.slot, "treasury change", totals["charged"] - totals["paid"], p.treasury)

    def _check_demand_response(
        self, step: SlotStep, want: Settlement, events: dict[str, list[dict[str, Any]]]
    ) -> None:
        """The events the step announced and settled, and what each participant was paid, are
        the mirror's (`Settlement.dr_created`, `dr_settled`, `dr_paid`)."""
        c, dr = step.settle_slot, step.demand_response
        created = events["DemandResponseCreated"]
        _same(c, "demand-response events announced", len(created), int(want.dr_created[0]))
        for e in created:
            _same(c, "announced event's slot", e["start_slot"], c + 2)
            _same(c, "announced event's id", e["event_id"], self._next_event_seen)
            self._next_event_seen += 1
            _same(c, "announced event's participants", e["participants"], len(dr.participants))
        settled = [int(e["event_id"]) for e in events["DemandResponseSettled"]]
        _same(c, "demand-response events settled", len(settled), int(want.dr_settled[0]))
        if settled != [int(x) for x in dr.settle]:
            raise LedgerError(
                f"market.ledger: slot {c}: events {settled} settled on chain, {list(dr.settle)} "
                "sent"
            )
        index = {a: k for k, a in enumerate(self._devices)}
        paid = np.zeros(self.n, dtype=np.int64)
        for e in events["ParticipantSettled"]:
            paid[index[str(e["device"])]] += e["reward"]
        _same_each(c, "demand-response reward", paid, want.dr_paid[0])

    def _check_rewards(
        self,
        step: SlotStep,
        pending: _Pending | None,
        want: Settlement | None,
        granted: list[dict[str, Any]],
    ) -> None:
        """Every RewardGranted of the transaction: the reconciled slot's renewable rewards and
        the demand-response events it settled, per account."""
        index = {a: k for k, a in enumerate(self.addresses)}
        got = np.zeros(self.n, dtype=np.int64)
        for e in granted:
            got[index[str(e["account"])]] += e["amount"]
        expected = np.zeros(self.n, dtype=np.int64)
        if pending is not None:
            expected += pending.rewards
        if want is not None:
            expected += want.dr_paid[0]
        slot = step.settle_slot if want is not None or pending is None else pending.slot
        _same_each(slot, "rewards", got, expected)

    def _flush(self) -> None:
        """Check the transaction in flight, then reconcile the pending slot on its own once its
        readings are final."""
        self._collect()
        pending, self._pending = self._pending, None
        if pending is not None:
            final = self.suite.slot_start(pending.slot + 1) + self._window
            self._run(SlotStep(parts=0), pending, max(final, self._now + 1))
            self._collect()


def _same(slot: int, field: str, got: int, want: int) -> None:
    if got != want:
        raise LedgerError(f"market.ledger: slot {slot}: {field} is {got} on chain, {want} reported")


def _same_each(slot: int, field: str, got: IntArray, want: IntArray) -> None:
    if not np.array_equal(got, want):
        k = int(np.flatnonzero(got != want)[0])
        raise LedgerError(
            f"market.ledger: slot {slot}: {field} of prosumer {k} is {int(got[k])} on chain, "
            f"{int(want[k])} reported"
        )


def _address(key: bytes) -> str:
    from eth_account import Account

    return str(Account.from_key(key).address)


def open_chain_ledger(n: int, config: MarketConfig, meter_capacity_w: list[int]) -> ChainLedger:
    """Deploy the suite on the chain `config.ledger` names: in process on `config.evm_engine`
    (revm or py-evm), or on the node at `rpc_url`."""
    if config.ledger == "rpc":
        chain = Chain.rpc(config.rpc_url)
    else:
        chain = RevmChain() if config.evm_engine == "revm" else Chain.in_process()
    return ChainLedger(n, config, chain, meter_capacity_w)
