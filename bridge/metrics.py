"""Prometheus metrics: the bridge's counters, read at scrape time from the objects that own them.

The sans-I/O core already counts everything it decides (validator, tracker, stats); a collector
that reads those counters when Prometheus scrapes keeps one source of truth and costs nothing in
the hot path. Only what the shell measures itself (decision latency, outbox depth from the
worker's last pass, policy reloads) lives in prometheus-client objects. Each bridge gets its own
registry, so tests can run several in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.commands import CommandState
from bridge.errors import ConfigError
from bridge.validation import RejectReason

if TYPE_CHECKING:
    from bridge.coap import CoapStats
    from bridge.core import BridgeCore


@dataclass
class OutboxSnapshot:
    """Written by the outbox worker after each pass; read by scrapes."""

    rows: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    repairs: dict[str, int] = field(default_factory=dict)
    """Rows sent with a part left out after a revert, by the revert (`Outbox.repairs`)."""
    readings_lost: dict[str, int] = field(default_factory=dict)
    """Reading rows failed for good, by the revert (`bridge.reading_rows.lost_readings`)."""


class CoreCollector(Collector):
    """Exports a BridgeCore's own counters (copied under the GIL: dict() of a dict is atomic)."""

    def __init__(self, core: BridgeCore, outbox: OutboxSnapshot) -> None:
        self.core = core
        self.outbox = outbox

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        core, v = self.core, self.core.validator
        accepted = CounterMetricFamily(
            "bridge_telemetry_accepted", "DDATA messages that passed every check."
        )
        accepted.add_metric([], v.telemetry_accepted)
        yield accepted
        rejected = CounterMetricFamily(
            "bridge_rejected",
            "Device messages refused, by reason (docs/iot.md).",
            labels=["reason"],
        )
        counts = dict(v.rejected)
        for reason in RejectReason:
            rejected.add_metric([reason.value], counts.get(reason, 0))
        yield rejected
        decisions = CounterMetricFamily(
            "bridge_decisions", "Slots decided, by who decided.", labels=["source"]
        )
        for source, n in dict(core.stats.decisions).items():
            decisions.add_metric([source.value], n)
        yield decisions
        fallbacks = CounterMetricFamily(
            "bridge_fallbacks",
            "Slots the rule-based fallback decided, by reason.",
            labels=["reason"],
        )
        for why, n in dict(core.stats.fallbacks).items():
            fallbacks.add_metric([why.value], n)
        yield fallbacks
        commands = CounterMetricFamily(
            "bridge_commands", "Commands sent, and how each ended.", labels=["state"]
        )
        commands.add_metric(["sent"], core.stats.commands_sent)
        finished = dict(core.tracker.finished)
        for state in (CommandState.APPLIED, CommandState.REJECTED, CommandState.EXPIRED):
            commands.add_metric([state.value], finished.get(state, 0))
        yield commands
        readings = CounterMetricFamily(
            "bridge_readings_queued", "Signed readings handed to the outbox."
        )
        readings.add_metric([], core.stats.readings_queued)
        yield readings
        depth = GaugeMetricFamily(
            "bridge_outbox_rows",
            "Outbox rows by state (pending+signed = backlog).",
            labels=["state"],
        )
        for row_state, n in dict(self.outbox.rows).items():
            depth.add_metric([row_state], n)
        yield depth
        retries = CounterMetricFamily("bridge_outbox_retries", "Outbox attempts beyond the first.")
        retries.add_metric([], self.outbox.retries)
        yield retries
        repairs = CounterMetricFamily(
            "bridge_outbox_repairs",
            "Rows sent again without the part the chain refused, by the revert.",
            labels=["error"],
        )
        for error, n in dict(self.outbox.repairs).items():
            repairs.add_metric([error], n)
        yield repairs
        lost = CounterMetricFamily(
            "bridge_readings_lost",
            "Signed readings that failed for good in the outbox, by the revert (docs/iot.md); "
            "the meter's later readings still land.",
            labels=["error"],
        )
        for error, n in dict(self.outbox.readings_lost).items():
            lost.add_metric([error], n)
        yield lost
        missed = GaugeMetricFamily(
            "bridge_missed_messages", "Gaps in device sequence numbers (messages lost upstream)."
        )
        missed.add_metric([], sum(s.missed for s in list(v.sessions.values())))
        yield missed


class CoapCollector(Collector):
    """Exports the CoAP shell's own counters (`bridge.coap.CoapStats`), read at scrape time."""

    def __init__(self, stats: CoapStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self.stats
        notes = CounterMetricFamily(
            "bridge_coap_notifications", "CoAP representations handed to validation."
        )
        notes.add_metric([], s.notifications)
        yield notes
        failures = CounterMetricFamily(
            "bridge_coap_observe_failures",
            "Observation attempts a CoAP device did not answer, by reason.",
            labels=["reason"],
        )
        for why, n in dict(s.observe_failures).items():
            failures.add_metric([why], n)
        yield failures
        requests = CounterMetricFamily(
            "bridge_coap_requests",
            "Commands and DR events sent over CoAP, by response code, timeout or unreachable.",
            labels=["result"],
        )
        for result, n in dict(s.requests).items():
            requests.add_metric([result], n)
        yield requests
        refusals = CounterMetricFamily(
            "bridge_coap_oscore_refusals",
            "OSCORE exchanges refused, by reason: by the device (device_refused_<code>) or by "
            "the bridge (bad_key, malformed).",
            labels=["reason"],
        )
        for why, n in dict(s.oscore_refusals).items():
            refusals.add_metric([why], n)
        yield refusals


class BridgeMetrics:
    """One bridge's registry and the figures the shell measures itself."""

    def __init__(self, core: BridgeCore) -> None:
        self.registry = CollectorRegistry()
        self.outbox = OutboxSnapshot()
        self.registry.register(CoreCollector(core, self.outbox))
        self.decision_latency = Histogram(
            "bridge_decision_latency_seconds",
            "From the slot's last telemetry (or the deadline) to its commands published.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self.reloads = Counter(
            "bridge_policy_reloads",
            "Hot reloads of the policy when the MLflow alias moved, by result.",
            ["result"],
            registry=self.registry,
        )
        self.dr_events = Counter(
            "bridge_dr_events", "Demand-response event messages published.", ["status"],
            registry=self.registry,
        )  # fmt: skip
        self.up = Gauge("bridge_broker_connected", "1 while the broker session is up.",
                        registry=self.registry)  # fmt: skip
        self.port: int | None = None

    def watch_coap(self, stats: CoapStats) -> None:
        """Export a CoAP link's counters beside the core's."""
        self.registry.register(CoapCollector(stats))

    def serve(self, port: int) -> int:
        """Start the /metrics endpoint on 127.0.0.1; returns the bound port (0 picks one).

        A port in use (the live bridge's, for a shadow started on the same config) raises
        ConfigError naming `metrics_port`, before anything connects."""
        try:
            server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"metrics_port: expected a free TCP port on 127.0.0.1, got {port} ({exc}); "
                "a shadow beside the live bridge needs its own (--metrics-port)"
            ) from None
        self.port = int(server.server_port)
        self._server = server
        return self.port

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
