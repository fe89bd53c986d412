"""The device simulator behind `microgrid devices simulate`: a site's devices on a real broker.

Each device of the site manifest is a `VirtualDevice` with its own key, its own broker user and
its own MQTT connection (so the broker's ACL and the per-device passwords are exercised exactly
as in the field). A slot clock drives them all from the scenario's load and PV profiles: at each
slot boundary every device reports the slot that just ended, and meters sign its net energy.
Commands change what the devices do in the slot that follows, within their own limits, so the
bridge's decisions show up in the next telemetry (a battery's SoC moves, a curtailed inverter
produces less). The profiles arrive as arrays: the simulator does not build grids (pandapower is
not allowed in `bridge`); the CLI builds them from the scenario.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bridge.clock import SlotClock
from bridge.mqtt import MqttLink, Will
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.site_builder import device_key
from bridge.topics import device_subscriptions
from bridge.virtual_device import VirtualDevice

log = logging.getLogger("bridge.simulator")

#: Share of a household's load that sits in its smart appliances (what demand response moves).
FLEXIBLE_SHARE = 0.3
#: How much of yesterday's deferred energy comes back each slot.
REBOUND_PER_SLOT = 0.25


@dataclass(frozen=True)
class Profiles:
    """(T, n_prosumer) kW of load and available PV, in the site's prosumer order."""

    load_kw: np.ndarray
    pv_kw: np.ndarray

    def row(self, slot: int) -> int:
        return slot % self.load_kw.shape[0]


@dataclass
class FleetStats:
    telemetry_sent: int = 0
    readings_signed: int = 0
    commands_applied: int = 0
    commands_rejected: int = 0
    limit_violations: int = 0
    """Set-points a device applied beyond its own rating or SoC window: must stay 0."""
    per_device: dict[str, int] = field(default_factory=dict)


class Fleet:
    """The site's virtual devices and their physics; sans-I/O (the caller moves the bytes)."""

    def __init__(
        self,
        site: SiteManifest,
        profiles: Profiles,
        domain: ReadingDomain,
        seed: str,
        start_nonces: Mapping[str, int] | None = None,
    ):
        """`start_nonces`: each device's next registry nonce (`registration.reading_nonces`);
        None starts every device at 0, right only on a fresh registry."""
        self.site = site
        self.profiles = profiles
        b = site.batteries
        self.devices: dict[str, VirtualDevice] = {}
        battery_index = {d: k for k, d in enumerate(site.battery_devices())}
        self.battery_index = battery_index
        for spec in site.devices:
            k = battery_index.get(spec.id)
            dev = VirtualDevice(site.site, spec, device_key(seed, spec.id), domain)
            dev.nonce = (start_nonces or {}).get(spec.id, 0)
            if k is not None:
                dev.soc = b.soc_initial[k]
                dev.soc_min, dev.soc_max = b.soc_min[k], b.soc_max[k]
            self.devices[spec.id] = dev
        self.backlog_kwh = np.zeros(len(site.prosumers))
        self.stats = FleetStats()

    def _battery_step(self, dev: VirtualDevice) -> float:
        """Run the set-point for one slot; returns the power really exchanged (kW)."""
        k = self.battery_index[dev.spec.id]
        b = self.site.batteries
        dt = self.site.dt_h
        cap = max(b.capacity_kwh[k], 1e-9)
        p = dev.setpoint_kw
        if abs(p) > dev.spec.power_kw + 1e-9:
            self.stats.limit_violations += 1
        if p >= 0:
            room = (dev.soc_max - dev.soc) * cap / (dt * b.efficiency_charge[k])
            p = min(p, max(room, 0.0))
            dev.soc += p * dt * b.efficiency_charge[k] / cap
        else:
            room = (dev.soc - dev.soc_min) * cap * b.efficiency_discharge[k] / dt
            p = max(p, -max(room, 0.0))
            dev.soc += p * dt / (b.efficiency_discharge[k] * cap)
        dev.soc = min(max(dev.soc, 0.0), 1.0)
        if dev.soc < dev.soc_min - 1e-6 or dev.soc > dev.soc_max + 1e-6:
            self.stats.limit_violations += 1
        return p

    def telemetry(self, slot: int, now_ms: int) -> list[tuple[str, str, bytes]]:
        """Every device's DDATA for `slot` (just ended): (device, topic, payload)."""
        site, dt = self.site, self.site.dt_h
        t = self.profiles.row(slot)
        out: list[tuple[str, str, bytes]] = []
        total_net = 0.0

        def send(dev: VirtualDevice, metrics: dict[str, object], wh: int | None = None) -> None:
            topic, payload = dev.telemetry(slot, now_ms, metrics, wh)
            out.append((dev.spec.id, topic, payload))

        for i, p in enumerate(site.prosumers):
            load = float(self.profiles.load_kw[t, i])
            available = float(self.profiles.pv_kw[t, i])
            pv_dev, app_dev = self.devices[p.pv], self.devices[p.appliance]
            bat_dev, meter_dev = self.devices[p.battery], self.devices[p.meter]
            # Demand response defers part of the flexible load; it returns in later slots.
            flexible = FLEXIBLE_SHARE * load
            deferred = app_dev.dr_share * flexible
            rebound = REBOUND_PER_SLOT * self.backlog_kwh[i] / dt
            self.backlog_kwh[i] += (deferred - rebound) * dt
            appliance_kw = flexible - deferred + rebound
            house_kw = load - flexible + appliance_kw
            pv_kw = available * (1.0 - pv_dev.curtailment)
            battery_kw = self._battery_step(bat_dev)
            net = house_kw - pv_kw + battery_kw
            total_net += net
            send(
                pv_dev,
                {"pv_kw": pv_kw, "available_kw": available, "curtailment": pv_dev.curtailment},
            )
            send(
                app_dev,
                {
                    "load_kw": appliance_kw,
                    "backlog_kwh": float(self.backlog_kwh[i]),
                    "dr_share": app_dev.dr_share,
                },
            )
            send(bat_dev, {"soc": bat_dev.soc, "soh": 1.0, "power_kw": battery_kw})
            send(meter_dev, {"net_kw": net, "load_kw": house_kw}, round(net * dt * 1000))
            self.stats.readings_signed += 1
        if site.community_battery is not None:
            dev = self.devices[site.community_battery]
            power = self._battery_step(dev)
            total_net += power
            send(dev, {"soc": dev.soc, "soh": 1.0, "power_kw": power})
        sensor = self.devices[site.grid_sensor]
        loading = min(abs(total_net) / max(site.demand_reference_kw, 1e-9), 5.0)
        send(
            sensor,
            {
                "v_min_pu": 1.0 - 0.03 * loading,
                "v_max_pu": 1.0 + 0.01 * loading,
                "line_loading": 0.8 * loading,
                "trafo_loading": loading,
                "trafo_net_kw": total_net,
            },
        )
        self.stats.telemetry_sent += len(out)
        return out

    def on_command(self, device: str, payload: bytes, now_ms: int) -> list[tuple[str, bytes]]:
        dev = self.devices[device]
        before = dict(dev.applied)
        out = dev.on_command(payload, now_ms, self.site.dt_h)
        for cid, status in dev.applied.items():
            if cid not in before:
                if status == "applied":
                    self.stats.commands_applied += 1
                else:
                    self.stats.commands_rejected += 1
        if len(dev.applied) > 4096:  # remember recent ids only; older ones have expired anyway
            for cid in list(dev.applied)[:2048]:
                del dev.applied[cid]
        return out


