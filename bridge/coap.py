"""The bridge's thin CoAP shell: observe constrained devices, send them commands, move bytes.

Like `MqttLink` it decides nothing. Each notification of a device's `birth`, `death` or `data`
resource becomes a `Received` under the MQTT topic it stands for (`bridge.coap_resources`) and
goes into the *same* queue the MQTT shell fills, so `BridgeCore.handle` validates it with the
same code and counts every refusal by the same reason: the core cannot tell the transports apart.
A command (`DCMD`) is a confirmable POST to the device's `cmd` resource; the DACK in the response
goes into the queue too, and reaches the command tracker like an MQTT DACK. A DREVENT is a PUT.

What CoAP does not give, the shell counts rather than hides (`CoapStats`): a device that does not
answer within `request_timeout_s` (`timeout`) or whose host refuses the datagram (`unreachable`)
is retried every `retry_s`, and its missing telemetry makes the slot fall back to the rule-based
controller exactly as stale MQTT data does; a command that got no response stays unanswered and
the tracker counts it `expired`. An observation silent for `reobserve_s` is registered again (a
rebooted device forgets its observers, RFC 7641 section 3.3.1).

Observe transfers state: a re-registration delivers the current representation again. A payload
identical to the last one handed on for the same device and message type is dropped here (the
same bytes are the same message, `duplicates`); anything else, a replay of an older message
included, goes to the validator. Nor does Observe queue what was missed while the bridge or the
device was away: each (re-)registration of `data` first fetches the device's `log` of signed
telemetry after the last reading the bridge holds, so those readings still reach the chain.

Every exchange with a device is protected by OSCORE (`bridge.oscore`): the link loads the
device's pre-shared context from `oscore_dir` and aiocoap protects each request to that
device's resources with it, and unprotects the answers and notifications. A device that refuses
a request (another key, a replayed sequence number) is counted in `oscore_refusals`, and so is
an answer the bridge cannot decrypt; plain CoAP is only for a config that says
`coap.insecure: true`.

An exchange is never dropped half way, so the bridge shuts down (and re-registers) without the
errors aiocoap 0.4.17 would log. Its OSCORE transport sends each protected request as a second,
*wire* request and, when the bridge's observation ends, keeps the wire observation (a FIXME in
aiocoap): the device goes on notifying a listener nobody reads, each re-registration adds one,
and at shutdown each reports `LibraryShutdown` into a request already ended, where aiocoap's
`Pipe` logs it with a keyword `logging` does not take (`exception=`): a `TypeError` per
observation. So the link notes the wire requests its observations cause (`_Context`), ends a
wire observation with its own (`_end_observation`: the device's next notification but one is
answered with a reset, and the device forgets the listener), and never cancels a response it
stops waiting for (`_answer`): aiocoap delivers whatever comes late, or the `LibraryShutdown`
of `close`, into a request still open, and the link takes it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code

from bridge.coap_resources import (
    CONTENT_FORMAT_JSON,
    OBSERVED,
    Endpoint,
    Resource,
    code_text,
    log_query,
    notification_topic,
    outgoing,
    response_topic,
    split_log,
)
from bridge.mqtt import Received
from bridge.oscore import DeviceContext, load_contexts, refusal, release


@dataclass
class CoapStats:
    """What the CoAP shell saw; exported as `bridge_coap_*` metrics and in the run summary."""

    notifications: int = 0
    """Representations handed to the core (first responses and notifications)."""
    duplicates: int = 0
    """Representations identical to the last one handed on (a re-registration): dropped."""
    observe_failures: Counter[str] = field(default_factory=Counter)
    """Observation attempts that failed, by `timeout`, `unreachable` or the response code."""
    reobserved: int = 0
    backlog: int = 0
    """Telemetry fetched from devices' `log` after a (re-)registration (before duplicates)."""
    backlog_failures: int = 0
    """`log` requests that got no usable answer (the bridge goes on with the current state)."""
    """Observations registered again after `reobserve_s` of silence."""
    requests: Counter[str] = field(default_factory=Counter)
    """Commands and DR events sent, by outcome: the response code (`2.04`), `timeout` or
    `unreachable`; `read_only`: not sent, by a shadow's link."""
    latency_ms: list[float] = field(default_factory=list)
    """Round trip of each answered command (POST to response), the last 1,000."""
    oscore_refusals: Counter[str] = field(default_factory=Counter)
    """OSCORE exchanges that failed, by reason: the device refused the bridge's request
    (`device_refused_4.01`: unknown id or replayed; `device_refused_4.00`: did not decrypt) or
    the bridge could not decrypt the device's answer (`bad_key`, `malformed`)."""


