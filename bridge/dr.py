"""Demand-response events: what the policy's `dr_share` means to a consumer, on DREVENT topics.

A command tells a smart appliance what to do; a DREVENT tells the household why, for how long
and what it earns (docs/iot.md): `start` with the target reduction and the incentive when the
policy first asks for a share of a consumer's flexible load, the same event id again each slot
it continues (the end moves, the target may change), and `end` the first slot it stops. The
messages are retained, so a display that reconnects shows the event in force. Sans-I/O: the
run loop publishes what `update` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bridge.clock import SlotClock
from bridge.core import Publish
from bridge.decision import Decision
from bridge.messages import ApplianceMetrics, DrEvent, encode
from bridge.observation import SiteState
from bridge.site import SiteManifest
from bridge.topics import MessageType, topic
from envs.codec import Codec

#: A share below this is no request at all (the policy's output is continuous).
MIN_SHARE = 0.01


@dataclass(frozen=True)
class EventPublish:
    status: str
    publish: Publish


@dataclass
class _Active:
    event_id: str
    start_ts: int


class DemandResponseEvents:
    """Open events per appliance, and the messages that open, extend and close them."""

    def __init__(self, site: SiteManifest) -> None:
        self.site = site
        self.active: dict[str, _Active] = {}
        self.published = 0

    def update(
        self,
        slot: int,
        decision: Decision,
        codec: Codec,
        state: SiteState,
        clock: SlotClock,
    ) -> list[EventPublish]:
        shares = np.asarray(codec.decode_action(decision.action).dr_share).reshape(-1)
        start_ms = int(clock.start(slot) * 1000)
        end_ms = int(clock.start(slot + 1) * 1000)
        price = float(self.site.import_price[slot % self.site.steps_per_day])
        out: list[EventPublish] = []
        for i, p in enumerate(self.site.prosumers):
            device = p.appliance
            share = float(shares[i])
            held = self.active.get(device)
            if share >= MIN_SHARE:
                if held is None:
                    held = self.active[device] = _Active(f"dr.{slot}.{p.name}", start_ms)
                latest = state.latest.get(device)
                flexible = (
                    latest.metrics.load_kw
                    if latest is not None and isinstance(latest.metrics, ApplianceMetrics)
                    else 0.0
                )
                msg = DrEvent(
                    event_id=held.event_id, device=device, ts=start_ms, status="start",
                    start_ts=held.start_ts, end_ts=end_ms,
                    target_kw=round(share * flexible, 4), incentive_per_kwh=price,
                )  # fmt: skip
                out.append(self._publish("start", msg))
            elif held is not None:
                msg = DrEvent(
                    event_id=held.event_id, device=device, ts=start_ms, status="end",
                    start_ts=held.start_ts, end_ts=start_ms, target_kw=0.0,
                    incentive_per_kwh=price,
                )  # fmt: skip
                del self.active[device]
                out.append(self._publish("end", msg))
        return out

    def _publish(self, status: str, msg: DrEvent) -> EventPublish:
        self.published += 1
        where = topic(self.site.site, MessageType.DREVENT, msg.device)
        return EventPublish(status, Publish(where, encode(msg), retain=True))
