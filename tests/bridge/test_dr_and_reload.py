"""Demand-response events and the hot-reload parity check, without a broker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

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


def _constant_onnx(obs_dim: int, action: np.ndarray) -> Any:
    """A frozen policy graph that answers `action` to every observation (obs @ 0 + action)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.zeros((obs_dim, len(action)), np.float32), "w")
    bias = numpy_helper.from_array(np.asarray(action, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["obs", "w"], ["z"]),
            helper.make_node("Add", ["z", "b"], ["a"]),
        ],
        "constant",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, [None, obs_dim])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, len(action)])],
        [weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_the_alias_moving_reloads_after_the_parity_check(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`policy.source: models:/NAME@ALIAS` against a real MLflow registry (sqlite): the bridge
    serves the alias's version; when the alias moves it downloads the new version, checks it on
    the recorded observations and swaps it in between two decisions (NBIRTH says so); a version
    answering NaN is refused, counted, kept out and not downloaded again."""
    import mlflow
    import mlflow.onnx
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # nothing of MLflow's lands in the repository
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("bridge", artifact_location=(tmp_path / "art").as_uri())
    client = MlflowClient(tracking_uri=uri)
    codec = site.make_codec()
    versions = []
    for value in (0.0, 0.25, np.nan):  # as training.train registers its policies
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.onnx.log_model(
                _constant_onnx(codec.obs_dim, np.full(codec.act_dim, value)), name="policy",
                registered_model_name="ppo", save_as_external_data=False,
            )  # fmt: skip
        versions.append(str(info.registered_model_version))
    client.set_registered_model_alias("ppo", "champion", versions[0])

    source = "models:/ppo@champion"
    loaded = load_policy(source, codec, uri)
    assert (loaded.name, loaded.version) == ("models:/ppo/1", "1")
    dep = Deployment(chainId=31337, addresses={"DeviceRegistry": REGISTRY}, genesis=GENESIS,
                     slotSeconds=900)  # fmt: skip
    cfg = BridgeConfig(
        dry_run=True, metrics_port=None,
        policy={"source": source, "tracking_uri": uri, "reload_every_s": 0.05},
    )  # fmt: skip
    runner = BridgeRunner(cfg, site, dep, loaded)
    _with_observations(runner, site, domain, keys)
    assert runner._try_reload() is None  # the alias has not moved

    class Births:
        """Where the runner's NBIRTH goes instead of the broker."""

        birth = None

        def __init__(self) -> None:
            self.published: list[bytes] = []

        def publish(self, topic_text: str, payload: bytes, *, retain: bool = False) -> None:
            self.published.append(payload)

    births = Births()
    runner.link = births  # type: ignore[assignment]

    def reloads(result: str) -> float:
        value = runner.metrics.registry.get_sample_value(
            "bridge_policy_reloads_total", {"result": result}
        )
        return value or 0.0

    async def scenario() -> None:
        loop = asyncio.create_task(runner._reload_loop())
        try:
            client.set_registered_model_alias("ppo", "champion", versions[1])
            while runner.loaded.version != "2":
                await asyncio.sleep(0.05)
            action = runner.core.policy.predict(np.zeros(codec.obs_dim, np.float32))
            assert np.allclose(action, 0.25)
            assert runner.parity["samples"] == 1.0 and reloads("accepted") == 1
            assert b"models:/ppo/2" in births.published[-1]
            client.set_registered_model_alias("ppo", "champion", versions[2])
            while reloads("rejected") == 0:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a few more polls: the refused version is not fetched again
            assert runner.loaded.version == "2" and runner.refused == {"3"}
            assert reloads("rejected") == 1 and reloads("accepted") == 1
        finally:
            runner.stop.set()
            await loop

    asyncio.run(asyncio.wait_for(scenario(), 120))
