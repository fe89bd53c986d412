"""The simulator's CoAP side: some virtual devices served as CoAP resources (aiocoap) on UDP.

A constrained device is a CoAP *server*: it holds its birth, its last goodbye and its latest
telemetry as observable resources and takes commands on a POST resource (the layout is in
`bridge.coap_resources`). One server here answers for every device the simulator puts on CoAP,
each under its own path, as a gateway for a handful of sensors would; the payloads are the very
bytes the MQTT devices publish (same model, same EIP-712 signature), so only the transport
differs. Like the MQTT shell it moves bytes and decides nothing: what a command does is the
`VirtualDevice`'s business, reached through `on_command`.

Each device's resources answer only requests protected by that device's own OSCORE context
(`bridge.oscore`; `contexts`): a plain request, one under another device's context, a replayed
or an undecryptable one is refused (4.01, or 4.00 for one that does not decrypt) and counted in
`refusals` by reason. `/.well-known/core` stays readable without OSCORE, for discovery. A server
built without contexts (`devices simulate --coap-insecure`) serves plain CoAP, as a lab may.

A device may also have *readers* (`readers`; a shadow bridge, `bridge.oscore`): contexts of
their own, under which its resources answer GET and Observe but refuse a command or a DR event
with 4.03 (`read_only`). So a dry run watches the devices beside the live bridge without
sharing its keys, and cannot command them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path

import aiocoap
import aiocoap.resource as coap_resource
from aiocoap.numbers.codes import Code
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
from aiocoap.transports.oscore import OSCOREAddress

from bridge.coap_resources import (
    BAD_REQUEST,
    CHANGED,
    CONTENT,
    CONTENT_FORMAT_JSON,
    CREATED,
    FORBIDDEN,
    OBSERVED,
    SERVICE_UNAVAILABLE,
    UNAUTHORIZED,
    UNSUPPORTED_CONTENT_FORMAT,
    Resource,
    ack_code,
    code_number,
    parse_log_query,
    resource_path,
)
from bridge.errors import BridgeError
from bridge.messages import MAX_PAYLOAD_BYTES, AckStatus
from bridge.oscore import (
    READ_ONLY,
    UNPROTECTED,
    WRONG_DEVICE,
    CountingCredentials,
    DeviceContext,
    load_contexts,
    load_reader_contexts,
    release,
)
from bridge.topics import MessageType, parse_topic

#: Signed telemetry a device keeps for a bridge that was away: a day of 15-minute slots.
LOG_KEPT = 96

CommandHandler = Callable[[str, bytes], list[tuple[str, bytes]]]
"""(device, command payload) -> the device's answers as (topic, payload), as over MQTT."""


def _reply(code: tuple[int, int], payload: bytes = b"") -> aiocoap.Message:
    return aiocoap.Message(
        code=Code(code_number(code)), payload=payload, content_format=CONTENT_FORMAT_JSON
    )


def _json_only(request: aiocoap.Message) -> aiocoap.Message | None:
    """A refusal for a request body that is not JSON or too large; None when acceptable."""
    if request.opt.content_format not in (None, CONTENT_FORMAT_JSON):
        return _reply(UNSUPPORTED_CONTENT_FORMAT)
    if len(request.payload) > MAX_PAYLOAD_BYTES:
        return _reply(BAD_REQUEST, f"at most {MAX_PAYLOAD_BYTES} bytes".encode())
    return None


class Guarded:
    """A device resource that takes only requests protected by its device's own context."""

    server: CoapDeviceServer
    device: str

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        refused = self.server.refuse(self.device, request)
        if refused is not None:
            return refused
        return await super().render(request)  # type: ignore[misc]


class Representation(Guarded, coap_resource.ObservableResource):
    """One observable device resource: its latest payload; observers hear of every change."""

    def __init__(self, server: CoapDeviceServer, device: str) -> None:
        super().__init__()
        self.server = server
        self.device = device
        self.payload = b""
        """Empty until the device has something to say (no birth yet, no telemetry yet)."""

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return _reply(CONTENT, self.payload)

    def set(self, payload: bytes) -> None:
        self.payload = payload
        self.updated_state()


class LogResource(Guarded, coap_resource.Resource):
    """GET `?after=N`: the kept telemetry whose reading nonce is above N, one per line."""

    def __init__(self, server: CoapDeviceServer, device: str) -> None:
        super().__init__()
        self.server = server
        self.device = device

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        try:
            after = parse_log_query(request.opt.uri_query)
        except ValueError as exc:
            return _reply(BAD_REQUEST, str(exc).encode())
        kept = self.server.logs.get(self.device, ())
        lines = [payload for nonce, payload in kept if nonce > after]
        return aiocoap.Message(
            code=Code(code_number(CONTENT)), payload=b"\n".join(lines), content_format=0
        )


