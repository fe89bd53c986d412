"""The market around the physics of a step: gate closure before it, settlement after it.

`Exchange.open` runs at gate closure, before the slot is simulated: it fixes the reference price
(the seed formula's community price, which the operator's price signal moves), detects an
emergency from the last solved grid state (GridBalance's rule) and takes the book.
`Exchange.close` runs after the physics: the meters read what really flowed, the grid state the
slot left decides whether a demand-response event is announced two slots on (GridBalance's
events start after the block's slot), and the ledger settles fills, imbalances, events and
rewards. The env shells call the two around
`Engine.step`; the book comes from the default bidding rule (single agent) or from
each prosumer agent's bid (`envs.parallel_env`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.codec import DecodedAction
from envs.dynamics import GridState
from envs.errors import ScenarioError
from envs.kernel import CompiledParams
from envs.kpis import MARKET_INFO
from envs.ledger import Ledger, MirrorLedger, Settlement, SlotInput
from envs.market import Book, band, to_units
from envs.market_kernel import announce_range, gate_rows, summarise_rows
from envs.params import FloatArray, GridParams, IntArray
from envs.scenario import MarketConfig


@dataclass(frozen=True)
class GateClosure:
    """What is fixed before the slot runs."""

    slot: IntArray
    book: Book
    reference: IntArray
    emergency: np.ndarray


class Exchange:
    """One scenario's market for a batch of `batch` grids."""

    def __init__(
        self,
        params: GridParams,
        config: MarketConfig,
        batch: int,
        compiled: CompiledParams | None = None,
    ) -> None:
        self.params = params
        self.config = config
        self.batch = batch
        self.n = params.n_prosumer
        self.ledger: Ledger = open_ledger(params, config, batch)
        self._compiled = compiled if compiled is not None else CompiledParams(params)
        self._mcfg = np.array(
            [
                config.band_low_bps,
                config.band_high_bps,
                config.bid_markup,
                config.dr_loading,
                config.dr_voltage_pu,
                config.emergency_loading,
            ],
            dtype=np.float64,
        )

    def reset(self, rows: IntArray) -> None:
        self.ledger.reset(rows)

    def fused_accounts(
        self,
    ) -> tuple[FloatArray, IntArray, IntArray, IntArray, IntArray, IntArray, IntArray]:
        """(market config, rates, order, credit, treasury, reward tokens, demand-response state)
        for the fused step.

        Only a mirror ledger settles inside the compiled step; a chain ledger raises here and the
        environments run `open`, `Engine.step` and `close` in turn instead (`fuses`).
        """
        if not isinstance(self.ledger, MirrorLedger):
            raise TypeError(f"the {self.ledger.name!r} ledger settles outside the compiled step")
        return (self._mcfg, *self.ledger.accounts())

    @property
    def fuses(self) -> bool:
        """Whether the fused step can settle this market (the mirror ledger does)."""
        return isinstance(self.ledger, MirrorLedger)

    def reference(self, state: GridState) -> IntArray:
        """The coming slot's reference price (money units per Wh, >= 1), as `open` fixes it."""
        return np.maximum(to_units(state.community_price), 1)

    def band(self, reference: IntArray) -> tuple[IntArray, IntArray]:
        """The allowed limit-price band of each row (money units per Wh)."""
        low, high = band(reference, self.config.band_low_bps, self.config.band_high_bps)
        return np.maximum(low, 1), high

    def open(
        self, state: GridState, action: DecodedAction, book: Book | None = None
    ) -> GateClosure:
        """Fix the slot's reference price, events and book (call before `Engine.step`).

        Without a `book`, every prosumer orders by the default bidding rule: its expected net
        position = forecast load (less demand response, plus the backlog's rebound) - forecast
        PV after curtailment + the battery set-point within what SoC allows; buyers bid the
        reference x (1 + markup), sellers ask x (1 - markup), inside the band.
        """
        b, n = state.slot.shape[0], self.n
        c = self._compiled
        reference = np.empty(b, dtype=np.int64)
        emergency = np.empty(b, dtype=np.bool_)
        use_rule = book is None
        if book is None:
            zeros = np.zeros((b, n), dtype=np.int64)
            book = Book(zeros, zeros.copy(), zeros.copy())
        qty, limit, side = book.qty_wh, book.limit, book.side
        gate_rows(
            self._mcfg, c.scalars, c.battery, c.forecast_mode, float(c.lead_scale[0]), c.noise,
            c.stride, self.params.horizon, self.params.prosumer_load_kw,
            self.params.prosumer_pv_kw, state.slot, state.step, state.soc, state.capacity_kwh,
            state.backlog_kwh, state.grid, state.last_load_kw, state.last_pv_kw,
            state.community_price, state.noise_offset, action.battery_kw, action.pv_curtailment,
            action.dr_share, use_rule, reference, emergency, qty, limit, side,
        )  # fmt: skip
        return GateClosure(
            slot=state.slot.copy(), book=book, reference=reference, emergency=emergency
        )

    # ---- settlement --------------------------------------------------------------------
    def close(self, gate: GateClosure, state: GridState) -> Settlement:
        """Meter the slot just simulated and settle it (call after `Engine.step`)."""
        p = self.params
        metered = np.rint(state.last_net_kw * p.dt_h * 1000.0).astype(np.int64)
        b = metered.shape[0]
        announce = np.empty(b, dtype=np.bool_)
        baseline = np.empty((b, self.n), dtype=np.int64)
        c = self._compiled
        announce_range(
            0, b, self._mcfg, p.dt_h, c.forecast_mode, c.lead_scale, c.noise, c.stride,
            state.grid, p.prosumer_load_kw, p.prosumer_pv_kw, state.slot, state.step,
            state.last_load_kw, state.last_pv_kw, state.noise_offset, announce, baseline,
        )  # fmt: skip
        return self.ledger.settle(
            SlotInput(
                slot=gate.slot,
                book=gate.book,
                reference=gate.reference,
                metered_wh=metered,
                dr_announce=announce,
                dr_baseline_wh=baseline,
                emergency=gate.emergency,
            )
        )