async def simulate(
    site: SiteManifest,
    profiles: Profiles,
    domain: ReadingDomain,
    *,
    broker_url: str,
    passwords: dict[str, str],
    ca_file: Path | None,
    clock: SlotClock,
    seed: str,
    slots: int | None = None,
    bridge_node: str = "bridge",
    stop: asyncio.Event | None = None,
    wall: Callable[[], float] = time.time,
    start_nonces: Mapping[str, int] | None = None,
) -> FleetStats:
    """Connect every device, then report each slot until `slots` slots passed or `stop` is set."""
    fleet = Fleet(site, profiles, domain, seed, start_nonces)
    links: dict[str, MqttLink] = {}
    stop = stop or asyncio.Event()
    for device_id, dev in fleet.devices.items():
        (wt, wp), (bt, bp) = dev.connect(int(wall() * 1000))
        if device_id not in passwords:
            raise KeyError(f"passwords: expected an entry for device {device_id!r}")
        link = MqttLink(
            broker_url,
            client_id=f"{device_id}",
            username=device_id,
            password=passwords[device_id],
            ca_file=ca_file,
            will=Will(wt, wp),
        )
        await link.connect(device_subscriptions(site.site, device_id, bridge_node))
        link.publish(bt, bp)
        links[device_id] = link

    async def serve(device_id: str, link: MqttLink) -> None:
        while not stop.is_set():
            msg = await link.receive(0.5)
            if msg is None or "/DCMD/" not in msg.topic:
                continue
            for topic, payload in fleet.on_command(device_id, msg.payload, int(wall() * 1000)):
                link.publish(topic, payload)

    servers = [asyncio.create_task(serve(d, link)) for d, link in links.items()]
    first = clock.slot(wall()) + 1
    try:
        slot = first
        while not stop.is_set() and (slots is None or slot < first + slots):
            delay = clock.start(slot) - wall()
            if delay > 0:
                with_stop = asyncio.create_task(stop.wait())
                await asyncio.wait({with_stop}, timeout=delay)
                with_stop.cancel()
                if stop.is_set():
                    break
            now_ms = int(wall() * 1000)
            for device_id, topic, payload in fleet.telemetry(slot - 1, now_ms):
                links[device_id].publish(topic, payload)
            log.info("slot reported", extra={"slot": slot - 1, "devices": len(links)})
            slot += 1
        # Let the answers to the last slot's commands go out before leaving.
        await asyncio.sleep(min(clock.slot_seconds * 0.8, 2.0))
    finally:
        stop.set()
        await asyncio.gather(*servers, return_exceptions=True)
        for device_id, link in links.items():
            dev = fleet.devices[device_id]
            await link.close(dev.goodbye(int(wall() * 1000)))
    return fleet.stats
