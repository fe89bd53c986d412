"""`microgrid bench coap`: what the CoAP transport adds, device server and bridge shell on loopback.

Both ends are the project's own: `CoapDeviceServer` (the simulator's, aiocoap) on a free UDP port
and the bridge's `CoapLink`, in one process and one event loop, as in the tests. Each round every
device notifies new telemetry at once (as at a slot boundary), then the bridge sends each a
command at once (as after a decision). Two figures per message:

* **reading latency**: from the device setting its `data` representation to the notification
  sitting in the bridge's queue (what `BridgeCore.handle` would take next);
* **command round trip**: from the bridge's POST to the device's DACK in the queue;
* **CPU per round trip**: the process's CPU time over the measured rounds divided by the
  commands (each with its reading): steadier than latencies on a shared machine.

Payloads are short JSON stand-ins: validation is `bench bridge`'s business, this measures only the
transport. Server and client share the process (and the GIL), so a burst is served one request
at a time: the figures are an upper bound for devices that each answer on their own.

By default both ends speak OSCORE, as a deployment does (fresh contexts in a temporary folder,
`bridge.oscore.provision`); `insecure=True` measures plain CoAP, to show what OSCORE costs.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bridge.coap import CoapLink
from bridge.coap_resources import Endpoint, Resource
from bridge.coap_server import CoapDeviceServer
from bridge.mqtt import Received
from bridge.oscore import BRIDGE_SIDE, DEVICE_SIDE, load_contexts, provision

SITE = "bench"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quantiles(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "p50": round(s[len(s) // 2], 3),
        "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))], 3),
        "max": round(s[-1], 3),
    }


async def _bench(devices: int, rounds: int, oscore_root: Path | None) -> dict[str, Any]:
    ids = [f"dev{i}" for i in range(devices)]
    port = _free_udp_port()
    contexts = None
    if oscore_root is not None:
        provision(ids, oscore_root)
        contexts = load_contexts(oscore_root / DEVICE_SIDE, ids, "bench", Counter())
    server = CoapDeviceServer(SITE, ids, contexts)
    server.on_command = lambda device, payload: [
        (f"mgv1/{SITE}/DACK/{device}", b'{"status":"applied","cmd":' + payload + b"}")
    ]
    await server.start("127.0.0.1", port)
    for device in ids:
        server.publish(device, Resource.BIRTH, b'{"birth":1}')
    queue: asyncio.Queue[Received] = asyncio.Queue()
    link = CoapLink(
        SITE, dict.fromkeys(ids, Endpoint("127.0.0.1", port)), queue, reobserve_s=3600,
        oscore_dir=None if oscore_root is None else oscore_root / BRIDGE_SIDE,
    )  # fmt: skip
    await link.start()
    try:
        for _ in ids:  # every birth arrived: the observations are registered
            await asyncio.wait_for(queue.get(), 30)
        readings: list[float] = []
        commands: list[float] = []
        started, cpu = time.monotonic(), time.process_time()
        # Round -1 is a warm-up, not measured: under OSCORE each context's first exchange after a
        # start reserves sequence numbers on disk (an fsync), a once-per-start cost.
        for r in range(-1, rounds):
            if r == 0:
                readings.clear()
                commands.clear()
                started, cpu = time.monotonic(), time.process_time()
            t0 = time.monotonic()
            for device in ids:
                server.publish(device, Resource.DATA, b'{"round":%d}' % r)
            for _ in ids:
                msg = await asyncio.wait_for(queue.get(), 30)
                readings.append((msg.at - t0) * 1000)
            link.stats.latency_ms.clear()
            for device in ids:
                link.publish(f"mgv1/{SITE}/DCMD/{device}", b"%d" % r)
            for _ in ids:
                await asyncio.wait_for(queue.get(), 30)
            commands.extend(link.stats.latency_ms)
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    finally:
        await link.close()
        await server.close()
        server.release()
    rq, cq = _quantiles(readings), _quantiles(commands)
    return {
        "mode": "coap_loopback" if oscore_root is None else "coap_oscore_loopback",
        "devices": devices,
        "rounds": rounds,
        "messages": len(readings) + 2 * len(commands),
        "reading_latency_ms_p50": rq["p50"],
        "reading_latency_ms_p99": rq["p99"],
        "reading_latency_ms_max": rq["max"],
        "command_round_trip_ms_p50": cq["p50"],
        "command_round_trip_ms_p99": cq["p99"],
        "command_round_trip_ms_max": cq["max"],
        "seconds": round(elapsed, 3),
        "cpu_ms_per_round_trip": round(cpu * 1000 / max(1, len(commands)), 3),
    }


def bench_coap(devices: int = 14, rounds: int = 50, *, insecure: bool = False) -> dict[str, Any]:
    """Run the loopback measurement; the keys are documented in docs/iot.md (CoAP devices)."""
    if insecure:
        return asyncio.run(_bench(devices, rounds, None))
    with tempfile.TemporaryDirectory(prefix="bench-oscore-") as root:
        return asyncio.run(_bench(devices, rounds, Path(root)))
