"""End to end, as an operator runs it: `devices simulate` and `bridge run` as processes, on a real
mosquitto (TLS, a password per device, the ACL) and a real anvil with the suite deployed, for a
few accelerated slots (1.5 s of wall clock each, still 15 minutes of energy each).

The chain's clock is moved ahead after the devices are registered, so the bridge's accelerated
slot numbers fall after the registration slot and before the chain's current slot, as the
registry demands of a reading.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.registration import owner_of
from bridge.site import SiteManifest, load_site
from bridge.site_builder import build_site
from contracts.client import Chain
from envs import load_scenario
from envs.grid import build_grid
from tests.bridge.broker import Broker
from tests.bridge.services import CLI_ENV, REPO, cli, free_port
from tests.bridge.stack import bridge_config, daytime_genesis, live_stack

SLOT_S = 1.5


@dataclass
class Setup:
    site: SiteManifest
    broker: Broker
    chain: Chain
    registry: str
    files: Path
    genesis: float


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    files = tmp_path_factory.mktemp("site")
    build_site(build_grid(load_scenario()), site="site1", seed="0").save(files / "site.json")
    site = load_site(files / "site.json")
    # Registration happens in a chain slot from 4 to 99; the chain then jumps 300 slots on; the
    # bridge's accelerated slots are numbered from 100 on (for a few minutes of tests: ended,
    # after registration, inside the window) and stand for the morning (`daytime_genesis`).
    with live_stack(files, site, [d.id for d in site.devices], daytime_genesis) as live:
        live.chain.travel_to(live.deployed_at + 300 * 900)
        (files / "passwords.json").write_text(json.dumps(live.broker.passwords))
        wall = time.time()
        genesis = wall - (wall % SLOT_S) - 100 * SLOT_S
        registry = live.deployment.addresses["DeviceRegistry"]
        yield Setup(site, live.broker, live.chain, registry, files, genesis)


def write_config(s: Setup, port: int, **extra: Any) -> Path:
    cfg = bridge_config(
        s.files, s.broker, s.chain, slot_seconds=SLOT_S, genesis=s.genesis,
        decide_deadline=0.6, metrics_port=port, **extra,
    )  # fmt: skip
    path = s.files / f"bridge-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_bridge(config: Path, *extra: str) -> subprocess.Popen[str]:
    """Start `bridge run`; returns once it is subscribed (births sent before would be missed).

    Its JSON log goes to a file beside the config (a pipe nobody reads would fill and block it).
    """
    log = config.with_suffix(".log")
    proc = subprocess.Popen(
        cli("bridge", "run", "--config", str(config), "--json", *extra),
        env=CLI_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if '"bridge started"' in log.read_text():
            return proc
        time.sleep(0.1)
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"bridge did not start: {out[-2000:]} {log.read_text()[-2000:]}")


def start_devices(s: Setup, slots: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli(
            "devices", "simulate", "--broker", s.broker.url, "--ca-file", str(s.broker.ca_file),
            "--passwords", str(s.files / "passwords.json"), "--site", str(s.files / "site.json"),
            "--deployment", str(s.files / "deployment.json"), "--slot-seconds", str(SLOT_S),
            "--genesis", str(s.genesis), "--slots", str(slots), "--json",
        ),
        env=CLI_ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def finish(
    proc: subprocess.Popen[str], timeout: float = 60, stop: bool = False
) -> dict[str, object]:
    """The process's JSON summary; `stop` sends SIGTERM first (the operator's clean stop)."""
    if stop:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return dict(json.loads(out.strip().splitlines()[-1]))


def settled_batches(chain: Chain, deployment: Path) -> dict[int, int]:
    """Slot -> orders of every signed batch settled on chain (a slot twice would fail the
    caller's count: the dict keeps one entry a slot)."""
    address = json.loads(deployment.read_text())["addresses"]["EnergyTrading"]
    trading = chain.contract("EnergyTrading", address)
    logs = trading.events.SignedBatchSettled().get_logs(from_block=0)
    out: dict[int, int] = {}
    for e in logs:
        slot = int(e["args"]["slot"])
        assert slot not in out, f"slot {slot} settled twice"
        out[slot] = int(e["args"]["orderCount"])
    return out


def test_simulated_site_through_broker_bridge_and_chain(setup: Setup) -> None:
    s = setup
    port = free_port()
    bridge = start_bridge(write_config(s, port))
    devices = start_devices(s, slots=6)
    metrics: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and devices.poll() is None:
        metrics = scrape(port)
        time.sleep(0.5)
    fleet = finish(devices)
    summary = finish(bridge, stop=True)
    n = len(s.site.devices)
    # The endpoint served the counters while the bridge ran.
    assert metrics['bridge_commands_total{state="applied"}'] > 0, metrics
    assert metrics["bridge_telemetry_accepted_total"] >= n
    assert metrics['bridge_rejected_total{reason="bad_signature"}'] == 0
    assert "bridge_decision_latency_seconds_count" in metrics
    # Every message the devices sent was valid and counted; nothing refused.
    assert summary["rejected"] == {}, summary
    assert int(summary["slots_decided"]) >= 6  # type: ignore[call-overload]
    assert int(summary["telemetry_accepted"]) >= 4 * n  # type: ignore[call-overload]
    # Slots with every device's telemetry were decided by the policy, the rest said why.
    decisions = summary["decisions"]
    assert isinstance(decisions, dict) and decisions.get("policy", 0) >= 4, summary
    # Every command of a slot the policy decided was applied (commands sent before the devices
    # were up expire, and those queued while the fleet was still connecting are refused as late).
    commands = summary["commands"]
    per_slot = 2 * len(s.site.prosumers) + len(s.site.battery_devices())
    assert isinstance(commands, dict)
    assert commands["applied"] >= per_slot * (decisions["policy"] - 1), summary
    assert fleet["commands_applied"] >= commands["applied"]
    # A late refusal can reach the bridge after it already counted the command expired.
    assert fleet["commands_rejected"] <= commands.get("rejected", 0) + commands["expired"]
    assert fleet["limit_violations"] == 0
    # Every reading the bridge queued is on the chain, once.
    queued = int(summary["readings_queued"])  # type: ignore[call-overload]
    assert queued >= 4 * len(s.site.prosumers)
    # ... and every slot it decided settled on chain, once: one SlotSettler.run a slot.
    settled = int(summary["slots_enqueued"])  # type: ignore[call-overload]
    assert settled >= 6
    assert summary["outbox"] == {"confirmed": queued + settled}, summary
    registry = s.chain.contract("DeviceRegistry", s.registry)
    logs = registry.events.ReadingRecorded().get_logs(from_block=0)
    keys = [(e["args"]["device"], e["args"]["slot"]) for e in logs]
    assert len(keys) == len(set(keys)) == queued
    batches = settled_batches(s.chain, s.files / "deployment.json")
    assert len(batches) == settled
    assert sum(count for count in batches.values()) > 0  # households traded
    # Metered to the household's account, as registered.
    # (One slot's net can be exactly 0 Wh, e.g. PV matching load: look across the slots.)
    owner = owner_of(s.site, s.site.prosumers[0].name, s.chain.accounts[0])
    slots = sorted({k[1] for k in keys})
    metered = [registry.functions.netMeteredWh([owner], slot).call()[0] for slot in slots]
    assert any(m != 0 for m in metered), metered


def test_dry_run_commands_nothing(setup: Setup) -> None:
    """Shadow mode: the same decisions are made and logged, no command, no chain work."""
    s = setup
    port = free_port()
    config = write_config(s, port, chain={"deployment": "deployment.json"})
    bridge = start_bridge(config, "--dry-run")
    fleet = finish(start_devices(s, slots=2))
    summary = finish(bridge, stop=True)
    assert summary["mode"] == "shadow"
    assert summary["commands_sent"] == 0 and fleet["commands_applied"] == 0
    assert int(summary["telemetry_accepted"]) >= len(s.site.devices)  # type: ignore[call-overload]
    assert summary["outbox"] == {} and summary["rejected"] == {}
