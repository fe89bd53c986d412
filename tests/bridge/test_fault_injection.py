"""The simulator's fault injection (`bridge.faults`) against the bridge's validator, sans I/O.

A fleet reports 40 slots with every fault on at once; what the devices send goes through the
validator as the bridge's receive loop would. Each injected fault must be refused under its
own reason and counted (a drop-out and a slow clock as `stale`, a truncated copy as
`malformed`, a forgery as `bad_signature`), a frozen sensor must pass (it is not the bridge's to
notice), and every reading the meters signed must reach the chain's queue: accepted or relayed.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from bridge.clock import SlotClock
from bridge.errors import ConfigError
from bridge.faults import Fault, FaultInjector, FaultPlan
from bridge.messages import Telemetry
from bridge.signing import ReadingDomain
from bridge.simulator import Fleet, Profiles
from bridge.site import SiteManifest
from bridge.validation import Rejected, RejectReason, TelemetryValidator, ValidationLimits
from tests.bridge.helpers import GENESIS, SEED, SLOT


def _profiles() -> Profiles:
    t = np.arange(96)
    load = np.stack([1.2 + 0.3 * np.sin(t / 15), 0.9 + 0.2 * np.cos(t / 11)], axis=1)
    pv = np.clip(np.sin((t - 24) / 48 * np.pi), 0.0, None)[:, None] * np.array([[2.0, 1.5]])
    return Profiles(load, pv)


def test_every_injected_fault_is_refused_by_its_reason_and_no_reading_is_lost(
    site: SiteManifest, domain: ReadingDomain
) -> None:
    clock = SlotClock(GENESIS, 900.0)
    fleet = Fleet(site, _profiles(), domain, SEED, clock=clock)
    validator = TelemetryValidator(site, domain, ValidationLimits(genesis=GENESIS))
    start_ms = int(clock.start(SLOT) * 1000)
    for device, dev in fleet.devices.items():
        _, (_, birth) = dev.connect(start_ms)
        validator.on_birth(device, birth, start_ms)
    plan = FaultPlan.parse([f"{f.value}=0.1" for f in Fault])
    keys = {d: dev.key for d, dev in fleet.devices.items()}
    injector = FaultInjector(plan, domain, keys, SEED)
    delivered: Counter[tuple[str, int]] = Counter()
    messages = 0

    def receive(sent: list[tuple[str, str, bytes]], now_ms: int) -> None:
        nonlocal messages
        for device, _, payload in sent:
            messages += 1
            out = validator.on_telemetry(device, payload, now_ms)
            msg = out.relay if isinstance(out, Rejected) else out
            if isinstance(msg, Telemetry) and msg.reading is not None:
                delivered[device, msg.reading.nonce] += 1

    for slot in range(SLOT + 1, SLOT + 41):
        now_ms = int(clock.start(slot) * 1000) + 200
        receive(injector.apply(fleet.telemetry(slot - 1, now_ms)), now_ms)
    receive(injector.flush(), now_ms)

    injected = injector.injected
    assert all(injected[f] > 0 for f in Fault), injected
    rejected = {r.value: n for r, n in validator.rejected.items() if n}
    assert rejected[RejectReason.MALFORMED] == injected[Fault.MALFORMED], (rejected, injected)
    assert rejected[RejectReason.BAD_SIGNATURE] == injected[Fault.FORGED], (rejected, injected)
    # A dropped message comes a slot late, a slow clock's is 5 minutes old: both `stale`
    # (once each, a message can be both).
    stale = rejected[RejectReason.STALE]
    assert max(injected[Fault.DROPOUT], injected[Fault.CLOCK_SKEW]) <= stale
    assert stale <= injected[Fault.DROPOUT] + injected[Fault.CLOCK_SKEW]
    assert set(rejected) == {"malformed", "bad_signature", "stale"}, rejected
    # Every message counted: accepted or refused under one reason.
    assert validator.telemetry_accepted + sum(rejected.values()) == messages
    # 0 lost, 0 twice: every meter reading signed reached the queue exactly once.
    meters = [p.meter for p in site.prosumers]
    signed = {(m, n) for m in meters for n in range(fleet.devices[m].nonce)}
    assert set(delivered) == signed and set(delivered.values()) == {1}, delivered
    assert validator.relayed_readings > 0


def test_fault_options_name_what_is_expected() -> None:
    plan = FaultPlan.parse(["dropout=0.05", "forged=1"], skew_s=30)
    assert plan.rates == {Fault.DROPOUT: 0.05, Fault.FORGED: 1.0} and plan.skew_s == 30
    with pytest.raises(ConfigError, match="--fault: expected KIND=RATE with KIND one of dropout"):
        FaultPlan.parse(["drop=0.1"])
    with pytest.raises(ConfigError, match=r"--fault: expected a rate in \[0, 1\]"):
        FaultPlan.parse(["stuck=2"])
    with pytest.raises(ConfigError, match=r"--fault: expected a rate in \[0, 1\]"):
        FaultPlan.parse(["stuck"])
