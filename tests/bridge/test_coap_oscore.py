"""OSCORE between the bridge and its CoAP devices, on loopback with no mocks: the simulator's
device server and the bridge's `CoapLink` (both aiocoap), each with its end of a pre-shared
context that `bridge.oscore.provision` wrote. Readings and commands travel protected; a plain
command, a replayed protected one (bytes captured on the wire and sent again, also after both
ends restarted) and one under a wrong key are refused, and each refusal is counted by reason."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from bridge.coap import CoapLink
from bridge.coap_resources import Endpoint, Resource
from bridge.coap_server import CoapDeviceServer
from bridge.config import BridgeConfig
from bridge.errors import ConfigError
from bridge.messages import Ack, AckStatus, Command, PvCurtailment, encode
from bridge.mqtt import Received
from bridge.oscore import (
    BAD_KEY,
    BRIDGE_SIDE,
    DEVICE_SIDE,
    REPLAYED,
    UNKNOWN_CONTEXT,
    UNPROTECTED,
    WRONG_DEVICE,
    load_contexts,
    load_reader_contexts,
    provision,
    release,
)
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.site_builder import device_key
from bridge.virtual_device import VirtualDevice
from tests.bridge.helpers import NOW_MS, SLOT

PV = "bus2-pv"
METER = "bus2-meter"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _next(queue: asyncio.Queue[Received], timeout: float = 5.0) -> Received:
    return await asyncio.wait_for(queue.get(), timeout)


class Relay(asyncio.DatagramProtocol):
    """A UDP hop between the bridge and the device that keeps every datagram the bridge sent:
    what an attacker on the device's network sees, and can send again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sent: list[bytes] = []
        self.transport: Any = None
        self.client: tuple[str, int] | None = None
        self.up: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.upstream:
            if self.client is not None:
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        self.sent.append(data)
        self.transport.sendto(data, self.upstream)


class CountingRelay(Relay):
    """A relay that counts the device's datagrams to the bridge and can stop forwarding the
    bridge's (the device's network gone, for the bridge)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(upstream)
        self.from_device = 0
        self.cut = False

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.upstream:
            self.from_device += 1
        elif self.cut:
            return

        super().datagram_received(data, addr)


async def _send_raw(datagram: bytes, port: int, wait_s: float = 1.0) -> bytes | None:
    """One datagram from a fresh socket (as an attacker would), and the answer if any."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class Once(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not answer.done():
                answer.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Once, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(datagram)
        return await asyncio.wait_for(answer, wait_s)
    except TimeoutError:
        return None
    finally:
        transport.close()


def _device(site: SiteManifest, domain: ReadingDomain, device_id: str) -> VirtualDevice:
    spec = site.device(device_id)
    assert spec is not None
    return VirtualDevice(site.site, spec, device_key("test", spec.id), domain)


def _command(n: int, fraction: float) -> Command:
    return Command(
        command_id=f"{1000 + n}.{PV}.pv_curtailment", device=PV, ts=NOW_MS, slot=SLOT + 1,
        expires_ts=NOW_MS + 900_000, action=PvCurtailment(kind="pv_curtailment", fraction=fraction),
    )  # fmt: skip


def _server(site: SiteManifest, root: Path, dev: VirtualDevice) -> CoapDeviceServer:
    contexts = load_contexts(root / DEVICE_SIDE, [PV], "--coap-oscore", Counter())
    server = CoapDeviceServer(site.site, [PV], contexts)
    server.on_command = lambda d, p: dev.on_command(p, NOW_MS, announce_accepted=False)
    return server


@dataclass
class Wired:
    """The pv's protected server, a relay in front of it, and a started bridge link that
    reaches the device through the relay; the device has announced itself (`birth`)."""

    port: int
    server: CoapDeviceServer
    relay: Relay
    relay_transport: Any
    birth: bytes
    queue: asyncio.Queue[Received]
    link: CoapLink

    async def close(self) -> None:
        await self.link.close()
        await self.server.close()
        self.server.release()
        self.relay_transport.close()


