"""The observation and action layout: names, units, scaling and bounds, in one place.

The environment, the trainer and the live bridge all build vectors through this module, so a
policy sees exactly the same numbers in simulation and in the field (no train/serve skew). A
`Codec` is plain data: it serialises to a dict that is stored beside every exported policy.

Every action component lies in [-1, 1] (what SB3 expects of a Box):

* battery set-point: fraction of the battery's power rating, charging > 0;
* PV curtailment and demand-response share: ``max(a, 0)`` (so 0 means "do nothing");
* price signal: the seed price is scaled by ``signal_range ** a``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from envs.params import FloatArray, GridParams


@dataclass(frozen=True)
class Field:
    """One named block of a vector: `size` entries in `unit`, stored as (raw - offset) / scale."""

    name: str
    size: int
    unit: str
    low: float
    high: float
    description: str
    scale: tuple[float, ...] = ()
    """Per entry; empty means 1.0 for all."""
    offset: tuple[float, ...] = ()
    """Per entry; empty means 0.0 for all."""
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class DecodedAction:
    """An action turned into physical set-points (batch axis first)."""

    battery_kw: FloatArray
    pv_curtailment: FloatArray
    dr_share: FloatArray
    price_multiplier: FloatArray
    clipped: FloatArray
    """Per row, how many components lay outside [-1, 1] and were clipped."""
    clip_amount: FloatArray
    """Per row, the summed distance by which components were clipped."""


@dataclass(frozen=True)
class Codec:
    """Observation and action layout for one grid; `from_params` builds it from GridParams."""

    obs_fields: tuple[Field, ...]
    act_fields: tuple[Field, ...]
    battery_power_kw: tuple[float, ...]
    signal_range: float
    _slices: dict[str, slice] = field(default_factory=dict, compare=False, repr=False)
    # Derived in __post_init__ (frozen dataclass: set through object.__setattr__).
    _obs_dim: int = field(init=False, compare=False, repr=False)
    _offset: np.ndarray = field(init=False, compare=False, repr=False)
    _inv_scale: np.ndarray = field(init=False, compare=False, repr=False)
    _low: np.ndarray = field(init=False, compare=False, repr=False)
    _high: np.ndarray = field(init=False, compare=False, repr=False)
    _power: np.ndarray = field(init=False, compare=False, repr=False)
    _act_slices: list[slice] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        start = 0
        for f in self.obs_fields:
            self._slices[f.name] = slice(start, start + f.size)
            start += f.size
        object.__setattr__(self, "_obs_dim", start)
        scale = np.concatenate(
            [np.asarray(f.scale or (1.0,) * f.size, dtype=np.float64) for f in self.obs_fields]
        )
        offset = np.concatenate(
            [np.asarray(f.offset or (0.0,) * f.size, dtype=np.float64) for f in self.obs_fields]
        )
        object.__setattr__(self, "_inv_scale", 1.0 / scale)
        object.__setattr__(self, "_offset", offset)
        object.__setattr__(self, "_low", self.bounds()[0].astype(np.float64))
        object.__setattr__(self, "_high", self.bounds()[1].astype(np.float64))
        object.__setattr__(self, "_power", np.asarray(self.battery_power_kw, dtype=np.float64))
        bounds = np.concatenate([[0], np.cumsum([f.size for f in self.act_fields])])
        object.__setattr__(
            self, "_act_slices", [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        )

    # ---- observation -------------------------------------------------------------------
    @property
    def obs_dim(self) -> int:
        return self._obs_dim

    @property
    def act_dim(self) -> int:
        return sum(f.size for f in self.act_fields)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of the encoded observation (float32)."""
        low = np.concatenate([np.full(f.size, f.low, dtype=np.float32) for f in self.obs_fields])
        high = np.concatenate([np.full(f.size, f.high, dtype=np.float32) for f in self.obs_fields])
        return low, high

    def scaling(self) -> np.ndarray:
        """(4, dim) rows offset, 1/scale, low, high: what compiled encoders need."""
        return np.ascontiguousarray(
            np.stack([self._offset, self._inv_scale, self._low, self._high])
        )

    def field_sizes(self) -> list[tuple[str, int]]:
        return [(f.name, f.size) for f in self.obs_fields]

    def obs_slice(self, name: str) -> slice:
        return self._slices[name]

    def obs_names(self) -> list[str]:
        """One name per observation entry, e.g. ``soc[bus6]`` or ``load_forecast[bus6,+3]``."""
        names: list[str] = []
        for f in self.obs_fields:
            if f.labels:
                names.extend(f"{f.name}[{lab}]" for lab in f.labels)
            else:
                names.extend(f"{f.name}[{i}]" for i in range(f.size))
        return names

    def encode(self, raw: Mapping[str, np.ndarray], batch: int) -> np.ndarray:
        """Scale and clip raw physical values (dict of (B, size) arrays) into float32 (B, dim).

        Clipping to the declared bounds keeps every observation inside the space, so an
        implausible reading cannot push a policy outside what it was trained on.
        """
        buf = np.empty((batch, self._obs_dim), dtype=np.float64)
        for f in self.obs_fields:
            buf[:, self._slices[f.name]] = raw[f.name]
        return self.scale_raw(buf)

    def scale_raw(self, buf: np.ndarray) -> np.ndarray:
        """Scale and clip a raw (B, dim) float64 buffer in place; return it as float32."""
        buf -= self._offset
        buf *= self._inv_scale
        np.clip(buf, self._low, self._high, out=buf)
        return buf.astype(np.float32)

    def decode_observation(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        """Invert `encode` (up to clipping): physical values per field, batch axis first."""
        x = np.atleast_2d(np.asarray(obs, dtype=np.float64)) / self._inv_scale + self._offset
        return {f.name: x[:, self._slices[f.name]] for f in self.obs_fields}

    # ---- action ------------------------------------------------------------------------
    def action_names(self) -> list[str]:
        names: list[str] = []
        for f in self.act_fields:
            names.extend(f"{f.name}[{lab}]" for lab in f.labels)
        return names

    def decode_action(self, action: np.ndarray) -> DecodedAction:
        """Clip to [-1, 1] (reporting how much) and map to physical set-points."""
        a = np.asarray(action, dtype=np.float64)
        clipped = np.clip(a, -1.0, 1.0)
        diff = np.abs(a - clipped)
        battery, pv, dr, price = (clipped[..., s] for s in self._act_slices)
        return DecodedAction(
            battery_kw=battery * self._power,
            pv_curtailment=np.maximum(pv, 0.0),
            dr_share=np.maximum(dr, 0.0),
            price_multiplier=self.signal_range ** price[..., 0],
            clipped=(diff > 0).sum(axis=-1).astype(np.float64),
            clip_amount=diff.sum(axis=-1),
        )

    def encode_action(
        self,
        battery_kw: np.ndarray,
        pv_curtailment: np.ndarray,
        dr_share: np.ndarray,
        price_multiplier: np.ndarray | float = 1.0,
    ) -> np.ndarray:
        """Physical set-points -> action vector(s): what rule-based controllers emit."""
        power = np.where(self._power > 0, self._power, 1.0)
        bat = np.clip(np.asarray(battery_kw, dtype=np.float64) / power, -1.0, 1.0)
        pv = np.clip(np.asarray(pv_curtailment, dtype=np.float64), 0.0, 1.0)
        dr = np.clip(np.asarray(dr_share, dtype=np.float64), 0.0, 1.0)
        lead = bat.shape[:-1]
        price = np.log(np.asarray(price_multiplier, dtype=np.float64)) / np.log(self.signal_range)
        price = np.broadcast_to(np.clip(price, -1.0, 1.0), lead)[..., None]
        pv = np.broadcast_to(pv, (*lead, pv.shape[-1]))
        dr = np.broadcast_to(dr, (*lead, dr.shape[-1]))
        return np.concatenate([bat, pv, dr, price], axis=-1).astype(np.float32)

    # ---- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def fields(fs: tuple[Field, ...]) -> list[dict[str, Any]]:
            return [
                {
                    **f.__dict__,
                    "scale": list(f.scale),
                    "offset": list(f.offset),
                    "labels": list(f.labels),
                }
                for f in fs
            ]

        return {
            "obs_fields": fields(self.obs_fields),
            "act_fields": fields(self.act_fields),
            "battery_power_kw": list(self.battery_power_kw),
            "signal_range": self.signal_range,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Codec:
        def fields(items: list[dict[str, Any]]) -> tuple[Field, ...]:
            return tuple(
                Field(
                    **{
                        **i,
                        "scale": tuple(i["scale"]),
                        "offset": tuple(i["offset"]),
                        "labels": tuple(i["labels"]),
                    }
                )
                for i in items
            )

        return cls(
            obs_fields=fields(d["obs_fields"]),
            act_fields=fields(d["act_fields"]),
            battery_power_kw=tuple(d["battery_power_kw"]),
            signal_range=float(d["signal_range"]),
        )

    @classmethod
    def from_params(cls, p: GridParams) -> Codec:
        names = p.prosumer_names
        bats = names + (("community",) if p.has_community_battery else ())
        h = p.horizon
        load_s = tuple(float(x) for x in p.load_scale_kw)
        pv_s = tuple(float(x) for x in p.pv_scale_kw)
        per_h = [f"{n},+{k + 1}" for n in names for k in range(h)]
        lead = [f"+{k + 1}" for k in range(h)]
        price_ref = float(max(p.import_price.max(), 1e-6))
        obs = (
            Field("time_of_day", 2, "sin/cos", -1, 1, "phase of the day", labels=("sin", "cos")),
            Field("day_of_year", 2, "sin/cos", -1, 1, "phase of the year", labels=("sin", "cos")),
            Field("soc", len(bats), "fraction", 0, 1, "battery state of charge", labels=bats),
            Field("state_of_health", len(bats), "fraction", 0, 1,
                  "capacity / nominal capacity", labels=bats),
            Field("load", len(names), "kW", 0, 10, "last slot's load / year peak",
                  scale=load_s, labels=names),
            Field("pv", len(names), "kW", 0, 10, "last slot's available PV / year peak",
                  scale=pv_s, labels=names),
            Field("backlog", len(names), "kWh", 0, 50, "deferred energy still to serve",
                  scale=load_s, labels=names),
            Field("load_forecast", len(names) * h, "kW", 0, 10, "load forecast per lead step",
                  scale=tuple(s for s in load_s for _ in range(h)), labels=tuple(per_h)),
            Field("pv_forecast", len(names) * h, "kW", 0, 10, "PV forecast per lead step",
                  scale=tuple(s for s in pv_s for _ in range(h)), labels=tuple(per_h)),
            Field("background_net_forecast", h, "kW", -10, 10,
                  "uncontrolled load - PV forecast / year peak net load",
                  scale=(p.demand_reference_kw,) * h, labels=tuple(lead)),
            Field("import_price_forecast", h, "currency/kWh", 0, 10,
                  "time-of-use import price per lead step / day's peak price",
                  scale=(price_ref,) * h, labels=tuple(lead)),
            Field("feed_in_price", 1, "currency/kWh", 0, 10, "feed-in tariff / peak import price",
                  scale=(price_ref,), labels=("now",)),
            Field("community_price", 1, "currency/kWh", 0, 50,
                  "last slot's seed-formula price / peak import price", scale=(price_ref,),
                  labels=("last",)),
            Field("grid", 4, "pu / fraction", -10, 10,
                  "v_min and v_max as (v - 1) / 0.1; max line and transformer loading",
                  scale=(0.1, 0.1, 1.0, 1.0), offset=(1.0, 1.0, 0.0, 0.0),
                  labels=("v_min", "v_max", "line_loading", "trafo_loading")),
        )  # fmt: skip
        act = (
            Field("battery", len(bats), "fraction of rated kW", -1, 1,
                  "set-point, charging > 0", labels=bats),
            Field("pv_curtailment", len(names), "fraction", -1, 1,
                  "share of available PV curtailed: max(a, 0)", labels=names),
            Field("demand_response", len(names), "fraction", -1, 1,
                  "share of the flexible load called: max(a, 0)", labels=names),
            Field("price_signal", 1, "log multiplier", -1, 1,
                  "seed price x signal_range ** a", labels=("community",)),
        )  # fmt: skip
        return cls(
            obs_fields=obs,
            act_fields=act,
            battery_power_kw=tuple(float(x) for x in p.batteries.power_kw),
            signal_range=p.signal_range,
        )
