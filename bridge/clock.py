"""The slot clock shared by the bridge and the simulator: slot `s` starts at genesis + s x length.

On the chain a slot is 900 s from the deployment's genesis. Tests and demos shorten the wall-clock
length (1-2 s) while each slot still stands for one 15-minute market slot of energy, so a day
runs in minutes; only this object knows the difference.

What a slot *stands for* is the chain's view: slot `s` is the quarter hour that starts at the
deployment's genesis + s x 900 s, whatever the wall clock did. The policy's time features and the
simulator's profile row are both taken from that instant (`stands_for`, `slot_of_year`), so an
accelerated run sees the same time of day and day of year as the chain settles, and the bridge
and the devices agree on them without reading the wall clock.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass


def slot_of_year(unix_s: float, steps_per_day: int) -> int:
    """The env's slot index t (day of year x steps per day + slot of the day) of a UTC instant."""
    d = datetime.datetime.fromtimestamp(int(unix_s), tz=datetime.UTC)
    seconds = d.hour * 3600 + d.minute * 60 + d.second
    slot_of_day = seconds * steps_per_day // 86_400
    return (d.timetuple().tm_yday - 1) * steps_per_day + slot_of_day


@dataclass(frozen=True)
class SlotClock:
    genesis: float
    slot_seconds: float
    chain_genesis: float | None = None
    """The deployment's genesis (unix s); None: `genesis` (right when the clock is not sped up)."""
    chain_slot_seconds: float = 900.0
    """What one slot stands for on the chain."""

    def slot(self, now_s: float) -> int:
        return int((now_s - self.genesis) // self.slot_seconds)

    def start(self, slot: int) -> float:
        return self.genesis + slot * self.slot_seconds

    def stands_for(self, slot: int) -> float:
        """The unix time (s) at which the quarter hour that `slot` settles on the chain starts."""
        origin = self.genesis if self.chain_genesis is None else self.chain_genesis
        return origin + slot * self.chain_slot_seconds
