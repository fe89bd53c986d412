"""Commands out, acknowledgements in: turning a decision into DCMDs and tracking each to its end.

Command ids are deterministic (slot, device, action), so a bridge restarted mid-slot re-sends the
same ids and a device that already applied one does not apply it twice. The tracker follows each
command through accepted -> applied | rejected, or expired when no final answer came before
`expires_ts`; its counts feed the metrics and its `unanswered` list the re-send logic.

`commands_for` is the definition, one pydantic `Command` each; `CommandEncoder` is what the
bridge sends with: the same bytes (tests/bridge/test_decision.py compares them), from per-device
templates made once, because at 1,000 devices building, encoding and addressing 748 models was
most of a slot's decision latency (~15 of ~25 ms). The schema's bounds are still checked for
every value (finite, within the field's range), all at once in numpy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import numpy as np
from pydantic_core import to_json

from bridge.decision import Decision
from bridge.errors import BridgeError
from bridge.messages import (
    Ack,
    AckStatus,
    BatterySetpoint,
    Command,
    DemandResponse,
    PvCurtailment,
    decode,
    encode,
)
from bridge.site import SiteManifest
from bridge.topics import MessageType, topic
from envs.codec import Codec


def command_id(slot: int, device: str, kind: str) -> str:
    return f"{slot}.{device}.{kind}"


def commands_for(
    decision: Decision,
    site: SiteManifest,
    codec: Codec,
    slot: int,
    now_ms: int,
    expires_ms: int,
) -> list[Command]:
    """One command per controllable device for `slot`, from the shielded action.

    Battery set-points are the shield's `applied_kw` (not re-derived from the action, which
    went through float32), so what is sent is exactly what the shield allowed.
    """
    decoded = codec.decode_action(decision.action)
    out: list[Command] = []

    def add(device: str, action: BatterySetpoint | PvCurtailment | DemandResponse) -> None:
        out.append(
            Command(
                command_id=command_id(slot, device, action.kind),
                device=device,
                ts=now_ms,
                slot=slot,
                expires_ts=expires_ms,
                action=action,
            )
        )

    applied = np.asarray(decision.report.applied_kw, dtype=np.float64).reshape(-1)
    for k, device in enumerate(site.battery_devices()):
        add(device, BatterySetpoint(kind="battery_setpoint", power_kw=float(applied[k])))
    pv = np.asarray(decoded.pv_curtailment).reshape(-1)
    dr = np.asarray(decoded.dr_share).reshape(-1)
    for i, p in enumerate(site.prosumers):
        add(p.pv, PvCurtailment(kind="pv_curtailment", fraction=float(pv[i])))
        add(p.appliance, DemandResponse(kind="demand_response", share=float(dr[i])))
    return out


class Outgoing(NamedTuple):
    """One encoded DCMD: what is published, and what the tracker follows (a tuple: ~750 are
    made a slot)."""

    command_id: str
    device: str
    topic: str
    payload: bytes
    """Byte for byte `encode` of the `Command` that `commands_for` builds."""
    expires_ts: int


#: Per command kind: the action's value field and its schema bounds (bridge.messages).
_FIELDS = {
    "battery_setpoint": ("power_kw", -1e6, 1e6),
    "pv_curtailment": ("fraction", 0.0, 1.0),
    "demand_response": ("share", 0.0, 1.0),
}
_MAX_SLOT = 2**63 - 1
_MAX_TS = 2**53 - 1


class CommandEncoder:
    """`commands_for`'s commands as wire bytes, from templates made once per site.

    Each device's topic, command-id tail and action head are fixed; a slot adds its number and
    times, a device its value. Ids and topics are checked against the schema here, once, with
    a real `Command` of the longest slot number; values, every slot, against the same bounds
    the schema has (a value outside them raises, as pydantic would have).
    """

    def __init__(self, site: SiteManifest, codec: Codec) -> None:
        self.codec = codec
        devices: list[tuple[str, str]] = [(d, "battery_setpoint") for d in site.battery_devices()]
        for p in site.prosumers:
            devices += [(p.pv, "pv_curtailment"), (p.appliance, "demand_response")]
        self.n_battery = len(site.battery_devices())
        self.n_prosumer = len(site.prosumers)
        self._parts: list[tuple[str, str, str, bytes, bytes]] = []
        for device, kind in devices:
            field, lo, _ = _FIELDS[kind]
            Command.model_validate({  # raises if no slot's command could pass the schema
                "command_id": command_id(_MAX_SLOT, device, kind), "device": device,
                "ts": _MAX_TS, "slot": _MAX_SLOT, "expires_ts": _MAX_TS,
                "action": {"kind": kind, field: lo},
            })  # fmt: skip
            tail = f'.{device}.{kind}","device":"{device}","ts":'.encode()
            head = f',"action":{{"kind":"{kind}","{field}":'.encode()
            self._parts.append(
                (device, kind, topic(site.site, MessageType.DCMD, device), tail, head)
            )
        self._lo = np.array([_FIELDS[kind][1] for _, kind in devices])
        self._hi = np.array([_FIELDS[kind][2] for _, kind in devices])

    def encode(self, decision: Decision, slot: int, now_ms: int, expires_ms: int) -> list[Outgoing]:
        """One `Outgoing` per controllable device, in `commands_for`'s order."""
        for name, value, top in (("slot", slot, _MAX_SLOT), ("ts", now_ms, _MAX_TS),
                                 ("expires_ts", expires_ms, _MAX_TS)):  # fmt: skip
            if not 0 <= value <= top:
                raise BridgeError(f"command {name}: expected 0..{top}, got {value}")
        decoded = self.codec.decode_action(decision.action)
        applied = np.asarray(decision.report.applied_kw, dtype=np.float64).reshape(-1)
        pv = np.asarray(decoded.pv_curtailment, dtype=np.float64).reshape(-1)
        dr = np.asarray(decoded.dr_share, dtype=np.float64).reshape(-1)
        n = self.n_prosumer
        if len(applied) < self.n_battery or len(pv) < n or len(dr) < n:
            raise BridgeError(
                f"commands: expected {self.n_battery} set-points and {n} PV and DR values, got "
                f"{len(applied)}, {len(pv)} and {len(dr)}"
            )
        # commands_for's order: the batteries, then each prosumer's PV and appliance.
        values = np.concatenate(
            [applied[: self.n_battery], np.column_stack([pv[:n], dr[:n]]).ravel()]
        )
        bad = ~((values >= self._lo) & (values <= self._hi))  # NaN fails both comparisons
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            field, lo, hi = _FIELDS[self._parts[i][1]]
            raise BridgeError(
                f"command for {self._parts[i][0]}: action.{field} expected {lo}..{hi}, "
                f"got {values[i]}"
            )
        slot_b = str(slot).encode()
        start = b'{"command_id":"' + slot_b
        middle = b'%d,"slot":%s,"expires_ts":%d' % (now_ms, slot_b, expires_ms)
        prefix = f"{slot}."
        return [
            Outgoing(
                prefix + device + "." + kind,
                device,
                top,
                b"".join((start, tail, middle, head, to_json(v), b"}}")),
                expires_ms,
            )
            for (device, kind, top, tail, head), v in zip(self._parts, values.tolist(), strict=True)
        ]


