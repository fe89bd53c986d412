"""The slot clock shared by the bridge and the simulator: slot `s` starts at genesis + s x length.

On the chain a slot is 900 s from the deployment's genesis. Tests and demos shorten the wall-clock
length (1-2 s) while each slot still stands for one 15-minute market slot of energy, so a day
runs in minutes; only this object knows the difference.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlotClock:
    genesis: float
    slot_seconds: float

    def slot(self, now_s: float) -> int:
        return int((now_s - self.genesis) // self.slot_seconds)

    def start(self, slot: int) -> float:
        return self.genesis + slot * self.slot_seconds
