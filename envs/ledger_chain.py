"""`ChainLedger`: the deployed contract suite as the environment's ledger.

The same slot the mirror settles in numpy is run through the real contracts: the reference price
is posted (``setPriceParams``), the prosumers' EIP-712 signed orders are settled in one batch
(``settleSignedBatch``), every smart meter signs its reading and the relay submits them in one
transaction (``DeviceRegistry.submitReadings``), and the readings reconcile the slot
(``reconcileSlot``): four transactions a slot. Chain time advances through the slot's
gate closure, end and reading window, so every rule about time is exercised. ``evm`` runs on
in-process py-evm (eth-tester); ``rpc`` on any JSON-RPC node (anvil locally). An episode reset
reverts to the snapshot taken after deployment instead of redeploying.

After reconciliation RewardSystem grants the renewable reward of every exporting meter
(``rewardRenewable``, from the signed readings) and, during a demand-response event, each
participant's incentive (``grantReward``). One grid per ledger: chain state is not batched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from web3.logs import DISCARD

from contracts.client import Chain, DeviceType, RewardKind, SuiteConfig, deploy_suite
from contracts.model import PriceParams, Side, SignedOrder, Trade
from envs.accounts import meter_key, prosumer_addresses, prosumer_key
from envs.errors import LedgerError
from envs.ledger import Settlement, SlotInput, per_wh, units
from envs.market import BUY
from envs.params import IntArray
from envs.scenario import MarketConfig

#: The posted reference price is the demand factor: baseRate 1e4 x bps x 1e4 / 1e8 = bps.
_BASE_RATE = 10_000
_FLAT_TOD = (10_000,) * 24
#: Reward tokens put in RewardSystem's budget at deployment (far beyond any simulated year).
_REWARD_BUDGET = 10**30


class ChainLedger:
    """Settles one grid's slots on the contracts deployed to `chain` (see the module docstring)."""

    def __init__(
        self, n: int, config: MarketConfig, chain: Chain, meter_capacity_w: list[int]
    ) -> None:
        self.name = "evm" if chain.is_tester else "rpc"
        self.batch = 1
        self.n = n
        self.config = config
        self.chain = chain
        self._now = chain.timestamp()
        self._params = self._price_params(1)
        self._rates = (per_wh(config.dr_incentive_per_kwh), per_wh(config.renewable_reward_per_kwh))
        self.suite = deploy_suite(
            chain,
            config=SuiteConfig(
                fee_bps=config.fee_bps, price=self._params, renewable_rate_per_wh=self._rates[1]
            ),
        )
        suite = self.suite
        self.admin = suite.admin
        self.addresses = prosumer_addresses(n)
        self._keys = [prosumer_key(k) for k in range(n)]
        self._meters = [meter_key(k) for k in range(n)]
        initial = units(config.initial_credit)
        treasury = units(config.treasury_credit)
        total = treasury + n * initial
        token, trading = suite.payment_token, suite.trading
        chain.transact(token, "mint", self.admin, total, sender=self.admin)
        chain.transact(token, "approve", trading.address, total, sender=self.admin)
        # The admin is the treasury: its credit pays imbalance surpluses.
        if treasury:
            suite.deposit(self.admin, treasury)
        if initial:
            suite.deposit_for_many(self.admin, list(self.addresses), [initial] * n)
        self._devices = [_address(key) for key in self._meters]
        suite.register_devices(
            [
                (self._devices[k], owner, DeviceType.METER, meter_capacity_w[k])
                for k, owner in enumerate(self.addresses)
            ]
        )
        self._first_slot = suite.current_slot() + 2
        suite.fund_rewards(_REWARD_BUDGET)
        self._window = int(chain.call(suite.registry, "readingWindow"))
        self._snapshot = chain.snapshot()
        self._start()

    def _advance(self, timestamp: int) -> None:
        """Move chain time forward to `timestamp` (a late settlement is still on time)."""
        if timestamp > self._now:
            self.chain.travel_to(timestamp)
            self._now = timestamp

    def _price_params(self, reference: int) -> PriceParams:
        c = self.config
        return PriceParams(
            base_rate=_BASE_RATE,
            demand_factor_bps=int(reference),
            grid_stress_factor_bps=0,
            band_low_bps=c.band_low_bps,
            band_high_bps=c.band_high_bps,
            imbalance_penalty_bps=c.imbalance_penalty_bps,
            tod_multiplier_bps=_FLAT_TOD,
        )

    def _start(self) -> None:
        self._slot = self._first_slot
        self._now = int(self.chain.timestamp())
        self._nonces = [0] * self.n
        self._credit = np.array([self._read_credits()], dtype=np.int64)
        self.treasury = np.array([self.suite.credit_of(self.admin)], dtype=np.int64)

    def _reward(self, c: int, slot: SlotInput, count: Any) -> IntArray:
        """Grant the slot's rewards on RewardSystem; returns each prosumer's grants (events)."""
        suite, admin = self.suite, self.admin
        receipts = []
        exporters = [self._devices[k] for k in range(self.n) if slot.metered_wh[0, k] < 0]
        if exporters:  # anyone may call it: the amounts follow from the signed readings
            receipts.append(
                self.chain.transact(suite.rewards, "rewardRenewable", c, exporters, sender=admin)
            )
        if slot.dr_event[0]:
            for k in np.flatnonzero(slot.dr_reduction_wh[0] > 0):
                amount = int(slot.dr_reduction_wh[0, k]) * self._rates[0]
                receipts.append(
                    self.chain.transact(
                        suite.rewards, "grantReward", self.addresses[k], amount,
                        int(RewardKind.DEMAND_RESPONSE), sender=admin,
                    )
                )  # fmt: skip
        granted = np.zeros(self.n, dtype=np.int64)
        for receipt in receipts:
            count(receipt)
            for event in suite.rewards.events.RewardGranted().process_receipt(
                receipt, errors=DISCARD
            ):
                granted[self.addresses.index(event["args"]["account"])] += int(
                    event["args"]["amount"]
                )
        return granted

    def on_chain(self) -> tuple[IntArray, int]:
        """(credits, treasury) read from the contract: what the tracked figures must equal."""
        credits = np.array([self._read_credits()], dtype=np.int64)
        return credits, int(self.suite.credit_of(self.admin))

    def _read_credits(self) -> list[int]:
        suite = self.suite
        return [
            int(c)
            for c in self.chain.call_many(suite.trading, "creditOf", [(a,) for a in self.addresses])
        ]

    def reset(self, rows: IntArray) -> None:
        self.chain.revert(self._snapshot)
        self._snapshot = self.chain.snapshot()  # anvil consumes a snapshot when reverting
        self._start()

    def credits(self) -> IntArray:
        return self._credit.copy()

    def settle(self, slot: SlotInput) -> Settlement:
        if slot.book.qty_wh.shape[0] != 1:
            raise LedgerError(
                f"market.ledger: {self.name} settles one grid, got a batch of "
                f"{slot.book.qty_wh.shape[0]}; use the mirror ledger for batches"
            )
        suite, chain, admin = self.suite, self.chain, self.admin
        c = self._slot
        self._slot += 1
        gas = 0
        txs = 0

        def count(receipt: Any) -> None:
            nonlocal gas, txs
            gas += int(receipt["gasUsed"])
            txs += 1

        params = self._price_params(int(slot.reference[0]))
        args, tod = params.as_args()
        count(chain.transact(suite.trading, "setPriceParams", args, tod, sender=admin))
        book = slot.book
        credit = self._credit[0]
        orders: list[SignedOrder] = []
        refused = 0
        for k in range(self.n):
            q, limit, side = int(book.qty_wh[0, k]), int(book.limit[0, k]), int(book.side[0, k])
            if q <= 0:
                continue
            if slot.emergency[0] or (side == BUY and q * limit > credit[k]):
                refused += 1
                continue
            orders.append(SignedOrder(self.addresses[k], c, Side(side), q, limit))
        orders.sort(key=lambda o: o.key)
        signatures = [
            suite.sign_order(self._keys[self.addresses.index(o.owner)], o) for o in orders
        ]
        self._advance(suite.gate_closes_at(c))
        result, receipt = suite.settle_signed_batch(admin, c, orders, signatures)
        count(receipt)
        settled = suite.trading.events.SignedBatchSettled().process_receipt(receipt, errors=DISCARD)
        fee = int(settled[0]["args"]["fee"])
        fills = np.zeros(self.n, dtype=np.int64)
        for o, f in zip(orders, result.fills.tolist(), strict=True):
            fills[self.addresses.index(o.owner)] = f
        # The slot ends; every meter signs its reading, relayed by the admin.
        self._advance(suite.slot_start(c + 1))
        readings = [
            (self._meters[k], c, int(slot.metered_wh[0, k]), self._nonces[k]) for k in range(self.n)
        ]
        count(suite.submit_readings(readings, sender=admin))
        self._nonces = [x + 1 for x in self._nonces]
        self._advance(suite.slot_start(c + 1) + self._window)
        trades = [
            Trade(o.owner, o.side, f) for o, f in zip(orders, result.fills.tolist(), strict=True)
        ]
        # Credits move by what the events say: buyers pay fill x price at settlement (the price
        # the contract verified), reconciliation reports every account's net change.
        bought = np.where(book.side[0] == BUY, fills, -fills)
        cash = -np.where(book.side[0] == BUY, fills, 0) * result.price
        unpaid = np.zeros(self.n, dtype=np.int64)
        treasury = fee
        trading = suite.trading.events
        for receipt in suite.reconcile_slot(admin, c, trades, members=list(self.addresses)):
            count(receipt)
            for event in trading.AccountReconciled().process_receipt(receipt, errors=DISCARD):
                owner = self.addresses.index(event["args"]["account"])
                cash[owner] += int(event["args"]["credited"])
                unpaid[owner] = int(event["args"]["unpaid"])
            for event in trading.SlotReconciled().process_receipt(receipt, errors=DISCARD):
                treasury += int(event["args"]["charged"]) - int(event["args"]["paid"])
        self._credit[0] += cash
        self.treasury[0] += treasury
        rewards = self._reward(c, slot, count)
        one = np.ones(1, dtype=np.int64)
        return Settlement(
            price=one * result.price,
            volume_wh=one * result.volume,
            fill_wh=fills[None, :],
            cash=cash[None, :],
            fees=one * fee,
            imbalance_wh=(slot.metered_wh[0] - bought)[None, :],
            unpaid=unpaid[None, :],
            refused=one * refused,
            rewards=rewards[None, :],
            gas_used=one * gas,
            transactions=one * txs,
        )


def _address(key: bytes) -> str:
    from eth_account import Account

    return str(Account.from_key(key).address)


def open_chain_ledger(n: int, config: MarketConfig, meter_capacity_w: list[int]) -> ChainLedger:
    """Deploy the suite on the chain `config.ledger` names: in-process py-evm or `rpc_url`."""
    chain = Chain.in_process() if config.ledger == "evm" else Chain.rpc(config.rpc_url)
    return ChainLedger(n, config, chain, meter_capacity_w)
