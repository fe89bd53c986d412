"""The safety shield: every action is projected onto what the batteries can safely do now.

A learned policy gives no guarantees, and in the field a set-point the battery cannot follow is
at best ignored and at worst trips the inverter. The shield sits between any policy and the
devices, in simulation and in the live bridge alike, and changes as little as it must:

* non-finite components become 0 (the codec's "do nothing") and everything is clipped to [-1, 1];
* each battery's set-point is cut to the band that keeps the next SoC inside the window
  [soc_min + margin, soc_max - margin] after charge/discharge efficiency (the env's own battery
  model), which also bounds it by the power rating;
* with a ramp limit, the set-point moves at most `ramp_kw_per_step` from the last one; where
  that would leave the SoC band (the battery filled while charging hard), SoC safety wins and
  the report says so.

It needs only numpy at run time: the bridge imports it without gymnasium or pandapower. The
codec and battery parameters it takes are the same objects the env uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from envs.codec import Codec
    from envs.params import BatteryParams, GridParams

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

#: Back-off from the SoC-derived power limits, as a fraction of each battery's rating: a
#: set-point rounded through the float32 action (~6e-8 of the rating) still keeps the SoC
#: inside the window.
BACKOFF = 1e-6


@dataclass(frozen=True)
class ShieldReport:
    """What the projection changed; battery arrays are (..., n_battery), others per action."""

    requested_kw: FloatArray
    """Battery set-points asked for (non-finite -> 0, clipped to the rating)."""
    applied_kw: FloatArray
    """Battery set-points after the shield."""
    lower_kw: FloatArray
    """Most discharging set-point the SoC window allows now (<= 0)."""
    upper_kw: FloatArray
    """Most charging set-point the SoC window allows now (>= 0)."""
    non_finite: BoolArray
    """Per action component: was NaN or infinite (replaced by 0)."""
    out_of_range: BoolArray
    """Per action component: lay outside [-1, 1] (clipped)."""
    soc_limited: BoolArray
    """Per battery: the SoC window cut the set-point."""
    ramp_limited: BoolArray
    """Per battery: the ramp limit cut the set-point."""
    ramp_overridden: BoolArray
    """Per battery: no set-point met both limits; the SoC window was kept, the ramp broken."""

    @property
    def modified(self) -> BoolArray:
        """Per action row: did the shield change anything."""
        changed: BoolArray = np.asarray(
            self.non_finite.any(axis=-1)
            | self.out_of_range.any(axis=-1)
            | self.soc_limited.any(axis=-1)
            | self.ramp_limited.any(axis=-1)
            | self.ramp_overridden.any(axis=-1)
        )
        return changed


class Shield:
    """Projects actions onto the feasible set of the current SoC, power and ramp limits."""

    def __init__(
        self,
        batteries: BatteryParams,
        codec: Codec,
        dt_h: float,
        ramp_kw_per_step: FloatArray | float | None = None,
        soc_margin: float = 0.0,
    ) -> None:
        n = batteries.n
        self.batteries = batteries
        self.codec = codec
        self.dt_h = float(dt_h)
        if not self.dt_h > 0:
            raise ValueError(f"shield: dt_h must be > 0, got {dt_h}")
        self.power_kw = np.asarray(codec.battery_power_kw, dtype=np.float64)
        if self.power_kw.shape != (n,):
            raise ValueError(
                f"shield: codec has {self.power_kw.shape[0]} batteries, parameters have {n}"
            )
        self.soc_low = batteries.soc_min + soc_margin
        self.soc_high = batteries.soc_max - soc_margin
        if soc_margin < 0 or np.any(self.soc_low >= self.soc_high):
            raise ValueError(
                f"shield: soc_margin {soc_margin} must be >= 0 and leave a non-empty window "
                f"inside [soc_min, soc_max] = [{batteries.soc_min.tolist()}, "
                f"{batteries.soc_max.tolist()}]"
            )
        if ramp_kw_per_step is None:
            self.ramp_kw: FloatArray | None = None
        else:
            ramp = np.broadcast_to(np.asarray(ramp_kw_per_step, dtype=np.float64), (n,)).copy()
            if not np.all(ramp >= 0):
                raise ValueError(f"shield: ramp_kw_per_step must be >= 0, got {ramp.tolist()}")
            self.ramp_kw = ramp
        start = 0
        for f in codec.act_fields:
            if f.name == "battery":
                break
            start += f.size
        self._battery = slice(start, start + n)

    @classmethod
    def from_params(
        cls,
        params: GridParams,
        codec: Codec,
        ramp_kw_per_step: FloatArray | float | None = None,
        soc_margin: float = 0.0,
    ) -> Shield:
        """The shield of a scenario's batteries and time step."""
        return cls(params.batteries, codec, params.dt_h, ramp_kw_per_step, soc_margin)

    def limits(
        self, soc: FloatArray, capacity_kwh: FloatArray | None = None
    ) -> tuple[FloatArray, FloatArray]:
        """(lower, upper) set-point in kW that keeps the next SoC inside the shield's window.

        A battery already outside the window may only move back towards it.
        """
        b = self.batteries
        soc = np.asarray(soc, dtype=np.float64)
        if not np.isfinite(soc).all():
            raise ValueError(f"shield: soc must be finite, got {soc.tolist()}")
        cap = np.maximum(
            np.asarray(b.capacity_kwh if capacity_kwh is None else capacity_kwh, dtype=np.float64),
            0.0,
        )
        headroom = (self.soc_high - soc) * cap / (b.efficiency_charge * self.dt_h)
        reserve = (soc - self.soc_low) * cap * b.efficiency_discharge / self.dt_h
        margin = BACKOFF * self.power_kw
        upper = np.clip(headroom - margin, 0.0, self.power_kw)
        lower = -np.clip(reserve - margin, 0.0, self.power_kw)
        return lower, upper

    def project(
        self,
        action: np.ndarray,
        soc: FloatArray,
        last_setpoint: FloatArray | None = None,
        capacity_kwh: FloatArray | None = None,
    ) -> tuple[np.ndarray, ShieldReport]:
        """Project `action` (codec layout, (act_dim,) or (B, act_dim)) onto the feasible set.

        `soc` is each battery's state of charge now, `last_setpoint` the battery set-points in
        kW applied in the previous step (needed for the ramp limit; None skips it) and
        `capacity_kwh` the current capacity (nominal if None). Returns the float32 action and a
        report of what changed.
        """
        a = np.array(action, dtype=np.float64)
        if a.shape[-1:] != (self.codec.act_dim,):
            raise ValueError(
                f"shield: action must end in {self.codec.act_dim} components, got shape {a.shape}"
            )
        non_finite = ~np.isfinite(a)
        a[non_finite] = 0.0
        out_of_range = np.abs(a) > 1.0
        np.clip(a, -1.0, 1.0, out=a)

        requested = a[..., self._battery] * self.power_kw
        lower, upper = self.limits(soc, capacity_kwh)
        target = requested
        ramp_limited = np.zeros(requested.shape, dtype=bool)
        if self.ramp_kw is not None and last_setpoint is not None:
            last = np.asarray(last_setpoint, dtype=np.float64)
            target = np.clip(requested, last - self.ramp_kw, last + self.ramp_kw)
            ramp_limited = target != requested
        applied = np.clip(target, lower, upper)
        soc_limited = applied != target
        ramp_overridden = np.zeros(requested.shape, dtype=bool)
        if self.ramp_kw is not None and last_setpoint is not None:
            last = np.asarray(last_setpoint, dtype=np.float64)
            ramp_overridden = np.abs(applied - last) > self.ramp_kw * (1.0 + 1e-9) + 1e-12
        power = np.where(self.power_kw > 0, self.power_kw, 1.0)
        a[..., self._battery] = np.where(self.power_kw > 0, applied / power, 0.0)
        report = ShieldReport(
            requested_kw=requested,
            applied_kw=applied,
            lower_kw=np.broadcast_to(lower, requested.shape).copy(),
            upper_kw=np.broadcast_to(upper, requested.shape).copy(),
            non_finite=non_finite,
            out_of_range=out_of_range,
            soc_limited=soc_limited,
            ramp_limited=ramp_limited,
            ramp_overridden=ramp_overridden,
        )
        return a.astype(np.float32), report
