"""The thin MQTT shell: paho-mqtt 2 moving bytes between the broker and an asyncio queue.

It decides nothing (aiomqtt's lesson): payloads stay bytes, and every decision is in the sans-I/O
core. TLS and a user name/password are mandatory outside tests of the refusal itself; the last
will is set before connecting, as Sparkplug requires.

paho is driven from the event loop itself (paho's "external event loop" interface: `loop_read`
when the socket is readable, `loop_write` while paho has bytes to send, `loop_misc` every second
for the keep-alive), not from paho's own thread. With a thread, the two shared one GIL: every
`recv` paho made (three a packet) and every acknowledgement the loop queued (a wake-up write to
paho's self-pipe) handed the GIL over and waited up to a switch interval to get it back, and the
bench measured the bridge at half of raw paho's rate. On the loop, a message goes from the socket
to `queue` in one call, and the broker's flow stays with the caller: each readable event reads at
most `READ_BUDGET` packets before the loop runs the consumer again, so a burst waits in the
kernel and the broker, not stamped and queued here (a slot's last message is handed over when the
bridge can look at it, which is where decision latency starts). The (re)connect itself (DNS, TCP,
the TLS handshake) blocks, so it runs in a worker thread, with paho's back-off between tries
(1 s doubling to 30 s).

A link that must not lose what it receives (the bridge's) opens a *persistent* MQTT v5 session
(`clean_start` False, a session expiry) and acknowledges each message itself (`manual_ack`):
the broker keeps every QoS 1 message the bridge has not acknowledged, across a bridge crash and
while the bridge is away, and delivers it again on the next connect. The caller acknowledges a
message (`ack`) only once what it carried is durable, so a reading is never acknowledged and
then lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.errors import BridgeError

#: Packets read per readable event before the loop gets back to the consumer, and by default
#: the messages the queue may hold before reading stops (`max_queued`). A slot's last message
#: is handled after those read with it, so this bounds the wait inside decision latency
#: (~32 x 0.1 ms); smaller costs more loop turns per message (16: ~10 % more CPU a message in
#: the bench).
READ_BUDGET = 32
#: Bytes asked of the socket at a time (paho's own reads ask for a packet's bytes only).
RECV_CHUNK = 65_536
#: paho's reconnect back-off (seconds): the first wait, doubled after each failed try up to the
#: last; a connection that got its CONNACK starts the next loss at the first again.
RECONNECT_DELAY_S = (1.0, 30.0)


_PUBACK_REASONS = {code: ReasonCode(PacketTypes.PUBACK, identifier=code) for code in (0x00, 0x10)}
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    at: float = 0.0
    """time.monotonic() when paho handed it over: where decision latency starts."""
    mid: int = 0
    """The broker's packet id, for `MqttLink.ack` (0 for QoS 0)."""
    qos: int = 0


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = False


#: Most bytes `_Client._packet_write` joins into one `send` (a slot's commands are ~150 KiB).
WRITE_CHUNK = 262_144


_PUBLISHED = threading.Condition()
"""One condition for every `_Info`: paho makes one per message, most of a publish's cost."""


class _Info(mqtt.MQTTMessageInfo):
    """paho's MessageInfo on the shared condition (waiters each check their own flag)."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._published = False
        self._condition = _PUBLISHED
        self.rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        with self._condition:
            self._published = True
            self._condition.notify_all()


class _Unwatched(mqtt.MQTTMessageInfo):
    """The MessageInfo of `_Client.publish_many`'s messages: nobody waits on one (the link
    follows their PUBACKs through `on_publish`), so completing it is free; paho's sets a flag
    under a condition and wakes its waiters, once per PUBACK."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0)

    def _set_as_published(self) -> None:
        pass


_UNWATCHED = _Unwatched()


def _fixed_header(remaining: int) -> bytes:
    """A QoS 1 PUBLISH's first byte and its remaining length (7 bits a byte)."""
    out = bytearray((0x32,))
    while True:
        remaining, byte = divmod(remaining, 128)
        out.append(byte | 0x80 if remaining else byte)
        if not remaining:
            return bytes(out)


