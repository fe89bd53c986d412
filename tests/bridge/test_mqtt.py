"""Through a real mosquitto (TLS, a password per device, the ACL): refusals and one full slot."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agents.baselines import IdlePolicy
from bridge.commands import CommandState
from bridge.core import BridgeCore, Publish
from bridge.decision import Source
from bridge.errors import BridgeError
from bridge.mqtt import MqttLink, Received, Will, _Client
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.site_builder import device_key
from bridge.topics import MessageType, bridge_subscriptions, device_subscriptions, topic
from bridge.validation import TelemetryValidator, ValidationLimits
from bridge.virtual_device import VirtualDevice
from tests.bridge.broker import Broker, mosquitto
from tests.bridge.helpers import SEED, metrics_for


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, site: SiteManifest) -> Iterator[Broker]:
    with mosquitto(tmp_path_factory.mktemp("mosquitto"), [d.id for d in site.devices]) as b:
        yield b


def _link(
    broker: Broker, user: str, *, password: str | None = None, will: Will | None = None
) -> MqttLink:
    return MqttLink(
        broker.url,
        client_id=f"{user}-{time.monotonic_ns()}",
        username=user,
        password=password or broker.passwords[user],
        ca_file=broker.ca_file,
        will=will,
    )


async def _drain(link: MqttLink, seconds: float) -> list[tuple[str, bytes]]:
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        msg = await link.receive(left)
        if msg is not None:
            got.append((msg.topic, msg.payload))
    return got


def test_wrong_password_and_plain_tcp_are_refused(broker: Broker) -> None:
    async def run() -> None:
        with pytest.raises(BridgeError, match="refused"):
            await _link(broker, "bus1-meter", password="guess").connect(timeout_s=5)
        plain = MqttLink(
            f"mqtt://127.0.0.1:{broker.port}",
            client_id="x",
            username="bridge",
            password=broker.passwords["bridge"],
        )
        with pytest.raises(BridgeError):
            await plain.connect(timeout_s=2)

    asyncio.run(run())


def test_the_acl_keeps_each_device_on_its_own_topics(broker: Broker) -> None:
    async def run() -> None:
        bridge = _link(broker, "bridge")
        await bridge.connect(bridge_subscriptions("site1"))
        meter = _link(broker, "bus1-meter")
        await meter.connect(device_subscriptions("site1", "bus1-meter", "bridge"))
        spy = _link(broker, "bus2-meter")  # tries to read bus1-meter's commands
        await spy.connect([topic("site1", MessageType.DCMD, "bus1-meter")])
        meter.publish(topic("site1", MessageType.DDATA, "bus2-meter"), b"impersonation")
        meter.publish(topic("site1", MessageType.DDATA, "bus1-meter"), b"own")
        bridge.publish(topic("site1", MessageType.DCMD, "bus1-meter"), b"cmd")
        at_bridge = await _drain(bridge, 1.0)
        assert at_bridge == [("mgv1/site1/DDATA/bus1-meter", b"own")]
        assert await _drain(meter, 0.2) == [("mgv1/site1/DCMD/bus1-meter", b"cmd")]
        assert await _drain(spy, 0.2) == []
        for link in (bridge, meter, spy):
            await link.close()

    asyncio.run(run())


def test_one_slot_through_the_broker(broker: Broker, site: SiteManifest) -> None:
    """Births and signed telemetry in, validated; the decision out as commands; every command
    applied and acknowledged within the device's limits."""
    now_s = int(time.time())
    genesis = now_s - now_s % 86_400
    domain = ReadingDomain(31337, "0x" + "5a" * 20)
    slot = (now_s - genesis) // 900

    async def run() -> None:
        validator = TelemetryValidator(site, domain, ValidationLimits(genesis=genesis))
        core = BridgeCore(site, validator, IdlePolicy(site.make_codec()), policy_name="idle")
        bridge = _link(broker, "bridge", will=Will(**core.will(now_s * 1000).__dict__))
        await bridge.connect(bridge_subscriptions("site1"))
        devices = {}
        links = {}
        for spec in site.devices:
            dev = VirtualDevice(
                "site1", spec, device_key(SEED, spec.id), domain, soc_min=0.1, soc_max=0.9
            )
            (wt, wp), (bt, bp) = dev.connect(int(time.time() * 1000))
            link = _link(broker, spec.id, will=Will(wt, wp))
            await link.connect(device_subscriptions("site1", spec.id, "bridge"))
            link.publish(bt, bp)
            devices[spec.id], links[spec.id] = dev, link
        await asyncio.sleep(0.3)
        for spec in site.devices:
            m = {k: v for k, v in metrics_for(spec.kind.value).items() if k != "kind"}
            wh = round(m["net_kw"] * 250) if spec.kind.value == "meter" else None  # type: ignore[operator]
            t, p = devices[spec.id].telemetry(slot - 1, int(time.time() * 1000), m, wh)
            links[spec.id].publish(t, p)
        work = []
        for t, p in await _drain(bridge, 1.5):
            work += core.handle(t, p, int(time.time() * 1000))
        assert validator.accepted == 2 * len(site.devices), dict(validator.rejected)
        assert sum(validator.rejected.values()) == 0
        assert {w.key for w in work if not isinstance(w, Publish)} == {
            f"reading:{p.meter}:{slot - 1}" for p in site.prosumers
        }
        decision, commands = core.decide(slot, int(time.time() * 1000))
        assert decision.source is Source.POLICY and len(commands) == 7
        assert bridge.publish_many(commands.topics, commands.payloads) == 7  # as the runner does
        for device_id, link in links.items():
            for t, p in await _drain(link, 0.3):
                if "/DCMD/" in t:
                    for at, ap in devices[device_id].on_command(p, int(time.time() * 1000)):
                        link.publish(at, ap)
        for t, p in await _drain(bridge, 1.0):
            core.handle(t, p, int(time.time() * 1000))
        assert core.tracker.finished == {CommandState.APPLIED: 7}
        assert await bridge.drain(2.0) == 0  # every command's PUBACK came back
        for dev in devices.values():
            if dev.spec.kind.value == "battery":
                assert abs(dev.setpoint_kw) <= dev.spec.power_kw
        for link in links.values():
            await link.close()
        await bridge.close()

    asyncio.run(run())