class CommandState(StrEnum):
    SENT = "sent"
    ACCEPTED = "accepted"
    APPLIED = "applied"
    REJECTED = "rejected"
    EXPIRED = "expired"


FINAL = (CommandState.APPLIED, CommandState.REJECTED, CommandState.EXPIRED)


@dataclass(slots=True)
class Tracked:
    command_id: str
    device: str
    expires_ts: int
    payload: bytes
    """The DCMD as sent: `command` decodes it again (only a re-send needs the model)."""
    state: CommandState = CommandState.SENT
    applied: float | None = None
    reason: str | None = None

    @property
    def command(self) -> Command:
        return decode(Command, self.payload)


class CommandTracker:
    """Follows every command sent to its final state."""

    def __init__(self) -> None:
        self.commands: dict[str, Tracked] = {}
        self.finished: Counter[CommandState] = Counter()
        self.unknown_acks = 0
        """Acks for ids never sent (or already forgotten): counted, otherwise ignored."""

    def sent(self, command: Command) -> None:
        if command.command_id not in self.commands:
            self.commands[command.command_id] = Tracked(
                command.command_id, command.device, command.expires_ts, encode(command)
            )

    def sent_encoded(self, outs: list[Outgoing]) -> None:
        """`sent` for a slot's commands from the `CommandEncoder` (no model to build); a
        command id already tracked keeps its state, as in `sent`."""
        commands = self.commands
        for out in outs:
            if out.command_id not in commands:
                commands[out.command_id] = Tracked(
                    out.command_id, out.device, out.expires_ts, out.payload
                )

    def on_ack(self, ack: Ack) -> Tracked | None:
        """Move a command on; an ack out of order (accepted after applied) changes nothing."""
        tracked = self.commands.get(ack.command_id)
        if tracked is None or tracked.device != ack.device:
            self.unknown_acks += 1
            return None
        if tracked.state in FINAL:
            return tracked
        if ack.status is AckStatus.ACCEPTED:
            tracked.state = CommandState.ACCEPTED
            return tracked
        tracked.state = CommandState(ack.status.value)
        tracked.applied = ack.applied
        tracked.reason = ack.reason
        self.finished[tracked.state] += 1
        return tracked

    def expire(self, now_ms: int) -> list[Tracked]:
        """Mark commands past their expiry without a final answer; forget finished ones."""
        expired = []
        kept: dict[str, Tracked] = {}
        for cid, tracked in self.commands.items():  # one pass, no deletes: ~750 a slot
            if tracked.state in FINAL:
                continue
            if tracked.expires_ts <= now_ms:
                tracked.state = CommandState.EXPIRED
                expired.append(tracked)
            else:
                kept[cid] = tracked
        self.commands = kept
        if expired:
            self.finished[CommandState.EXPIRED] += len(expired)
        return expired

    def unanswered(self) -> list[Command]:
        """Commands with no answer at all yet (candidates for a re-send after a reconnect)."""
        return [t.command for t in self.commands.values() if t.state is CommandState.SENT]