class _Client(mqtt.Client):
    """paho's client with the bridge's hot path made cheap, and stoppable like a threaded one.

    The common packets take a short way; anything else takes paho's own:

    * reads come out of one `recv` of up to `RECV_CHUNK` bytes: paho asks for each packet in
      three (its type, its length, its body), each a system call;
    * a QoS 1 PUBLISH without MQTT v5 properties (what devices send; a topic alias or any other
      property is a property) goes straight to `on_fast_message`: no `Properties` object (paho
      builds and clears one per packet, the largest cost it had), no `MQTTMessage`, no topic
      matching for the per-topic callbacks this client does not use;
    * a PUBACK saying success without properties (the broker's answer to every command the
      bridge publishes) skips the same decoding, and one whole in the read buffer skips paho's
      generic read too;
    * after a PUBACK, paho's walk over every unacknowledged message for one queued behind the
      in-flight limit runs only when one can be (`_update_inflight`: it was quadratic in a
      slot's commands);
    * a slot's commands are queued by `publish_many` as one buffer, and packets queued
      together leave in one `send` (`_packet_write`).

    It leans on paho's private methods and state (`_sock_recv`, `_packet_read`,
    `_handle_publish`, `_handle_pubackcomp`, `_update_inflight`, `_packet_write`,
    `_out_messages`, `_out_packet`), which is why paho is pinned below the next minor version;
    the tests run every path through a real mosquitto, and compare the new ones with paho's
    own byte for byte.
    """

    drained = False
    """Set when a read found nothing left (the socket would block): the readable event is done."""
    on_loop_stop: Callable[[], None] | None = None
    on_fast_message: Callable[[str, bytes, int, int], None] | None = None
    """Called with (topic, payload, packet id, QoS) for a PUBLISH taking the short way."""
    _rbuf = b""
    _rpos = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._topic_heads: dict[str, bytes] = {}

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._rbuf, self._rpos = b"", 0  # what the old connection left is not this one's
        return super().reconnect()

    def _sock_recv(self, bufsize: int) -> bytes:
        pos = self._rpos
        if pos >= len(self._rbuf):
            try:
                data = super()._sock_recv(RECV_CHUNK)
            except BlockingIOError:
                self.drained = True
                raise
            if not data:
                return data  # the broker closed the connection
            self._rbuf, pos = data, 0
        out = self._rbuf[pos : pos + bufsize]
        self._rpos = pos + len(out)
        return out

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        fast = self.on_fast_message
        header = self._in_packet["command"]
        packet = self._in_packet["packet"]
        if fast is None or (header & 0x06) != 0x02 or self._protocol != mqtt.MQTTv5:
            return super()._handle_publish()
        end = 2 + ((packet[0] << 8) | packet[1])  # after the topic
        # A topic, a packet id, and a property length of 0; anything else is paho's.
        if end == 2 or len(packet) < end + 3 or packet[end + 2] != 0:
            return super()._handle_publish()
        try:
            topic = packet[2:end].decode()
        except UnicodeDecodeError:
            return super()._handle_publish()
        mid = (packet[end] << 8) | packet[end + 1]
        fast(topic, bytes(memoryview(packet)[end + 3 :]), mid, 1)
        if self._manual_ack:
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(mid)

    def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """paho's QoS 1 publish of bytes, the same state kept, in a quarter of its time.

        paho spends ~15-40 us a publish (a `threading.Condition` per message, its debug-log
        formatting, generic packing): a 1,000-device decision's 748 commands were more than the
        decision itself. Anything else (QoS 0 or 2, properties, a queue or inflight limit
        reached, a topic paho would refuse) is paho's own.
        """
        if (
            qos != 1
            or properties is not None
            or type(payload) is not bytes
            or self._protocol != mqtt.MQTTv5
            or self._max_queued_messages > 0
            or 0 < self._max_inflight_messages <= self._inflight_messages
        ):
            return super().publish(topic, payload, qos, retain, properties)
        name = topic.encode()
        if not name or len(name) > 65_535 or b"+" in name or b"#" in name:
            return super().publish(topic, payload, qos, retain, properties)
        remaining = len(name) + len(payload) + 5  # topic length, packet id, property length
        if remaining > 268_435_455:
            return super().publish(topic, payload, qos, retain, properties)
        mid = self._mid_generate()
        info = _Info(mid)
        message = mqtt.MQTTMessage.__new__(mqtt.MQTTMessage)
        message.timestamp = time.monotonic()
        message.state = mqtt.MessageState.MQTT_MS_WAIT_FOR_PUBACK
        message.dup = False
        message.mid = mid
        message._topic = name
        message.payload = payload
        message.qos = 1
        message.retain = retain
        message.info = info
        message.properties = None
        with self._out_message_mutex:
            if mid in self._out_messages:  # 65,535 unacknowledged: paho's answer
                info.rc = mqtt.MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
                return info
            self._out_messages[mid] = message
            if self._sock is None:  # sent after the reconnect, as paho does
                message.state = mqtt.MessageState.MQTT_MS_PUBLISH
                info.rc = mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
                return info
            self._inflight_messages += 1
            packet = bytearray((0x32 | bool(retain),))
            while True:  # the remaining length, 7 bits a byte
                remaining, byte = divmod(remaining, 128)
                packet.append(byte | 0x80 if remaining else byte)
                if not remaining:
                    break
            packet += len(name).to_bytes(2, "big")
            packet += name
            packet += mid.to_bytes(2, "big")
            packet.append(0)  # no properties
            packet += payload
            info.rc = self._packet_queue(mqtt.PUBLISH, packet, mid, 1, info)
            return info

    def _handle_pubackcomp(self, cmd: Any) -> mqtt.MQTTErrorCode:
        packet = self._in_packet["packet"]
        n = len(packet)
        # A PUBACK: its packet id, then maybe a reason code, then maybe a property length of 0
        # (a reason of 0x10, "no matching subscribers", is a success too).
        if cmd != "PUBACK" or n < 2 or n > 4 or (n == 4 and packet[3] != 0):
            return super()._handle_pubackcomp(cmd)
        reason = _PUBACK_REASONS.get(packet[2] if n > 2 else 0)
        if reason is None:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PROPERTIES)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _update_inflight(self) -> mqtt.MQTTErrorCode:
        """paho's, skipped when every message it holds is in flight already.

        paho calls it after each PUBACK and walks all its unacknowledged messages looking for
        one queued behind the in-flight limit: with a slot's 748 commands out, that walk was
        ~280,000 steps a slot (~55 ms of CPU, more than the slot's decision). A message is
        waiting only if paho holds more messages than it counts in flight."""
        if len(self._out_messages) <= self._inflight_messages:
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._update_inflight()

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        """paho's, with the packets at the head of its queue joined into one `send`.

        paho sends each packet with its own system call: 748 for a slot's commands. Packets
        that need nothing once written are joined (up to `WRITE_CHUNK` bytes); a QoS 0 PUBLISH
        (completed when written) and a DISCONNECT (the socket closes after it) stay paho's."""
        queue = self._out_packet
        if len(queue) > 1:
            parts: list[bytes | bytearray | memoryview] = []
            size = 0
            for packet in queue:
                command = packet["command"] & 0xF0
                if size >= WRITE_CHUNK or command == mqtt.DISCONNECT:
                    break
                if command == mqtt.PUBLISH and packet["qos"] == 0:
                    break
                pos = packet["pos"]
                parts.append(memoryview(packet["packet"])[pos:] if pos else packet["packet"])
                size += packet["to_process"]
            if len(parts) > 1:
                for _ in parts:
                    queue.popleft()
                joined = b"".join(parts)
                queue.appendleft({
                    "command": mqtt.PUBLISH, "mid": 0, "qos": 1, "pos": 0,
                    "to_process": len(joined), "packet": joined, "info": None,
                })  # fmt: skip
        return super()._packet_write()

    def publish_many(self, topics: list[str], payloads: list[bytes]) -> list[int]:
        """QoS 1 publishes of `payloads[i]` to `topics[i]`, queued as one write; their ids.

        `publish`'s short way for a whole slot of commands: one lock, one packet buffer, one
        write registration, and a shared MessageInfo (`_Unwatched`); what stays per message is
        the `MQTTMessage` paho needs to re-send it after a reconnect and to complete it on its
        PUBACK. Topics are encoded and checked once and kept (a site's command topics are a
        fixed set). Where `publish` would not take its short way (QoS limits, no connection,
        MQTT 3) every message goes through `publish`. An id still unacknowledged from 65,535
        publishes ago is skipped, as paho refuses it (`MQTT_ERR_QUEUE_SIZE`), and its id left
        out of the answer.
        """
        n = len(topics)
        if len(payloads) != n:
            raise ValueError(f"publish_many: expected as many payloads as topics, got {n} topics")
        if not n:  # a shadow slot's: nothing to queue, no id to take
            return []
        if (
            self._protocol != mqtt.MQTTv5
            or self._max_queued_messages > 0
            or 0 < self._max_inflight_messages < self._inflight_messages + n
            or self._sock is None
            or any(type(p) is not bytes for p in payloads)
        ):
            return [self.publish(t, p, qos=1).mid for t, p in zip(topics, payloads, strict=True)]
        known = self._topic_heads
        heads = [known.get(t) or self._topic_head(t) for t in topics]  # raises before queuing
        new = mqtt.MQTTMessage.__new__
        waiting = mqtt.MessageState.MQTT_MS_WAIT_FOR_PUBACK
        now = time.monotonic()
        chunks: list[bytes] = []
        mids: list[int] = []
        with self._out_message_mutex:
            out = self._out_messages
            with self._mid_generate_mutex:
                first = self._last_mid
                self._last_mid = (first + n - 1) % 65_535 + 1
            mid = first
            for head, payload in zip(heads, payloads, strict=True):
                mid = mid % 65_535 + 1
                if mid in out:
                    continue
                message = new(mqtt.MQTTMessage)
                message.timestamp = now
                message.state = waiting
                message.dup = False
                message.mid = mid
                message._topic = head[2:]
                message.payload = payload
                message.qos = 1
                message.retain = False
                message.info = _UNWATCHED
                message.properties = None
                out[mid] = message
                mids.append(mid)
                # The packet id, then a property length of 0 (no properties).
                size = len(head) + len(payload) + 3
                if size < 128:
                    fixed = bytes((0x32, size))
                elif size < 16_384:  # a command's size: two bytes of remaining length
                    fixed = bytes((0x32, (size & 0x7F) | 0x80, size >> 7))
                else:
                    fixed = _fixed_header(size)
                chunks += (fixed, head, (mid << 8).to_bytes(3), payload)
            self._inflight_messages += len(mids)
            if chunks:
                self._packet_queue(mqtt.PUBLISH, b"".join(chunks), 0, 1)
        return mids

    def _topic_head(self, topic: str) -> bytes:
        """A PUBLISH's topic field (length, then UTF-8) for `topic`, checked as paho checks."""
        name = topic.encode()
        if not name or len(name) > 65_535 or b"+" in name or b"#" in name:
            raise ValueError(f"publish topic: expected 1..65535 bytes, no wildcard, got {topic!r}")
        if len(self._topic_heads) >= 65_536:
            self._topic_heads.clear()
        head = self._topic_heads[topic] = len(name).to_bytes(2, "big") + name
        return head

    def _read_puback(self) -> mqtt.MQTTErrorCode | None:
        """Complete a successful PUBACK waiting whole in the read buffer, without paho's
        generic read (three reads and a packet dictionary a packet: ~14 us of a PUBACK's ~20,
        748 PUBACKs a slot at 1,000 devices); None, with nothing consumed, for anything else.
        """
        buf, pos = self._rbuf, self._rpos
        if len(buf) - pos < 4 or buf[pos] != 0x40:
            return None
        n = buf[pos + 1]
        if n < 2 or n > 4 or pos + 2 + n > len(buf) or (n == 4 and buf[pos + 5] != 0):
            return None
        reason = _PUBACK_REASONS.get(buf[pos + 4] if n > 2 else 0)
        if reason is None:
            return None
        self._rpos = pos + 2 + n
        with self._msgtime_mutex:
            self._last_bytes_received = time.monotonic()
        mid = (buf[pos + 2] << 8) | buf[pos + 3]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PROPERTIES)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def read_packets(self, limit: int) -> mqtt.MQTTErrorCode:
        """`loop_read`, but at most `limit` packets: paho's reads one per message it has in
        flight (every command the bridge published, until its PUBACK), which is no budget."""
        self.drained = False
        for _ in range(limit):
            if self._sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._read_puback() if self._in_packet["command"] == 0 else None
            if rc is None:
                rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if self.drained:
                break
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def loop_stop(self) -> mqtt.MQTTErrorCode:
        """Stop driving the connection (no DISCONNECT, no reconnect): what a crash leaves."""
        if self.on_loop_stop is not None:
            self.on_loop_stop()
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS


class MqttLink:
    """One MQTT connection: connect, subscribe, publish, and an async stream of messages."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        username: str,
        password: str,
        ca_file: str | Path | None = None,
        will: Will | None = None,
        birth: Will | None = None,
        keepalive: int = 10,
        session_expiry_s: int | None = None,
        receive_maximum: int = 1000,
        max_queued: int = READ_BUDGET,
    ) -> None:
        """`session_expiry_s` set: a persistent session with manual acknowledgements (`ack`);
        None: a clean session whose messages paho acknowledges on receipt (devices, tools).

        `max_queued`: reading stops while this many messages wait in `queue`. A consumer that
        commits each batch (the bridge: one SQLite transaction, one fsync) wants it as large as
        its batch, so that a backlog (a restart's, the broker's queue) goes in few commits, not
        one per `READ_BUDGET`; the bench keeps the default, the shortest wait for a slot's last
        message."""
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise BridgeError(f"broker url: expected mqtts://HOST:PORT or mqtt://..., got {url!r}")
        self.host = parsed.hostname
        self.port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
        self.keepalive = keepalive
        self.persistent = session_expiry_s is not None
        self.client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=self.persistent,
        )
        self._connect_props = Properties(PacketTypes.CONNECT)
        if session_expiry_s is not None:
            self._connect_props.SessionExpiryInterval = session_expiry_s
            # How many unacknowledged messages the broker may have in flight to us.
            self._connect_props.ReceiveMaximum = receive_maximum
        self.client.username_pw_set(username, password)
        if parsed.scheme == "mqtts":
            self.client.tls_set(
                ca_certs=str(ca_file) if ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT
            )
        if will is not None:
            self.client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(1000)
        self.queue: asyncio.Queue[Received] = asyncio.Queue()
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._subscriptions: list[str] = []
        self.birth = birth
        """Published on every (re)connect: a broker restarted without persistence forgot it."""
        self._unconfirmed: set[int] = set()
        """Packet ids of QoS 1 publishes the broker has not acknowledged (`drain` waits)."""
        self._early: set[int] = set()
        """Acknowledged before `publish` returned (a CONNACK's resend, read in the same call)."""
        self._ack_lock = threading.Lock()
        self.connects = 0
        self.session_resumed = 0
        """Connects on which the broker still held our session (queued messages follow)."""
        self._refused: str | None = None
        self._suback: dict[int, str] = {}
        """Subscriptions sent on the last connect and not yet acknowledged (packet id -> topic)."""
        self._sub_refused: list[str] = []
        self.subscribed = asyncio.Event()
        """Set once the broker acknowledged every subscription of the last connect."""
        self._fd: int | None = None
        """The socket registered with the event loop (its number: paho closes the object)."""
        self._writing = False
        self.max_queued = max(1, max_queued)
        self._paused = False
        """Reading stopped: `queue` holds `max_queued` messages the consumer has not taken."""
        self._lost: asyncio.Event | None = None
        self._stopped = False
        self._halted = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self.client.on_loop_stop = self._stop
        self.client.on_fast_message = self._on_fast_message

    # ---- paho callbacks (on the event loop, but for a reconnect's) ---------------------------
    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the event loop: now if this is it, else as soon as it can."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to tell
                self._loop.call_soon_threadsafe(fn)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self._on_loop(self.connected.set)
            return
        if getattr(flags, "session_present", False):
            self.session_resumed += 1
        self._suback.clear()
        for sub in self._subscriptions:  # re-subscribe after every reconnect (idempotent)
            _, mid = client.subscribe(sub, qos=1)
            self._suback[mid] = sub
        if not self._suback:
            self._on_loop(self.subscribed.set)
        if self.birth is not None:
            client.publish(self.birth.topic, self.birth.payload, qos=1, retain=self.birth.retain)
        self.connects += 1
        self._on_loop(self.connected.set)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        sub = self._suback.pop(mid, None)
        if sub is None:
            return
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            self._sub_refused.append(f"{sub!r} ({refused[0]})")
        if not self._suback:
            self._on_loop(self.subscribed.set)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._on_loop(self.connected.clear)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._ack_lock:
            if mid in self._unconfirmed:
                self._unconfirmed.discard(mid)
            else:
                self._early.add(mid)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.queue.put_nowait(
            Received(
                message.topic, bytes(message.payload), time.monotonic(), message.mid, message.qos
            )
        )

    def _on_fast_message(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        self.queue.put_nowait(Received(topic, payload, time.monotonic(), mid, qos))

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()  # still open: paho closes it after this call
        self._on_loop(lambda: self._detach(fd))

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._on_loop(self._sync_write)

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._on_loop(self._sync_write)

    # ---- the event loop's side of the socket -------------------------------------------------
    def _attach(self) -> None:
        """A (re)connect returned: read from the new socket, and write what paho queued."""
        sock = self.client.socket()
        assert self._loop is not None
        if sock is None or self._stopped:
            if self._lost is not None:
                self._lost.set()  # gone already: the driver tries again
            return
        self._fd = sock.fileno()
        self._paused = False
        self._loop.add_reader(self._fd, self._readable)
        self._sync_write()

    def _detach(self, fd: int) -> None:
        """Socket `fd` is closing (paho closes it right after): forget it, look for a new one."""
        if self._fd is not None and fd != self._fd:
            return  # not the one registered (told late, from a reconnect's thread)
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = None
        self._writing = False
        self._paused = False
        if self._lost is not None:
            self._lost.set()

    def _sync_write(self) -> None:
        """Watch the socket for room to write exactly while paho has bytes to send.

        paho's register/unregister callbacks only say *when* to look (some come late, from a
        reconnect's thread): its queue decides, so a stale call can neither leave a written
        socket watched (a busy loop) nor queued bytes unwatched.
        """
        if self._loop is None:
            return
        want = self._fd is not None and self.client.want_write()
        if want and not self._writing:
            assert self._fd is not None
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)
        elif not want and self._writing:
            if self._fd is not None:
                self._loop.remove_writer(self._fd)
            self._writing = False

    def _writable(self) -> None:
        self.client.loop_write()
        self._sync_write()

    def _readable(self) -> None:
        """Read until the socket is dry, `READ_BUDGET` packets at most; with `max_queued`
        waiting in `queue`, stop reading until the consumer took some (`_resume`)."""
        if self._fd is None or self._loop is None:
            return
        room = min(READ_BUDGET, self.max_queued - self.queue.qsize())
        if room <= 0:
            if not self._paused:
                self._paused = True
                self._loop.remove_reader(self._fd)
            return
        client = self.client
        if client.read_packets(room) or client.drained or self._fd is None:
            return
        # Not dry: a TLS socket may hold decrypted bytes no readable event will announce.
        self._loop.call_soon(self._readable)

    def _resume(self) -> None:
        """The consumer took messages: read again if `_readable` had stopped."""
        if (
            self._paused
            and self._fd is not None
            and self._loop is not None
            and self.queue.qsize() < self.max_queued
        ):
            self._paused = False
            self._loop.add_reader(self._fd, self._readable)
            self._loop.call_soon(self._readable)

    async def _drive(self) -> None:
        """(Re)connect with back-off, run the keep-alive, until `_stop`."""
        assert self._loop is not None and self._lost is not None
        low, high = RECONNECT_DELAY_S
        delay = low
        first = True
        while not self._stopped:
            if not first:
                with contextlib.suppress(TimeoutError):  # the back-off, cut short by `_stop`
                    await asyncio.wait_for(self._halted.wait(), delay)
                if self._stopped:
                    return
            first = False
            self._lost.clear()
            connects = self.connects
            try:
                await self._loop.run_in_executor(None, self._reconnect)
            except OSError:
                delay = min(delay * 2, high)
                continue
            self._attach()
            while not self._lost.is_set() and not self._stopped:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), 1.0)
                if self._fd is not None:
                    self.client.loop_misc()
            delay = low if self.connects > connects else min(delay * 2, high)

    def _reconnect(self) -> None:
        """Worker thread: DNS, TCP, TLS and the CONNECT queued (the loop writes it)."""
        self.client.reconnect()
        if self._stopped:  # closed meanwhile: this connection is nobody's
            sock = self.client.socket()
            if sock is not None:
                sock.close()

    def _stop(self) -> None:
        """Drive the connection no further; the socket is left as it is."""
        self._stopped = True
        self._halted.set()
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = None
        if self._lost is not None:
            self._lost.set()

    # ---- async API -------------------------------------------------------------------------
    async def connect(self, subscriptions: list[str] = (), timeout_s: float = 10.0) -> None:  # type: ignore[assignment]
        """Connect (TLS, credentials, will), subscribe, and wait until the broker said yes to
        the connection and to every subscription (its SUBACK): a message published the moment
        this returns reaches us, and a subscription the broker refuses fails here, by name."""
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        self._loop_thread = threading.get_ident()
        self._lost = asyncio.Event()
        self._subscriptions = list(subscriptions)
        self.client.connect_async(
            self.host,
            self.port,
            keepalive=self.keepalive,
            clean_start=not self.persistent,
            properties=self._connect_props,
        )
        self._driver = asyncio.create_task(self._drive())
        try:
            await asyncio.wait_for(self.connected.wait(), timeout_s)
        except TimeoutError:
            await self._halt()
            raise BridgeError(
                f"broker {self.host}:{self.port}: no CONNACK within {timeout_s} s"
            ) from None
        if self._refused is not None:
            await self._halt()
            raise BridgeError(
                f"broker {self.host}:{self.port} refused the connection: {self._refused}"
            )
        try:
            await asyncio.wait_for(self.subscribed.wait(), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            await self._halt()
            waiting = sorted(self._suback.values())
            raise BridgeError(
                f"broker {self.host}:{self.port}: no SUBACK within {timeout_s} s for "
                f"{waiting or self._subscriptions}"
            ) from None
        if self._sub_refused:
            await self._halt()
            raise BridgeError(
                f"broker {self.host}:{self.port} refused the subscription to "
                f"{', '.join(self._sub_refused)}"
            )

    async def _halt(self) -> None:
        """Stop driving, close the socket, and let the driver finish."""
        sock = self.client.socket()
        self._stop()
        if sock is not None:
            sock.close()
        if self._driver is not None:
            await asyncio.gather(self._driver, return_exceptions=True)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any:
        """Queue a publish (the loop writes it); returns paho's MessageInfo.

        Published while the broker is away, a QoS 1 message waits in paho's queue and goes out
        after the reconnect; `drain` waits for that before a link is closed.
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            with self._ack_lock:
                if info.mid in self._early:
                    self._early.discard(info.mid)
                else:
                    self._unconfirmed.add(info.mid)
        return info

    def publish_many(self, topics: list[str], payloads: list[bytes]) -> int:
        """QoS 1 publishes of `payloads[i]` to `topics[i]`, queued together (a slot's commands:
        one buffer and one write for the loop, not a message object and a `send` each, which
        was ~10 us a command inside the decision latency); returns how many were queued."""
        mids = self.client.publish_many(topics, payloads)
        with self._ack_lock:
            early = self._early.intersection(mids)
            self._early -= early
            self._unconfirmed.update(mids)
            self._unconfirmed -= early
        return len(mids)

    async def drain(self, timeout_s: float) -> int:
        """Wait until the broker has acknowledged every QoS 1 publish, or `timeout_s` passed.

        Closing a link drops whatever paho still queues: after a broker restart a device's
        readings wait for the reconnect back-off (up to 30 s), and leaving before it would
        lose them. Returns how many publishes are still unacknowledged (0: nothing lost).
        """
        deadline = time.monotonic() + timeout_s
        while self._unconfirmed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._unconfirmed)

    def ack(self, msg: Received) -> None:
        """Tell the broker `msg` is safe with us; before this it would be delivered again.

        A no-op on a clean-session link (paho acknowledged on receipt). An acknowledgement for a
        connection that has since dropped is dropped with it (a reconnect clears paho's queue)
        or reaches the new connection, where it is harmless: the broker delivers the message
        again either way, the caller's idempotency keys absorb it, and the reading was durable
        before any acknowledgement was queued.
        """
        if self.persistent and msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    def pending(self, limit: int) -> list[Received]:
        """Messages already waiting, without waiting (at most `limit`): one batch to commit."""
        out: list[Received] = []
        while len(out) < limit:
            try:
                out.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        self._resume()
        return out

    async def receive(self, timeout_s: float | None = None) -> Received | None:
        """The next message, or None after `timeout_s`."""
        if self.queue.empty():
            self._resume()
            try:
                msg = await asyncio.wait_for(self.queue.get(), timeout_s)
            except TimeoutError:
                return None
        else:
            msg = self.queue.get_nowait()
        self._resume()
        return msg

    async def close(self, goodbye: tuple[str, bytes] | None = None) -> None:
        """Publish a clean goodbye (the will does not fire on a clean disconnect), then leave."""
        if goodbye is not None and self.connected.is_set():
            info = self.publish(goodbye[0], goodbye[1])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._published(info), 5)
        if self._fd is not None:
            self.client.disconnect()  # written by the loop; paho closes the socket after it
            deadline = time.monotonic() + 2.0
            while self._fd is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        await self._halt()

    @staticmethod
    async def _published(info: Any) -> None:
        while not info.is_published():
            await asyncio.sleep(0.01)