async def _wire(
    site: SiteManifest,
    root: Path,
    dev: VirtualDevice,
    relay_type: type[Relay] = Relay,
    **link_options: Any,
) -> Wired:
    """What each relayed scenario starts from, set up in one place so they cannot drift."""
    port = free_udp_port()
    server = _server(site, root, dev)
    await server.start("127.0.0.1", port)
    relay_port = free_udp_port()
    relay_transport, relay = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: relay_type(("127.0.0.1", port)), local_addr=("127.0.0.1", relay_port)
    )
    _, (_, birth) = dev.connect(NOW_MS)
    server.publish(PV, Resource.BIRTH, birth)
    queue: asyncio.Queue[Received] = asyncio.Queue()
    options = {"request_timeout_s": 2, "retry_s": 0.2, "reobserve_s": 60, **link_options}
    link = CoapLink(
        site.site, {PV: Endpoint("127.0.0.1", relay_port)}, queue,
        oscore_dir=root / BRIDGE_SIDE, **options,
    )  # fmt: skip
    await link.start()
    return Wired(port, server, relay, relay_transport, birth, queue, link)


def test_readings_and_commands_travel_protected_and_replays_are_refused(
    tmp_path: Path, site: SiteManifest, domain: ReadingDomain
) -> None:
    provision([PV], tmp_path)
    dev = _device(site, domain, PV)

    async def scenario() -> None:
        wired = await _wire(site, tmp_path, dev)
        port, server, relay, birth, queue, link = (
            wired.port, wired.server, wired.relay, wired.birth, wired.queue, wired.link,
        )  # fmt: skip
        try:
            got = await _next(queue)
            assert (got.topic, got.payload) == ("mgv1/site1/DBIRTH/bus2-pv", birth)
            _, data = dev.telemetry(SLOT, NOW_MS, {"pv_kw": 1.0, "available_kw": 2.0,
                                                   "curtailment": 0.5}, None)  # fmt: skip
            server.publish(PV, Resource.DATA, data)
            got = await _next(queue)
            assert (got.topic, got.payload) == ("mgv1/site1/DDATA/bus2-pv", data)
            # The signed telemetry is not readable on the wire, nor is the command below.
            assert not any(b"pv_kw" in d or b"bus2-pv" in d for d in relay.sent)
            before = len(relay.sent)
            link.publish("mgv1/site1/DCMD/bus2-pv", encode(_command(0, 0.25)))
            got = await _next(queue)
            ack = Ack.model_validate_json(got.payload)
            assert got.topic == "mgv1/site1/DACK/bus2-pv" and ack.status is AckStatus.APPLIED
            assert dev.curtailment == 0.25 and server.commands == 1
            (command_datagram,) = relay.sent[before:]
            assert b"pv_curtailment" not in command_datagram

            # The captured command, sent again from another socket: the device refuses it.
            answer = await _send_raw(command_datagram, port)
            assert answer is not None and answer[1] == int(Code.UNAUTHORIZED), answer
            assert server.commands == 1 and server.refusals == {REPLAYED: 1}

            # A plain command, as anyone on the network could send it: 4.01, not applied.
            plain = await aiocoap.Context.create_client_context(transports=["udp6"])
            try:
                uri = Endpoint("127.0.0.1", port).uri(site.site, PV, Resource.CMD)
                msg = aiocoap.Message(code=Code.POST, uri=uri, payload=encode(_command(1, 0.9)),
                                      content_format=50)  # fmt: skip
                response = await plain.request(msg).response
                assert response.code == Code.UNAUTHORIZED
                get = aiocoap.Message(code=Code.GET, uri=uri.replace("/cmd", "/data"))
                assert (await plain.request(get).response).code == Code.UNAUTHORIZED
                base = uri.rsplit("/", 4)[0]
                wkc = aiocoap.Message(code=Code.GET, uri=base + "/.well-known/core")
                assert (await plain.request(wkc).response).code == Code.CONTENT  # discovery
            finally:
                await plain.shutdown()
            assert dev.curtailment == 0.25 and server.commands == 1
            assert server.refusals == {REPLAYED: 1, UNPROTECTED: 2}
            assert link.stats.oscore_refusals == {} and link.summary()["oscore"] is True
        finally:
            await wired.close()

        # Both ends restart from their folders: the replay window survived, the bytes are
        # still refused, and the bridge's next command (a later sequence number) is taken.
        sequence = json.loads((tmp_path / DEVICE_SIDE / PV / "sequence.json").read_text())
        assert sequence["received"] != "unknown"
        server = _server(site, tmp_path, dev)
        await server.start("127.0.0.1", port)
        server.publish(PV, Resource.BIRTH, birth)
        link = CoapLink(
            site.site, {PV: Endpoint("127.0.0.1", port)}, queue,
            request_timeout_s=2, retry_s=0.2, reobserve_s=60, oscore_dir=tmp_path / BRIDGE_SIDE,
        )  # fmt: skip
        await link.start()
        try:
            answer = await _send_raw(command_datagram, port)
            assert answer is not None and answer[1] == int(Code.UNAUTHORIZED), answer
            assert server.refusals == {REPLAYED: 1}
            link.publish("mgv1/site1/DCMD/bus2-pv", encode(_command(2, 0.5)))
            while (got := await _next(queue)).topic != "mgv1/site1/DACK/bus2-pv":
                pass
            assert Ack.model_validate_json(got.payload).status is AckStatus.APPLIED
            assert dev.curtailment == 0.5 and server.commands == 1  # a new server object
        finally:
            await link.close()
            await server.close()
            server.release()

    asyncio.run(scenario())


