"""Baseline controllers that need no training: the yardsticks for every learned policy."""

from __future__ import annotations

import numpy as np

from envs.codec import Codec


def _batch(obs: np.ndarray) -> tuple[np.ndarray, bool]:
    o = np.asarray(obs, dtype=np.float64)
    return (o[None, :], True) if o.ndim == 1 else (o, False)


class IdlePolicy:
    """Batteries idle, no curtailment, no demand response: what the grid does on its own."""

    name = "idle"

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def predict(self, obs: np.ndarray) -> np.ndarray:
        o, single = _batch(obs)
        a = np.zeros((o.shape[0], self.codec.act_dim), dtype=np.float32)
        return a[0] if single else a


class _NextSlotReader:
    """What the rule-based baselines read from an observation: the next slot's forecasts."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        sizes = dict(codec.field_sizes())
        self.n_prosumer = sizes["load"]
        self.n_battery = sizes["soc"]
        self.horizon = sizes["import_price_forecast"]
        self.power = np.asarray(codec.battery_power_kw, dtype=np.float64)
        self._price = codec.obs_slice("import_price_forecast").start

    def next_slot(
        self, obs: np.ndarray
    ) -> tuple[np.ndarray, bool, dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """(batched obs, was single, decoded fields, load (B, n), PV (B, n)) for lead +1."""
        o, single = _batch(obs)
        raw = self.codec.decode_observation(o)
        b, n, h = o.shape[0], self.n_prosumer, self.horizon
        load = raw["load_forecast"].reshape(b, n, h)[:, :, 0]
        pv = raw["pv_forecast"].reshape(b, n, h)[:, :, 0]
        return o, single, raw, load, pv


class RuleBasedPolicy(_NextSlotReader):
    """Self-consumption first, then peak shaving: the rule a household installer would set.

    Each prosumer battery charges from its own forecast PV surplus and discharges into its own
    forecast deficit. The community battery absorbs the community's surplus and, when the
    community imports, discharges only in the tariff's most expensive band (where a kWh saved
    is worth most). No curtailment, no demand response, neutral price signal.
    """

    name = "rule_based"

    def __init__(self, codec: Codec, peak_price_ratio: float = 0.99) -> None:
        super().__init__(codec)
        self.peak_price_ratio = peak_price_ratio

    def predict(self, obs: np.ndarray) -> np.ndarray:
        o, single, raw, load, pv = self.next_slot(obs)
        b, n = o.shape[0], self.n_prosumer
        surplus = pv - load
        kw = np.zeros((b, self.n_battery))
        kw[:, :n] = np.clip(surplus, -self.power[:n], self.power[:n])
        if self.n_battery > n:
            community = surplus.sum(axis=1) - raw["background_net_forecast"][:, 0]
            # Scaled price 1.0 is the day's most expensive import price.
            at_peak = o[:, self._price] >= self.peak_price_ratio
            p = self.power[n]
            kw[:, n] = np.where(community > 0, np.minimum(community, p), np.where(at_peak, -p, 0.0))
        a = self.codec.encode_action(kw, np.zeros((b, n)), np.zeros((b, n)), 1.0)
        return a[0] if single else a


class PriceThresholdPolicy(_NextSlotReader):
    """Tariff arbitrage: charge every battery in cheap slots, discharge in dear ones.

    Prices are read as the observation scales them, relative to the day's peak import price,
    so the thresholds carry over to any tariff: on the default one (0.22 / 0.30 / 0.42 / 0.26)
    the defaults charge overnight and discharge in the evening peak. Discharge is capped at the
    community's forecast net load, because energy pushed past it is only sold at the feed-in
    price and is worth less than it cost to store. Between the thresholds the batteries idle.
    No curtailment, no demand response, neutral price signal.

    Charging is deliberately uncoordinated: every battery at full power the moment the tariff
    drops is the rebound peak that naive time-of-use response causes (on the default grid about
    340 kW through the transformer, which the env reports as thermal violations).
    """

    name = "arbitrage"

    def __init__(
        self, codec: Codec, charge_below: float = 0.6, discharge_above: float = 0.9
    ) -> None:
        if not 0.0 <= charge_below < discharge_above:
            raise ValueError(
                f"thresholds must satisfy 0 <= charge_below < discharge_above, "
                f"got {charge_below} and {discharge_above}"
            )
        super().__init__(codec)
        self.charge_below = charge_below
        self.discharge_above = discharge_above

    def predict(self, obs: np.ndarray) -> np.ndarray:
        o, single, raw, load, pv = self.next_slot(obs)
        b, n = o.shape[0], self.n_prosumer
        net = load.sum(axis=1) - pv.sum(axis=1) + raw["background_net_forecast"][:, 0]
        price = o[:, self._price]
        total = max(float(self.power.sum()), 1e-9)
        share = np.clip(net, 0.0, total) / total
        kw = np.where(
            (price <= self.charge_below)[:, None],
            self.power[None, :],
            np.where((price >= self.discharge_above)[:, None], -share[:, None] * self.power, 0.0),
        )
        a = self.codec.encode_action(kw, np.zeros((b, n)), np.zeros((b, n)), 1.0)
        return a[0] if single else a