class CommandResource(Guarded, coap_resource.Resource):
    """POST a DCMD; the response is the DACK (applied / rejected) or, for rebirth, a DBIRTH."""

    def __init__(self, server: CoapDeviceServer, device: str) -> None:
        super().__init__()
        self.server = server
        self.device = device

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        refusal = _json_only(request)
        if refusal is not None:
            return refusal
        return self.server.command(self.device, request.payload)


class DrEventResource(Guarded, coap_resource.Resource):
    """PUT the consumer's current demand-response event (MQTT retains it; here the device does)."""

    def __init__(self, server: CoapDeviceServer, device: str) -> None:
        super().__init__()
        self.server = server
        self.device = device

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        refusal = _json_only(request)
        if refusal is not None:
            return refusal
        self.server.dr_events[self.device] = request.payload
        return _reply(CHANGED)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return _reply(CONTENT, self.server.dr_events.get(self.device, b""))


class CoapDeviceServer:
    """The CoAP resources of a set of devices, served on one UDP port."""

    def __init__(
        self,
        site: str,
        devices: Iterable[str],
        contexts: Mapping[str, DeviceContext] | None = None,
        readers: Mapping[str, Mapping[str, DeviceContext]] | None = None,
    ) -> None:
        """`contexts`: each device's OSCORE context (`bridge.oscore.load_contexts`), owned by
        the server from here on and written back by `release` (not `close`: a server closed
        and started again, as a gateway reboots, goes on with them); None serves plain CoAP.
        `readers`: device -> reader -> a read-only context (`load_reader_contexts`), likewise."""
        self.site = site
        self.devices = tuple(devices)
        self.contexts = dict(contexts) if contexts is not None else None
        if self.contexts is not None and set(self.contexts) != set(self.devices):
            raise BridgeError(
                f"coap contexts: expected one per device, missing "
                f"{sorted(set(self.devices) - set(self.contexts))}"
            )
        self.readers = {d: dict(r) for d, r in (readers or {}).items()}
        if self.readers and self.contexts is None:
            raise BridgeError("coap readers: expected OSCORE contexts for the devices too")
        if set(self.readers) - set(self.devices):
            raise BridgeError(
                f"coap readers: expected devices of this server, got "
                f"{sorted(set(self.readers) - set(self.devices))}"
            )
        self.refusals: Counter[str] = Counter()
        """Requests refused for their (missing, wrong, replayed) protection, by reason."""
        self.on_command: CommandHandler | None = None
        """Set by the simulator: the virtual device's own command logic."""
        self.dr_events: dict[str, bytes] = {}
        self.commands = 0
        self.online: set[str] = set()
        """Devices between their birth and their goodbye: only they take commands."""
        self.logs: dict[str, deque[tuple[int, bytes]]] = {
            d: deque(maxlen=LOG_KEPT) for d in self.devices
        }
        """Per device, (reading nonce, DDATA) of its recent signed telemetry (`log`)."""
        self._observable: dict[tuple[str, Resource], Representation] = {}
        self._root = coap_resource.Site()
        for device in self.devices:
            for resource in OBSERVED:
                rep = Representation(self, device)
                self._observable[device, resource] = rep
                self._root.add_resource(resource_path(site, device, resource), rep)
            self._root.add_resource(
                resource_path(site, device, Resource.CMD), CommandResource(self, device)
            )
            self._root.add_resource(
                resource_path(site, device, Resource.DR), DrEventResource(self, device)
            )
            self._root.add_resource(
                resource_path(site, device, Resource.LOG), LogResource(self, device)
            )
        self._root.add_resource(
            (".well-known", "core"),
            coap_resource.WKCResource(self._root.get_resources_as_linkheader),
        )
        self._context: aiocoap.Context | None = None
        self.port: int | None = None

    def refuse(self, device: str, request: aiocoap.Message) -> aiocoap.Message | None:
        """4.01 for a request not protected by `device`'s own context; None: serve it."""
        if self.contexts is None:
            return None
        remote = request.remote
        if not isinstance(remote, OSCOREAddress):
            self.refusals[UNPROTECTED] += 1
            return _reply(UNAUTHORIZED, b"OSCORE required")
        ctx = remote.security_context
        if ctx is self.contexts[device]:
            return None
        if any(ctx is r for r in self.readers.get(device, {}).values()):
            if request.code in (Code.GET, Code.FETCH):
                return None
            self.refusals[READ_ONLY] += 1
            return _reply(FORBIDDEN, b"a reader's OSCORE context may only read")
        self.refusals[WRONG_DEVICE] += 1
        return _reply(UNAUTHORIZED, b"not this device's OSCORE context")

    def _site(self) -> coap_resource.Site | OscoreSiteWrapper:
        """The resources as served: behind OSCORE, which unprotects before they answer."""
        if self.contexts is None:
            return self._root
        credentials = CountingCredentials(self.refusals)
        for device, ctx in self.contexts.items():
            ctx.refusals = self.refusals
            credentials[f":{device}"] = ctx
        for device, readers in self.readers.items():
            for reader, ctx in readers.items():
                ctx.refusals = self.refusals
                credentials[f":{device}:{reader}"] = ctx
        return OscoreSiteWrapper(self._root, credentials)

    async def start(self, host: str = "127.0.0.1", port: int = 5683) -> None:
        """Bind the UDP port and serve. The port must be given: the bridge's config names it."""
        if not 0 < port < 65_536:
            raise BridgeError(f"coap port: expected 1..65535, got {port}")
        try:
            # UDP only: aiocoap's default would also listen on TCP and TLS ports beside it.
            self._context = await aiocoap.Context.create_server_context(
                self._site(),
                bind=(host, port),
                transports=["udp6" if sys.platform == "linux" else "simplesocketserver"],
            )
        except OSError as exc:
            raise BridgeError(
                f"coap bind {host}:{port}: expected a free UDP port ({exc})"
            ) from None
        self.port = port

    def publish(self, device: str, resource: Resource, payload: bytes) -> None:
        """A new representation of an observed resource; its observers are notified.

        A birth brings the device online, a goodbye takes it off: in between it takes commands.
        """
        if resource is Resource.BIRTH:
            self.online.add(device)
        elif resource is Resource.DEATH:
            self.online.discard(device)
        elif resource is Resource.DATA:
            self._keep(device, payload)
        self._observable[device, resource].set(payload)

    def _keep(self, device: str, payload: bytes) -> None:
        """Signed telemetry joins the device's backlog until LOG_KEPT newer ones push it out."""
        try:
            reading = json.loads(payload).get("reading")
            nonce = int(reading["nonce"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return  # no reading (or not the device's own JSON): nothing owed to the chain
        log = self.logs[device]
        if log and nonce <= log[-1][0]:
            if nonce == log[-1][0]:
                log[-1] = (nonce, payload)  # the same reading notified again: kept once
            return
        log.append((nonce, payload))

    def command(self, device: str, payload: bytes) -> aiocoap.Message:
        """The device's answer to a command, as a CoAP response (see `bridge.coap_resources`)."""
        if self.on_command is None or device not in self.online:
            # Not up (yet, or any more): an MQTT device would not be subscribed either.
            return _reply(SERVICE_UNAVAILABLE)
        self.commands += 1
        answers = self.on_command(device, payload)
        final = b""
        for topic_text, answer in answers:
            kind = parse_topic(topic_text).message_type
            if kind is MessageType.DBIRTH:  # rebirth: a new session, told to every observer too
                self.publish(device, Resource.BIRTH, answer)
                return _reply(CREATED, answer)
            final = answer
        if not final:
            # Unparseable, for another device, or already answered: an MQTT device stays silent.
            return _reply(BAD_REQUEST, b"expected a new, well-formed command for this device")
        status = AckStatus(json.loads(final)["status"])
        return _reply(ack_code(status), final)

    async def close(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
            self._context = None
        await asyncio.sleep(0)

    def release(self) -> None:
        """The contexts' sequence numbers and replay windows to disk, their locks freed."""
        if self.contexts is not None:
            release(self.contexts.values())
        for readers in self.readers.values():
            release(readers.values())


@contextlib.asynccontextmanager
async def serving(
    site: str,
    devices: Iterable[str],
    host: str,
    port: int,
    oscore_dir: Path | None = None,
) -> AsyncIterator[CoapDeviceServer | None]:
    """A started server for `devices` (None when there are none), closed on the way out.

    `oscore_dir`: the devices' ends of their OSCORE contexts, `<dir>/<device>/`, with their
    readers' under `<dir>/<device>/readers/` (None: plain).
    """
    ids = list(devices)
    if not ids:
        yield None
        return
    contexts, readers = None, None
    if oscore_dir is not None:
        contexts = load_contexts(oscore_dir, ids, "--coap-oscore", Counter())
        try:
            readers = load_reader_contexts(oscore_dir, ids, "--coap-oscore", Counter())
        except BaseException:
            release(contexts.values())
            raise
    server = CoapDeviceServer(site, ids, contexts, readers)
    try:
        await server.start(host, port)
        yield server
    finally:
        await server.close()
        server.release()