def test_a_wrong_key_is_refused_and_counted_by_reason(
    tmp_path: Path, site: SiteManifest, domain: ReadingDomain
) -> None:
    """The bridge's end under another secret (same ids): the device cannot decrypt a thing and
    answers 4.00 unprotected; another context altogether (unknown ids): 4.01. Nothing reaches
    the validator, and the bridge's metrics count the refusals by reason."""
    provision([PV], tmp_path / "good")
    provision([PV], tmp_path / "other")
    forged = tmp_path / "forged"
    (forged / PV).mkdir(parents=True)
    for name in ("settings.json", "secret.json"):
        text = (tmp_path / "good" / BRIDGE_SIDE / PV / name).read_text()
        (forged / PV / name).write_text(text)
    (forged / PV / "secret.json").write_text(json.dumps({"secret_hex": "00" * 32}))
    dev = _device(site, domain, PV)

    async def attempt(oscore_dir: Path) -> tuple[CoapLink, CoapDeviceServer]:
        port = free_udp_port()
        server = _server(site, tmp_path / "good", dev)
        await server.start("127.0.0.1", port)
        _, (_, birth) = dev.connect(NOW_MS)
        server.publish(PV, Resource.BIRTH, birth)
        queue: asyncio.Queue[Received] = asyncio.Queue()
        link = CoapLink(
            site.site, {PV: Endpoint("127.0.0.1", port)}, queue,
            request_timeout_s=1, retry_s=0.2, reobserve_s=60, oscore_dir=oscore_dir,
        )  # fmt: skip
        await link.start()
        try:
            link.publish("mgv1/site1/DCMD/bus2-pv", encode(_command(0, 0.25)))
            await asyncio.sleep(1.0)
            assert queue.empty()
        finally:
            await link.close()
            await server.close()
            server.release()
        return link, server

    async def scenario() -> None:
        link, server = await attempt(forged)
        assert server.commands == 0 and set(server.refusals) == {BAD_KEY}
        assert set(link.stats.oscore_refusals) == {"device_refused_4.00"}
        assert link.stats.requests == {"oscore": 1} and link.stats.observe_failures["oscore"] >= 3
        assert link.summary()["reachable"] == 0
        _exported(link, "device_refused_4.00")
        link, server = await attempt(tmp_path / "other" / BRIDGE_SIDE)
        assert server.commands == 0 and set(server.refusals) == {UNKNOWN_CONTEXT}
        assert set(link.stats.oscore_refusals) == {"device_refused_4.01"}
        _exported(link, "device_refused_4.01")

    asyncio.run(scenario())


def _exported(link: CoapLink, reason: str) -> None:
    from prometheus_client import CollectorRegistry

    from bridge.metrics import CoapCollector

    registry = CollectorRegistry()
    registry.register(CoapCollector(link.stats))
    value = registry.get_sample_value("bridge_coap_oscore_refusals_total", {"reason": reason})
    assert value == link.stats.oscore_refusals[reason] > 0


