"""A virtual field device, sans-I/O: what the simulator runs for each meter, inverter, battery.

It speaks docs/iot.md exactly as firmware would: a session number per connect, a `seq` per
message, a registry nonce per signed reading, and acknowledgements that say what was really
applied. It obeys commands only within its own limits (a battery clips to its rating and its SoC
window), so the tests can check that no device limit is ever violated whatever the bridge asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.errors import PayloadError
from bridge.messages import (
    Ack,
    AckStatus,
    BatterySetpoint,
    Command,
    DemandResponse,
    DeviceBirth,
    DeviceDeath,
    PvCurtailment,
    Ratings,
    Rebirth,
    SignedReading,
    Telemetry,
    decode,
    encode,
)
from bridge.signing import ReadingDomain
from bridge.site import SiteDevice
from bridge.topics import MessageType, topic


@dataclass
class VirtualDevice:
    """One device's protocol state and set-points; `metrics` are supplied by the caller."""

    site: str
    spec: SiteDevice
    key: bytes
    domain: ReadingDomain
    bd_seq: int = 0
    seq: int = 0
    nonce: int = 0
    setpoint_kw: float = 0.0
    curtailment: float = 0.0
    dr_share: float = 0.0
    soc: float = 0.5
    soc_min: float = 0.0
    soc_max: float = 1.0
    efficiency_charge: float = 1.0
    efficiency_discharge: float = 1.0
    capacity_kwh: float | None = None
    """Usable capacity now (it fades); None: the rating's."""
    applied: dict[str, str] = field(default_factory=dict)
    """command_id -> status already answered: a re-sent command is not applied twice."""

    def _topic(self, kind: MessageType) -> str:
        return topic(self.site, kind, self.spec.id)

    def connect(self, now_ms: int) -> tuple[tuple[str, bytes], tuple[str, bytes]]:
        """A new session: (will to set before connecting, birth to publish after)."""
        self.bd_seq += 1
        self.seq = 0
        will = DeviceDeath(device=self.spec.id, bd_seq=self.bd_seq, ts=now_ms)
        birth = DeviceBirth(
            device=self.spec.id,
            kind=self.spec.kind,
            address=self.spec.address,
            bd_seq=self.bd_seq,
            seq=0,
            ts=now_ms,
            ratings=Ratings(
                capacity_w=self.spec.capacity_w,
                power_kw=self.spec.power_kw or None,
                capacity_kwh=self.spec.capacity_kwh or None,
            ),
        )
        return (self._topic(MessageType.DDEATH), encode(will)), (
            self._topic(MessageType.DBIRTH),
            encode(birth),
        )

    def goodbye(self, now_ms: int) -> tuple[str, bytes]:
        """A clean DDEATH for the current session (a clean disconnect does not fire the will)."""
        death = DeviceDeath(device=self.spec.id, bd_seq=self.bd_seq, ts=now_ms)
        return self._topic(MessageType.DDEATH), encode(death)

    def telemetry(
        self, slot: int, now_ms: int, metrics: dict[str, object], energy_wh: int | None
    ) -> tuple[str, bytes]:
        """DDATA for `slot`; a reading is signed when `energy_wh` is given."""
        self.seq += 1
        reading = None
        if energy_wh is not None:
            sig = self.domain.sign(self.key, slot, energy_wh, self.nonce)
            reading = SignedReading(
                slot=slot, energy_wh=energy_wh, nonce=self.nonce, signature="0x" + sig.hex()
            )
            self.nonce += 1
        msg = Telemetry.model_validate(
            {
                "device": self.spec.id,
                "bd_seq": self.bd_seq,
                "seq": self.seq,
                "ts": now_ms,
                "slot": slot,
                "metrics": {"kind": self.spec.kind.value, **metrics},
                "reading": None if reading is None else reading.model_dump(),
            }
        )
        return self._topic(MessageType.DDATA), encode(msg)

    def _ack(self, cid: str, status: AckStatus, now_ms: int, **kw: object) -> tuple[str, bytes]:
        self.seq += 1
        ack = Ack.model_validate(
            {
                "command_id": cid,
                "device": self.spec.id,
                "bd_seq": self.bd_seq,
                "seq": self.seq,
                "ts": now_ms,
                "status": status,
                **kw,
            }
        )
        return self._topic(MessageType.DACK), encode(ack)

    def on_command(
        self, payload: bytes, now_ms: int, dt_h: float = 0.25, announce_accepted: bool = True
    ) -> list[tuple[str, bytes]]:
        """Accept, then apply within limits or reject; answers are DACKs (or a DBIRTH).

        `announce_accepted` False leaves out the `accepted` DACK: over CoAP the exchange itself
        says the command arrived, and the response carries only the final answer.
        """
        try:
            cmd = decode(Command, payload)
        except PayloadError:
            return []
        if cmd.device != self.spec.id:
            return []
        if isinstance(cmd.action, Rebirth):
            _, birth = self.connect(now_ms)
            return [birth]
        if cmd.command_id in self.applied:
            return []  # a re-send of something already answered
        out = [self._ack(cmd.command_id, AckStatus.ACCEPTED, now_ms)] if announce_accepted else []
        if now_ms >= cmd.expires_ts:
            self.applied[cmd.command_id] = "rejected"
            return [*out, self._ack(cmd.command_id, AckStatus.REJECTED, now_ms, reason="expired")]
        action = cmd.action
        value: float
        if isinstance(action, BatterySetpoint) and self.spec.kind.value == "battery":
            # The SoC window on the energy that reaches the cells, as `envs.devices` models it.
            cap = max(
                self.spec.capacity_kwh if self.capacity_kwh is None else self.capacity_kwh, 1e-9
            )
            up = max(0.0, (self.soc_max - self.soc) * cap / (self.efficiency_charge * dt_h))
            down = max(0.0, (self.soc - self.soc_min) * cap * self.efficiency_discharge / dt_h)
            value = min(max(action.power_kw, -self.spec.power_kw, -down), self.spec.power_kw, up)
            self.setpoint_kw = value
        elif isinstance(action, PvCurtailment) and self.spec.kind.value == "pv":
            value = self.curtailment = action.fraction
        elif isinstance(action, DemandResponse) and self.spec.kind.value == "appliance":
            value = self.dr_share = action.share
        else:
            self.applied[cmd.command_id] = "rejected"
            reason = f"action: {action.kind} is not for a {self.spec.kind.value}"
            return [*out, self._ack(cmd.command_id, AckStatus.REJECTED, now_ms, reason=reason)]
        self.applied[cmd.command_id] = "applied"
        return [*out, self._ack(cmd.command_id, AckStatus.APPLIED, now_ms, applied=value)]
