"""The thin MQTT shell: paho-mqtt 2 moving bytes between the broker and an asyncio queue.

It decides nothing (aiomqtt's lesson): payloads stay bytes, and every decision is in the sans-I/O
core. paho runs its network loop in its own thread; received messages cross into the event loop
in batches: the paho thread appends to a list and wakes the loop (`call_soon_threadsafe`, a
write to its self-pipe) only when that list was empty, so a burst costs one wake-up, not one
per message. TLS and a user name/password are mandatory outside tests of the
refusal itself; the last will is set before connecting, as Sparkplug requires.

A link that must not lose what it receives (the bridge's) opens a *persistent* MQTT v5 session
(`clean_start` False, a session expiry) and acknowledges each message itself (`manual_ack`):
the broker keeps every QoS 1 message the bridge has not acknowledged, across a bridge crash and
while the bridge is away, and delivers it again on the next connect. The caller acknowledges a
message (`ack`) only once what it carried is durable, so a reading is never acknowledged and
then lost.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.errors import BridgeError


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
    ) -> None:
        """`session_expiry_s` set: a persistent session with manual acknowledgements (`ack`);
        None: a clean session whose messages paho acknowledges on receipt (devices, tools)."""
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise BridgeError(f"broker url: expected mqtts://HOST:PORT or mqtt://..., got {url!r}")
        self.host = parsed.hostname
        self.port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
        self.keepalive = keepalive
        self.persistent = session_expiry_s is not None
        self.client = mqtt.Client(
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
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.queue: asyncio.Queue[Received] = asyncio.Queue()
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: list[str] = []
        self.birth = birth
        """Published on every (re)connect: a broker restarted without persistence forgot it."""
        self._unconfirmed: set[int] = set()
        """Packet ids of QoS 1 publishes the broker has not acknowledged (`drain` waits)."""
        self._early: set[int] = set()
        """Acknowledged before `publish` returned (paho's thread is faster than ours)."""
        self._ack_lock = threading.Lock()
        self._inbox: list[Received] = []
        """Received by paho's thread, not yet moved into `queue` by the event loop."""
        self._inbox_lock = threading.Lock()
        self.connects = 0
        self.session_resumed = 0
        """Connects on which the broker still held our session (queued messages follow)."""
        self._refused: str | None = None
        self._suback: dict[int, str] = {}
        """Subscriptions sent on the last connect and not yet acknowledged (packet id -> topic)."""
        self._sub_refused: list[str] = []
        self.subscribed = asyncio.Event()
        """Set once the broker acknowledged every subscription of the last connect."""
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # ---- paho thread -> event loop ---------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        assert self._loop is not None
        if reason.is_failure:
            self._refused = str(reason)
            self._loop.call_soon_threadsafe(self.connected.set)
            return
        if getattr(flags, "session_present", False):
            self.session_resumed += 1
        self._suback.clear()
        for sub in self._subscriptions:  # re-subscribe after every reconnect (idempotent)
            _, mid = client.subscribe(sub, qos=1)
            self._suback[mid] = sub
        if not self._suback:
            self._loop.call_soon_threadsafe(self.subscribed.set)
        if self.birth is not None:
            client.publish(self.birth.topic, self.birth.payload, qos=1, retain=self.birth.retain)
        self.connects += 1
        self._loop.call_soon_threadsafe(self.connected.set)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        assert self._loop is not None
        sub = self._suback.pop(mid, None)
        if sub is None:
            return
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            self._sub_refused.append(f"{sub!r} ({refused[0]})")
        if not self._suback:
            self._loop.call_soon_threadsafe(self.subscribed.set)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.connected.clear)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._ack_lock:
            if mid in self._unconfirmed:
                self._unconfirmed.discard(mid)
            else:
                self._early.add(mid)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        assert self._loop is not None
        received = Received(
            message.topic, bytes(message.payload), time.monotonic(), message.mid, message.qos
        )
        with self._inbox_lock:
            self._inbox.append(received)
            if len(self._inbox) > 1:
                return  # a wake-up is already on its way; it takes this one too
        self._loop.call_soon_threadsafe(self._take_inbox)

    def _take_inbox(self) -> None:
        """On the event loop: move what paho's thread received into `queue`, in order."""
        with self._inbox_lock:
            batch, self._inbox = self._inbox, []
        for received in batch:
            self.queue.put_nowait(received)

    # ---- async API -------------------------------------------------------------------------
    async def connect(self, subscriptions: list[str] = (), timeout_s: float = 10.0) -> None:  # type: ignore[assignment]
        """Connect (TLS, credentials, will), subscribe, and wait until the broker said yes to
        the connection and to every subscription (its SUBACK): a message published the moment
        this returns reaches us, and a subscription the broker refuses fails here, by name."""
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        self._subscriptions = list(subscriptions)
        self.client.connect_async(
            self.host,
            self.port,
            keepalive=self.keepalive,
            clean_start=not self.persistent,
            properties=self._connect_props,
        )
        self.client.loop_start()
        try:
            await asyncio.wait_for(self.connected.wait(), timeout_s)
        except TimeoutError:
            self.client.loop_stop()
            raise BridgeError(
                f"broker {self.host}:{self.port}: no CONNACK within {timeout_s} s"
            ) from None
        if self._refused is not None:
            self.client.loop_stop()
            raise BridgeError(
                f"broker {self.host}:{self.port} refused the connection: {self._refused}"
            )
        try:
            await asyncio.wait_for(self.subscribed.wait(), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            self.client.loop_stop()
            waiting = sorted(self._suback.values())
            raise BridgeError(
                f"broker {self.host}:{self.port}: no SUBACK within {timeout_s} s for "
                f"{waiting or self._subscriptions}"
            ) from None
        if self._sub_refused:
            self.client.loop_stop()
            raise BridgeError(
                f"broker {self.host}:{self.port} refused the subscription to "
                f"{', '.join(self._sub_refused)}"
            )

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any:
        """Queue a publish (paho sends it from its thread); returns paho's MessageInfo.

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

    async def drain(self, timeout_s: float) -> int:
        """Wait until the broker has acknowledged every QoS 1 publish, or `timeout_s` passed.

        Closing a link drops whatever paho still queues: after a broker restart a device's
        readings wait for paho's reconnect back-off (up to 30 s), and leaving before it would
        lose them. Returns how many publishes are still unacknowledged (0: nothing lost).
        """
        deadline = time.monotonic() + timeout_s
        while self._unconfirmed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._unconfirmed)

    def ack(self, msg: Received) -> None:
        """Tell the broker `msg` is safe with us; before this it would be delivered again.

        A no-op on a clean-session link (paho acknowledged on receipt). An acknowledgement for a
        connection that has since dropped is refused by paho and harmless: the broker delivers
        the message again on the next connect, and the caller's idempotency keys absorb it.
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
        return out

    async def receive(self, timeout_s: float | None = None) -> Received | None:
        """The next message, or None after `timeout_s`."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return None

    async def close(self, goodbye: tuple[str, bytes] | None = None) -> None:
        """Publish a clean goodbye (the will does not fire on a clean disconnect), then leave."""
        if goodbye is not None and self.connected.is_set():
            info = self.publish(goodbye[0], goodbye[1])
            await asyncio.get_running_loop().run_in_executor(None, info.wait_for_publish, 5)
        self.client.disconnect()
        self.client.loop_stop()
