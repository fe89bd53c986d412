"""Prices: the time-of-use tariff with the upstream grid and the seed's community price.

The community price follows the seed formula

    price = baseRate * (demandFactor + gridStressFactor) * timeOfDayMultiplier

with demandFactor = community net load / the year's peak net load (floored at 0.1 so a PV
surplus makes energy cheap, not free) and gridStressFactor = transformer loading above the
stress threshold, scaled to 1 at 100 % loading. The agent's price signal multiplies it. The
market issue turns this price into the reference price and order band of EnergyTrading.
"""

from __future__ import annotations

import numpy as np

from envs.params import FloatArray, GridParams, IntArray

DEMAND_FACTOR_FLOOR = 0.1


def seed_price(
    p: GridParams,
    slot_of_day: IntArray,
    net_load_kw: FloatArray,
    trafo_loading: FloatArray,
    multiplier: FloatArray,
) -> FloatArray:
    """The community price per kWh for a batch, given the slot's net load and grid stress."""
    demand = np.maximum(net_load_kw / p.demand_reference_kw, DEMAND_FACTOR_FLOOR)
    stress = np.maximum(trafo_loading - p.stress_threshold, 0.0) / max(
        1.0 - p.stress_threshold, 1e-9
    )
    return p.base_rate * (demand + stress) * p.tod_multiplier[slot_of_day] * multiplier