def test_unacknowledged_messages_come_back_after_a_crash_and_while_away(
    broker: Broker, site: SiteManifest
) -> None:
    """The bridge's link: a persistent session with manual acks. What it did not acknowledge
    (it died before committing) is delivered again, and what was published while it was away
    is kept for it; what it acknowledged is not delivered twice."""
    topic_ = topic("site1", MessageType.DDATA, "bus1-meter")

    def bridge_link() -> MqttLink:
        return MqttLink(
            broker.url, client_id="site1-persist", username="bridge",
            password=broker.passwords["bridge"], ca_file=broker.ca_file, session_expiry_s=600,
        )  # fmt: skip

    async def run() -> None:
        device = _link(broker, "bus1-meter")
        await device.connect()
        first = bridge_link()
        await first.connect(bridge_subscriptions("site1"))
        await asyncio.sleep(0.3)  # the SUBACK follows the CONNACK
        for i in range(4):
            device.publish(topic_, f"m{i}".encode())
        got = [await first.receive(5) for _ in range(4)]
        assert [m.payload for m in got if m is not None] == [b"m0", b"m1", b"m2", b"m3"]
        for m in got[:2]:
            assert m is not None
            first.ack(m)
        await asyncio.sleep(0.3)  # let the PUBACKs leave before the "crash"
        first.client.loop_stop()  # a crash: no DISCONNECT, no acks for m2, m3
        first.client.socket().close()  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
        device.publish(topic_, b"m4")  # while the bridge is away
        await asyncio.sleep(0.3)
        second = bridge_link()
        await second.connect(bridge_subscriptions("site1"))
        again = [m.payload for m in await _messages(second, 2.0)]
        assert second.session_resumed == 1
        assert sorted(again) == [b"m2", b"m3", b"m4"], again
        await second.close()
        await device.close()

    asyncio.run(run())