def test_a_context_of_another_device_is_refused(
    tmp_path: Path, site: SiteManifest, domain: ReadingDomain
) -> None:
    """Two devices behind one gateway port: the meter's context does not open the pv's `cmd`."""
    provision([PV, METER], tmp_path)
    dev = _device(site, domain, PV)

    async def scenario() -> None:
        port = free_udp_port()
        contexts = load_contexts(tmp_path / DEVICE_SIDE, [PV, METER], "--coap-oscore", Counter())
        server = CoapDeviceServer(site.site, [PV, METER], contexts)
        server.on_command = lambda d, p: dev.on_command(p, NOW_MS, announce_accepted=False)
        await server.start("127.0.0.1", port)
        bridge_end = load_contexts(tmp_path / BRIDGE_SIDE, [METER], "x", Counter())
        client = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
        # A client that holds the meter's key and aims it at the pv.
        client.client_credentials[f"coap://127.0.0.1:{port}/*"] = bridge_end[METER]
        try:
            uri = Endpoint("127.0.0.1", port).uri(site.site, PV, Resource.CMD)
            msg = aiocoap.Message(code=Code.POST, uri=uri, payload=encode(_command(0, 0.25)),
                                  content_format=50)  # fmt: skip
            response = await client.request(msg).response
            assert response.code == Code.UNAUTHORIZED
            assert server.commands == 0 and server.refusals == {WRONG_DEVICE: 1}
        finally:
            await client.shutdown()
            release(bridge_end.values())
            await server.close()
            server.release()

    asyncio.run(scenario())


def test_provision_keeps_contexts_and_config_demands_security(tmp_path: Path) -> None:
    first = provision([PV, METER], tmp_path)
    assert first == {"written": [PV, METER], "kept": []}
    settings = {
        side: json.loads((tmp_path / side / PV / "settings.json").read_text())
        for side in (BRIDGE_SIDE, DEVICE_SIDE)
    }
    assert settings[BRIDGE_SIDE]["sender-id_hex"] == settings[DEVICE_SIDE]["recipient-id_hex"]
    assert settings[BRIDGE_SIDE]["recipient-id_hex"] == settings[DEVICE_SIDE]["sender-id_hex"]
    assert (tmp_path / BRIDGE_SIDE / PV / "secret.json").stat().st_mode & 0o077 == 0
    assert provision([PV], tmp_path) == {"written": [], "kept": [PV]}
    old = (tmp_path / BRIDGE_SIDE / PV / "secret.json").read_text()
    assert provision([PV], tmp_path, renew=True) == {"written": [PV], "kept": []}
    assert (tmp_path / BRIDGE_SIDE / PV / "secret.json").read_text() != old

    # A context in use by one process is refused to a second; a missing one names the field.
    held = load_contexts(tmp_path / BRIDGE_SIDE, [PV], "coap.oscore_dir", Counter())
    try:
        with pytest.raises(ConfigError, match=r"coap.oscore_dir: .* in use by another"):
            load_contexts(tmp_path / BRIDGE_SIDE, [PV], "coap.oscore_dir", Counter())
    finally:
        release(held.values())
    with pytest.raises(ConfigError, match=r"coap.oscore_dir: expected an OSCORE context .*bus9"):
        load_contexts(tmp_path / BRIDGE_SIDE, ["bus9-pv"], "coap.oscore_dir", Counter())
    (tmp_path / BRIDGE_SIDE / METER / "secret.json").unlink()
    with pytest.raises(ConfigError, match=r"expected a complete OSCORE context for bus2-meter"):
        load_contexts(tmp_path / BRIDGE_SIDE, [METER], "coap.oscore_dir", Counter())

    endpoints = {"endpoints": {PV: "coap://127.0.0.1:5683"}}
    with pytest.raises(ValueError, match="oscore_dir: expected the folder"):
        BridgeConfig.model_validate({"coap": endpoints})
    with pytest.raises(ValueError, match="not both"):
        BridgeConfig.model_validate({"coap": {**endpoints, "insecure": True, "oscore_dir": "x"}})
    assert BridgeConfig.model_validate({"coap": {**endpoints, "insecure": True}}).coap.insecure
    cfg = BridgeConfig.model_validate({"coap": {**endpoints, "oscore_dir": "o"}})
    assert cfg.resolve(tmp_path).coap.oscore_dir == tmp_path / "o"


