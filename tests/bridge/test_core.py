"""BridgeCore without a broker: bytes in, publishes and outbox work out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.baselines import IdlePolicy
from bridge.core import BridgeCore, ChainWork, Publish
from bridge.decision import FallbackReason, Source
from bridge.messages import Command, Rebirth, decode
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.validation import RejectReason, TelemetryValidator, ValidationLimits
from tests.bridge.helpers import GENESIS, NOW_MS, SLOT, birth, telemetry


class NaNPolicy:
    name = "nan"

    def predict(self, obs: np.ndarray) -> np.ndarray:
        return np.full(8, np.nan, dtype=np.float32)


def _core(
    site: SiteManifest, domain: ReadingDomain, policy: object, mode: str = "live"
) -> BridgeCore:
    v = TelemetryValidator(site, domain, ValidationLimits(genesis=GENESIS))
    return BridgeCore(site, v, policy, mode=mode)  # type: ignore[arg-type]


def _feed(
    core: BridgeCore, site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> list[Publish | ChainWork]:
    out: list[Publish | ChainWork] = []
    for d in site.devices:
        core.handle(f"mgv1/site1/DBIRTH/{d.id}", birth(site, d.id), NOW_MS)
        msg = telemetry(site, domain, keys[d.id], d.id)
        out += core.handle(f"mgv1/site1/DDATA/{d.id}", json.dumps(msg).encode(), NOW_MS)
    return out


def test_readings_become_idempotent_outbox_work(
    site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    core = _core(site, domain, IdlePolicy(site.make_codec()))
    work = [w for w in _feed(core, site, domain, keys) if isinstance(w, ChainWork)]
    assert {w.key for w in work} == {
        f"reading:{d.id}:{SLOT}" for d in site.devices if d.kind.value in ("meter", "battery")
    }
    meter = next(w for w in work if w.key.startswith("reading:bus1-meter"))
    device = site.device("bus1-meter")
    assert device is not None and meter.args[0] == (device.address, SLOT, 300, 0)
    assert meter.fn == "submitReading" and "DeviceRegistrySlotNotEnded" in meter.retry_on


def test_a_reading_from_a_fast_clock_waits_in_the_outbox_for_its_slot_to_end(
    site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    """A meter a slot ahead reports slot SLOT + 2 while the bridge is in SLOT + 1: not acted on,
    but queued with the registry's "slot not ended" as a "not yet", so the outbox holds it
    (durably) until the chain's slot has ended."""
    core = _core(site, domain, IdlePolicy(site.make_codec()))
    core.handle("mgv1/site1/DBIRTH/bus1-meter", birth(site, "bus1-meter"), NOW_MS)
    msg = telemetry(site, domain, keys["bus1-meter"], "bus1-meter", slot=SLOT + 2)
    [work] = core.handle("mgv1/site1/DDATA/bus1-meter", json.dumps(msg).encode(), NOW_MS)
    assert isinstance(work, ChainWork) and work.key == f"reading:bus1-meter:{SLOT + 2}"
    assert work.retry_on == ("DeviceRegistrySlotNotEnded",)
    assert core.validator.rejected == {RejectReason.FUTURE: 1} and not core.state.latest


def test_telemetry_without_a_session_asks_for_a_rebirth(
    site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    core = _core(site, domain, IdlePolicy(site.make_codec()))
    msg = telemetry(site, domain, keys["bus1-pv"], "bus1-pv")
    out = core.handle("mgv1/site1/DDATA/bus1-pv", json.dumps(msg).encode(), NOW_MS)
    assert (
        len(out) == 1 and isinstance(out[0], Publish) and out[0].topic == "mgv1/site1/DCMD/bus1-pv"
    )
    assert isinstance(decode(Command, out[0].payload).action, Rebirth)
    assert core.validator.rejected == {RejectReason.NO_SESSION: 1}
    # A meter out of session: rebirth asked, and its validly signed reading still relayed.
    msg = telemetry(site, domain, keys["bus1-meter"], "bus1-meter")
    out = core.handle("mgv1/site1/DDATA/bus1-meter", json.dumps(msg).encode(), NOW_MS)
    assert isinstance(out[0], Publish) and isinstance(out[1], ChainWork)
    assert out[1].key == f"reading:bus1-meter:{SLOT}" and core.validator.relayed_readings == 1
    assert core.handle("not/a/topic", b"", NOW_MS) == []
    assert core.validator.rejected[RejectReason.MALFORMED] == 1


def test_nan_policy_falls_back_and_shadow_mode_sends_nothing(
    site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    core = _core(site, domain, NaNPolicy(), mode="shadow")
    _feed(core, site, domain, keys)
    decision, published = core.decide(SLOT + 1, NOW_MS)
    assert decision.source is Source.FALLBACK and decision.reason is FallbackReason.NON_FINITE
    assert published == [] and core.stats.fallbacks == {FallbackReason.NON_FINITE: 1}
    assert np.isfinite(decision.action).all()
    live = _core(site, domain, NaNPolicy())
    _feed(live, site, domain, keys)
    _, published = live.decide(SLOT + 1, NOW_MS)
    assert len(published) == 7 and live.stats.commands_sent == 7
    assert len(live.tracker.unanswered()) == 7


def test_a_stale_reading_is_still_queued_for_the_chain_but_not_used_for_control(
    site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes]
) -> None:
    core = _core(site, domain, IdlePolicy(site.make_codec()))
    core.handle("mgv1/site1/DBIRTH/bus1-meter", birth(site, "bus1-meter"), NOW_MS)
    old = telemetry(site, domain, keys["bus1-meter"], "bus1-meter", slot=SLOT - 4)
    out = core.handle("mgv1/site1/DDATA/bus1-meter", json.dumps(old).encode(), NOW_MS)
    assert [w.key for w in out if isinstance(w, ChainWork)] == [f"reading:bus1-meter:{SLOT - 4}"]
    assert core.validator.rejected == {RejectReason.STALE: 1}
    assert "bus1-meter" not in core.state.latest  # the old metrics steer nothing


def test_a_metrics_port_in_use_is_refused_naming_the_field(
    site: SiteManifest, domain: ReadingDomain
) -> None:
    """A shadow started on the live bridge's config finds its metrics port taken: a clear
    ConfigError naming `metrics_port` (and `--metrics-port`), not a traceback."""
    import socket

    from bridge.errors import ConfigError
    from bridge.metrics import BridgeMetrics

    core = _core(site, domain, IdlePolicy(site.make_codec()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigError, match=r"metrics_port: expected a free TCP port.*--metrics-port"
        ):
            BridgeMetrics(core).serve(port)
