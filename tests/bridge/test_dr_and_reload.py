"""Demand-response events and the hot-reload parity check, without a broker."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bridge.clock import SlotClock
from bridge.config import BridgeConfig, Deployment
from bridge.decision import decide
from bridge.dr import DemandResponseEvents
from bridge.messages import DrEvent, decode
from bridge.policy_source import LoadedPolicy, load_policy
from bridge.runner import BridgeRunner
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.topics import MessageType, device_subscriptions, topic
from tests.bridge.helpers import GENESIS, NOW_MS, REGISTRY, birth, telemetry


class Fixed:
    """A policy that always answers `action`."""

    def __init__(self, action: np.ndarray) -> None:
        self.action = action

    def predict(self, obs: np.ndarray) -> np.ndarray:
        return self.action


def _runner(site: SiteManifest) -> BridgeRunner:
    dep = Deployment(chainId=31337, addresses={"DeviceRegistry": REGISTRY}, genesis=GENESIS,
                     slotSeconds=900)  # fmt: skip
    loaded = load_policy("builtin:rule-based", site.make_codec(), "")
    return BridgeRunner(BridgeConfig(dry_run=True, metrics_port=None), site, dep, loaded)


def _with_observations(
    runner: BridgeRunner, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    core = runner.core
    for d in site.devices:
        core.handle(f"mgv1/site1/DBIRTH/{d.id}", birth(site, d.id), NOW_MS)
        msg = telemetry(site, domain, keys[d.id], d.id)
        core.handle(f"mgv1/site1/DDATA/{d.id}", json.dumps(msg).encode(), NOW_MS)
    core.decide(1000, NOW_MS)
    assert len(core.observations) == 1


def test_dr_event_starts_continues_and_ends(site: SiteManifest) -> None:
    runner = _runner(site)
    codec, core = runner.core.codec, runner.core
    n = len(site.prosumers)
    asking = codec.encode_action(np.zeros(n + 1), np.zeros(n), np.array([0.5, 0.0]))
    idle = codec.encode_action(np.zeros(n + 1), np.zeros(n), np.zeros(n))
    clock = SlotClock(GENESIS, 900)
    # As if every device had reported: the policy, not the stale-data fallback, decides.
    obs = dataclasses.replace(core.builder.build(core.state, 999, 0, 0.3), missing=())
    events = DemandResponseEvents(site)

    def step(slot: int, action: np.ndarray) -> list[DrEvent]:
        d = decide(obs, Fixed(action), core.fallback, core.shield)
        out = events.update(slot, d, codec, core.state, clock)
        assert all(e.publish.retain for e in out)
        assert all(e.publish.topic == "mgv1/site1/DREVENT/bus1-appliance" for e in out)
        return [decode(DrEvent, e.publish.payload) for e in out]

    (first,) = step(10, asking)
    assert first.status == "start" and first.event_id == "dr.10.bus1"
    assert (
        first.start_ts == (GENESIS + 10 * 900) * 1000 and first.end_ts == first.start_ts + 900_000
    )
    assert first.incentive_per_kwh == site.import_price[10]
    (again,) = step(11, asking)
    assert again.event_id == first.event_id and again.end_ts == first.end_ts + 900_000
    (end,) = step(12, idle)
    assert end.status == "end" and end.event_id == first.event_id
    assert step(13, idle) == []
    assert events.published == 3


def test_parity_check_records_figures_and_refuses_nan(
    site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    runner = _runner(site)
    act_dim = runner.core.codec.act_dim
    with pytest.raises(ValueError, match="expected recorded observations"):
        runner.parity_check(LoadedPolicy(Fixed(np.zeros(act_dim)), "x"))
    _with_observations(runner, site, domain, keys)
    figures = runner.parity_check(LoadedPolicy(Fixed(np.full(act_dim, 0.25)), "x"))
    assert figures["samples"] == 1.0 and figures["max_abs_diff"] > 0
    with pytest.raises(ValueError, match="expected finite actions"):
        runner.parity_check(LoadedPolicy(Fixed(np.full(act_dim, np.nan)), "nan"))
    with pytest.raises(ValueError, match="expected actions of shape"):
        runner.parity_check(LoadedPolicy(Fixed(np.zeros(3)), "short"))


def test_a_shadow_bridge_never_passes_for_the_live_one(site: SiteManifest) -> None:
    """Beside the live bridge, the shadow has its own node id: its birth and death go to topics
    no device watches, and its MQTT client id cannot take the live bridge's connection over."""
    runner = _runner(site)
    live_node = BridgeConfig().node
    assert runner.core.node == f"{live_node}-shadow"
    watched = set(device_subscriptions(site.site, site.devices[0].id, live_node))
    now = NOW_MS
    assert runner.core.birth(now).topic not in watched
    assert runner.core.will(now).topic not in watched
    assert topic(site.site, MessageType.NBIRTH, live_node) in watched
