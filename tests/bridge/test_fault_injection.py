"""The simulator's fault injection (`bridge.faults`) against the bridge's validator, sans I/O.

A fleet reports 40 slots with every fault on at once; what the devices send goes through the
validator as the bridge's receive loop would. Each injected fault must be refused under its
own reason and counted (a drop-out and a slow clock as `stale`, a fast clock as `future`, a
truncated copy as `malformed`, a forgery as `bad_signature`), a frozen sensor must pass (it is
not the bridge's to notice) unless its metrics contradict the reading its meter signed
(`implausible`, the reading relayed), and every reading the meters signed must reach the
chain's queue, once: accepted or relayed (a slow or fast clock's reading too). Where two
faults met in one message the injector says so, and the counts match exactly
(`expected_refusals`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import pytest

from bridge.clock import SlotClock
from bridge.errors import ConfigError
from bridge.faults import SKEWED_DROPOUT, SKEWED_FORGERY, Fault, FaultInjector, FaultPlan
from bridge.messages import Telemetry
from bridge.signing import ReadingDomain
from bridge.simulator import Fleet, Profiles
from bridge.site import SiteManifest
from bridge.validation import Rejected, TelemetryValidator, ValidationLimits
from tests.bridge.helpers import GENESIS, SEED, SLOT


def _profiles() -> Profiles:
    t = np.arange(96)
    load = np.stack([1.2 + 0.3 * np.sin(t / 15), 0.9 + 0.2 * np.cos(t / 11)], axis=1)
    pv = np.clip(np.sin((t - 24) / 48 * np.pi), 0.0, None)[:, None] * np.array([[2.0, 1.5]])
    return Profiles(load, pv)


def expected_refusals(
    injected: Mapping[str, int], skew_s: float, slot_s: float, limits: ValidationLimits
) -> dict[str, int]:
    """The bridge's refusals by reason for what the injector did, for a skew beyond `limits`
    either way and held messages that arrive one slot (`slot_s`) late. Each message counts
    once, by the first check it fails (time before signature): a forged copy of a skewed
    message is refused for its time, a held skewed one for its `ts` if the skew outruns the
    slot it was held (more than `max_clock_skew_s` ahead still: `future`), else as `stale`."""
    dropped, skewed = injected.get(Fault.DROPOUT, 0), injected.get(Fault.CLOCK_SKEW, 0)
    forged, skewed_forged = injected.get(Fault.FORGED, 0), injected.get(SKEWED_FORGERY, 0)
    skewed_held = injected.get(SKEWED_DROPOUT, 0)
    held_ahead = skewed_held if skew_s - slot_s > limits.max_clock_skew_s else 0
    in_slot = skewed - skewed_held + skewed_forged  # skewed messages sent in their own slot
    out = {
        "malformed": injected.get(Fault.MALFORMED, 0),
        "bad_signature": forged - skewed_forged,
        "stale": dropped - held_ahead + (in_slot if skew_s < 0 else 0),
        "future": held_ahead + (in_slot if skew_s > 0 else 0),
    }
    return {reason: n for reason, n in out.items() if n}


@pytest.mark.parametrize(
    ("skew_s", "rate"), [(-300.0, 0.1), (300.0, 0.1), (1_200.0, 0.1), (300.0, 0.3)]
)
def test_every_injected_fault_is_refused_by_its_reason_and_no_reading_is_lost(
    site: SiteManifest, domain: ReadingDomain, skew_s: float, rate: float
) -> None:
    """A clock 5 minutes slow (`stale`), 5 minutes fast or more than a slot fast (`future`,
    its `ts` only: the slot it reports is the real one); at 30 % faults meet in a message."""
    clock = SlotClock(GENESIS, 900.0)
    fleet = Fleet(site, _profiles(), domain, SEED, clock=clock)
    validator = TelemetryValidator(site, domain, ValidationLimits(genesis=GENESIS))
    start_ms = int(clock.start(SLOT) * 1000)
    for device, dev in fleet.devices.items():
        _, (_, birth) = dev.connect(start_ms)
        validator.on_birth(device, birth, start_ms)
    plan = FaultPlan.parse([f"{f.value}={rate}" for f in Fault], skew_s=skew_s)
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
    receive(injector.flush(), now_ms + 900_000)  # at the next boundary, as the simulator does

    injected = injector.injected
    assert all(injected[f] > 0 for f in Fault), injected
    rejected = {r.value: n for r, n in validator.rejected.items() if n}
    # Every message counted: accepted or refused under one reason.
    assert validator.telemetry_accepted + sum(rejected.values()) == messages
    # A frozen display may disagree with the reading its meter signed: refused for control,
    # the reading relayed (below). Only a stuck message can.
    assert rejected.pop("implausible", 0) <= injected[Fault.STUCK]
    expected = expected_refusals(injected, skew_s, 900.0, validator.limits)
    assert rejected == expected, (rejected, injected)
    if rate > 0.1:  # the meetings the accounting above is exact about did happen
        assert injected[SKEWED_DROPOUT] > 0 and injected[SKEWED_FORGERY] > 0, injected
    assert rejected["malformed"] == injected[Fault.MALFORMED]
    assert rejected["bad_signature"] + injected[SKEWED_FORGERY] == injected[Fault.FORGED]
    assert ("future" in rejected) is (skew_s > 0)
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


def test_a_dropped_out_device_sends_its_acknowledgements_after_what_it_holds(
    site: SiteManifest, domain: ReadingDomain
) -> None:
    """A device whose uplink is down sends nothing in between: its DACKs queue behind the held
    telemetry, so the bridge sees its sequence numbers in order (a DACK first would make the
    held DDATA a `replayed`, not a `stale` whose reading is relayed)."""
    keys = {d.id: b"\x01" * 32 for d in site.devices}
    injector = FaultInjector(FaultPlan({Fault.DROPOUT: 1.0}), domain, keys, SEED)
    data = ("bus1-battery", "mgv1/site1/DDATA/bus1-battery", b'{"seq":1,"metrics":{}}')
    assert injector.apply([data]) == [] and injector.holding
    ack = ("mgv1/site1/DACK/bus1-battery", b'{"seq":2}')
    assert injector.hold("bus1-battery", *ack) == []  # behind the held DDATA
    assert injector.hold("bus1-pv", "mgv1/site1/DACK/bus1-pv", b"{}") == [
        ("bus1-pv", "mgv1/site1/DACK/bus1-pv", b"{}")  # not dropped out: goes now
    ]
    assert injector.flush() == [data, ("bus1-battery", *ack)] and not injector.holding
