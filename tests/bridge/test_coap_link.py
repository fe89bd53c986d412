"""The CoAP shells on loopback, no mocks: the simulator's device server (aiocoap) and the
bridge's `CoapLink` (aiocoap client) on a free UDP port, bytes compared with what the same
virtual device says over MQTT; a device nobody serves is counted, not waited for."""

from __future__ import annotations

import asyncio
import socket

from bridge.coap import CoapLink
from bridge.coap_resources import Endpoint, Resource
from bridge.coap_server import CoapDeviceServer
from bridge.messages import Ack, AckStatus, Command, DeviceBirth, PvCurtailment, Rebirth, encode
from bridge.mqtt import Received
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.site_builder import device_key
from bridge.virtual_device import VirtualDevice
from tests.bridge.helpers import NOW_MS, SLOT


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _next(queue: asyncio.Queue[Received], timeout: float = 5.0) -> Received:
    return await asyncio.wait_for(queue.get(), timeout)


def test_observe_and_command_round_trip(site: SiteManifest, domain: ReadingDomain) -> None:
    spec = site.device("bus2-pv")
    assert spec is not None
    dev = VirtualDevice(site.site, spec, device_key("test", spec.id), domain)

    async def scenario() -> None:
        port = free_udp_port()
        server = CoapDeviceServer(site.site, [spec.id])
        server.on_command = lambda d, p: dev.on_command(p, NOW_MS, announce_accepted=False)
        await server.start("127.0.0.1", port)
        _, (_, birth) = dev.connect(NOW_MS)
        server.publish(spec.id, Resource.BIRTH, birth)
        queue: asyncio.Queue[Received] = asyncio.Queue()
        link = CoapLink(
            site.site, {spec.id: Endpoint("127.0.0.1", port)}, queue,
            request_timeout_s=2, retry_s=0.2, reobserve_s=0.5,
        )  # fmt: skip
        await link.start()
        try:
            got = await _next(queue)
            assert (got.topic, got.payload) == ("mgv1/site1/DBIRTH/bus2-pv", birth)
            # Telemetry: the very bytes an MQTT device would publish, on the DDATA topic.
            _, data = dev.telemetry(SLOT, NOW_MS, {"pv_kw": 1.0, "available_kw": 2.0,
                                                   "curtailment": 0.5}, None)  # fmt: skip
            server.publish(spec.id, Resource.DATA, data)
            got = await _next(queue)
            assert (got.topic, got.payload) == ("mgv1/site1/DDATA/bus2-pv", data)
            # A command: POST, and the DACK in the response (no separate `accepted`).
            cmd = Command(
                command_id="1000.bus2-pv.pv_curtailment", device=spec.id, ts=NOW_MS,
                slot=SLOT + 1, expires_ts=NOW_MS + 900_000,
                action=PvCurtailment(kind="pv_curtailment", fraction=0.25),
            )  # fmt: skip
            topic = "mgv1/site1/DCMD/bus2-pv"
            assert link.serves(topic) and not link.serves("mgv1/site1/DCMD/bus1-pv")
            link.publish(topic, encode(cmd))
            got = await _next(queue)
            ack = Ack.model_validate_json(got.payload)
            assert got.topic == "mgv1/site1/DACK/bus2-pv"
            assert ack.status is AckStatus.APPLIED and ack.applied == 0.25 and ack.seq == 2
            assert dev.curtailment == 0.25
            # A re-send of an answered command gets 4.00, and nothing for the core.
            link.publish(topic, encode(cmd))
            # A command for the wrong kind of device: rejected, 4.03, with the DACK.
            wrong = cmd.model_copy(update={"command_id": "1000.bus2-pv.x", "action":
                                           Rebirth(kind="rebirth")})  # fmt: skip
            link.publish(topic, encode(wrong))
            got = await _next(queue)
            assert got.topic == "mgv1/site1/DBIRTH/bus2-pv"  # rebirth: a new session
            assert DeviceBirth.model_validate_json(got.payload).bd_seq == 2
            # Re-registrations after silence deliver the same representations: dropped here.
            await asyncio.sleep(1.5)
            assert queue.empty()
            s = link.stats
            assert s.reobserved >= 2 and s.duplicates >= 2, s
            assert s.requests == {"2.04": 1, "4.00": 1, "2.01": 1}, s.requests
            assert server.commands == 3 and link.summary()["reachable"] == 1
        finally:
            await link.close()
            await server.close()

    asyncio.run(scenario())


