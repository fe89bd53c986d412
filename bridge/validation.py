"""Telemetry validation: every device message is accepted whole or refused with one counted reason.

Plain functions over bytes and the clock value the shell passes in, so every rule is tested
without a broker, and fuzzed. The checks run cheapest first and the signature (a public-key
recovery) last; session state (last `seq`, last reading nonce) only moves once a message has
passed every check, so a forged message cannot advance it and lock the real device out.

Timing is a rule for *control*, not for *settlement*: telemetry too old to act on is refused
(counted `stale`), so is telemetry stamped ahead of the bridge's clock (`future`: a device clock
running fast) and telemetry outside a live session (`no_session`), but a signed reading inside
any of them that passes every check of its own is still handed back (`Rejected.relay`) for the
chain, whose own reading window is the judge. Otherwise a bridge that was down for a few slots
would drop the readings the broker kept for it, and a meter with a fast clock would never be
metered: readings the chain never gets (the registry takes the device's later ones over the
gap, but each lost one is a slot of that meter settled without its reading).

A meter's reading that disagrees with the `net_kw` beside it (`implausible`, checked after the
signature) is relayed the same way: the signature makes the reading the device's word, the
metrics are more likely the wrong half (a frozen display), and the chain judges the reading on
its signature and cap alone.

A future reading for a slot that has not ended is not held here: the outbox holds it, durably,
since the registry's "slot not ended" is a "not yet" it retries (`BridgeCore._reading_work`).
Only a reading more than `ValidationLimits.max_reading_lead_slots` ahead of the bridge's
current slot is refused whole: it measures nothing yet, and relayed it would hold the meter's
later readings behind it in the outbox's lane until its slot ended, then have them refused as
not after it.

The session table (`sessions`, `last_nonce`) is what a restarted bridge needs to accept the
messages the broker delivers again; `dirty` names the devices whose entry changed since the
shell last persisted it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from bridge.errors import PayloadError
from bridge.messages import (
    Ack,
    BatteryMetrics,
    DeviceBirth,
    DeviceDeath,
    DeviceKind,
    MeterMetrics,
    PvMetrics,
    Telemetry,
    decode,
)
from bridge.signing import ReadingDomain
from bridge.site import SiteDevice, SiteManifest

#: Measured power may exceed a rating by this share (inverter tolerance, metering error).
RATING_TOLERANCE = 0.05
#: A signed reading may differ from net_kw x slot length by this much (Wh) or this share.
ENERGY_TOLERANCE_WH = 50
ENERGY_TOLERANCE_SHARE = 0.05


class RejectReason(StrEnum):
    """Why a device message was refused; one counter per reason (docs/iot.md, Validation)."""

    MALFORMED = "malformed"
    TOPIC_MISMATCH = "topic_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    WRONG_KIND = "wrong_kind"
    BIRTH_MISMATCH = "birth_mismatch"
    NO_SESSION = "no_session"
    REPLAYED = "replayed"
    STALE = "stale"
    FUTURE = "future"
    IMPLAUSIBLE = "implausible"
    BAD_SIGNATURE = "bad_signature"
    MISSING_READING = "missing_reading"


@dataclass(frozen=True)
class Rejected:
    """A refused message: the counted reason and a detail naming the field and expectation."""

    reason: RejectReason
    detail: str
    relay: Telemetry | None = None
    """A DDATA refused as stale, future, out of session, or `implausible` only because a meter's
    metrics disagree with its reading, whose signed reading passed every check of its own:
    relay the reading to the chain, do not act on the data."""


@dataclass
class Session:
    """What the bridge remembers of one device connection."""

    bd_seq: int
    last_seq: int = 0
    alive: bool = True
    missed: int = 0
    """Gaps in `seq`: messages the device sent that never arrived."""


@dataclass(frozen=True)
class ValidationLimits:
    """Time rules, in seconds of the bridge's clock."""

    max_age_s: float = 120.0
    """Telemetry older than this is stale (the bridge acts on what is true now)."""
    max_clock_skew_s: float = 5.0
    """Telemetry stamped further ahead than this comes from a skewed device clock."""
    slot_seconds: float = 900
    """Wall-clock slot length: 900 s as on the chain, shorter only in accelerated runs."""
    genesis: float = 0
    max_reading_lead_slots: int = 1
    """A `future` message's reading is relayed only for a slot at most this many slots after
    the bridge's current one (the outbox holds it until the chain's slot ends); one further
    ahead is refused whole. 1: a device clock up to two slots fast is still metered."""


