"""Misbehaving devices on the real stack: injected faults and fuzzed payloads through mosquitto
(TLS, a password per device, the ACL) to an in-process bridge relaying to anvil.

The sans-I/O tests (test_fault_injection, test_fuzz) prove the validator's answers; these prove
the shells keep them: what a device publishes reaches the bridge once and is counted under the
reason the validator gives, and the readings the meters signed still land on chain exactly once
(the `_check` of test_faults: registry nonces moved by exactly what was signed, no (device,
slot) twice, every slot settled once, no device limit broken).

* Every fault of `bridge.faults` at 10 % with a clock 30 s fast (beyond `max_clock_skew_s`, so
  `future`): the refusals by reason must match what the fleet says it injected
  (`expected_refusals`).
* 10,000 hypothesis-made payloads (in every run, ~30 s) published on meters' topics with the
  meters' own credentials during a live run: malformed (random bytes or JSON, a genuine
  message cut short), forged (the live session's numbers, a reading signed by another device's
  key or carrying junk) and replayed (a genuine message again, byte for byte). Each is counted
  once under its reason; payloads on another device's topic are stopped by the broker's ACL
  and never counted.

On a loaded machine a message can reach the bridge more than a slot late and count as `stale`
instead (a genuine one still has its reading relayed): the counts that late delivery cannot
change are asserted exactly, the others within the `stale` surplus.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter, defaultdict
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bridge.clock import SlotClock
from bridge.config import load_deployment
from bridge.faults import Fault, FaultPlan
from bridge.mqtt import MqttLink
from bridge.runner import BridgeRunner
from bridge.signing import ReadingDomain
from bridge.site_builder import device_key
from bridge.topics import MessageType, topic
from bridge.validation import ValidationLimits
from tests.bridge.test_fault_injection import expected_refusals
from tests.bridge.test_faults import Outcome, _check, _in_process
from tests.bridge.test_fuzz import json_values
from tests.bridge.test_run import SLOT_S, Setup, setup

__all__ = ["setup"]  # the module-scoped stack of test_run, one per module and worker

#: A device clock 30 s fast: 20 accelerated slots, far beyond `max_clock_skew_s` (5 s).
SKEW_S = 30.0
#: Hostile payloads per live run (BRIDGE_BROKER_FUZZ=N to change).
FUZZ = int(os.environ.get("BRIDGE_BROKER_FUZZ", "10000"))
#: Payloads each meter's credentials publish on the next meter's topic (the ACL drops them).
CROSS_TOPIC = 3


async def _nothing(runner: BridgeRunner) -> None:
    return None


def _late_tolerant(rejected: dict[str, int], expected: dict[str, int], exact: set[str]) -> None:
    """`rejected` against `expected`: the reasons in `exact` equal; `stale` may exceed its
    expectation by what arrived late, and only the refusals late delivery turns into `stale`
    (`bad_signature`, checked after the time) may fall short, by no more in all."""
    for reason in exact:
        assert rejected.get(reason, 0) == expected.get(reason, 0), (reason, rejected, expected)
    late = rejected.get("stale", 0) - expected.get("stale", 0)
    assert late >= 0, (rejected, expected)
    short = expected.get("bad_signature", 0) - rejected.get("bad_signature", 0)
    assert 0 <= short <= late, (rejected, expected)


def test_every_fault_the_devices_inject_is_counted_through_the_broker_and_nothing_is_lost(
    setup: Setup,
) -> None:
    s = setup
    plan = FaultPlan.parse([f"{f.value}=0.1" for f in Fault], skew_s=SKEW_S)
    out = asyncio.run(_in_process(s, 8, _nothing, faults=plan))
    reasons = {"stale", "future", "malformed", "bad_signature", "implausible", "replayed"}
    rejected = _check(s, out, reasons)  # 0 lost, 0 twice, 0 limit violations
    injected, summary = out.fleet.faults, out.summaries[-1]
    assert all(injected.get(f, 0) > 0 for f in Fault), injected
    expected = expected_refusals(injected, SKEW_S, SLOT_S, ValidationLimits())
    # A frozen display may contradict the reading its meter signed: refused for control, the
    # reading relayed; only a stuck message can be.
    assert rejected.get("implausible", 0) <= injected[Fault.STUCK], (rejected, injected)
    _late_tolerant(rejected, expected, exact={"malformed", "future"})
    # A fast clock's meters were refused for control, their readings relayed (all on chain).
    assert expected["future"] > 0 and summary["relayed_readings"] > 0
    # Every message the devices sent counted once: accepted or refused under one reason
    # (a QoS 1 duplicate, were there one, is a `replayed` more).
    sent = out.fleet.telemetry_sent + injected[Fault.MALFORMED] + injected[Fault.FORGED]
    counted = int(summary["telemetry_accepted"]) + sum(rejected.values())
    assert counted - rejected.get("replayed", 0) == sent, (counted, sent, rejected)
    print(f"\ninjected {dict(injected)}\nrejected {rejected}\nexpected {expected}")
    print(f"readings signed {out.fleet.readings_signed}, relayed {summary['relayed_readings']}")


# ---- fuzzing through the broker ----------------------------------------------------------

#: One hostile payload to make: its kind and the draws it is made from.
Spec = tuple[str, int, Any]

SPECS = st.one_of(
    st.tuples(
        st.just("malformed"),
        st.integers(0, 10**6),
        st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
    ),
    st.tuples(st.just("truncated"), st.integers(0, 10**6), st.floats(0.0, 0.999)),
    st.tuples(
        st.just("forged"),
        st.integers(0, 10**6),
        st.none() | st.binary(min_size=65, max_size=65),  # None: another device's key
    ),
    st.tuples(st.just("replayed"), st.integers(0, 10**6), st.integers(0, 10**6)),
)


def hostile_specs(n: int) -> list[Spec]:
    """`n` payload recipes drawn by hypothesis (reproducibly); made into bytes during the run,
    where a forgery takes the live session's numbers and a replay a message really sent."""
    drawn: list[Spec] = []

    @settings(
        max_examples=n, database=None, deadline=None, derandomize=True,
        phases=[Phase.generate], suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(SPECS)
    def collect(spec: Spec) -> None:
        drawn.append(spec)

    collect()
    return drawn


class Attacker:
    """Meters' own broker credentials in the wrong hands: publishes hostile payloads on their
    topics, and keeps what it publishes by kind (the bridge must count exactly that)."""

    def __init__(self, s: Setup, runner: BridgeRunner) -> None:
        self.s = s
        self.runner = runner
        self.meters = [p.meter for p in s.site.prosumers]
        dep = load_deployment(s.files / "deployment.json")
        self.domain = ReadingDomain(dep.chain_id, dep.addresses["DeviceRegistry"])
        self.clock = SlotClock(s.genesis, SLOT_S)
        self.links: dict[str, MqttLink] = {}
        self.recorder: MqttLink | None = None
        self.genuine: dict[str, list[bytes]] = defaultdict(list)
        """What the meters sent before the attack (the tap would hear the attack too)."""
        self.attacking = False
        self.sent: Counter[str] = Counter()
        self._serial = 0

    async def connect(self) -> None:
        b = self.s.broker
        for meter in self.meters:
            link = MqttLink(
                b.url, client_id=f"{meter}-attacker", username=meter,
                password=b.passwords[meter], ca_file=b.ca_file,
            )  # fmt: skip
            await link.connect()
            self.links[meter] = link
        # What the meters really send, to replay and to cut short (the bridge's user may read
        # every topic: a tap on the wire).
        self.recorder = MqttLink(
            b.url, client_id="attacker-tap", username="bridge",
            password=b.passwords["bridge"], ca_file=b.ca_file,
        )  # fmt: skip
        one = topic(self.s.site.site, MessageType.DDATA, self.meters[0])
        await self.recorder.connect([one.rsplit("/", 1)[0] + "/+"])

    async def record(self) -> None:
        assert self.recorder is not None
        while True:
            msg = await self.recorder.receive()
            if msg is not None and not self.attacking:
                self.genuine[msg.topic.rsplit("/", 1)[1]].append(msg.payload)

    def payload(self, spec: Spec) -> tuple[str, bytes]:
        """The meter whose credentials send it, and the bytes."""
        kind, pick, draw = spec
        meter = self.meters[pick % len(self.meters)]
        genuine = self.genuine[meter]
        self.sent[kind] += 1
        if kind == "malformed":
            return meter, draw
        if kind == "truncated":
            whole = genuine[pick % len(genuine)]
            return meter, whole[: int(len(whole) * draw)]
        if kind == "replayed":
            return meter, genuine[draw % len(genuine)]
        return meter, self._forgery(meter, genuine[-1], draw)

    def _forgery(self, meter: str, genuine: bytes, junk: bytes | None) -> bytes:
        """A message as the meter's next could be (its live session, fresh numbers, the
        current slot), with a reading signed by the next meter's key, or junk."""
        v = self.runner.core.validator
        session = v.sessions[meter]
        self._serial += 1
        msg = json.loads(genuine)
        now = time.time()
        slot = self.clock.slot(now)
        nonce = v.last_nonce.get(meter, 0) + 10**9 + self._serial
        energy = int(msg["reading"]["energy_wh"])
        if junk is None:
            other = self.meters[(self.meters.index(meter) + 1) % len(self.meters)]
            junk = self.domain.sign(device_key("0", other), slot, energy, nonce)
        msg.update(bd_seq=session.bd_seq, seq=session.last_seq + 10**9 + self._serial)
        msg.update(ts=int(now * 1000), slot=slot)
        msg["reading"].update(slot=slot, nonce=nonce, signature="0x" + junk.hex())
        return json.dumps(msg, separators=(",", ":")).encode()

    async def attack(self, specs: list[Spec], chunk: int = 100) -> None:
        site = self.s.site.site
        self.attacking = True
        for i in range(0, len(specs), chunk):
            for spec in specs[i : i + chunk]:
                meter, raw = self.payload(spec)
                self.links[meter].publish(topic(site, MessageType.DDATA, meter), raw)
            await asyncio.sleep(0.01)  # the bridge, on this loop too, reads meanwhile
        # Each meter's credentials on another meter's topic: the broker's ACL must drop them.
        for k, meter in enumerate(self.meters):
            target = self.meters[(k + 1) % len(self.meters)]
            for _ in range(CROSS_TOPIC):
                self.links[meter].publish(topic(site, MessageType.DDATA, target), b"{not json")
        for link in self.links.values():
            assert await link.drain(30.0) == 0

    async def close(self) -> None:
        for link in [*self.links.values(), self.recorder]:
            if link is not None:
                await link.close()


async def _fuzz_run(s: Setup, specs: list[Spec]) -> tuple[Outcome, Counter[str]]:
    stop = asyncio.Event()
    sent: Counter[str] = Counter()

    async def attack(runner: BridgeRunner) -> None:
        attacker = Attacker(s, runner)
        await attacker.connect()
        recording = asyncio.create_task(attacker.record())
        started = time.monotonic()
        try:
            # Every meter has spoken (a message to replay) and the bridge took it.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                any(len(attacker.genuine[m]) < 1 for m in attacker.meters)
                or any(m not in runner.core.validator.last_nonce for m in attacker.meters)
            ):
                await asyncio.sleep(0.1)
            v = runner.core.validator
            before = sum(v.rejected.values())
            await attacker.attack(specs)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and sum(v.rejected.values()) - before < len(specs):
                await asyncio.sleep(0.1)
            # A few more slots of ordinary traffic: the genuine messages after the attack land.
            await asyncio.sleep(max(3 * SLOT_S, 7 * SLOT_S - (time.monotonic() - started)))
        finally:
            sent.update(attacker.sent)
            recording.cancel()
            await attacker.close()
            stop.set()

    out = await _in_process(s, None, attack, stop=stop)
    return out, sent


def _fuzz_through_the_broker(s: Setup, n: int) -> None:
    specs = hostile_specs(n)
    assert len(specs) >= 0.9 * n  # hypothesis drew (nearly) what was asked
    started = time.monotonic()
    out, sent = asyncio.run(_fuzz_run(s, specs))
    took = time.monotonic() - started
    assert sum(sent.values()) == len(specs)
    rejected = _check(s, out, {"stale", "malformed", "bad_signature", "replayed"})
    expected = {
        "malformed": sent["malformed"] + sent["truncated"],  # not one CROSS_TOPIC payload
        "bad_signature": sent["forged"],
        "replayed": sent["replayed"],
    }
    _late_tolerant(rejected, expected, exact={"malformed", "replayed"})
    assert "topic_mismatch" not in rejected and "no_session" not in rejected
    print(
        f"\n{len(specs)} hostile payloads in {took:.1f} s: sent {dict(sent)}, rejected {rejected}"
    )
    print(f"readings signed {out.fleet.readings_signed}, all on chain once")


def test_fuzzed_payloads_through_the_broker_are_counted_by_reason_and_lose_nothing(
    setup: Setup,
) -> None:
    _fuzz_through_the_broker(setup, FUZZ)
