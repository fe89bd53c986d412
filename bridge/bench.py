"""`microgrid bench bridge`: how many device messages the bridge validates a second, and how long a
slot's decision takes once its last telemetry is in.

In process, through the sans-I/O core: every message goes through `BridgeCore.handle`, the same
call the MQTT shell makes (topic parse, pydantic schema, identity, session and sequence, staleness,
plausibility, the EIP-712 signature of meter and battery readings, the outbox work it owes), and
each slot ends with `BridgeCore.decide` (observation through the env's codec, the policy, the
shield, the commands encoded as they would be published). Payloads are built and signed before the
clock starts, as the devices would have done; no socket, broker or chain is in the figures.

The site is synthetic, not a scenario's: `n_prosumer = (devices - 2) // 4` prosumers with a meter,
inverter, battery and appliance each, a community battery, and feeder sensors making up the rest,
so the bridge may not need pandapower to build one. The policy is the rule-based controller (the
bridge's own fallback, numpy only); an ONNX policy adds about 0.2 ms (issue 6).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from agents.baselines import RuleBasedPolicy
from bridge.core import BridgeCore
from bridge.errors import BridgeError
from bridge.heap import settle_heap
from bridge.messages import DeviceBirth, DeviceKind, Ratings, encode
from bridge.signing import ReadingDomain, address_of
from bridge.site import SiteDevice, SiteManifest
from bridge.site_builder import build_site, device_key
from bridge.validation import TelemetryValidator, ValidationLimits
from envs.params import BatteryParams, GridParams

#: The issue's targets (issue 6, Benchmark): printed beside the figures, never asserted.
TARGETS = {"ingest_msg_per_s": 5_000.0, "decision_latency_ms_p99": 20.0}
SEED = "bench"
CHAIN_ID = 31337
REGISTRY = "0x" + "5a" * 20
GENESIS = 1_700_000_000 - 1_700_000_000 % 86_400
FIRST_SLOT = 1_000
"""The first benchmarked slot after GENESIS (any slot works; this one starts at 10:00 UTC)."""
SLOT_S = 900


@dataclass(frozen=True)
class BenchConfig:
    """What `bench_bridge` measures."""

    devices: int
    """Devices on the site (>= 6: one prosumer's four, the community battery, a feeder sensor)."""
    slots: int | None = None
    """Slots to run; None: enough for ~20,000 messages (at least 10 slots, at most 200)."""

    def n_slots(self) -> int:
        return self.slots if self.slots is not None else max(10, min(200, 20_000 // self.devices))


def synthetic_site(devices: int, *, site: str = "site1", seed: str = SEED) -> SiteManifest:
    """A site of exactly `devices` devices without a grid build (see the module docstring)."""
    n = (devices - 2) // 4
    if n < 1:
        raise BridgeError(f"devices: expected at least 6, got {devices}")
    price = np.full(96, 0.30)
    price[:28] = 0.22
    price[68:84] = 0.42
    rng = np.random.default_rng(0)
    k = n + 1

    def full(x: float) -> np.ndarray:
        return np.full(k, x)

    power = np.append(rng.uniform(3.0, 6.0, n), 25.0)
    params = SimpleNamespace(
        grid_code=f"bench-{devices}",
        prosumer_names=tuple(f"bus{i + 1}" for i in range(n)),
        n_prosumer=n,
        has_community_battery=True,
        horizon=4,
        load_scale_kw=rng.uniform(3.0, 8.0, n),
        pv_scale_kw=rng.uniform(2.0, 6.0, n),
        import_price=price,
        feed_in_price=0.08,
        tod_multiplier=np.ones(96),
        base_rate=0.25,
        stress_threshold=0.8,
        demand_reference_kw=5.0 * n,
        batteries=BatteryParams(
            capacity_kwh=power * 2.0,
            power_kw=power,
            efficiency_charge=full(0.95),
            efficiency_discharge=full(0.95),
            soc_min=full(0.1),
            soc_max=full(0.9),
            soc_initial=full(0.5),
            fade_per_full_cycle=full(1e-4),
            replacement_cost_per_kwh=full(100.0),
        ),
        signal_range=2.0,
        steps_per_day=96,
        n_days=366,
        dt_h=0.25,
    )
    base = build_site(cast(GridParams, params), site=site, seed=seed)
    extra = [
        SiteDevice(
            id=f"feeder-sensor-{i + 2}",
            kind=DeviceKind.GRID_SENSOR,
            address=_address(seed, f"feeder-sensor-{i + 2}"),
            capacity_w=1000,
        )
        for i in range(devices - len(base.devices))
    ]
    # Built anew, not model_copy'd: the manifest's device index is made on construction.
    return SiteManifest(**{**dict(base), "devices": [*base.devices, *extra]})


def _address(seed: str, device_id: str) -> str:
    return address_of(device_key(seed, device_id))


#: One plausible telemetry sample per device kind (the bench and the tests send these).
SAMPLE_METRICS: dict[str, dict[str, Any]] = {
    "meter": {"kind": "meter", "net_kw": 1.2, "load_kw": 2.0},
    "pv": {"kind": "pv", "pv_kw": 0.8, "available_kw": 0.8, "curtailment": 0.0},
    "battery": {"kind": "battery", "soc": 0.5, "soh": 0.99, "power_kw": 0.0},
    "appliance": {"kind": "appliance", "load_kw": 0.5, "backlog_kwh": 0.1, "dr_share": 0.0},
    "grid_sensor": {
        "kind": "grid_sensor",
        "v_min_pu": 0.97,
        "v_max_pu": 1.02,
        "line_loading": 0.3,
        "trafo_loading": 0.4,
    },
}


#: A device's key, derived once rather than once per slot (payloads are made ahead of the clock,
#: but 20,000 of them took longer than the bench itself).
_device_key = functools.lru_cache(maxsize=65_536)(device_key)


def now_ms(k: int) -> int:
    """The bridge's clock 100 s into benchmarked slot k + 1, when slot k's telemetry arrives."""
    return (GENESIS + (FIRST_SLOT + k + 1) * SLOT_S + 100) * 1000


def birth_payloads(site: SiteManifest) -> list[tuple[str, bytes]]:
    """Every device's DBIRTH (session 1), as (topic, payload)."""
    out = []
    for d in site.devices:
        msg = DeviceBirth(
            device=d.id, kind=d.kind, address=d.address, bd_seq=1, seq=0, ts=now_ms(0) - 1000,
            ratings=Ratings(capacity_w=d.capacity_w, power_kw=d.power_kw or None),
        )  # fmt: skip
        out.append((f"mgv1/{site.site}/DBIRTH/{d.id}", encode(msg)))
    return out


def telemetry_payloads(
    site: SiteManifest, domain: ReadingDomain, k: int, seed: str = SEED
) -> list[tuple[str, bytes]]:
    """Slot k's DDATA of every device, signed as the device signs it (meters and batteries)."""
    slot = FIRST_SLOT + k
    ts = now_ms(k) - 50
    out = []
    for d in site.devices:
        m = SAMPLE_METRICS[d.kind.value]
        msg: dict[str, Any] = {
            "device": d.id, "bd_seq": 1, "seq": k + 1, "ts": ts, "slot": slot, "metrics": m,
        }  # fmt: skip
        if d.kind in (DeviceKind.METER, DeviceKind.BATTERY):
            wh = round(m.get("net_kw", 0.0) * 250)
            sig = domain.sign(_device_key(seed, d.id), slot, wh, k)
            msg["reading"] = {
                "slot": slot,
                "energy_wh": wh,
                "nonce": k,
                "signature": "0x" + sig.hex(),
            }
        out.append((f"mgv1/{site.site}/DDATA/{d.id}", json.dumps(msg).encode()))
    return out


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q))


def make_core(site: SiteManifest, domain: ReadingDomain) -> BridgeCore:
    limits = ValidationLimits(genesis=GENESIS, slot_seconds=SLOT_S)
    validator = TelemetryValidator(site, domain, limits)
    policy = RuleBasedPolicy(site.make_codec())
    return BridgeCore(site, validator, policy, policy_name="rule_based")


def bench_bridge(
    config: BenchConfig, advance: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Run `config.slots` slots of every device's telemetry and the slot's decision in process.

    `advance` is called with a step count: once per device signed ahead of the clock, once per
    device's message handled. Returns the figures documented in docs/iot.md (Benchmark).
    """
    site = synthetic_site(config.devices)
    domain = ReadingDomain(CHAIN_ID, REGISTRY)
    n_slots = config.n_slots()
    slots = []
    for k in range(n_slots):
        slots.append(telemetry_payloads(site, domain, k))
        if advance:
            advance(len(site.devices))
    core = make_core(site, domain)
    for t, payload in birth_payloads(site):
        core.handle(t, payload, now_ms(0))
    handle = core.handle
    clock = time.perf_counter
    cpu = time.process_time
    ingest_s = 0.0
    ingest_cpu_s = 0.0
    latencies: list[float] = []
    decision_cpu: list[float] = []
    commands = 0
    # The heap as `bridge run` serves with: collections stay on, as live, and are timed.
    settle_heap()
    for k, messages in enumerate(slots):
        now = now_ms(k)
        started, started_cpu = clock(), cpu()
        for t, payload in messages[:-1]:
            handle(t, payload, now)
        last_t, last_payload = messages[-1]
        last_in = clock()
        handle(last_t, last_payload, now)
        ingested, ingested_cpu = clock(), cpu()
        _, out = core.decide(FIRST_SLOT + k + 1, now)
        decided, decided_cpu = clock(), cpu()
        ingest_s += ingested - started
        ingest_cpu_s += ingested_cpu - started_cpu
        latencies.append(decided - last_in)
        decision_cpu.append(decided_cpu - ingested_cpu)
        commands += len(out)
        if advance:
            advance(len(messages))
    result: dict[str, Any] = {
        **ingest_figures("in_process", core, site, n_slots, ingest_s),
        **decision_figures(latencies, commands, n_slots, core.policy_name),
        # CPU time: what a machine shared with other jobs inflates far less than wall time.
        "ingest_cpu_us_per_msg": ingest_cpu_s / (n_slots * len(site.devices)) * 1e6,
        "decision_cpu_ms_p50": percentile_ms(decision_cpu, 50),
        "decision_cpu_ms_p99": percentile_ms(decision_cpu, 99),
    }
    return checked(result)


def ingest_figures(
    mode: str, core: BridgeCore, site: SiteManifest, n_slots: int, ingest_s: float
) -> dict[str, Any]:
    """The ingest half of both modes' figures, once every message was accepted (a bench that
    refused some would time the refusal path, not the bridge's)."""
    v = core.validator
    messages_total = n_slots * len(site.devices)
    if v.telemetry_accepted != messages_total or any(v.rejected.values()):
        raise BridgeError(
            f"bench: expected all {messages_total} messages accepted, got "
            f"{v.telemetry_accepted} and refusals {dict(v.rejected)}"
        )
    signed = sum(d.kind in (DeviceKind.METER, DeviceKind.BATTERY) for d in site.devices)
    return {
        "mode": mode,
        "devices": len(site.devices),
        "prosumers": len(site.prosumers),
        "slots": n_slots,
        "messages": messages_total,
        "signed_share": round(signed / len(site.devices), 3),
        "ingest_msg_per_s": messages_total / ingest_s,
        "ingest_us_per_msg": ingest_s / messages_total * 1e6,
    }


def decision_figures(
    latencies: list[float], commands: int, n_slots: int, policy: str
) -> dict[str, Any]:
    """The decision half of a bench result, shared by the in-process and MQTT modes."""
    return {
        "decision_latency_ms_p50": percentile_ms(latencies, 50),
        "decision_latency_ms_p99": percentile_ms(latencies, 99),
        "decision_latency_ms_max": max(latencies) * 1000.0,
        "commands_per_slot": commands / n_slots,
        "policy": policy,
        "targets": dict(TARGETS),
    }


def checked(result: dict[str, Any]) -> dict[str, Any]:
    """`result` if every figure is finite; a NaN or inf means the bench itself went wrong."""
    bad = [k for k, x in result.items() if isinstance(x, float) and not math.isfinite(x)]
    if bad:
        raise BridgeError(f"bench: expected finite figures, got NaN/inf in {bad}")
    return result


def steps(config: BenchConfig) -> int:
    """Progress steps `bench_bridge` reports: signing and handling, per device per slot."""
    return 2 * config.n_slots() * config.devices
