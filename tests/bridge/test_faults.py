"""Faults on the real stack (mosquitto with TLS/passwords/ACL, anvil with the suite deployed):
a broker restart, a chain node that stops answering, the bridge killed with SIGKILL and
restarted, a policy that answers NaN. Each run must end with every reading the devices signed
on the chain exactly once (0 lost, 0 duplicate settlements: the registry's per-device nonces
moved by exactly the readings signed, and no (device, slot) recorded twice), 0 device-limit
violations, and every refused message counted under a named reason.

The simulated devices run in the test process (same asyncio loop as an in-process bridge, or
beside a `bridge run` process for the SIGKILL case), on accelerated 1.5 s slots.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.baselines import RuleBasedPolicy
from bridge.clock import SlotClock
from bridge.config import load_bridge_config, load_deployment
from bridge.faults import FaultPlan
from bridge.policy_source import LoadedPolicy
from bridge.registration import reading_nonces
from bridge.runner import BridgeRunner
from bridge.signing import ReadingDomain
from bridge.simulator import FleetStats, Profiles, simulate
from envs import load_scenario
from envs.grid import build_grid
from tests.bridge.services import ANVIL_PROCESSES, free_port
from tests.bridge.test_run import (
    SLOT_S,
    Setup,
    finish,
    settled_batches,
    setup,
    start_bridge,
    write_config,
)

__all__ = ["setup"]  # the module-scoped stack of test_run, one per module and worker


#: Refusals a fault may cause: telemetry that arrives too late to act on (its reading is still
#: relayed) and messages the broker delivers twice (QoS 1 is at-least-once).
EXPECTED_REASONS = {"stale", "replayed"}


class NaNPolicy:
    """A policy that has gone wrong: NaN everywhere."""

    name = "nan"

    def __init__(self, act_dim: int) -> None:
        self.act_dim = act_dim

    def predict(self, obs: np.ndarray) -> np.ndarray:
        return np.full(self.act_dim, np.nan, dtype=np.float32)


@dataclass
class Outcome:
    fleet: FleetStats
    start_nonces: dict[str, int]
    first_block: int
    summaries: list[dict[str, Any]]


def _runner(s: Setup, config: Path, policy: Any = None) -> BridgeRunner:
    cfg = load_bridge_config(config)
    dep = load_deployment(cfg.chain.deployment)
    codec = s.site.make_codec()
    loaded = LoadedPolicy(policy or RuleBasedPolicy(codec), getattr(policy, "name", "rule-based"))
    return BridgeRunner(cfg, s.site, dep, loaded)


async def _fleet(
    s: Setup,
    slots: int | None,
    fault: Callable[[], Awaitable[None]],
    faults: FaultPlan | None = None,
    stop: asyncio.Event | None = None,
) -> Outcome:
    """Run the devices for `slots` slots (None: until `stop`) while `fault` does its damage;
    `faults`: what the devices themselves get wrong (`bridge.faults`)."""
    grid = build_grid(load_scenario())
    dep = load_deployment(s.files / "deployment.json")
    nonces = reading_nonces(s.chain, s.registry, s.site)
    first_block = int(s.chain.w3.eth.block_number) + 1
    sim = asyncio.create_task(
        simulate(
            s.site,
            Profiles(grid.prosumer_load_kw, grid.prosumer_pv_kw),
            ReadingDomain(dep.chain_id, dep.addresses["DeviceRegistry"]),
            broker_url=s.broker.url,
            passwords=s.broker.passwords,
            ca_file=s.broker.ca_file,
            clock=SlotClock(s.genesis, SLOT_S),
            seed="0",
            slots=slots,
            start_nonces=nonces,
            faults=faults,
            stop=stop,
        )
    )
    await fault()
    return Outcome(await sim, nonces, first_block, [])


async def _in_process(
    s: Setup,
    slots: int | None,
    fault: Callable[[BridgeRunner], Awaitable[None]],
    policy: Any = None,
    faults: FaultPlan | None = None,
    stop: asyncio.Event | None = None,
) -> Outcome:
    runner = _runner(s, write_config(s, free_port()), policy)
    serving = asyncio.create_task(runner.run())
    await asyncio.sleep(1.0)  # subscribed before the devices' births
    out = await _fleet(s, slots, lambda: fault(runner), faults, stop)
    await asyncio.sleep(SLOT_S)  # the last slot's telemetry and acks arrive
    await _until_on_chain(s, out)
    runner.stop.set()
    out.summaries.append(await serving)
    return out


async def _until_on_chain(s: Setup, out: Outcome, timeout_s: float = 60.0) -> None:
    """Wait until every signed reading is on chain, or `timeout_s` passed (`_check` then says
    what is missing). "0 lost" is an eventual property: after a fault the bridge relays a
    backlog, and on a loaded machine that takes longer than a slot; stopping it earlier would
    leave readings durable in its outbox, not lost, but not checkable either."""
    meters = [p.meter for p in s.site.prosumers]
    target = sum(out.start_nonces[m] for m in meters) + out.fleet.readings_signed
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = await asyncio.to_thread(reading_nonces, s.chain, s.registry, s.site)
        if sum(now[m] for m in meters) >= target:
            return
        await asyncio.sleep(0.5)


def _check(s: Setup, out: Outcome, reasons: set[str] = EXPECTED_REASONS) -> dict[str, int]:
    """0 lost, 0 duplicated, 0 limit violations, every refusal named; the refusals by reason."""
    fleet, summary = out.fleet, out.summaries[-1]
    assert fleet.limit_violations == 0
    assert fleet.unsent == 0  # the broker acknowledged every message the devices sent
    registry = s.chain.contract("DeviceRegistry", s.registry)
    meters = [p.meter for p in s.site.prosumers]
    now = reading_nonces(s.chain, s.registry, s.site)
    per_meter = fleet.readings_signed // len(meters)
    assert per_meter * len(meters) == fleet.readings_signed and per_meter >= 4
    moved = {m: now[m] - out.start_nonces[m] for m in meters}
    assert moved == dict.fromkeys(meters, per_meter), (moved, per_meter, summary)  # 0 lost
    logs = registry.events.ReadingRecorded().get_logs(from_block=out.first_block)
    keys = [(e["args"]["device"], e["args"]["slot"]) for e in logs]
    assert len(keys) == len(set(keys)) == fleet.readings_signed  # 0 duplicate settlements
    assert set(summary["outbox"]) <= {"confirmed"}, summary  # nothing failed or left behind
    # Every slot the bridge (or its killed predecessor) queued settled on chain, once.
    with sqlite3.connect(s.files / "outbox.db") as db:
        rows = db.execute("SELECT key, state FROM outbox WHERE key LIKE 'slot:%'").fetchall()
    assert rows and {state for _, state in rows} == {"confirmed"}, rows  # 0 lost slots
    batches = settled_batches(s.chain, s.files / "deployment.json")  # 0 settled twice
    assert sorted(batches) == sorted(int(key.split(":")[1]) for key, _ in rows)
    rejected: dict[str, int] = dict(summary["rejected"])
    assert set(rejected) <= reasons, summary
    relaying = ("stale", "future", "no_session", "implausible")  # refusals that relay a reading
    assert summary["relayed_readings"] <= sum(rejected.get(r, 0) for r in relaying)
    return rejected


def test_broker_restart_mid_run_loses_nothing(setup: Setup) -> None:
    s = setup

    async def restart(runner: BridgeRunner) -> None:
        # The devices connect one by one (TLS each): on a loaded machine that can take longer
        # than a few slots, and a restart then would refuse a device its first CONNACK. Their
        # first telemetry says they are all up.
        deadline = time.monotonic() + 60
        while runner.core.validator.telemetry_accepted == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(2 * SLOT_S)
        connects = runner.link.connects
        await asyncio.to_thread(s.broker.restart, 5 * SLOT_S)
        deadline = time.monotonic() + 30
        while runner.link.connects == connects and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert runner.link.connects > connects, "the bridge did not reconnect"

    out = asyncio.run(_in_process(s, 8, restart))
    # The devices' wills fire when the broker goes down: their telemetry is out of session until
    # they are born again (the bridge asks); the readings in it are relayed all the same.
    _check(s, out, EXPECTED_REASONS | {"no_session"})
    summary = out.summaries[-1]
    assert summary["broker_sessions_resumed"] >= 1  # the restarted broker kept our session


def test_chain_node_unanswering_then_back_loses_nothing(
    setup: Setup, request: pytest.FixtureRequest
) -> None:
    """anvil paused (SIGSTOP: every request hangs until the client's timeout, the worst kind of
    outage) for 8 s, or a full minute with --runslow; readings queue durably meanwhile."""
    s = setup
    pause_s = 60.0 if request.config.getoption("--runslow") else 8.0
    proc = ANVIL_PROCESSES[s.chain.w3.provider.endpoint_uri]  # type: ignore[attr-defined]

    async def outage(runner: BridgeRunner) -> None:
        await asyncio.sleep(2 * SLOT_S)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(pause_s)
            assert runner.inbox is not None and runner.inbox.backlog() > 0  # held durably
        finally:
            os.kill(proc.pid, signal.SIGCONT)

    slots = int(pause_s / SLOT_S) + 6
    out = asyncio.run(_in_process(s, slots, outage))
    _check(s, out)


def test_policy_answering_nan_falls_back_and_loses_nothing(setup: Setup) -> None:
    s = setup

    async def nothing(runner: BridgeRunner) -> None:
        return None

    policy = NaNPolicy(s.site.make_codec().act_dim)
    out = asyncio.run(_in_process(s, 5, nothing, policy))
    _check(s, out)
    summary = out.summaries[-1]
    assert summary["decisions"].get("policy", 0) == 0
    assert summary["fallbacks"].get("non_finite", 0) >= 3, summary
    assert summary["commands"].get("applied", 0) > 0  # the rule-based fallback still steers


def test_bridge_sigkill_and_restart_loses_nothing(setup: Setup) -> None:
    """`bridge run` killed with SIGKILL mid-run: no NDEATH, no drain, readings unacknowledged
    in flight. Restarted on the same outbox, it gets them again from its broker session."""
    s = setup
    config = write_config(s, free_port())
    restarted: list[subprocess.Popen[str]] = []
    bridge = start_bridge(config)

    async def kill_and_restart() -> None:
        await asyncio.sleep(3.3 * SLOT_S)  # mid-slot, with readings in flight
        bridge.send_signal(signal.SIGKILL)
        bridge.wait()
        await asyncio.sleep(SLOT_S)  # the devices carry on; the broker queues for the bridge
        restarted.append(await asyncio.to_thread(start_bridge, config))

    async def both() -> Outcome:
        # 16 slots: under a loaded machine the restarted bridge takes ~10 s to start and
        # must still see fresh slots to steer in.
        out = await _fleet(s, 16, kill_and_restart)
        await asyncio.sleep(SLOT_S)  # the last slot's telemetry reaches the bridge
        await _until_on_chain(s, out)
        out.summaries.append(await asyncio.to_thread(finish, restarted[0], 60, True))
        return out

    out = asyncio.run(both())
    summaries = out.summaries
    rejected = _check(s, out)
    summary = summaries[-1]
    assert summary["broker_sessions_resumed"] >= 1
    # What waited in the broker session was too old to act on and went to the chain only...
    assert summary["relayed_readings"] >= 1 and rejected.get("stale", 0) >= 1, summary
    # ... and the restarted bridge steered again with fresh telemetry.
    assert int(summary["telemetry_accepted"]) > 0 and summary["decisions"].get("policy", 0) >= 1
