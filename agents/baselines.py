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


class RuleBasedPolicy:
    """Self-consumption first, then peak shaving: the rule a household installer would set.

    Each prosumer battery charges from its own forecast PV surplus and discharges into its own
    forecast deficit. The community battery absorbs the community's surplus and, when the
    community imports, discharges only in the tariff's most expensive band (where a kWh saved
    is worth most). No curtailment, no demand response, neutral price signal.
    """

    name = "rule_based"

    def __init__(self, codec: Codec, peak_price_ratio: float = 0.99) -> None:
        self.codec = codec
        sizes = dict(codec.field_sizes())
        self.n_prosumer = sizes["load"]
        self.n_battery = sizes["soc"]
        self.horizon = sizes["import_price_forecast"]
        self.power = np.asarray(codec.battery_power_kw, dtype=np.float64)
        self.peak_price_ratio = peak_price_ratio
        self._price = codec.obs_slice("import_price_forecast").start

    def predict(self, obs: np.ndarray) -> np.ndarray:
        o, single = _batch(obs)
        raw = self.codec.decode_observation(o)
        b, n, h = o.shape[0], self.n_prosumer, self.horizon
        load = raw["load_forecast"].reshape(b, n, h)[:, :, 0]
        pv = raw["pv_forecast"].reshape(b, n, h)[:, :, 0]
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
