"""`microgrid bench bridge --mqtt`: `bridge.bench`'s figures, end to end through mosquitto.

A mosquitto started here on a free loopback port (plain TCP, anonymous: neither TLS nor the ACL
is in these figures), a load generator in its own process (`bridge.bench_generator`: pre-encoded
MQTT packets over several connections, so neither its GIL nor paho's per-publish work is the
limit) publishing every device's pre-signed telemetry at QoS 1, and the
bridge's own shell (`MqttLink`, a persistent session acknowledging each message after `handle`)
feeding `BridgeCore`. Slots are paced: the generator starts slot k only once slot k - 1 was
decided, so the latency is not queueing behind the next slot.

- ingest: messages / the time from telling the generator "go" to the slot's last message
  handled; generator, broker, sockets, paho and validation all in it (not the outbox's SQLite).
- decision latency: from paho handing the bridge the slot's last telemetry to the slot's
  commands handed to paho to publish (`MqttLink.publish_many`: queued, not yet on the wire).
- bridge CPU: the bridge process's CPU time over all slots (MQTT, validation, decisions, every
  thread) per message; a loaded machine inflates it far less than the wall-clock figures.
- the latency's two parts: the slot's last message waiting behind those read with it and being
  handled (wall time), and the decision with its publish (CPU time).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.bench import (
    CHAIN_ID,
    FIRST_SLOT,
    REGISTRY,
    BenchConfig,
    birth_payloads,
    checked,
    decision_figures,
    ingest_figures,
    make_core,
    now_ms,
    percentile_ms,
    synthetic_site,
    telemetry_payloads,
)
from bridge.errors import BridgeError
from bridge.heap import settle_heap
from bridge.mqtt import MqttLink
from bridge.signing import ReadingDomain
from bridge.topics import bridge_subscriptions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _mosquitto(directory: Path) -> Any:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise BridgeError("mosquitto: expected it installed (apt-get install mosquitto)")
    port = _free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_inflight_messages 0\nlog_dest none\nuser root\n"
    )
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BridgeError(f"mosquitto: did not start on port {port}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _write_payloads(path: Path, messages: list[tuple[str, bytes]]) -> None:
    with path.open("wb") as f:
        for t, payload in messages:
            f.write(t.encode() + b"\t" + payload + b"\n")


async def _run(
    config: BenchConfig, directory: Path, advance: Callable[[int], None] | None
) -> dict[str, Any]:
    site = synthetic_site(config.devices)
    domain = ReadingDomain(CHAIN_ID, REGISTRY)
    n = len(site.devices)
    n_slots = config.n_slots()
    _write_payloads(directory / "births", birth_payloads(site))
    for k in range(n_slots):
        _write_payloads(directory / f"slot{k}", telemetry_payloads(site, domain, k))
        if advance:
            advance(n)
    core = make_core(site, domain)
    settle_heap()  # as `bridge run` does: this process is the bridge
    with _mosquitto(directory) as port:
        link = MqttLink(
            f"mqtt://127.0.0.1:{port}", client_id="bench-bridge", username="bridge",
            password="bench", session_expiry_s=300, receive_maximum=10_000,
        )  # fmt: skip
        await link.connect(bridge_subscriptions(site.site))
        gen = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.bench_generator", str(port), str(directory),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert gen.stdin is not None and gen.stdout is not None
        try:
            await asyncio.wait_for(gen.stdout.readline(), 120)  # connected, births published
            for _ in range(n):
                msg = await link.receive(30)
                if msg is None:
                    raise BridgeError("bench: the load generator's births did not all arrive")
                core.handle(msg.topic, msg.payload, now_ms(0))
                link.ack(msg)
            ingest_s = 0.0
            generator_s = 0.0
            cpu_started = time.process_time()
            latencies: list[float] = []
            waits: list[float] = []
            decision_cpu: list[float] = []
            commands = 0
            for k in range(n_slots):
                now = now_ms(k)
                gen.stdin.write(f"{k}\n".encode())
                await gen.stdin.drain()
                go = time.monotonic()
                last_at = go
                seen = 0
                while seen < n:  # in batches, as BridgeRunner reads them
                    first = await link.receive(30)
                    if first is None:
                        raise BridgeError(f"bench: slot {k}'s telemetry did not all arrive")
                    for msg in [first, *link.pending(n - seen - 1)]:
                        core.handle(msg.topic, msg.payload, now)
                        link.ack(msg)
                        last_at = msg.at
                        seen += 1
                handled = time.monotonic()
                ingest_s += handled - go
                handled_cpu = time.process_time()
                _, out = core.decide(FIRST_SLOT + k + 1, now)
                commands += link.publish_many(out.topics, out.payloads)
                decision_cpu.append(time.process_time() - handled_cpu)
                latencies.append(time.monotonic() - last_at)
                waits.append(handled - last_at)
                # The generator's own figure (its last PUBACK) is not the decision's business.
                line = await asyncio.wait_for(gen.stdout.readline(), 30)
                generator_s += float(line)
                if advance:
                    advance(n)
            cpu_s = time.process_time() - cpu_started
            gen.stdin.write(b"end\n")
            await gen.stdin.drain()
            await asyncio.wait_for(gen.wait(), 30)
        finally:
            if gen.returncode is None:
                gen.kill()
                await gen.wait()
            await link.close()
    result: dict[str, Any] = {
        **ingest_figures("mqtt", core, site, n_slots, ingest_s),
        "generator_msg_per_s": n_slots * n / generator_s,
        "bridge_cpu_us_per_msg": cpu_s / (n_slots * n) * 1e6,
        **decision_figures(latencies, commands, n_slots, core.policy_name),
        # Where the latency goes: the slot's last message waiting and being handled, then the
        # decision and the publish in CPU time (which the machine's load inflates far less).
        "last_message_wait_ms_p50": percentile_ms(waits, 50),
        "last_message_wait_ms_p99": percentile_ms(waits, 99),
        "decision_cpu_ms_p50": percentile_ms(decision_cpu, 50),
        "decision_cpu_ms_p99": percentile_ms(decision_cpu, 99),
    }
    return checked(result)


def bench_bridge_mqtt(
    config: BenchConfig, advance: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """End to end through a mosquitto started here; same keys as `bridge.bench.bench_bridge`."""
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        return asyncio.run(_run(config, Path(tmp), advance))
