"""A mixed site end to end: some devices on MQTT (a real mosquitto with TLS, passwords and the
ACL), the others on CoAP (a real aiocoap server on a free loopback UDP port), one bridge for all
of them, and a real anvil with the suite deployed, for a few accelerated slots. No mocks.

The simulator and the bridge run in the test's event loop, so the test can put a forged and a
malformed representation on a CoAP device's telemetry resource, as a tampered device or a
spoofing neighbour would, and check that the bridge refuses each under the reason an MQTT
message would get. A second run takes the CoAP devices' server away for two slots: the readings
they sign meanwhile come back from their `log` and reach the chain, none lost. A third points
the bridge at CoAP devices nobody serves: they are counted unreachable and the slots fall back
to the rule-based controller, naming them, as for stale data.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.baselines import RuleBasedPolicy
from bridge.clock import SlotClock
from bridge.coap_resources import Resource
from bridge.coap_server import CoapDeviceServer, serving
from bridge.config import BridgeConfig, Deployment
from bridge.errors import ConfigError
from bridge.mqtt import MqttLink
from bridge.oscore import BRIDGE_SIDE, DEVICE_SIDE, load_contexts, provision
from bridge.policy_source import LoadedPolicy
from bridge.registration import reading_nonces
from bridge.runner import BridgeRunner
from bridge.signing import ReadingDomain
from bridge.simulator import FleetStats, Profiles, simulate
from bridge.site import SiteManifest
from contracts.client import Chain
from tests.bridge.broker import Broker
from tests.bridge.helpers import SEED, telemetry
from tests.bridge.stack import bridge_config, live_stack

SLOT_S = 1.5
SLOTS = 6
#: The CoAP half of the site: one prosumer's meter, inverter, battery and appliance.
COAP = "bus2-*"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    broker: Broker
    chain: Chain
    registry: str
    deployment: Deployment
    files: Path
    genesis: float


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, site: SiteManifest) -> Iterator[Stack]:
    files = tmp_path_factory.mktemp("coap")
    mqtt_ids = [d.id for d in site.devices if not d.id.startswith("bus2-")]
    # As in test_run: registered in chain slot 50, the chain then at ~250, the bridge's
    # accelerated slots ~100-110: ended, after registration, inside the reading window.
    with live_stack(files, site, mqtt_ids, lambda now: now - 50 * 900) as live:
        live.chain.travel_to(live.deployed_at + 200 * 900)
        wall = time.time()
        genesis = wall - (wall % SLOT_S) - 100 * SLOT_S
        dep = live.deployment
        yield Stack(live.broker, live.chain, dep.addresses["DeviceRegistry"], dep, files, genesis)


def _config(
    s: Stack, coap_url: str, name: str, *, oscore_dir: Path | None = None, **extra: Any
) -> BridgeConfig:
    """The bridge with bus2's devices on CoAP: under OSCORE with the bridge's ends of the
    contexts in `oscore_dir`, plain CoAP (`insecure`) without."""
    security = {"oscore_dir": str(oscore_dir)} if oscore_dir is not None else {"insecure": True}
    raw = bridge_config(
        s.files, s.broker, s.chain, slot_seconds=SLOT_S, genesis=s.genesis,
        decide_deadline=0.6, outbox=f"{name}.db",
        coap={
            "endpoints": {COAP: coap_url},
            # 2 s: at start every OSCORE context reserves sequence numbers on disk (an fsync,
            # bridge and devices in this one process), slow on a loaded machine.
            "request_timeout_s": 2.0,
            "retry_s": 0.3,
            "reobserve_s": 3.0,
            **security,
        },
        **extra,
    )  # fmt: skip
    return BridgeConfig.model_validate(raw)


def _secured_server(s: Stack, site: SiteManifest, name: str) -> tuple[CoapDeviceServer, Path]:
    """bus2's devices behind one port, each under its own fresh OSCORE context (as `microgrid
    devices oscore` provisions them); the folder of the bridge's ends."""
    coap_ids = [d.id for d in site.devices if d.id.startswith("bus2-")]
    root = s.files / f"oscore-{name}"
    provision(coap_ids, root)
    contexts = load_contexts(root / DEVICE_SIDE, coap_ids, "--coap-oscore", Counter())
    return CoapDeviceServer(site.site, coap_ids, contexts), root / BRIDGE_SIDE


def _profiles(site: SiteManifest) -> Profiles:
    t = np.arange(96)
    load = np.stack([1.2 + 0.3 * np.sin(t / 15), 0.9 + 0.2 * np.cos(t / 11)], axis=1)
    pv = np.clip(np.sin((t - 24) / 48 * np.pi), 0.0, None)[:, None] * np.array([[2.0, 1.5]])
    return Profiles(load, pv)


async def _run(
    s: Stack,
    site: SiteManifest,
    cfg: BridgeConfig,
    server: CoapDeviceServer | None,
    during: Any = None,
) -> tuple[FleetStats, dict[str, Any], BridgeRunner]:
    """The bridge, then the fleet for SLOTS slots (`during` runs beside it); both summaries."""
    codec = site.make_codec()
    # The tests share one broker, and a live bridge's persistent session outlives its test: the
    # next test's bridge would be handed the last one's leftovers, as a restarted bridge is.
    b = cfg.broker
    forget = MqttLink(b.url, client_id=f"{site.site}-{cfg.node}", username=b.username,
                      password=b.password(), ca_file=b.ca_file)  # fmt: skip
    await forget.connect([])
    await forget.close()
    runner = BridgeRunner(cfg, site, s.deployment, LoadedPolicy(RuleBasedPolicy(codec), "rb"))
    refusals: list[str] = []
    runner.core.validator.on_reject = lambda reason, detail: refusals.append(f"{reason}: {detail}")
    serving = asyncio.create_task(runner.run())
    await asyncio.sleep(1.0)  # subscribed before the MQTT devices' births
    nonces = reading_nonces(s.chain, s.registry, site)
    fleet = asyncio.create_task(
        simulate(
            site, _profiles(site), ReadingDomain(s.deployment.chain_id, s.registry),
            broker_url=s.broker.url, passwords=s.broker.passwords, ca_file=s.broker.ca_file,
            clock=SlotClock(s.genesis, SLOT_S), seed=SEED, slots=SLOTS, start_nonces=nonces,
            coap=server,
        )
    )  # fmt: skip
    if during is not None:
        await during(runner)
    stats = await fleet
    await asyncio.sleep(SLOT_S)  # the last slot's telemetry and acks arrive
    runner.stop.set()
    summary = await serving
    summary["refusals"] = refusals  # the detail of each, for the assertion messages
    return stats, summary, runner


def _forged_and_malformed(
    server: CoapDeviceServer, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> Any:
    """A reading of bus2-meter signed with bus1-meter's key, then a malformed representation.

    The forgery carries the next nonce the bridge would accept, so that only its signature can
    refuse it. bus2-meter's own telemetry is held back meanwhile (and handed on after, in
    order): otherwise its next reading, with that very nonce, could overtake the forgery on a
    loaded machine and make it a replay."""
    device = "bus2-meter"
    publish = server.publish
    held: list[tuple[str, Resource, bytes]] = []
    published = [-1]  # the last nonce bus2-meter published itself

    def gated(device_id: str, resource: Resource, payload: bytes) -> None:
        if device_id == device and resource is Resource.DATA:
            if gate.is_set():
                held.append((device_id, resource, payload))
                return
            published[0] = int(json.loads(payload)["reading"]["nonce"])
        publish(device_id, resource, payload)

    gate = asyncio.Event()
    server.publish = gated  # type: ignore[method-assign]

    async def _until(done: Any, what: str) -> None:
        deadline = time.monotonic() + 10 * SLOT_S
        while not done():
            assert time.monotonic() < deadline, f"waited in vain for {what}"
            await asyncio.sleep(0.01)

    async def inject(runner: BridgeRunner) -> None:
        await asyncio.sleep(3.3 * SLOT_S)  # just after the third slot's telemetry
        v = runner.core.validator
        gate.set()
        await _until(lambda: v.last_nonce.get(device, -1) >= published[0], "its own validated")
        session = v.sessions[device]
        now_ms = int(time.time() * 1000)
        forged = telemetry(
            site, domain, keys[device], device,
            bd_seq=session.bd_seq, seq=session.last_seq + 100, ts=now_ms,
            slot=runner.clock.slot(now_ms / 1000) - 1,
            nonce=v.last_nonce.get(device, -1) + 1, signer=keys["bus1-meter"],
        )  # fmt: skip
        publish(device, Resource.DATA, json.dumps(forged).encode())
        await _until(lambda: sum(v.rejected.values()) > 0, "the forgery refused")
        server.publish = publish  # type: ignore[method-assign]
        while held:
            publish(*held.pop(0))
        publish(device, Resource.DATA, b'{"device": "bus2-meter", "seq": "7"')
        await asyncio.sleep(0.2)

    return inject


def test_mixed_site_mqtt_and_coap_end_to_end(
    stack: Stack, site: SiteManifest, keys: dict[str, bytes]
) -> None:
    s = stack
    site.save(s.files / "site.json")
    coap_ids = [d.id for d in site.devices if d.id.startswith("bus2-")]
    domain = ReadingDomain(s.deployment.chain_id, s.registry)
    refused: Counter[str] = Counter()

    async def scenario() -> tuple[FleetStats, dict[str, Any], BridgeRunner]:
        port = free_udp_port()
        server, bridge_end = _secured_server(s, site, "mixed")
        await server.start("127.0.0.1", port)
        try:
            cfg = _config(s, f"coap://127.0.0.1:{port}", "mixed", oscore_dir=bridge_end)
            inject = _forged_and_malformed(server, site, domain, keys)
            return await _run(s, site, cfg, server, inject)
        finally:
            await server.close()
            server.release()
            refused.update(server.refusals)

    first_block = int(s.chain.w3.eth.block_number) + 1
    fleet, summary, runner = asyncio.run(scenario())
    # Both forgeries refused and counted under the reasons MQTT messages get; nothing else.
    assert summary["rejected"] == {"bad_signature": 1, "malformed": 1}, summary["refusals"]
    registry = runner.metrics.registry
    assert registry.get_sample_value("bridge_rejected_total", {"reason": "bad_signature"}) == 1
    # Every device reported through its own transport and was validated.
    coap = summary["coap"]
    assert coap["devices"] == len(coap_ids) == coap["reachable"] == 4, coap
    assert coap["observe_failures"] == {}, coap
    assert coap["oscore"] is True and coap["oscore_refusals"] == {}, coap
    assert refused == {}, refused  # every request to the devices was protected by its context
    assert int(summary["telemetry_accepted"]) >= 4 * len(site.devices), summary
    # The CoAP devices kept up to the end with the MQTT ones (compared with the fleet's last
    # slot, not the wall clock, which a slow shutdown on a loaded machine moves on).
    latest = runner.core.state.latest
    last_slot = max(t.slot for t in latest.values())
    for device in coap_ids:
        assert latest[device].slot >= last_slot - 1, (device, latest[device].slot, last_slot)
    assert registry.get_sample_value("bridge_coap_notifications_total") == coap["notifications"]
    # Decisions made with every device's data, and their commands applied on both transports:
    # three per slot go over CoAP (bus2's inverter, battery and appliance).
    decisions = summary["decisions"]
    assert decisions.get("policy", 0) >= SLOTS - 2, summary
    commands = summary["commands"]
    per_slot = 2 * len(site.prosumers) + len(site.battery_devices())
    assert commands["applied"] >= per_slot * (decisions["policy"] - 1), summary
    assert coap["requests"].get("2.04", 0) >= 3 * (decisions["policy"] - 1), coap
    assert coap["command_latency_ms_p50"] is not None
    assert fleet.commands_applied >= commands["applied"] and fleet.limit_violations == 0
    # Every reading on the chain once, the CoAP meter's included.
    queued = int(summary["readings_queued"])
    assert summary["outbox"] == {"confirmed": queued}, summary
    logs = s.chain.contract("DeviceRegistry", s.registry).events.ReadingRecorded()
    keys_seen = [
        (e["args"]["device"], e["args"]["slot"]) for e in logs.get_logs(from_block=first_block)
    ]
    assert len(keys_seen) == len(set(keys_seen)) == queued == fleet.readings_signed
    meter = site.device("bus2-meter")
    assert meter is not None
    assert sum(d.lower() == meter.address.lower() for d, _ in keys_seen) >= SLOTS - 1


def test_unreachable_coap_device_falls_back_like_stale_data(
    stack: Stack, site: SiteManifest
) -> None:
    """bus2's devices configured on a port nobody serves: counted, and every slot falls back.
    (Plain CoAP, the config's explicit `insecure: true`: the other tests run OSCORE.)"""
    s = stack
    site.save(s.files / "site.json")
    cfg = _config(s, f"coap://127.0.0.1:{free_udp_port()}", "unreachable", dry_run=True)
    # The CoAP devices run, but their server is never bound: nobody answers on that port.
    unbound = CoapDeviceServer(site.site, [d.id for d in site.devices if d.id.startswith("bus2-")])
    _, summary, runner = asyncio.run(_run(s, site, cfg, unbound))
    coap = summary["coap"]
    assert coap["reachable"] == 0 and coap["observe_failures"]["unreachable"] >= 12, coap
    assert summary["decisions"] == {"fallback": summary["slots_decided"]}, summary
    assert summary["fallbacks"] == {"stale_data": summary["slots_decided"]}, summary
    # While the MQTT devices reported, the fallback named exactly the unreachable ones.
    details = [d.detail or "" for _, d in runner.core.decisions]
    assert any("bus2-meter" in d and "bus1" not in d for d in details), details
    assert summary["rejected"] == {}, summary


def test_coap_outage_loses_no_reading(stack: Stack, site: SiteManifest) -> None:
    """The CoAP devices' server goes away for two slots (a gateway reboot, a cut link) while
    the devices go on measuring and signing. The bridge counts them unreachable and falls back;
    when they answer again it registers again, fetches each meter's `log` from the last reading
    it holds, and relays the missed readings: every reading signed reaches the chain, once."""
    s = stack
    site.save(s.files / "site.json")

    async def scenario() -> tuple[FleetStats, dict[str, Any], BridgeRunner]:
        port = free_udp_port()
        server, bridge_end = _secured_server(s, site, "outage")
        await server.start("127.0.0.1", port)

        async def outage(runner: BridgeRunner) -> None:
            await asyncio.sleep(2.5 * SLOT_S)
            await server.close()
            await asyncio.sleep(2.5 * SLOT_S)
            await server.start("127.0.0.1", port)

        try:
            cfg = _config(s, f"coap://127.0.0.1:{port}", "outage", oscore_dir=bridge_end)
            return await _run(s, site, cfg, server, outage)
        finally:
            await server.close()
            server.release()

    first_block = int(s.chain.w3.eth.block_number) + 1
    fleet, summary, _ = asyncio.run(scenario())
    coap = summary["coap"]
    assert coap["observe_failures"].get("unreachable", 0) >= 1, coap
    assert coap["backlog"] >= 1 and summary["relayed_readings"] >= 1, summary
    # What was missed is too old to act on (stale), its readings relayed; nothing else refused.
    assert set(summary["rejected"]) <= {"stale"}, summary["refusals"]
    assert summary["fallbacks"].get("stale_data", 0) >= 1, summary
    # 0 lost, 0 duplicated: every reading the fleet signed is on the chain once.
    queued = int(summary["readings_queued"])
    assert summary["outbox"] == {"confirmed": queued}, summary
    logs = s.chain.contract("DeviceRegistry", s.registry).events.ReadingRecorded()
    seen = [(e["args"]["device"], e["args"]["slot"]) for e in logs.get_logs(from_block=first_block)]
    assert len(seen) == len(set(seen)) == queued == fleet.readings_signed, (seen, fleet)
    assert fleet.limit_violations == 0


def test_a_shadow_bridge_reads_oscore_devices_beside_the_live_one(
    stack: Stack, site: SiteManifest
) -> None:
    """`bridge run --dry-run` beside the live bridge, with CoAP devices under OSCORE: the
    shadow reads them under its own read-only contexts (`devices oscore --reader shadow`),
    never the live bridge's (which it holds locked), and commands nothing. Both bridges see
    every CoAP device; no request is refused on either side."""
    s = stack
    site.save(s.files / "site.json")
    coap_ids = [d.id for d in site.devices if d.id.startswith("bus2-")]
    root = s.files / "oscore-shadow"
    provision(coap_ids, root)
    provision(coap_ids, root, reader="shadow")
    refused: Counter[str] = Counter()
    shadow_summary: dict[str, Any] = {}

    async def scenario() -> tuple[FleetStats, dict[str, Any], BridgeRunner]:
        port = free_udp_port()
        url = f"coap://127.0.0.1:{port}"
        live_cfg = _config(s, url, "shadow-live", oscore_dir=root / BRIDGE_SIDE)
        # The same config with --dry-run and the shadow's folder: a ConfigError without it.
        with pytest.raises(ConfigError, match=r"coap\.shadow_oscore_dir: expected the shadow's"):
            live_cfg.model_copy(update={"dry_run": True}).coap_contexts()
        coap = live_cfg.coap.model_copy(update={"shadow_oscore_dir": root / "readers/shadow"})
        shadow_cfg = live_cfg.model_copy(update={"dry_run": True, "coap": coap})
        async with serving(site.site, coap_ids, "127.0.0.1", port, root / DEVICE_SIDE) as server:
            assert server is not None and set(server.readers) == set(coap_ids)

            async def beside(live: BridgeRunner) -> None:
                codec = site.make_codec()
                shadow = BridgeRunner(
                    shadow_cfg, site, s.deployment, LoadedPolicy(RuleBasedPolicy(codec), "rb")
                )
                task = asyncio.create_task(shadow.run(SLOTS - 2))
                shadow_summary.update(await task)

            try:
                return await _run(s, site, live_cfg, server, beside)
            finally:
                refused.update(server.refusals)

    _, summary, runner = asyncio.run(scenario())
    assert refused == {}, refused  # the shadow asked nothing it may not, the live bridge neither
    for run in (summary, shadow_summary):
        coap = run["coap"]
        assert coap["oscore"] is True and coap["oscore_refusals"] == {}, coap
        assert coap["reachable"] == len(coap_ids) and coap["observe_failures"] == {}, coap
    assert shadow_summary["mode"] == "shadow" and summary["mode"] == "live"
    assert shadow_summary["coap"]["requests"] == {}, shadow_summary["coap"]  # no command sent
    assert int(shadow_summary["telemetry_accepted"]) >= 2 * len(site.devices), shadow_summary
    # The live bridge commanded its CoAP devices meanwhile, under its own contexts.
    assert sum(summary["coap"]["requests"].values()) > 0, summary["coap"]
    assert runner.core.mode == "live"