async def _messages(link: MqttLink, seconds: float) -> list[Received]:
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        msg = await link.receive(left)
        if msg is not None:
            out.append(msg)
            link.ack(msg)
    return out


def test_connect_returns_once_subscribed(broker: Broker) -> None:
    """`connect` waits for the SUBACK: what a device publishes the moment it returns arrives
    (before, it returned on the CONNACK and such a message could beat the subscription)."""
    topic_ = topic("site1", MessageType.DDATA, "bus1-meter")

    async def run() -> None:
        device = _link(broker, "bus1-meter")
        await device.connect()
        for i in range(5):
            bridge = _link(broker, "bridge")
            await bridge.connect(bridge_subscriptions("site1"))
            assert bridge.subscribed.is_set()
            device.publish(topic_, f"m{i}".encode())
            assert await _drain(bridge, 0.5) == [(topic_, f"m{i}".encode())]
            await bridge.close()
        await device.close()

    asyncio.run(run())


def test_a_subscription_never_acknowledged_fails_by_name() -> None:
    """A broker that accepts the connection but never answers the SUBSCRIBE: `connect` fails
    after its timeout, naming the topic, instead of returning deaf."""

    async def run() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1024)  # CONNECT
            writer.write(bytes([0x20, 0x03, 0x00, 0x00, 0x00]))  # CONNACK v5: accepted
            await writer.drain()
            while await reader.read(1024):  # SUBSCRIBE, PINGREQ...: never answered
                pass

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = MqttLink(f"mqtt://127.0.0.1:{port}", client_id="deaf", username="u", password="p")
        with pytest.raises(BridgeError, match=r"no SUBACK within 1\.0 s for \['mgv1/x/DDATA/\+'\]"):
            await link.connect(["mgv1/x/DDATA/+"], timeout_s=1.0)
        server.close()

    asyncio.run(run())


class _FakeSocket:
    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        pass