def test_devices_oscore_provisions_the_sites_coap_devices(
    tmp_path: Path, site: SiteManifest
) -> None:
    """The paste-able command of docs/iot.md: both ends for every battery, kept on a rerun."""
    from typer.testing import CliRunner

    from training.cli import app

    site.save(tmp_path / "site.json")
    out = tmp_path / "oscore"
    args = ["devices", "oscore", "--site", str(tmp_path / "site.json"), "--out", str(out),
            "--coap-device", "*-battery", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    batteries = sorted(d.id for d in site.devices if d.id.endswith("-battery"))
    assert json.loads(result.output)["written"] == len(batteries) > 0
    assert sorted(p.name for p in (out / BRIDGE_SIDE).iterdir()) == batteries
    assert sorted(p.name for p in (out / DEVICE_SIDE).iterdir()) == batteries
    again = CliRunner().invoke(app, args)
    assert json.loads(again.output)["kept"] == len(batteries)
    typo = CliRunner().invoke(app, [*args[:-3], "--coap-device", "bus99-*"])
    assert typo.exit_code == 2 and "--coap-device.bus99-*: expected a device id" in typo.output
    # The shadow's own contexts (docs/iot.md, "Shadow mode with OSCORE devices").
    shadow = CliRunner().invoke(app, [*args, "--reader", "shadow"])
    assert shadow.exit_code == 0, shadow.output
    assert json.loads(shadow.output)["bridge"] == str(out / "readers" / "shadow")
    assert sorted(p.name for p in (out / "readers" / "shadow").iterdir()) == batteries
    bad = CliRunner().invoke(app, [*args, "--reader", "Shadow!"])
    assert bad.exit_code == 2 and "reader: expected a name" in bad.output


def test_the_simulators_server_loads_and_frees_the_device_ends(
    tmp_path: Path, site: SiteManifest
) -> None:
    """`devices simulate --coap-oscore DIR`'s server: protected while it runs, its contexts
    free again when it stops; a missing one names the option."""
    from bridge.coap_server import serving

    provision([PV], tmp_path)

    async def scenario() -> None:
        port = free_udp_port()
        async with serving(site.site, [PV], "127.0.0.1", port, tmp_path / DEVICE_SIDE) as server:
            assert server is not None and server.contexts is not None
            plain = await aiocoap.Context.create_client_context(transports=["udp6"])
            try:
                uri = Endpoint("127.0.0.1", port).uri(site.site, PV, Resource.BIRTH)
                got = await plain.request(aiocoap.Message(code=Code.GET, uri=uri)).response
                assert got.code == Code.UNAUTHORIZED and server.refusals == {UNPROTECTED: 1}
            finally:
                await plain.shutdown()
        release(load_contexts(tmp_path / DEVICE_SIDE, [PV], "again", Counter()).values())
        with pytest.raises(ConfigError, match="--coap-oscore: expected an OSCORE context"):
            async with serving(site.site, [METER], "127.0.0.1", port, tmp_path / DEVICE_SIDE):
                pass

    asyncio.run(scenario())


def test_a_device_that_crashed_recovers_its_replay_window_with_echo(
    tmp_path: Path, site: SiteManifest, domain: ReadingDomain
) -> None:
    """A device killed mid-run never wrote its replay window back (`sequence.json` says
    `unknown`). Restarted, it takes no request on trust: a replayed command is answered with a
    4.01 Echo challenge and not applied, while the bridge's next command answers the challenge
    (aiocoap's client does it by itself) and is applied."""
    provision([PV], tmp_path)
    dev = _device(site, domain, PV)

    async def scenario() -> None:
        wired = await _wire(site, tmp_path, dev)
        port, server, relay, birth, queue, link = (
            wired.port, wired.server, wired.relay, wired.birth, wired.queue, wired.link,
        )  # fmt: skip
        try:
            await _next(queue)  # the birth
            before = len(relay.sent)
            link.publish("mgv1/site1/DCMD/bus2-pv", encode(_command(0, 0.25)))
            while (got := await _next(queue)).topic != "mgv1/site1/DACK/bus2-pv":
                pass
            # The protected command (outer code POST); the rest are empty ACKs and the like.
            (captured,) = [d for d in relay.sent[before:] if d[1] == int(Code.POST)]
            # The crash: the server goes without writing its contexts back; the OS frees locks.
            await server.close()
            assert server.contexts is not None
            for ctx in server.contexts.values():
                ctx.lockfile.release()
                ctx.lockfile = None
            sequence = json.loads((tmp_path / DEVICE_SIDE / PV / "sequence.json").read_text())
            assert sequence["received"] == "unknown"
            wired.server = server = _server(site, tmp_path, dev)
            await server.start("127.0.0.1", port)
            server.publish(PV, Resource.BIRTH, birth)
            # The challenge is a protected 4.01 + Echo (outer code 2.04, the real one encrypted),
            # which only the holder of the bridge's key can read and answer.
            answer = await _send_raw(captured, port)
            assert answer is not None and answer[1] == int(Code.CHANGED), answer
            assert server.commands == 0 and dev.curtailment == 0.25
            link.publish("mgv1/site1/DCMD/bus2-pv", encode(_command(1, 0.5)))
            while (got := await _next(queue)).topic != "mgv1/site1/DACK/bus2-pv":
                pass
            assert Ack.model_validate_json(got.payload).status is AckStatus.APPLIED
            assert server.commands == 1 and dev.curtailment == 0.5
        finally:
            await wired.close()

    asyncio.run(scenario())


def test_protected_observations_end_cleanly_on_reregistration_and_close(
    tmp_path: Path, site: SiteManifest, domain: ReadingDomain, caplog: pytest.LogCaptureFixture
) -> None:
    """aiocoap's OSCORE transport keeps the wire observation under one the bridge ended, so
    each re-registration left the device one more listener to notify, and at shutdown each
    logged a `TypeError` from aiocoap's own error report (`Logger._log() got an unexpected
    keyword argument 'exception'`). The link ends them itself: after many re-registrations
    the device notifies the bridge once per change, and registrations given up unanswered, a
    command in flight and the close itself log no error."""
    import gc
    import logging

    caplog.set_level(logging.WARNING)
    provision([PV], tmp_path)
    dev = _device(site, domain, PV)

    async def scenario() -> None:
        wired = await _wire(site, tmp_path, dev, CountingRelay, request_timeout_s=0.5,
                            reobserve_s=0.3)  # fmt: skip
        server, queue, link = wired.server, wired.queue, wired.link
        relay = wired.relay
        assert isinstance(relay, CountingRelay)
        try:
            await _next(queue)  # the birth
            while link.stats.reobserved < 9:  # each resource registered again, three times
                await asyncio.sleep(0.1)
            # From the next registration on: quiet long enough to count datagrams below (~1 s),
            # short enough that the cut relay's re-registrations fail soon after.
            link.reobserve_s = 5
            await asyncio.sleep(0.6)
            # A listener the bridge gave up on acknowledges one more notification (aiocoap ends
            # it there) and resets the next, which makes the device forget it.
            for n in range(3):
                _, data = dev.telemetry(SLOT + n, NOW_MS, {"pv_kw": 1.0 + n, "available_kw": 2.0,
                                                           "curtailment": 0.5}, None)  # fmt: skip
                before = relay.from_device
                server.publish(PV, Resource.DATA, data)
                got = await _next(queue)
                assert got.payload == data
                await asyncio.sleep(0.1)
            # The third change reached the bridge as one datagram: nobody else listens.
            assert relay.from_device - before == 1, relay.from_device - before
            relay.cut = True  # registrations time out unanswered; a command goes unanswered
            while sum(link.stats.observe_failures.values()) < 3:
                await asyncio.sleep(0.1)
            link.publish("mgv1/site1/DCMD/bus2-pv", encode(_command(0, 0.25)))
            await asyncio.sleep(0.1)
        finally:
            await wired.close()
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    gc.collect()
    noise = [
        r for r in caplog.records if r.name in ("coap", "asyncio") or r.levelno >= logging.ERROR
    ]
    assert noise == [], [r.getMessage()[:200] for r in noise]


def test_a_readers_context_reads_beside_the_bridge_but_commands_nothing(
    tmp_path: Path, site: SiteManifest, domain: ReadingDomain
) -> None:
    """A shadow's own contexts (`provision(..., reader="shadow")`): its link observes the
    device at the same time as the live bridge's, each under its own key; its commands are
    not sent (`read_only`), and one sent anyway under its context is refused with 4.03 and
    not applied. Renewing the live contexts keeps the readers'."""
    from bridge.coap_server import serving
    from bridge.oscore import READ_ONLY, READERS

    provision([PV], tmp_path)
    assert provision([PV], tmp_path, reader="shadow") == {"written": [PV], "kept": []}
    assert provision([PV], tmp_path, reader="shadow") == {"written": [], "kept": [PV]}
    shadow_dir = tmp_path / READERS / "shadow"
    assert (tmp_path / DEVICE_SIDE / PV / READERS / "shadow" / "secret.json").exists()
    with pytest.raises(ConfigError, match="reader: expected a name"):
        provision([PV], tmp_path, reader="../x")
    dev = _device(site, domain, PV)

    async def scenario() -> None:
        port = free_udp_port()
        async with serving(site.site, [PV], "127.0.0.1", port, tmp_path / DEVICE_SIDE) as server:
            assert server is not None
            server.on_command = lambda d, p: dev.on_command(p, NOW_MS, announce_accepted=False)
            _, (_, birth) = dev.connect(NOW_MS)
            server.publish(PV, Resource.BIRTH, birth)
            endpoint = {PV: Endpoint("127.0.0.1", port)}
            queues: list[asyncio.Queue[Received]] = [asyncio.Queue(), asyncio.Queue()]
            live = CoapLink(site.site, endpoint, queues[0], request_timeout_s=2, retry_s=0.2,
                            oscore_dir=tmp_path / BRIDGE_SIDE)  # fmt: skip
            shadow = CoapLink(site.site, endpoint, queues[1], request_timeout_s=2, retry_s=0.2,
                              oscore_dir=shadow_dir, read_only=True)  # fmt: skip
            await live.start()
            await shadow.start()
            try:
                for queue in queues:
                    assert (await _next(queue)).payload == birth
                _, data = dev.telemetry(SLOT, NOW_MS, {"pv_kw": 1.0, "available_kw": 2.0,
                                                       "curtailment": 0.5}, None)  # fmt: skip
                server.publish(PV, Resource.DATA, data)
                for queue in queues:
                    assert (await _next(queue)).payload == data
                shadow.publish("mgv1/site1/DCMD/bus2-pv", encode(_command(0, 0.9)))
                live.publish("mgv1/site1/DCMD/bus2-pv", encode(_command(1, 0.25)))
                assert (await _next(queues[0])).topic == "mgv1/site1/DACK/bus2-pv"
                assert dev.curtailment == 0.25 and server.commands == 1
                assert shadow.stats.requests == {"read_only": 1}
            finally:
                await shadow.close()
                await live.close()
            # A command under the reader's context, sent anyway: 4.03, not applied.
            held = load_contexts(shadow_dir, [PV], "coap.shadow_oscore_dir", Counter())
            client = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
            client.client_credentials[f"coap://127.0.0.1:{port}/*"] = held[PV]
            try:
                uri = Endpoint("127.0.0.1", port).uri(site.site, PV, Resource.CMD)
                msg = aiocoap.Message(code=Code.POST, uri=uri, content_format=50,
                                      payload=encode(_command(2, 0.9)))  # fmt: skip
                assert (await client.request(msg).response).code == Code.FORBIDDEN
                get = aiocoap.Message(code=Code.GET, uri=uri.replace("/cmd", "/data"))
                assert (await client.request(get).response).payload == data
            finally:
                await client.shutdown()
                release(held.values())
            assert server.refusals == {READ_ONLY: 1} and server.commands == 1
            assert dev.curtailment == 0.25

    asyncio.run(scenario())
    provision([PV], tmp_path, renew=True)  # the live pair renewed; the reader's stays
    assert (tmp_path / DEVICE_SIDE / PV / READERS / "shadow" / "secret.json").exists()
    release(load_reader_contexts(tmp_path / DEVICE_SIDE, [PV], "x", Counter())[PV].values())


def test_a_dry_run_takes_the_shadows_contexts_never_the_live_ones(tmp_path: Path) -> None:
    coap = {"endpoints": {PV: "coap://127.0.0.1:5683"}, "oscore_dir": "o"}
    live = BridgeConfig.model_validate({"coap": coap}).resolve(tmp_path)
    assert live.coap_contexts() == tmp_path / "o"
    with pytest.raises(ConfigError, match=r"coap\.shadow_oscore_dir: expected the shadow's own"):
        live.model_copy(update={"dry_run": True}).coap_contexts()
    shadow = BridgeConfig.model_validate(
        {"dry_run": True, "coap": {**coap, "shadow_oscore_dir": "r/shadow"}}
    ).resolve(tmp_path)
    assert shadow.coap_contexts() == tmp_path / "r/shadow"
    with pytest.raises(ValueError, match="shadow_oscore_dir: expected the shadow's own contexts"):
        BridgeConfig.model_validate({"coap": {**coap, "shadow_oscore_dir": "o"}})
    with pytest.raises(ValueError, match="shadow_oscore_dir: expected either"):
        BridgeConfig.model_validate(
            {"coap": {"endpoints": coap["endpoints"], "insecure": True, "shadow_oscore_dir": "r"}}
        )
    plain = {"endpoints": coap["endpoints"], "insecure": True}
    assert BridgeConfig.model_validate({"dry_run": True, "coap": plain}).coap_contexts() is None
