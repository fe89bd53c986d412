"""Commands out, acknowledgements in: turning a decision into DCMDs and tracking each to its end.

Command ids are deterministic (slot, device, action), so a bridge restarted mid-slot re-sends the
same ids and a device that already applied one does not apply it twice. The tracker follows each
command through accepted -> applied | rejected, or expired when no final answer came before
`expires_ts`; its counts feed the metrics and its `unanswered` list the re-send logic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from bridge.decision import Decision
from bridge.messages import (
    Ack,
    AckStatus,
    BatterySetpoint,
    Command,
    DemandResponse,
    PvCurtailment,
)
from bridge.site import SiteManifest
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


class CommandState(StrEnum):
    SENT = "sent"
    ACCEPTED = "accepted"
    APPLIED = "applied"
    REJECTED = "rejected"
    EXPIRED = "expired"


FINAL = (CommandState.APPLIED, CommandState.REJECTED, CommandState.EXPIRED)


@dataclass
class Tracked:
    command: Command
    state: CommandState = CommandState.SENT
    applied: float | None = None
    reason: str | None = None


class CommandTracker:
    """Follows every command sent to its final state."""

    def __init__(self) -> None:
        self.commands: dict[str, Tracked] = {}
        self.finished: Counter[CommandState] = Counter()
        self.unknown_acks = 0
        """Acks for ids never sent (or already forgotten): counted, otherwise ignored."""

    def sent(self, command: Command) -> None:
        if command.command_id not in self.commands:
            self.commands[command.command_id] = Tracked(command)

    def on_ack(self, ack: Ack) -> Tracked | None:
        """Move a command on; an ack out of order (accepted after applied) changes nothing."""
        tracked = self.commands.get(ack.command_id)
        if tracked is None or tracked.command.device != ack.device:
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
        for cid, tracked in list(self.commands.items()):
            if tracked.state in FINAL:
                del self.commands[cid]
            elif tracked.command.expires_ts <= now_ms:
                tracked.state = CommandState.EXPIRED
                self.finished[CommandState.EXPIRED] += 1
                expired.append(tracked)
                del self.commands[cid]
        return expired

    def unanswered(self) -> list[Command]:
        """Commands with no answer at all yet (candidates for a re-send after a reconnect)."""
        return [t.command for t in self.commands.values() if t.state is CommandState.SENT]
