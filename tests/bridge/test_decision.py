"""Policy -> shield -> fallback, and the commands and acknowledgements that follow."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from agents.baselines import RuleBasedPolicy
from agents.shield import Shield
from bridge.commands import (
    CommandEncoder,
    CommandState,
    CommandTracker,
    command_id,
    commands_for,
)
from bridge.decision import Decision, FallbackReason, Source, decide
from bridge.errors import BridgeError
from bridge.messages import Ack, AckStatus, BatterySetpoint, Command, Telemetry, decode, encode
from bridge.observation import Observation, ObservationBuilder, SiteState
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from envs.codec import Codec
from tests.bridge.helpers import NOW_MS, SLOT, metrics_for, telemetry


class Constant:
    name = "constant"

    def __init__(self, action: np.ndarray) -> None:
        self.action = action

    def predict(self, obs: np.ndarray) -> np.ndarray:
        return self.action


class Broken:
    name = "broken"

    def predict(self, obs: np.ndarray) -> np.ndarray:
        raise RuntimeError("onnxruntime: bad input")


def _state(
    site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes], soc: float
) -> SiteState:
    state = SiteState()
    for d in site.devices:
        m = metrics_for(d.kind.value)
        if d.kind.value == "battery":
            m = {**m, "soc": soc}
        msg = telemetry(site, domain, keys[d.id], d.id, metrics=m)
        state.update(Telemetry.model_validate(msg))
    return state


@pytest.fixture
def parts(site: SiteManifest, params: object) -> tuple[Codec, ObservationBuilder, Shield]:
    codec = site.make_codec()
    shield = Shield(site.batteries.params(), codec, site.dt_h)
    return codec, ObservationBuilder(site, codec), shield


def _observe(builder: ObservationBuilder, state: SiteState) -> Observation:
    return builder.build(state, SLOT, builder.slot_of_year(NOW_MS // 1000), community_price=0.3)


def test_the_default_forecast_is_persistence(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> None:
    """`build` gathers the persistence forecast from the metrics it reads anyway; it must be
    `persistence`'s, with a transformer flow (background) and with a device missing."""
    _, builder, _ = parts
    t = builder.slot_of_year(NOW_MS // 1000)
    state = _state(site, domain, keys, 0.42)
    sensor = state.latest[site.grid_sensor]
    flow = {**sensor.metrics.model_dump(), "trafo_net_kw": 7.5}
    state.latest[site.grid_sensor] = sensor.model_copy(
        update={"metrics": type(sensor.metrics).model_validate(flow)}
    )
    for drop in (None, site.prosumers[0].meter, site.community_battery):
        if drop is not None:
            del state.latest[drop]
        fresh = ObservationBuilder(site, parts[0])
        default = fresh.build(state, SLOT, t, community_price=0.3)
        explicit = ObservationBuilder(site, parts[0])
        forecast = explicit.persistence(state, SLOT)
        given = explicit.build(state, SLOT, t, community_price=0.3, forecast=forecast)
        assert default.raw["background_net_forecast"][0, 0] != 0.0
        for key, value in given.raw.items():
            np.testing.assert_array_equal(default.raw[key], value, err_msg=key)
        np.testing.assert_array_equal(default.obs, given.obs)


def test_observation_matches_the_codec_layout(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> None:
    codec, builder, _ = parts
    obs = _observe(builder, _state(site, domain, keys, 0.42))
    assert obs.obs.shape == (codec.obs_dim,) and obs.obs.dtype == np.float32 and not obs.missing
    decoded = codec.decode_observation(obs.obs)
    np.testing.assert_allclose(decoded["soc"][0], 0.42, rtol=1e-6)
    np.testing.assert_allclose(decoded["load"][0], [2.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(decoded["pv_forecast"][0], 0.8, rtol=1e-6)  # persistence
    np.testing.assert_allclose(decoded["grid"][0], [0.97, 1.02, 0.3, 0.4], rtol=1e-5)
    low, high = codec.bounds()
    assert np.all(obs.obs >= low) and np.all(obs.obs <= high)


def test_missing_telemetry_is_reported_by_device(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> None:
    _, builder, _ = parts
    state = _state(site, domain, keys, 0.5)
    del state.latest["bus2-battery"]
    assert _observe(builder, state).missing == ("bus2-battery",)


def test_the_policy_decides_when_all_is_well_and_the_shield_bounds_it(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> None:
    codec, builder, shield = parts
    obs = _observe(builder, _state(site, domain, keys, 0.89))  # nearly full
    charge_all = np.ones(codec.act_dim, dtype=np.float32)
    d = decide(obs, Constant(charge_all), RuleBasedPolicy(codec), shield)
    assert d.source is Source.POLICY and d.reason is None
    _, upper = shield.limits(obs.soc, obs.capacity_kwh)
    assert np.all(d.report.applied_kw <= upper + 1e-9) and d.report.soc_limited.all()
    assert np.all(d.report.applied_kw < np.asarray(codec.battery_power_kw))


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        (Broken(), FallbackReason.POLICY_ERROR),
        (Constant(np.full(8, np.nan, dtype=np.float32)), FallbackReason.NON_FINITE),
        (Constant(np.zeros(3, dtype=np.float32)), FallbackReason.BAD_SHAPE),
    ],
)
def test_fallback_on_policy_failure_records_the_reason(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
    policy: object,
    reason: FallbackReason,
) -> None:
    codec, builder, shield = parts
    obs = _observe(builder, _state(site, domain, keys, 0.5))
    fallback = RuleBasedPolicy(codec)
    d = decide(obs, policy, fallback, shield)  # type: ignore[arg-type]
    assert d.source is Source.FALLBACK and d.reason is reason and d.detail
    expected, _ = shield.project(fallback.predict(obs.obs), obs.soc, None, obs.capacity_kwh)
    np.testing.assert_array_equal(d.action, expected)
    assert np.isfinite(d.action).all()


def test_stale_data_bypasses_even_a_good_policy(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> None:
    codec, builder, shield = parts
    state = _state(site, domain, keys, 0.5)
    del state.latest["feeder-sensor"]
    d = decide(
        _observe(builder, state), Constant(np.zeros(codec.act_dim)), RuleBasedPolicy(codec), shield
    )
    assert d.source is Source.FALLBACK and d.reason is FallbackReason.STALE_DATA
    assert "feeder-sensor" in d.detail


def _decision(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> Decision:
    codec, builder, shield = parts
    obs = _observe(builder, _state(site, domain, keys, 0.5))
    act = np.zeros(codec.act_dim, dtype=np.float32)
    act[:3] = [0.5, -0.5, 1.0]
    act[3:5] = [0.25, -1.0]  # PV curtailment: max(a, 0)
    act[5:7] = [0.0, 0.75]  # demand response
    return decide(obs, Constant(act), RuleBasedPolicy(codec), shield)


def test_commands_carry_the_shielded_setpoints_with_deterministic_ids(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> None:
    codec = parts[0]
    d = _decision(site, domain, keys, parts)
    cmds = commands_for(d, site, codec, SLOT + 1, NOW_MS, NOW_MS + 900_000)
    by_device = {c.device: c for c in cmds}
    assert len(cmds) == 3 + 2 * 2
    bat = by_device["community-battery"].action
    assert isinstance(bat, BatterySetpoint) and bat.power_kw == pytest.approx(
        d.report.applied_kw[2]
    )
    assert by_device["bus1-pv"].action.fraction == pytest.approx(0.25)  # type: ignore[union-attr]
    assert by_device["bus2-pv"].action.fraction == 0.0  # type: ignore[union-attr]
    assert by_device["bus2-appliance"].action.share == pytest.approx(0.75)  # type: ignore[union-attr]
    again = commands_for(d, site, codec, SLOT + 1, NOW_MS + 5, NOW_MS + 900_000)
    assert [c.command_id for c in again] == [c.command_id for c in cmds]
    assert cmds[0].command_id == command_id(SLOT + 1, "bus1-battery", "battery_setpoint")


@pytest.mark.parametrize("slot", [0, SLOT + 1, 2**63 - 1])
def test_the_encoder_sends_the_bytes_commands_for_defines(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
    slot: int,
) -> None:
    codec = parts[0]
    d = _decision(site, domain, keys, parts)
    rng = np.random.default_rng(slot % 1000)
    for applied in (
        d.report.applied_kw,
        rng.uniform(-50, 50, 3),
        np.array([-0.0, 1e-7, 123456.789]),
    ):
        d = dataclasses.replace(d, report=dataclasses.replace(d.report, applied_kw=applied))
        want = commands_for(d, site, codec, slot, NOW_MS, NOW_MS + 900_000)
        got = CommandEncoder(site, codec).encode(d, slot, NOW_MS, NOW_MS + 900_000)
        assert [o.payload for o in got] == [encode(c) for c in want]
        assert [decode(Command, o.payload) for o in got] == want
        assert [o.topic for o in got] == [f"mgv1/{site.site}/DCMD/{c.device}" for c in want]
        assert [(o.command_id, o.device) for o in got] == [(c.command_id, c.device) for c in want]


def test_the_encoder_refuses_what_the_schema_refuses(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> None:
    codec = parts[0]
    d = _decision(site, domain, keys, parts)
    encoder = CommandEncoder(site, codec)
    for bad in (np.nan, np.inf, 2e6):
        applied = np.array([0.0, bad, 0.0])
        broken = dataclasses.replace(d, report=dataclasses.replace(d.report, applied_kw=applied))
        with pytest.raises(BridgeError, match=r"bus2-battery: action\.power_kw"):
            encoder.encode(broken, SLOT + 1, NOW_MS, NOW_MS + 900_000)
    with pytest.raises(BridgeError, match="expires_ts"):
        encoder.encode(d, SLOT + 1, NOW_MS, 2**53)


def test_tracker_follows_acks_to_their_end(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> None:
    cmds = commands_for(
        _decision(site, domain, keys, parts), site, parts[0], SLOT + 1, NOW_MS, NOW_MS + 1000
    )
    tracker = CommandTracker()
    for c in cmds:
        tracker.sent(c)

    def ack(i: int, status: AckStatus, seq: int) -> Ack:
        return Ack(
            command_id=cmds[i].command_id,
            device=cmds[i].device,
            bd_seq=1,
            seq=seq,
            ts=NOW_MS,
            status=status,
            applied=1.0 if status is AckStatus.APPLIED else None,
        )

    assert tracker.on_ack(ack(0, AckStatus.ACCEPTED, 1)).state is CommandState.ACCEPTED  # type: ignore[union-attr]
    assert tracker.on_ack(ack(0, AckStatus.APPLIED, 2)).state is CommandState.APPLIED  # type: ignore[union-attr]
    late = tracker.on_ack(ack(0, AckStatus.ACCEPTED, 3))  # out of order: stays applied
    assert late is not None and late.state is CommandState.APPLIED
    tracker.on_ack(ack(1, AckStatus.REJECTED, 1))
    wrong = Ack(
        command_id=cmds[2].command_id,
        device="bus1-meter",
        bd_seq=1,
        seq=1,
        ts=0,
        status=AckStatus.APPLIED,
    )
    assert tracker.on_ack(wrong) is None and tracker.unknown_acks == 1
    assert len(tracker.unanswered()) == len(cmds) - 2
    expired = tracker.expire(NOW_MS + 1000)
    assert len(expired) == len(cmds) - 2
    assert tracker.finished == {
        CommandState.APPLIED: 1,
        CommandState.REJECTED: 1,
        CommandState.EXPIRED: len(cmds) - 2,
    }
    assert not tracker.commands


def test_a_slot_tracked_as_one_record_answers_as_commands_one_by_one(
    site: SiteManifest,
    domain: ReadingDomain,
    keys: dict[str, bytes],
    parts: tuple[Codec, ObservationBuilder, Shield],
) -> None:
    """`sent_encoded` keeps a slot in one record; every ack, re-send, expiry and question must
    answer as `sent` command by command does."""
    codec = parts[0]
    d = _decision(site, domain, keys, parts)
    encoder = CommandEncoder(site, codec)
    single, batch = CommandTracker(), CommandTracker()
    for slot, expires in ((SLOT + 1, NOW_MS + 1000), (SLOT + 2, NOW_MS + 5000)):
        for c in commands_for(d, site, codec, slot, NOW_MS, expires):
            single.sent(c)
        batch.sent_encoded(encoder.encode(d, slot, NOW_MS, expires))
    ids = list(single.commands)
    assert list(batch.commands) == ids
    rng = np.random.default_rng(3)
    for seq in range(60):
        cid = ids[int(rng.integers(len(ids)))]
        device = single.commands[cid].device
        if seq % 9 == 0:
            device = "bus1-meter"  # not the command's device: unknown
        if seq % 13 == 0:
            cid = f"{SLOT + 7}.{device}.pv_curtailment"  # never sent: unknown
        status = [AckStatus.ACCEPTED, AckStatus.APPLIED, AckStatus.REJECTED][seq % 3]
        ack = Ack(
            command_id=cid, device=device, bd_seq=1, seq=seq, ts=NOW_MS, status=status,
            applied=0.5 if status is AckStatus.APPLIED else None,
            reason="over its limit" if status is AckStatus.REJECTED else None,
        )  # fmt: skip
        assert single.on_ack(ack) == batch.on_ack(ack)
        if seq == 30:  # a restart's re-send of the first slot: states are kept
            batch.sent_encoded(encoder.encode(d, SLOT + 1, NOW_MS, NOW_MS + 1000))
    assert single.commands == batch.commands
    assert single.unanswered() == batch.unanswered()
    assert single.expire(NOW_MS + 1000) == batch.expire(NOW_MS + 1000)
    assert (single.finished, single.unknown_acks) == (batch.finished, batch.unknown_acks)
    assert single.commands == batch.commands
    assert batch.finished[CommandState.EXPIRED] > 0 and single.unknown_acks > 0
    for cid, tracked in list(batch.commands.items()):  # the second slot all answered: forgotten
        ack = Ack(
            command_id=cid, device=tracked.device, bd_seq=1, seq=99, ts=NOW_MS,
            status=AckStatus.APPLIED,
        )  # fmt: skip
        assert single.on_ack(ack) == batch.on_ack(ack)
    assert single.expire(NOW_MS + 1001) == batch.expire(NOW_MS + 1001) == []
    assert not batch.commands and not single.commands
    assert single.finished == batch.finished
