"""The device simulator behind `microgrid devices simulate`: a site's devices on a real broker.

Each device of the site manifest is a `VirtualDevice` with its own key, its own broker user and
its own MQTT connection (so the broker's ACL and the per-device passwords are exercised exactly
as in the field). A slot clock drives them all from the scenario's load and PV profiles: at each
slot boundary every device reports the slot that just ended, and meters sign its net energy.
Commands change what the devices do in the slot that follows, within their own limits, so the
bridge's decisions show up in the next telemetry (a battery's SoC moves, a curtailed inverter
produces less). The profiles arrive as arrays: the simulator does not build grids (pandapower is
not allowed in `bridge`); the CLI builds them from the scenario.

The physics are the env's own device models (`envs.devices`: batteries with efficiency and
fade, PV curtailment, flexible loads that defer and rebound), and a slot reads the profile row
of the quarter hour it stands for on the chain (`SlotClock.stands_for`), so the same policy on
the same day gives the same set-points and the same metered energy here as in the env
(tests/bridge/test_parity.py). The grid sensor solves the env's power flow on the same
injections (`bridge.grid_sensor`), so the bridge sees the env's voltages, loadings and
transformer flow, and with them its emergencies and demand-response events. Profiles without a
feeder (`Profiles.feeder` None, e.g. hand-made test profiles) get a stand-in: the transformer
flow is the lossless sum of the prosumers, the community battery and the feeder's uncontrolled
load, the voltages and loadings a rough function of that flow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bridge.clock import SlotClock, slot_of_year
from bridge.coap_resources import Resource
from bridge.coap_server import CoapDeviceServer
from bridge.errors import BridgeError
from bridge.faults import FaultInjector, FaultPlan
from bridge.grid_sensor import Feeder, GridSensor
from bridge.mqtt import MqttLink, Will
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.site_builder import device_key
from bridge.topics import device_subscriptions
from bridge.virtual_device import VirtualDevice
from envs.devices import battery_step, flexible_load_step, pv_output
from envs.params import GridParams

log = logging.getLogger("bridge.simulator")

#: How long the fleet waits, when it leaves, for the broker to acknowledge what it sent: longer
#: than paho's longest reconnect back-off (30 s), so a broker restart loses nothing.
DRAIN_S = 40.0


@dataclass(frozen=True)
class Profiles:
    """(T, n_prosumer) kW of load and available PV, in the site's prosumer order, by the env's
    slot of the year; with the feeder's uncontrolled load and the flexible-load model."""

    load_kw: np.ndarray
    pv_kw: np.ndarray
    background_net_kw: np.ndarray | None = None
    """(T,) kW the feeder's other consumers draw less their PV (and storage); None: none."""
    curtailable_share: float = 0.1
    """Share of a household's load that demand response drops (the scenario's flexible_load)."""
    shiftable_share: float = 0.2
    """Share that demand response defers into the appliances' backlog."""
    rebound_per_step: float = 0.25
    """Share of the backlog served again each slot without a demand-response call."""
    feeder: Feeder | None = None
    """The feeder's power-flow model, which the grid sensor solves; None: the stand-in."""

    @classmethod
    def of(cls, params: GridParams) -> Profiles:
        """A scenario's profiles and flexible-load model, as the env steps them."""
        return cls(
            params.prosumer_load_kw,
            params.prosumer_pv_kw,
            params.background_load_kw - params.background_pv_kw + params.background_storage_kw,
            float(params.curtailable_share),
            float(params.shiftable_share),
            float(params.rebound_per_step),
            Feeder.of(params),
        )

    def row(self, t: int) -> int:
        return t % self.load_kw.shape[0]


@dataclass(frozen=True)
class StartState:
    """Where the devices start (default: every battery at its initial SoC and rated capacity,
    no deferred load), e.g. an env episode's state in the middle of a day."""

    soc: np.ndarray
    """Per battery, in the codec's order (prosumers', then the community battery)."""
    capacity_kwh: np.ndarray
    """Per battery: usable capacity after fade."""
    backlog_kwh: np.ndarray
    """Per prosumer: energy its appliances deferred and still owe."""