def _offline_client(cls: type[mqtt.Client]) -> mqtt.Client:
    """A client with a socket stand-in: what it queues to send can be read back."""
    client = cls(CallbackAPIVersion.VERSION2, client_id="x", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client._sock = _FakeSocket()  # type: ignore[assignment]
    client.on_socket_register_write = lambda *_: None
    return client


@pytest.mark.parametrize("size", [0, 5, 200, 20_000, 3_000_000])
@pytest.mark.parametrize("retain", [False, True])
def test_the_short_publish_queues_what_paho_would(size: int, retain: bool) -> None:
    """`_Client.publish` (QoS 1 bytes) builds paho's packet and keeps paho's message state."""
    ours, paho = _offline_client(_Client), _offline_client(mqtt.Client)
    for client in (ours, paho):
        info = client.publish("mgv1/site1/DCMD/bus1-battery", b"x" * size, qos=1, retain=retain)
        assert (info.rc, info.mid) == (mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS, 1)
    assert ours._out_packet[0]["packet"] == paho._out_packet[0]["packet"]
    a, b = ours._out_messages[1], paho._out_messages[1]
    for name in ("dup", "mid", "_topic", "payload", "properties", "qos", "retain", "state"):
        assert getattr(a, name) == getattr(b, name), name
    assert ours._inflight_messages == paho._inflight_messages == 1
    ours._out_messages[1].info._set_as_published()
    assert ours._out_messages[1].info.is_published()


def test_the_short_read_hands_over_what_paho_would() -> None:
    """A PUBLISH without properties takes the short way, one with properties paho's; a PUBACK
    with a success reason or none completes the publish either way."""
    got: list[tuple[str, bytes, int, int]] = []
    client = _offline_client(_Client)
    assert isinstance(client, _Client)
    client.on_fast_message = lambda *args: got.append(args)
    slow: list[tuple[str, bytes, int]] = []
    client.on_message = lambda _c, _u, m: slow.append((m.topic, m.payload, m.mid))
    client._manual_ack = True
    body = b"\x00\x04a/bc" + (7).to_bytes(2, "big")
    client._in_packet.update(command=0x32, packet=bytearray(body + b"\x00payload"))
    client._handle_publish()
    with_props = body + b"\x02\x01\x01" + b"payload"  # payload format indicator
    client._in_packet.update(command=0x32, packet=bytearray(with_props))
    client._handle_publish()
    assert got == [("a/bc", b"payload", 7, 1)]
    assert slow == [("a/bc", b"payload", 7)]
    published = []
    client.on_publish = lambda _c, _u, mid, reason, _p: published.append((mid, reason.value))
    for tail in (b"", b"\x10", b"\x00\x00"):
        info = client.publish("t", b"p", qos=1)
        client._in_packet.update(command=0x40, packet=bytearray(info.mid.to_bytes(2, "big") + tail))
        client._handle_pubackcomp("PUBACK")
        assert info.is_published()
    assert [r for _, r in published] == [0, 0x10, 0]
    assert not client._out_messages


def _state_of(client: mqtt.Client) -> list[tuple[object, ...]]:
    names = ("dup", "mid", "_topic", "payload", "properties", "qos", "retain", "state")
    return [tuple(getattr(m, n) for n in names) for m in client._out_messages.values()]


def test_publish_many_queues_what_paho_would_one_by_one() -> None:
    """A slot's commands in one `publish_many`: paho's packets back to back, paho's state per
    message, ids wrapping past 65,535, and an id still unacknowledged skipped as paho skips it."""
    ours, paho = _offline_client(_Client), _offline_client(mqtt.Client)
    assert isinstance(ours, _Client)
    sizes = [0, 5, 120, 200, 20_000, 3_000_000, 7]
    topics = [f"mgv1/site1/DCMD/dev-{i}" for i in range(len(sizes))]
    payloads = [bytes([65 + i]) * size for i, size in enumerate(sizes)]
    for client in (ours, paho):
        held = client.publish("mgv1/site1/DCMD/held", b"unacknowledged", qos=1)
        assert held.mid == 1
        client._last_mid = 65_531  # the batch wraps, and reaches id 1, still in flight
    mids = ours.publish_many(topics, payloads)
    refused = [paho.publish(t, p, qos=1).rc for t, p in zip(topics, payloads, strict=True)]
    assert mids == [65_532, 65_533, 65_534, 65_535, 2, 3]
    assert refused.count(mqtt.MQTTErrorCode.MQTT_ERR_QUEUE_SIZE) == 1
    assert ours._last_mid == paho._last_mid == 3
    joined = b"".join(p["packet"] for p in paho._out_packet)
    assert b"".join(p["packet"] for p in ours._out_packet) == joined
    assert _state_of(ours) == _state_of(paho)
    assert ours._inflight_messages == paho._inflight_messages == 7
    with pytest.raises(ValueError, match="wildcard"):
        ours.publish_many(["mgv1/site1/DCMD/+"], [b"x"])
    assert ours._inflight_messages == 7  # nothing queued by a refused batch
    assert ours.publish_many([], []) == [] and ours._last_mid == 3  # a shadow slot's
    with pytest.raises(ValueError, match="as many payloads"):
        ours.publish_many(["t"], [])


def test_writes_are_joined_and_send_what_paho_sends() -> None:
    """Packets queued together leave in one `send` where they can (through partial writes),
    a QoS 0 PUBLISH still completes when written, and the bytes are paho's, in paho's order."""
    streams = []
    for cls in (_Client, mqtt.Client):
        client = _offline_client(cls)
        mine, peer = socket.socketpair()
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        mine.setblocking(False)
        client._sock = mine  # type: ignore[assignment]
        infos = [client.publish(f"t/{i}", bytes([i]) * 3000 * i, qos=1) for i in range(6)]
        infos += [client.publish(f"u/{i}", b"y" * 50, qos=1) for i in range(300)]
        got = b""
        while client.want_write():
            client.loop_write()
            if len(infos) == 306:  # more behind a packet half written: joined from its middle
                infos += [client.publish(f"v/{i}", b"z" * 900, qos=1) for i in range(50)]
                zero = client.publish("t/zero", b"qos0", qos=0)
                infos += [zero, client.publish("t/last", b"last", qos=1)]
            peer.settimeout(0.01)
            with contextlib.suppress(TimeoutError):
                while chunk := peer.recv(1 << 20):
                    got += chunk
        assert zero.is_published()  # once written
        assert not any(i.is_published() for i in infos if i is not zero)  # wait for PUBACK
        streams.append(got)
        mine.close()
        peer.close()
    assert streams[0] == streams[1] and len(streams[0]) > 50_000


def test_a_puback_lets_a_queued_message_go_as_paho_does() -> None:
    """`_update_inflight` skips paho's walk only when nothing waits behind the in-flight
    limit; with messages waiting, the next goes out on a PUBACK exactly as in paho."""
    clients = []
    for cls in (_Client, mqtt.Client):
        client = _offline_client(cls)
        client.max_inflight_messages_set(2)
        for i in range(4):
            client.publish(f"t/{i}", b"p%d" % i, qos=1)
        client._in_packet.update(command=0x40, packet=bytearray(b"\x00\x01"))
        client._handle_pubackcomp("PUBACK")
        clients.append(client)
    ours, paho = clients
    assert _state_of(ours) == _state_of(paho)
    assert ours._inflight_messages == paho._inflight_messages == 2
    assert [p["packet"] for p in ours._out_packet] == [p["packet"] for p in paho._out_packet]
    assert [m.state for m in ours._out_messages.values()].count(
        mqtt.MessageState.MQTT_MS_QUEUED
    ) == 1


def test_pubacks_read_from_the_buffer_complete_what_paho_completes() -> None:
    """PUBACKs with and without a reason and properties, a refusal (paho's way), an unknown
    id, and one split across two reads: the same publishes complete, with the same reasons."""
    results = []
    for cls in (_Client, mqtt.Client):
        client = _offline_client(cls)
        mine, peer = socket.socketpair()
        mine.setblocking(False)
        client._sock = mine  # type: ignore[assignment]
        done: list[tuple[int, int]] = []
        client.on_publish = lambda _c, _u, mid, reason, _p, done=done: done.append(
            (mid, reason.value)
        )
        mids = [client.publish(f"t/{i}", b"p", qos=1).mid for i in range(8)]
        acks = [
            b"\x40\x02" + mids[0].to_bytes(2, "big"),
            b"\x40\x03" + mids[1].to_bytes(2, "big") + b"\x10",
            b"\x40\x04" + mids[2].to_bytes(2, "big") + b"\x00\x00",
            b"\x40\x03" + mids[3].to_bytes(2, "big") + b"\x80",  # refused: paho's
            b"\x40\x02" + (999).to_bytes(2, "big"),  # not ours
            b"\x40\x02" + mids[4].to_bytes(2, "big"),
        ]
        split = b"\x40\x02" + mids[5].to_bytes(2, "big")
        peer.send(b"".join(acks) + split[:3])
        read = client.read_packets if isinstance(client, _Client) else client.loop_read
        read(100)
        peer.send(split[3:])
        read(100)
        results.append((done, sorted(client._out_messages)))
        mine.close()
        peer.close()
    assert results[0] == results[1]
    assert [mid for mid, _ in results[0][0]] == [1, 2, 3, 4, 5, 6]