def open_ledger(params: GridParams, config: MarketConfig, batch: int) -> Ledger:
    """The ledger the scenario names, for `batch` grids."""
    n = params.n_prosumer
    if config.ledger == "mirror":
        return MirrorLedger(batch, n, config)
    if batch != 1:
        raise ScenarioError(
            f"market.ledger: {config.ledger!r} settles one grid per environment, got a batch of "
            f"{batch}; allowed: 'mirror' for batches, or a single environment"
        )
    from envs.ledger_chain import open_chain_ledger  # web3 costs a second to import

    # A meter's plausibility cap must admit the largest position the prosumer can take.
    bat = params.batteries.power_kw[:n]
    peak_kw = params.prosumer_load_kw.max(axis=0) + params.prosumer_pv_kw.max(axis=0) + bat
    return open_chain_ledger(n, config, [int(w) for w in np.ceil(peak_kw * 1500.0) + 1000])


def market_matrix(s: Settlement, gate: GateClosure) -> FloatArray:
    """The slot's market figures, one row per grid, one column per `MARKET_INFO` key."""
    out = np.empty((s.price.shape[0], len(MARKET_INFO)), dtype=np.float64)
    summarise_rows(
        s.price, s.volume_wh, s.fees, s.imbalance_wh, s.refused, s.rewards, s.gas_used,
        s.transactions, np.stack([s.dr_event, s.dr_created, s.dr_settled], axis=1).astype(np.int64),
        s.dr_paid, gate.emergency, out,
    )  # fmt: skip
    return out


def market_columns(matrix: FloatArray) -> dict[str, FloatArray]:
    """A market matrix as `info` columns keyed as `MARKET_INFO` (views, no copies)."""
    return {k: matrix[:, j] for j, k in enumerate(MARKET_INFO)}


def market_info(s: Settlement, gate: GateClosure, i: int) -> dict[str, Any]:
    """Row `i` of the market figures as plain floats (the single env's `info`)."""
    row = market_matrix(s, gate)[i]
    return {k: float(row[j]) for j, k in enumerate(MARKET_INFO)}