def test_unreachable_device_is_counted_and_retried(site: SiteManifest) -> None:
    async def scenario() -> None:
        port = free_udp_port()  # nobody listens: the host answers ICMP port unreachable
        queue: asyncio.Queue[Received] = asyncio.Queue()
        link = CoapLink(
            site.site, {"bus2-meter": Endpoint("127.0.0.1", port)}, queue,
            request_timeout_s=0.5, retry_s=0.1, reobserve_s=5,
        )  # fmt: skip
        await link.start()
        try:
            link.publish("mgv1/site1/DREVENT/bus2-meter", b"{}")
            await asyncio.sleep(0.8)
            s = link.stats
            assert s.observe_failures["unreachable"] >= 6, s  # 3 resources, retried
            assert s.requests == {"unreachable": 1}
            assert queue.empty() and link.summary()["reachable"] == 0
        finally:
            await link.close()

    asyncio.run(scenario())


def test_server_refuses_what_is_not_json(site: SiteManifest) -> None:
    import aiocoap
    from aiocoap.numbers.codes import Code

    async def scenario() -> None:
        port = free_udp_port()
        server = CoapDeviceServer(site.site, ["bus2-pv"])
        await server.start("127.0.0.1", port)
        client = await aiocoap.Context.create_client_context()
        try:
            uri = Endpoint("127.0.0.1", port).uri(site.site, "bus2-pv", Resource.CMD)
            msg = aiocoap.Message(code=Code.POST, uri=uri, payload=b"x", content_format=0)
            response = await client.request(msg).response
            assert response.code == Code.UNSUPPORTED_CONTENT_FORMAT
            msg = aiocoap.Message(code=Code.GET, uri=uri.rsplit("/", 4)[0] + "/.well-known/core")
            links = (await client.request(msg).response).payload.decode()
            assert "</mgv1/site1/bus2-pv/data>;obs" in links
            put = aiocoap.Message(code=Code.PUT, uri=uri.replace("/cmd", "/dr"), payload=b"{}",
                                  content_format=50)  # fmt: skip
            assert (await client.request(put).response).code == Code.CHANGED
            assert server.dr_events == {"bus2-pv": b"{}"}
        finally:
            await client.shutdown()
            await server.close()

    asyncio.run(scenario())


def test_registration_fetches_the_signed_backlog_in_order(
    site: SiteManifest, domain: ReadingDomain
) -> None:
    """Telemetry notified while the bridge was away comes back from `log`, oldest first, from
    the reading after the last one the bridge holds; the current state is not sent twice."""
    spec = site.device("bus2-meter")
    assert spec is not None
    dev = VirtualDevice(site.site, spec, device_key("test", spec.id), domain)

    async def scenario() -> None:
        port = free_udp_port()
        server = CoapDeviceServer(site.site, [spec.id])
        await server.start("127.0.0.1", port)
        _, (_, birth) = dev.connect(NOW_MS)
        server.publish(spec.id, Resource.BIRTH, birth)
        sent = []
        for k in range(3):  # nonces 0, 1, 2, with nobody listening
            _, data = dev.telemetry(SLOT - 2 + k, NOW_MS, {"net_kw": 1.0, "load_kw": 1.0}, 250)
            server.publish(spec.id, Resource.DATA, data)
            sent.append(data)
        server.publish(spec.id, Resource.DATA, b'{"no": "reading"}')  # not kept in the log
        server.publish(spec.id, Resource.DATA, sent[-1])
        queue: asyncio.Queue[Received] = asyncio.Queue()
        link = CoapLink(
            site.site, {spec.id: Endpoint("127.0.0.1", port)}, queue,
            request_timeout_s=2, retry_s=0.2, reobserve_s=5, resume_after=lambda d: 0,
        )  # fmt: skip
        await link.start()
        try:
            got = [await _next(queue) for _ in range(3)]
            data_seen = [m.payload for m in got if m.topic == "mgv1/site1/DDATA/bus2-meter"]
            assert data_seen == sent[1:]  # nonce 0 the bridge holds; 1 and 2 in order
            assert link.stats.backlog == 2 and link.stats.duplicates == 1
            assert queue.empty()
        finally:
            await link.close()
            await server.close()

    asyncio.run(scenario())


def test_bench_coap_reports_its_figures() -> None:
    from bridge.bench_coap import bench_coap

    result = bench_coap(devices=2, rounds=3)
    assert result["messages"] == 2 * 3 * 3
    for key in ("reading_latency_ms", "command_round_trip_ms"):
        assert 0 < result[f"{key}_p50"] <= result[f"{key}_p99"] <= result[f"{key}_max"]