class ObservationEnded(coap_error.NetworkError):
    """The bridge ended a protected observation (a re-registration, or `close`).

    A `NetworkError` for aiocoap: its listeners take one as the end of an observation without
    printing it (as they do not for the `ObservationCancelled` a plain CoAP observation ends
    with, which the OSCORE transport would turn into a `NotImplementedError` here).
    """


_WIRE: contextvars.ContextVar[list[tuple[Any, asyncio.Task[Any] | None]] | None] = (
    contextvars.ContextVar("bridge_coap_wire", default=None)
)
"""Set around a request of the link's: the wire requests (and the tasks that sent them) the OSCORE
transport makes for it. aiocoap's tasks copy the context, so the list reaches them."""


class _Context(aiocoap.Context):
    """aiocoap's context, noting the protected wire requests made for the link's own requests."""

    def request(self, request_message: aiocoap.Message, handle_blockwise: bool = True) -> Any:
        sent = super().request(request_message, handle_blockwise)
        wires = _WIRE.get()
        if wires is not None and request_message.opt.oscore is not None:
            with contextlib.suppress(RuntimeError):  # (outside a task: nothing to wait for)
                wires.append((sent, asyncio.current_task()))
        return sent


def _take_error(future: asyncio.Future[Any]) -> None:
    """Mark a response's error as seen: an answer nobody waits for any more may still fail."""
    if not future.cancelled():
        future.exception()


def _stop_wire(wires: list[tuple[Any, asyncio.Task[Any] | None]]) -> list[asyncio.Task[Any]]:
    """End the protected observations under one of the link's; the tasks that will report it.

    Only a wire observation past its first response is ended (before it, aiocoap would refuse
    to end it twice when the response comes). The OSCORE transport's task then reports
    `ObservationEnded` into the link's request, which is still open, and the wire observation's
    token is forgotten: the device's next notification gets a reset, and it drops the listener.
    """
    tasks = []
    for wire, task in wires:
        obs = wire.observation
        if obs is not None and not obs.cancelled and wire.response.done():
            obs.error(ObservationEnded("observation ended by the bridge"))
            if task is not None and not task.done():
                tasks.append(task)
    return tasks


def _end_late(wires: list[tuple[Any, asyncio.Task[Any] | None]], request: Any) -> None:
    """A registration given up before its first response: end it when that comes after all."""
    _stop_wire(wires)
    obs = request.observation
    if obs is not None and not obs.cancelled:
        obs.cancel()


async def _end_observation(wires: list[tuple[Any, asyncio.Task[Any] | None]], request: Any) -> None:
    """End one of the link's observations, the wire's under it first (see the module's
    docstring), and wait until the OSCORE tasks have reported that into the link's request.

    Both are ended in one step, so no notification slips in between: the report is then the
    request's next event, which aiocoap takes as the end (no listener hears of it)."""
    tasks = _stop_wire(wires)
    obs = request.observation
    if obs is not None and not obs.cancelled:
        obs.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=1.0)
        await asyncio.sleep(0)  # their done callbacks run next


class _Listener:
    """One observation's notifications, queued until read, and its end.

    Not aiocoap's own iterator: that keeps only the latest notification, and its finalizer
    prints any error left in it but a few (an OSCORE refusal, say), which an observation the
    link gave up on may well hold. A queue drops nothing and prints nothing.
    """

    def __init__(self, observation: Any) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        with warnings.catch_warnings():
            # The callback interface is deprecated for the iterator this replaces, not removed
            # (aiocoap 0.4.17, pinned); its iterator is built on these very calls.
            warnings.simplefilter("ignore", DeprecationWarning)
            observation.register_callback(self.queue.put_nowait)
            observation.register_errback(lambda _exc: self.queue.put_nowait(None))

    async def next(self) -> Any:
        """The next notification; None once the observation has ended (for whatever reason)."""
        return await self.queue.get()