@dataclass
class FleetStats:
    telemetry_sent: int = 0
    readings_signed: int = 0
    commands_applied: int = 0
    commands_rejected: int = 0
    limit_violations: int = 0
    """Set-points a device applied beyond its own rating or SoC window: must stay 0."""
    unsent: int = 0
    """Messages the broker never acknowledged when the fleet left (after `DRAIN_S`): must be 0."""
    per_device: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    """Faults injected (`bridge.faults`), by kind."""


class Fleet:
    """The site's virtual devices and their physics; sans-I/O (the caller moves the bytes)."""

    def __init__(
        self,
        site: SiteManifest,
        profiles: Profiles,
        domain: ReadingDomain,
        seed: str,
        start_nonces: Mapping[str, int] | None = None,
        clock: SlotClock | None = None,
        start: StartState | None = None,
    ):
        """`start_nonces`: each device's next registry nonce (`registration.reading_nonces`);
        None starts every device at 0, right only on a fresh registry. `clock`: slot `s` reads
        the profile row of the quarter hour it stands for; None reads row `s`."""
        self.site = site
        self.profiles = profiles
        self.clock = clock
        self.battery_params = site.batteries.params()
        b = self.battery_params
        self.soc = np.array(b.soc_initial if start is None else start.soc, dtype=np.float64)
        self.capacity_kwh = np.array(
            b.capacity_kwh if start is None else start.capacity_kwh, dtype=np.float64
        )
        self.devices: dict[str, VirtualDevice] = {}
        battery_index = {d: k for k, d in enumerate(site.battery_devices())}
        self.battery_index = battery_index
        for spec in site.devices:
            k = battery_index.get(spec.id)
            dev = VirtualDevice(site.site, spec, device_key(seed, spec.id), domain)
            dev.nonce = (start_nonces or {}).get(spec.id, 0)
            if k is not None:
                dev.soc, dev.capacity_kwh = float(self.soc[k]), float(self.capacity_kwh[k])
                dev.soc_min, dev.soc_max = float(b.soc_min[k]), float(b.soc_max[k])
                dev.efficiency_charge = float(b.efficiency_charge[k])
                dev.efficiency_discharge = float(b.efficiency_discharge[k])
            self.devices[spec.id] = dev
        self.backlog_kwh = np.zeros(len(site.prosumers))
        if start is not None:
            self.backlog_kwh = np.array(start.backlog_kwh, dtype=np.float64)
        self.stats = FleetStats()
        self.sensor = None if profiles.feeder is None else GridSensor(profiles.feeder)

    def idle(self) -> None:
        """Drop every set-point: the devices come up doing nothing until commanded."""
        for dev in self.devices.values():
            dev.setpoint_kw, dev.curtailment, dev.dr_share = 0.0, 0.0, 0.0

    def row(self, slot: int) -> int:
        """The profile row of `slot`: the env's slot of the year it stands for."""
        if self.clock is None:
            return self.profiles.row(slot)
        return self.profiles.row(slot_of_year(self.clock.stands_for(slot), self.site.steps_per_day))

    def _batteries(self) -> np.ndarray:
        """Run every battery's set-point for one slot (the env's model); returns the kW really
        exchanged, in the codec's battery order."""
        ids = self.site.battery_devices()
        b = self.battery_params
        setpoint = np.array([self.devices[d].setpoint_kw for d in ids])
        self.stats.limit_violations += int((np.abs(setpoint) > b.power_kw + 1e-9).sum())
        out = battery_step(
            b, self.soc[None], self.capacity_kwh[None], setpoint[None], self.site.dt_h
        )
        self.soc, self.capacity_kwh = out.soc[0], out.capacity_kwh[0]
        outside = (self.soc < b.soc_min - 1e-6) | (self.soc > b.soc_max + 1e-6)
        self.stats.limit_violations += int(outside.sum())
        for k, d in enumerate(ids):
            self.devices[d].soc = float(self.soc[k])
            self.devices[d].capacity_kwh = float(self.capacity_kwh[k])
        return np.asarray(out.power_kw[0])

    def telemetry(self, slot: int, now_ms: int) -> list[tuple[str, str, bytes]]:
        """Every device's DDATA for `slot` (just ended): (device, topic, payload)."""
        site, dt, prof = self.site, self.site.dt_h, self.profiles
        t = self.row(slot)
        out: list[tuple[str, str, bytes]] = []

        def send(dev: VirtualDevice, metrics: dict[str, object], wh: int | None = None) -> None:
            topic, payload = dev.telemetry(slot, now_ms, metrics, wh)
            out.append((dev.spec.id, topic, payload))

        prosumers = [(self.devices[p.pv], self.devices[p.appliance]) for p in site.prosumers]
        load = np.asarray(prof.load_kw[t], dtype=np.float64)
        available = np.asarray(prof.pv_kw[t], dtype=np.float64)
        curtailment = np.array([pv.curtailment for pv, _ in prosumers])
        dr_share = np.array([app.dr_share for _, app in prosumers])
        flexible = flexible_load_step(
            load[None], self.backlog_kwh[None], dr_share[None], prof.curtailable_share,
            prof.shiftable_share, prof.rebound_per_step, dt,
        )  # fmt: skip
        served = flexible.served_kw[0]
        flexible_demand = (prof.curtailable_share + prof.shiftable_share) * load
        appliance = flexible_demand - (
            flexible.curtailed_kw[0] + flexible.deferred_kw[0] - flexible.rebound_kw[0]
        )
        self.backlog_kwh = flexible.backlog_kwh[0]
        pv_kw = pv_output(available, curtailment)
        battery_kw = self._batteries()
        total_net = 0.0
        for i, p in enumerate(site.prosumers):
            pv_dev, app_dev = prosumers[i]
            bat_dev, meter_dev = self.devices[p.battery], self.devices[p.meter]
            # The env's metered net: served load - PV output + own battery (charging > 0).
            net = float(served[i] - pv_kw[i] + battery_kw[i])
            total_net += net
            send(
                pv_dev,
                {
                    "pv_kw": float(pv_kw[i]),
                    "available_kw": float(available[i]),
                    "curtailment": pv_dev.curtailment,
                },
            )
            send(
                app_dev,
                {
                    "load_kw": float(appliance[i]),
                    "backlog_kwh": float(self.backlog_kwh[i]),
                    "dr_share": app_dev.dr_share,
                    "demand_kw": float(flexible_demand[i]),
                },
            )
            k = self.battery_index[p.battery]
            send(bat_dev, self._battery_metrics(k, float(battery_kw[k])))
            send(meter_dev, {"net_kw": net, "load_kw": float(served[i])}, round(net * dt * 1000))
            self.stats.readings_signed += 1
        if site.community_battery is not None:
            k = self.battery_index[site.community_battery]
            power = float(battery_kw[k])
            total_net += power
            send(self.devices[site.community_battery], self._battery_metrics(k, power))
        if prof.background_net_kw is not None:
            total_net += float(prof.background_net_kw[t])
        sensor = self.devices[site.grid_sensor]
        if self.sensor is not None:
            reading: dict[str, object] = {
                **self.sensor.read(t, load, served, pv_kw, battery_kw, total_net)
            }
            send(sensor, reading)
        else:
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

    def _battery_metrics(self, k: int, power_kw: float) -> dict[str, object]:
        nominal = float(self.battery_params.capacity_kwh[k])
        soh = float(self.capacity_kwh[k]) / nominal if nominal > 0 else 1.0
        return {"soc": float(self.soc[k]), "soh": soh, "power_kw": power_kw}

    def on_command(
        self, device: str, payload: bytes, now_ms: int, announce_accepted: bool = True
    ) -> list[tuple[str, bytes]]:
        dev = self.devices[device]
        before = dict(dev.applied)
        out = dev.on_command(payload, now_ms, self.site.dt_h, announce_accepted)
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
    first_slot: int | None = None,
    start: StartState | None = None,
    coap: CoapDeviceServer | None = None,
    faults: FaultPlan | None = None,
) -> FleetStats:
    """Connect every device, then report each slot until `slots` slots passed or `stop` is set.

    The devices first report the slot before `first_slot` (default: the slot after they are all
    connected) as they find it, idle, and obey commands from then on: set-points that arrived
    while they were connecting are dropped, so a run starts from the state an env episode
    starts from (batteries idle in the slot before, at their initial SoC or `start`'s).

    The devices `coap` serves (already started) speak CoAP: their births, telemetry and
    goodbyes become its resources' representations and their commands arrive through it; every
    other device has its own MQTT connection.

    `faults`: drop-outs, stuck values, clock skew, malformed and forged messages to inject
    (`bridge.faults`), seeded by `seed`.
    """
    fleet = Fleet(site, profiles, domain, seed, start_nonces, clock, start)
    injector = None
    if faults is not None and faults.rates:
        keys = {d: dev.key for d, dev in fleet.devices.items()}
        injector = FaultInjector(faults, domain, keys, seed)

    def send(device_id: str, topic_text: str, payload: bytes) -> None:
        if device_id in on_coap:
            assert coap is not None
            coap.publish(device_id, Resource.DATA, payload)
        else:
            links[device_id].publish(topic_text, payload)

    links: dict[str, MqttLink] = {}
    stop = stop or asyncio.Event()
    on_coap = set(coap.devices) if coap is not None else set()
    if coap is not None:
        coap.on_command = lambda device, payload: fleet.on_command(
            device, payload, int(wall() * 1000), announce_accepted=False
        )
    for device_id, dev in fleet.devices.items():
        (wt, wp), (bt, bp) = dev.connect(int(wall() * 1000))
        if device_id in on_coap:
            assert coap is not None
            coap.publish(device_id, Resource.BIRTH, bp)
            continue
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
                if injector is None:
                    link.publish(topic, payload)
                    continue
                # A device whose uplink is down (a drop-out) sends its answers after what it
                # holds, in its own order.
                for _, t, p in injector.hold(device_id, topic, payload):
                    link.publish(t, p)

    servers = [asyncio.create_task(serve(d, link)) for d, link in links.items()]
    first = clock.slot(wall()) + 1 if first_slot is None else first_slot
    try:
        late = wall() - clock.start(first)
        if late > 0.25 * clock.slot_seconds:
            raise BridgeError(
                f"first_slot: expected the devices connected before slot {first} starts, "
                f"they were {late:.1f} s late"
            )
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
            if slot == first:
                fleet.idle()
            sent = fleet.telemetry(slot - 1, now_ms)
            for device_id, topic_text, payload in (
                sent if injector is None else injector.apply(sent)
            ):
                send(device_id, topic_text, payload)
            log.info("slot reported", extra={"slot": slot - 1, "devices": len(fleet.devices)})
            slot += 1
        if injector is not None:  # what a dropped-out device still holds goes out now
            # ... at the next boundary, when it would have gone with the next slot's: late, as
            # every drop-out's (sent at once it would look on time for the last slot).
            delay = clock.start(slot) - wall()
            if injector.holding and delay > 0 and not stop.is_set():
                with_stop = asyncio.create_task(stop.wait())
                await asyncio.wait({with_stop}, timeout=delay)
                with_stop.cancel()
            for device_id, topic_text, payload in injector.flush():
                send(device_id, topic_text, payload)
            fleet.stats.faults = dict(injector.injected)
        # Let the answers to the last slot's commands go out before leaving.
        await asyncio.sleep(min(clock.slot_seconds * 0.8, 2.0))
    finally:
        stop.set()
        await asyncio.gather(*servers, return_exceptions=True)
        # A device that lost the broker resends its queue after reconnecting: wait for that
        # (paho's back-off reaches 30 s) before leaving, or its last readings would be lost.
        unsent = await asyncio.gather(*(link.drain(DRAIN_S) for link in links.values()))
        fleet.stats.unsent = sum(unsent)
        for device_id, link in links.items():
            dev = fleet.devices[device_id]
            await link.close(dev.goodbye(int(wall() * 1000)))
        if coap is not None:
            for device_id in on_coap:
                _, goodbye = fleet.devices[device_id].goodbye(int(wall() * 1000))
                coap.publish(device_id, Resource.DEATH, goodbye)
            coap.on_command = None
    return fleet.stats
