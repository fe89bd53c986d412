"""Faults the device simulator injects on purpose (`devices simulate --fault KIND=RATE`).

A bridge that runs for months meets devices that go quiet, sensors that freeze, clocks that
drift, firmware that sends garbage and neighbours that forge. The simulator can play each of
them, at a rate per device message and reproducibly (seeded), so a site can be rehearsed
against them end to end and every refusal shows up in the bridge's counters by reason:

* `dropout`: a device's telemetry for a slot does not go out then; the device sends it with
  its next slot's, oldest first, as a device that lost its uplink flushes its queue (what else
  it publishes meanwhile, its command acknowledgements, queues behind it: `hold`, so its
  sequence numbers still reach the bridge in order). The bridge refuses it as `stale` (too old
  to steer by) but still relays its signed reading, so nothing owed to the chain is lost.
* `stuck`: the device repeats its previous slot's metrics (a frozen sensor); its signed reading
  stays the real one (the meter's energy register does not freeze with its display).
* `clock_skew`: the message's `ts` is off by `skew_s` (the device's clock). Beyond the bridge's
  `timing.max_age_s` behind it is `stale`, beyond `max_clock_skew_s` ahead it is `future`; either
  way it is not acted on but its signed reading is relayed (its `slot` is the device's real one;
  a reading for a slot not yet ended would wait in the bridge's outbox until it has).
* `malformed`: besides the genuine message, a truncated copy of it (broken JSON): `malformed`.
* `forged`: before the genuine message, a copy whose reading is signed by another device's key,
  as a neighbour trying to bill its energy to this meter would: `bad_signature`. Only devices
  with a reading can be forged; the copy moves no session state, so the genuine one still lands.

Faults can meet in one message, and the bridge then counts it once, by the first of its checks
that fails (docs/iot.md, Validation): a skewed message that is also held back by a drop-out
is `stale` (it arrives a slot late), and a forged copy of a skewed message is refused for its
time (`stale` or `future`) before its signature is looked at. The injector counts those
meetings apart (`SKEWED_DROPOUT`, `SKEWED_FORGERY`), so every refusal can be matched to what
was injected exactly, not within bounds.

The injector is sans-I/O: one slot's messages in, what the devices really send out.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from bridge.errors import ConfigError
from bridge.signing import ReadingDomain


class Fault(StrEnum):
    DROPOUT = "dropout"
    STUCK = "stuck"
    CLOCK_SKEW = "clock_skew"
    MALFORMED = "malformed"
    FORGED = "forged"


#: A skewed message that a drop-out also held back (counted in both `clock_skew` and `dropout`).
SKEWED_DROPOUT = "clock_skew+dropout"
#: A forged copy of a skewed message (counted in both `clock_skew` and `forged`).
SKEWED_FORGERY = "clock_skew+forged"


@dataclass(frozen=True)
class FaultPlan:
    """Per device message, the chance of each fault; `skew_s` for `clock_skew`."""

    rates: Mapping[Fault, float] = field(default_factory=dict)
    skew_s: float = -300.0
    """Seconds added to a skewed message's `ts`: the default, a clock 5 minutes slow, is
    refused as `stale` with its reading relayed; a positive skew beyond the bridge's
    `max_clock_skew_s` is refused as `future`, its reading relayed all the same."""

    @classmethod
    def parse(cls, specs: Iterable[str], skew_s: float = -300.0) -> FaultPlan:
        """`KIND=RATE` each (`dropout=0.05`); errors name `--fault` and what was expected."""
        rates: dict[Fault, float] = {}
        for spec in specs:
            kind, _, rate = spec.partition("=")
            try:
                fault = Fault(kind.strip())
            except ValueError:
                raise ConfigError(
                    f"--fault: expected KIND=RATE with KIND one of "
                    f"{', '.join(f.value for f in Fault)}, got {spec!r}"
                ) from None
            try:
                value = float(rate)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--fault: expected a rate in [0, 1] after {kind}=, got {spec!r}")
            rates[fault] = value
        return cls(rates, skew_s)


class FaultInjector:
    """Applies a plan to each slot's telemetry; counts what it injected, by fault."""

    def __init__(
        self, plan: FaultPlan, domain: ReadingDomain, keys: Mapping[str, bytes], seed: str = "0"
    ) -> None:
        """`keys`: every device's key; a forgery signs with the next device's."""
        self.plan = plan
        self.domain = domain
        self.keys = dict(keys)
        self.rng = random.Random(f"faults:{seed}")
        self.injected: Counter[str] = Counter()
        """By `Fault`, and by `SKEWED_DROPOUT` / `SKEWED_FORGERY` where two met in a message."""
        self._held: dict[str, list[tuple[str, bytes]]] = {}
        self._metrics: dict[str, object] = {}
        ids = sorted(self.keys)
        self._forger = {d: ids[(i + 1) % len(ids)] for i, d in enumerate(ids)}

    def _hit(self, fault: Fault) -> bool:
        rate = self.plan.rates.get(fault, 0.0)
        return rate > 0.0 and self.rng.random() < rate

    def apply(self, sent: Iterable[tuple[str, str, bytes]]) -> list[tuple[str, str, bytes]]:
        """One slot's (device, topic, payload) as generated -> as the devices send them."""
        out: list[tuple[str, str, bytes]] = []
        for device, topic_text, payload in sent:
            msg = json.loads(payload)
            payload, skewed = self._stuck_and_skewed(device, msg, payload)
            held = self._held.pop(device, [])
            out.extend((device, t, p) for t, p in held)  # a reconnecting device flushes first
            if self._hit(Fault.DROPOUT):
                self.injected[Fault.DROPOUT] += 1
                self.injected[SKEWED_DROPOUT] += skewed
                self._held[device] = [(topic_text, payload)]
                continue
            if msg.get("reading") is not None and self._hit(Fault.FORGED):
                self.injected[Fault.FORGED] += 1
                self.injected[SKEWED_FORGERY] += skewed
                out.append((device, topic_text, self._forge(device, payload)))
            out.append((device, topic_text, payload))
            if self._hit(Fault.MALFORMED):
                self.injected[Fault.MALFORMED] += 1
                out.append((device, topic_text, payload[: len(payload) // 2]))
        return out

    def hold(self, device: str, topic_text: str, payload: bytes) -> list[tuple[str, str, bytes]]:
        """Anything else the device publishes (a DACK): queued behind what a drop-out holds,
        else sent now (returned)."""
        held = self._held.get(device)
        if held is None:
            return [(device, topic_text, payload)]
        held.append((topic_text, payload))
        return []

    @property
    def holding(self) -> bool:
        """Whether a dropped-out device still holds telemetry (for `flush`)."""
        return bool(self._held)

    def flush(self) -> list[tuple[str, str, bytes]]:
        """What devices still hold when the run ends: they send it before leaving, at the slot
        boundary after the last (the simulator waits for it), so it is late as every
        drop-out's."""
        held, self._held = self._held, {}
        return [(d, t, p) for d, queued in held.items() for t, p in queued]

    def _stuck_and_skewed(
        self, device: str, msg: dict[str, object], payload: bytes
    ) -> tuple[bytes, bool]:
        """The payload as sent, and whether its clock was skewed."""
        changed = skewed = False
        previous = self._metrics.get(device)
        self._metrics[device] = msg["metrics"]
        if previous is not None and self._hit(Fault.STUCK):
            self.injected[Fault.STUCK] += 1
            msg["metrics"] = previous
            self._metrics[device] = previous
            changed = True
        if self._hit(Fault.CLOCK_SKEW):
            self.injected[Fault.CLOCK_SKEW] += 1
            ts = msg["ts"]
            assert isinstance(ts, int)
            msg["ts"] = max(0, ts + round(self.plan.skew_s * 1000))
            changed = skewed = True
        return (json.dumps(msg, separators=(",", ":")).encode() if changed else payload), skewed

    def _forge(self, device: str, payload: bytes) -> bytes:
        msg = json.loads(payload)
        r = msg["reading"]
        sig = self.domain.sign(
            self.keys[self._forger[device]], r["slot"], r["energy_wh"], r["nonce"]
        )
        r["signature"] = "0x" + sig.hex()
        return json.dumps(msg, separators=(",", ":")).encode()