class CoapLink:
    """The CoAP devices of one site: their observations in, the bridge's requests out."""

    def __init__(
        self,
        site: str,
        endpoints: dict[str, Endpoint],
        queue: asyncio.Queue[Received],
        *,
        request_timeout_s: float = 5.0,
        retry_s: float = 5.0,
        reobserve_s: float = 300.0,
        resume_after: Callable[[str], int | None] | None = None,
        oscore_dir: Path | None = None,
        oscore_field: str = "coap.oscore_dir",
        read_only: bool = False,
    ) -> None:
        """`oscore_dir`: the folder of the bridge's OSCORE contexts, one `<device>/` each
        (`microgrid devices oscore`); None speaks plain CoAP (`coap.insecure`).

        `resume_after(device)`: the last reading nonce the bridge holds for the device, or
        None when it holds none (then, as on a fresh MQTT session, nothing older is fetched:
        what came before this bridge may already be on the chain).

        `read_only`: a shadow's link, which observes and fetches but sends no command or DR
        event (a reader's context could not: the device refuses it with 4.03); each one the
        core hands it is counted as `requests["read_only"]` instead."""
        self.site = site
        self.endpoints = dict(endpoints)
        self.queue = queue
        self.request_timeout_s = request_timeout_s
        self.retry_s = retry_s
        self.reobserve_s = reobserve_s
        self.resume_after = resume_after
        self.oscore_dir = oscore_dir
        self.oscore_field = oscore_field
        self.read_only = read_only
        """The config field named by an error loading the contexts (a shadow has its own)."""
        self.stats = CoapStats()
        self.reachable: dict[str, bool] = dict.fromkeys(self.endpoints, False)
        """Per device, whether its last observation attempt got an answer."""
        self._last: dict[str, bytes] = {}
        self._context: aiocoap.Context | None = None
        self._security: dict[str, DeviceContext] = {}
        self._observed: dict[str, set[Resource]] = {d: set() for d in self.endpoints}
        """Per device, the resources whose observation has handed on its first response."""
        self._ready: dict[str, asyncio.Event] = {}
        """Per device, set while every observation is registered (see `_in_order`)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def serves(self, topic_text: str) -> bool:
        """Whether a bridge publish goes to a CoAP device (and so through `publish`)."""
        route = outgoing(topic_text)
        return route is not None and route[0] in self.endpoints

    async def start(self) -> None:
        """Open the client context and observe every device's resources (retrying forever).

        With OSCORE each device's context is loaded first (a missing one raises ConfigError
        naming `coap.oscore_dir`) and registered for the URIs under that device's path only,
        so no request to a device leaves unprotected or under another device's key.
        """
        udp = "udp6" if sys.platform == "linux" else "simple6"
        if self.oscore_dir is None:
            self._context = await _Context.create_client_context(transports=[udp])
        else:
            self._security = load_contexts(
                self.oscore_dir, self.endpoints, self.oscore_field, self.stats.oscore_refusals
            )
            # The OSCORE transport first: it takes every request it holds a context for.
            self._context = await _Context.create_client_context(transports=["oscore", udp])
            for device, ctx in self._security.items():
                self._context.client_credentials[self._device_uris(device)] = ctx
        for device in self.endpoints:
            for resource in OBSERVED:
                self._spawn(self._observe(device, resource))

    def _device_uris(self, device: str) -> str:
        """The credentials pattern of one device's resources (aiocoap matches `*` globs)."""
        return (
            self.endpoints[device]
            .uri(self.site, device, Resource.BIRTH)
            .removesuffix(Resource.BIRTH.value)
            + "*"
        )

    def _failure(self, exc: coap_error.Error) -> str:
        """An observation's or request's failure reason; OSCORE refusals are counted apart."""
        why = refusal(exc)
        if why is not None:
            if why.startswith("device_refused"):
                self.stats.oscore_refusals[why] += 1  # a bad answer is counted by its context
            return "oscore"
        return "unreachable" if isinstance(exc, coap_error.NetworkError) else "error"

    async def _answer(self, message: aiocoap.Message) -> Any:
        """The response to one request, within `request_timeout_s` (TimeoutError otherwise).

        The response is awaited through a shield: cancelling it would end aiocoap's request
        while its OSCORE task still waits on the wire, and that task's late report (a timeout,
        `LibraryShutdown` at `close`) would then be logged by aiocoap as an error of its own.
        """
        assert self._context is not None
        response = self._context.request(message).response
        response.add_done_callback(_take_error)
        return await asyncio.wait_for(asyncio.shield(response), self.request_timeout_s)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- inbound ---------------------------------------------------------------------------
    def _deliver(self, topic_text: str, payload: bytes) -> None:
        if not payload:
            return  # the device has nothing to say yet (no telemetry, no goodbye)
        if self._last.get(topic_text) == payload:
            self.stats.duplicates += 1
            return
        self._last[topic_text] = payload
        self.stats.notifications += 1
        self.queue.put_nowait(Received(topic_text, payload, time.monotonic()))

    async def _observe(self, device: str, resource: Resource) -> None:
        """Keep one observation registered for as long as the link is open."""
        assert self._context is not None
        uri = self.endpoints[device].uri(self.site, device, resource)
        topic_text = notification_topic(self.site, device, resource)
        while not self._closing:
            wires: list[tuple[Any, asyncio.Task[Any] | None]] = []
            token = _WIRE.set(wires)
            try:
                request = self._context.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
            finally:
                _WIRE.reset(token)
            request.response.add_done_callback(_take_error)
            # Listen before the first response: a notification is not replayed to a late listener.
            notifications = _Listener(request.observation) if request.observation else None
            try:
                failure = await self._register(device, resource, topic_text, request)
                if failure is None:
                    if notifications is not None:
                        await self._follow(topic_text, notifications)
                    continue
            finally:
                if request.response.done():
                    await _end_observation(wires, request)
                else:  # no first response yet (a timeout, or `close`): end it when it comes
                    request.response.add_done_callback(
                        lambda _, w=wires, r=request: _end_late(w, r)
                    )
            if self._closing:
                return
            self.stats.observe_failures[failure] += 1
            self.reachable[device] = False
            self._observed[device].discard(resource)
            self._event(device).clear()
            await asyncio.sleep(self.retry_s)

    async def _register(
        self, device: str, resource: Resource, topic_text: str, request: Any
    ) -> str | None:
        """The observation's first response, handed on; None, or why the device did not answer.

        Registering `data` again means notifications may have been missed: the device's backlog
        of signed telemetry since the last reading the bridge holds goes first, oldest first.
        """
        try:
            first = await asyncio.wait_for(asyncio.shield(request.response), self.request_timeout_s)
        except TimeoutError:
            return "timeout"
        except coap_error.Error as exc:
            return self._failure(exc)
        if not first.code.is_successful():
            return code_text(int(first.code))
        self.reachable[device] = True
        after = None if self.resume_after is None else self.resume_after(device)
        if resource is Resource.DATA and after is not None:
            await self._backlog(device, topic_text, after)
        self._deliver(topic_text, first.payload)
        self._observed[device].add(resource)
        if len(self._observed[device]) == len(OBSERVED):
            self._event(device).set()
        if first.opt.observe is None:  # a device without Observe: poll it instead
            await asyncio.sleep(self.retry_s)
        return None

    async def _backlog(self, device: str, topic_text: str, after: int) -> None:
        """`GET log?after=N`: the signed telemetry the bridge has not seen, handed on in order."""
        uri = self.endpoints[device].uri(self.site, device, Resource.LOG)
        message = aiocoap.Message(code=Code.GET, uri=uri)
        message.opt.uri_query = (log_query(after),)
        try:
            response = await self._answer(message)
        except TimeoutError:
            self.stats.backlog_failures += 1
            return
        except coap_error.Error as exc:
            self._failure(exc)
            self.stats.backlog_failures += 1
            return
        if not response.code.is_successful():
            self.stats.backlog_failures += 1
            return
        for payload in split_log(response.payload):
            self.stats.backlog += 1
            self._deliver(topic_text, payload)

    async def _follow(self, topic_text: str, notifications: _Listener) -> None:
        """Hand on each notification until the observation ends or is silent for too long."""
        while True:
            try:
                note = await asyncio.wait_for(notifications.next(), self.reobserve_s)
            except TimeoutError:
                self.stats.reobserved += 1  # a rebooted device forgot us, or nothing changed
                return
            if note is None:
                return  # ended by the device or the network: register again
            self._deliver(topic_text, note.payload)

    # ---- outbound --------------------------------------------------------------------------
    def publish(self, topic_text: str, payload: bytes, *, retain: bool = False) -> None:
        """Send a DCMD (POST) or DREVENT (PUT) to its device; the answer arrives in the queue."""
        route = outgoing(topic_text)
        if route is None or route[0] not in self.endpoints:
            raise ValueError(
                f"coap: expected a DCMD or DREVENT for a CoAP device, got {topic_text}"
            )
        device, resource, method = route
        if self.read_only:
            self.stats.requests["read_only"] += 1
            return
        self._spawn(self._send(device, resource, method, payload))

    async def _send(self, device: str, resource: Resource, method: str, payload: bytes) -> None:
        message = aiocoap.Message(
            code=Code.POST if method == "POST" else Code.PUT,
            uri=self.endpoints[device].uri(self.site, device, resource),
            payload=payload,
            content_format=CONTENT_FORMAT_JSON,
        )
        started = time.monotonic()
        try:
            response = await self._answer(message)
        except TimeoutError:
            self.stats.requests["timeout"] += 1
            return
        except coap_error.Error as exc:
            self.stats.requests[self._failure(exc)] += 1
            return
        code = int(response.code)
        self.stats.requests[code_text(code)] += 1
        if resource is Resource.CMD:
            self.stats.latency_ms = [
                *self.stats.latency_ms[-999:],
                (time.monotonic() - started) * 1000,
            ]
            answer = response_topic(self.site, device, code)
            if answer is not None:
                await self._in_order(device)
                birth = notification_topic(self.site, device, Resource.BIRTH)
                if answer != birth and birth not in self._last:
                    await self._fetch(device, Resource.BIRTH)
                self._deliver(answer, response.payload)

    def _event(self, device: str) -> asyncio.Event:
        event = self._ready.get(device)
        if event is None:
            event = self._ready[device] = asyncio.Event()
        return event

    async def _in_order(self, device: str) -> None:
        """Hold a command's answer until the device's observations are registered again.

        A device that comes back after an outage can answer a command before the bridge's
        re-registration has handed on its telemetry (and `log` backlog); that telemetry was
        published before the acknowledgement, with a lower sequence number, and the validator
        would refuse it as `replayed` if the acknowledgement went first. MQTT keeps a device's
        messages in order; this restores that order, waiting at most `request_timeout_s`.
        """
        event = self._event(device)
        if not event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), self.request_timeout_s)

    async def _fetch(self, device: str, resource: Resource) -> None:
        """One plain GET, handed on: a birth the observation has not brought yet.

        Notifications and responses travel apart, so an acknowledgement from a device that just
        came up can overtake its birth notification; MQTT keeps them in order, and the validator
        refuses an ack outside a known session. Fetching the birth first restores the order.
        """
        uri = self.endpoints[device].uri(self.site, device, resource)
        try:
            response = await self._answer(aiocoap.Message(code=Code.GET, uri=uri))
        except TimeoutError:
            return
        except coap_error.Error as exc:
            self._failure(exc)
            return
        if response.code.is_successful():
            self._deliver(notification_topic(self.site, device, resource), response.payload)

    # ---- the end ---------------------------------------------------------------------------
    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._context is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._context.shutdown(), 5)
            self._context = None
        # Sequence numbers and replay windows to disk, locks freed: a restart goes on from here.
        release(self._security.values())
        self._security = {}

    def summary(self) -> dict[str, object]:
        s = self.stats
        lat = sorted(s.latency_ms)
        return {
            "devices": len(self.endpoints),
            "reachable": sum(self.reachable.values()),
            "notifications": s.notifications,
            "duplicates": s.duplicates,
            "reobserved": s.reobserved,
            "backlog": s.backlog,
            "observe_failures": dict(s.observe_failures),
            "oscore": self.oscore_dir is not None,
            "oscore_refusals": dict(s.oscore_refusals),
            "requests": dict(s.requests),
            "command_latency_ms_p50": round(lat[len(lat) // 2], 3) if lat else None,
        }