class TelemetryValidator:
    """Decides on every device-published message; counts each refusal by reason."""

    def __init__(
        self, site: SiteManifest, domain: ReadingDomain, limits: ValidationLimits | None = None
    ) -> None:
        self.site = site
        self._devices = {d.id: d for d in site.devices}
        """The manifest's index as a plain dict (its private attribute costs a pydantic
        `__getattr__` per look-up, on every message)."""
        self.domain = domain
        self.limits = limits or ValidationLimits()
        self.sessions: dict[str, Session] = {}
        self.last_nonce: dict[str, int] = {}
        """Per device, the highest reading nonce accepted (the chain's own replay guard, early)."""
        self.rejected: Counter[RejectReason] = Counter()
        self.accepted = 0
        self.telemetry_accepted = 0
        """DDATA only (`accepted` also counts births and acks)."""
        self.on_reject: Callable[[RejectReason, str], None] | None = None
        """Called with every refusal's reason and detail: the shell logs them."""
        self.dirty: set[str] = set()
        """Devices whose session or nonce changed since `take_dirty` (for the shell to persist)."""
        self.relayed_readings = 0
        """Readings relayed from telemetry refused (stale, future, out of session, or a meter's
        metrics disagreeing with its reading)."""

    def device(self, device_id: str) -> SiteDevice | None:
        """The manifest's device with this id (None: not on the site)."""
        return self._devices.get(device_id)

    def take_dirty(self) -> dict[str, tuple[Session | None, int | None]]:
        """The changed entries since the last call, to persist with the readings they carried."""
        out = {d: (self.sessions.get(d), self.last_nonce.get(d)) for d in self.dirty}
        self.dirty.clear()
        return out

    def restore(self, sessions: dict[str, Session], last_nonce: dict[str, int]) -> None:
        """A restarted bridge takes up where the last one committed."""
        self.sessions.update(sessions)
        self.last_nonce.update(last_nonce)

    # ---- helpers --------------------------------------------------------------------------
    def _refuse(self, reason: RejectReason, detail: str) -> Rejected:
        self.rejected[reason] += 1
        if self.on_reject is not None:
            self.on_reject(reason, detail)
        return Rejected(reason, detail)

    def _device(self, topic_device: str, payload_device: str) -> SiteDevice | Rejected:
        if payload_device != topic_device:
            return self._refuse(
                RejectReason.TOPIC_MISMATCH,
                f"device: expected the topic's id {topic_device!r}, got {payload_device!r}",
            )
        device = self._devices.get(payload_device)
        if device is None:
            return self._refuse(
                RejectReason.UNKNOWN_DEVICE,
                f"device: expected an id from the site manifest, got {payload_device!r}",
            )
        return device

    def _sequence(
        self, device: str, bd_seq: int, seq: int, count: bool = True
    ) -> Session | Rejected:
        """The live session this message belongs to; `count` False leaves counting to the caller."""
        session = self.sessions.get(device)
        refuse = self._refuse if count else Rejected
        if session is None or session.bd_seq != bd_seq or not session.alive:
            held = None if session is None else session.bd_seq
            return refuse(
                RejectReason.NO_SESSION,
                f"bd_seq: expected the session of the last DBIRTH ({held}), got {bd_seq}",
            )
        if seq <= session.last_seq:
            return refuse(
                RejectReason.REPLAYED,
                f"seq: expected > {session.last_seq} in session {bd_seq}, got {seq}",
            )
        return session

    def _out_of_session(self, msg: Telemetry, device: SiteDevice, refusal: Rejected) -> Rejected:
        """Telemetry outside a live session (its will fired in a broker restart, or its birth
        went astray) steers nothing, but a reading in it that passes every check of its own
        (plausible, fresh nonce, the device's signature) is still relayed: the nonce, not the
        session, is what guards a reading against replay."""
        refused = self._refuse(refusal.reason, refusal.detail)
        if msg.reading is None or self._reading_refusal(msg, device) is not None:
            return refused
        self.last_nonce[msg.device] = msg.reading.nonce
        self.dirty.add(msg.device)
        self.relayed_readings += 1
        return Rejected(refused.reason, refused.detail, relay=msg)

    def _clock(self, ts: int, now_ms: int) -> Rejected | None:
        age_s = (now_ms - ts) / 1000.0
        if age_s > self.limits.max_age_s:
            return self._refuse(
                RejectReason.STALE,
                f"ts: expected at most {self.limits.max_age_s} s old, got {age_s:.1f} s",
            )
        if -age_s > self.limits.max_clock_skew_s:
            return self._refuse(
                RejectReason.FUTURE,
                f"ts: expected at most {self.limits.max_clock_skew_s} s ahead, got {-age_s:.1f} s",
            )
        return None

    def current_slot(self, now_ms: int) -> int:
        return int((now_ms / 1000 - self.limits.genesis) // self.limits.slot_seconds)

    # ---- births and deaths ----------------------------------------------------------------
    def on_birth(self, topic_device: str, payload: bytes, now_ms: int) -> DeviceBirth | Rejected:
        """A DBIRTH opens a session if the device is the one the manifest describes."""
        try:
            birth = decode(DeviceBirth, payload)
        except PayloadError as exc:
            return self._refuse(RejectReason.MALFORMED, str(exc))
        device = self._device(topic_device, birth.device)
        if isinstance(device, Rejected):
            return device
        for name, got, want in (
            ("kind", birth.kind, device.kind),
            ("address", birth.address.lower(), device.address.lower()),
            ("ratings.capacity_w", birth.ratings.capacity_w, device.capacity_w),
        ):
            if got != want:
                return self._refuse(
                    RejectReason.BIRTH_MISMATCH, f"{name}: expected {want!r}, got {got!r}"
                )
        late = self._clock(birth.ts, now_ms)
        if late is not None:
            return late
        held = self.sessions.get(birth.device)
        if held is not None and held.alive and birth.bd_seq == held.bd_seq:
            return self._refuse(
                RejectReason.REPLAYED, f"bd_seq: expected a new session, got {birth.bd_seq} again"
            )
        self.sessions[birth.device] = Session(bd_seq=birth.bd_seq)
        self.dirty.add(birth.device)
        self.accepted += 1
        return birth

    def on_death(self, topic_device: str, payload: bytes) -> DeviceDeath | Rejected | None:
        """A DDEATH ends the current session; one from an older session is ignored (None)."""
        try:
            death = decode(DeviceDeath, payload)
        except PayloadError as exc:
            return self._refuse(RejectReason.MALFORMED, str(exc))
        device = self._device(topic_device, death.device)
        if isinstance(device, Rejected):
            return device
        session = self.sessions.get(death.device)
        if session is None or session.bd_seq != death.bd_seq:
            return None
        session.alive = False
        self.dirty.add(death.device)
        return death

    # ---- telemetry ------------------------------------------------------------------------
    def on_telemetry(self, topic_device: str, payload: bytes, now_ms: int) -> Telemetry | Rejected:
        """Schema, identity, session, time, plausibility, signature: all pass or one reason."""
        try:
            msg = decode(Telemetry, payload)
        except PayloadError as exc:
            return self._refuse(RejectReason.MALFORMED, str(exc))
        device = self._device(topic_device, msg.device)
        if isinstance(device, Rejected):
            return device
        if msg.metrics.kind != device.kind.value:
            return self._refuse(
                RejectReason.WRONG_KIND,
                f"metrics.kind: expected {device.kind.value!r}, got {msg.metrics.kind!r}",
            )
        session = self._sequence(msg.device, msg.bd_seq, msg.seq, count=False)
        if isinstance(session, Rejected):
            if session.reason is RejectReason.NO_SESSION:
                return self._out_of_session(msg, device, session)
            return self._refuse(session.reason, session.detail)
        unusable = self._timing(msg, now_ms)
        if unusable is not None and unusable[0] is RejectReason.FUTURE:
            lead = msg.slot - self.current_slot(now_ms)
            if lead > self.limits.max_reading_lead_slots:
                # Too far ahead to be a measurement: refused whole, its reading too.
                detail = unusable[1]
                if msg.reading is not None:
                    detail += (
                        f"; reading not relayed: expected its slot at most "
                        f"{self.limits.max_reading_lead_slots} ahead, got {lead} ahead"
                    )
                return self._refuse(RejectReason.FUTURE, detail)
        refusal = self._reading_refusal(msg, device)
        if refusal is not None:
            # Telemetry off time is refused as stale or future whatever else is wrong with it;
            # its reading is relayed only when it passes every check.
            return self._refuse(*(unusable or refusal))
        if unusable is None:
            disagreement = self._disagreement(msg)
            if disagreement is not None:
                unusable = (RejectReason.IMPLAUSIBLE, disagreement)  # refused, reading relayed
        reading = msg.reading
        if unusable is not None and reading is None:
            return self._refuse(*unusable)  # nothing owed to the chain: refused whole
        if reading is not None:
            self.last_nonce[msg.device] = reading.nonce
        if msg.seq > session.last_seq + 1:
            session.missed += msg.seq - session.last_seq - 1
        session.last_seq = msg.seq
        self.dirty.add(msg.device)
        if unusable is not None:
            refused = self._refuse(*unusable)
            self.relayed_readings += 1
            return Rejected(refused.reason, refused.detail, relay=msg)
        self.accepted += 1
        self.telemetry_accepted += 1
        return msg

    def _reading_refusal(
        self, msg: Telemetry, device: SiteDevice
    ) -> tuple[RejectReason, str] | None:
        """Plausibility, then the signed reading (nonce, signature); None when all pass."""
        implausible = self._implausible(msg, device)
        if implausible is not None:
            return RejectReason.IMPLAUSIBLE, implausible
        reading = msg.reading
        if reading is None:
            if device.kind is DeviceKind.METER:
                return (
                    RejectReason.MISSING_READING,
                    "reading: expected a signed reading from a meter",
                )
            return None
        last = self.last_nonce.get(msg.device, -1)
        if reading.nonce <= last:
            return RejectReason.REPLAYED, f"reading.nonce: expected > {last}, got {reading.nonce}"
        signer = self.domain.recover(
            device.address,
            reading.slot,
            reading.energy_wh,
            reading.nonce,
            bytes.fromhex(reading.signature[2:]),
        )
        if signer.lower() != device.address.lower():
            return (
                RejectReason.BAD_SIGNATURE,
                f"reading.signature: expected a signature by {device.address}, "
                f"got one by {signer or 'no valid key'}",
            )
        return None

    def _timing(self, msg: Telemetry, now_ms: int) -> tuple[RejectReason, str] | None:
        """Too old (`stale`) or ahead of time (`future`), by timestamp or by slot; None: on time."""
        age_s = (now_ms - msg.ts) / 1000.0
        if age_s > self.limits.max_age_s:
            return (
                RejectReason.STALE,
                f"ts: expected at most {self.limits.max_age_s} s old, got {age_s:.1f} s",
            )
        if -age_s > self.limits.max_clock_skew_s:
            return (
                RejectReason.FUTURE,
                f"ts: expected at most {self.limits.max_clock_skew_s} s ahead, got {-age_s:.1f} s",
            )
        current = self.current_slot(now_ms)
        if msg.slot < current - 1:
            return RejectReason.STALE, f"slot: expected {current - 1} or {current}, got {msg.slot}"
        if msg.slot > current:
            return RejectReason.FUTURE, f"slot: expected {current - 1} or {current}, got {msg.slot}"
        return None

    def _implausible(self, msg: Telemetry, device: SiteDevice) -> str | None:
        """Physics and ratings: what no working device can report. None when plausible."""
        m = msg.metrics
        rated_kw = device.capacity_w / 1000.0 * (1.0 + RATING_TOLERANCE)
        if isinstance(m, BatteryMetrics):
            limit = device.power_kw * (1.0 + RATING_TOLERANCE)
            if abs(m.power_kw) > limit:
                return f"metrics.power_kw: expected |power| <= {limit:.3f} kW, got {m.power_kw}"
        elif isinstance(m, PvMetrics):
            if m.available_kw > rated_kw:
                return f"metrics.available_kw: expected <= {rated_kw:.3f} kW, got {m.available_kw}"
            if m.pv_kw > m.available_kw * (1.0 + RATING_TOLERANCE) + 1e-6:
                return f"metrics.pv_kw: expected <= available_kw {m.available_kw}, got {m.pv_kw}"
        elif isinstance(m, MeterMetrics) and abs(m.net_kw) > rated_kw:
            return f"metrics.net_kw: expected |net| <= {rated_kw:.3f} kW, got {m.net_kw}"
        r = msg.reading
        if r is not None:
            if r.slot != msg.slot:
                return f"reading.slot: expected the telemetry's slot {msg.slot}, got {r.slot}"
            # Energy is per market slot (the site's dt_h, 900 s on the chain), whatever the
            # wall-clock slot length of an accelerated run.
            energy_s = round(self.site.dt_h * 3600)
            cap_wh = device.capacity_w * energy_s // 3600
            if abs(r.energy_wh) > cap_wh:
                return f"reading.energy_wh: expected |energy| <= {cap_wh} Wh, got {r.energy_wh}"
        return None

    def _disagreement(self, msg: Telemetry) -> str | None:
        """A meter's signed reading against its own `net_kw`: None when they agree.

        Checked after the signature, and not a reason to drop the reading: the device signed
        it, the chain takes it on that signature alone, and a disagreement more often means
        the metrics are wrong (a frozen display, `stuck`) than the energy register. So the
        message is refused for control (`implausible`) and its reading relayed."""
        m, r = msg.metrics, msg.reading
        if r is None or not isinstance(m, MeterMetrics):
            return None
        # Energy is per market slot (the site's dt_h), whatever the wall-clock slot length.
        expected = m.net_kw * round(self.site.dt_h * 3600) / 3.6
        tol = max(ENERGY_TOLERANCE_WH, ENERGY_TOLERANCE_SHARE * abs(expected))
        if abs(r.energy_wh - expected) <= tol:
            return None
        return (
            f"reading.energy_wh: expected net_kw x slot = {expected:.0f} "
            f"+/- {tol:.0f} Wh, got {r.energy_wh}"
        )

    # ---- acknowledgements -----------------------------------------------------------------
    def on_ack(self, topic_device: str, payload: bytes) -> Ack | Rejected:
        """A DACK from the device's live session, in sequence."""
        try:
            ack = decode(Ack, payload)
        except PayloadError as exc:
            return self._refuse(RejectReason.MALFORMED, str(exc))
        device = self._device(topic_device, ack.device)
        if isinstance(device, Rejected):
            return device
        session = self._sequence(ack.device, ack.bd_seq, ack.seq)
        if isinstance(session, Rejected):
            return session
        if ack.seq > session.last_seq + 1:
            session.missed += ack.seq - session.last_seq - 1
        session.last_seq = ack.seq
        self.dirty.add(ack.device)
        self.accepted += 1
        return ack
