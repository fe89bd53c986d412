"""Commands out, acknowledgements in: turning a decision into DCMDs and tracking each to its end.

Command ids are deterministic (slot, device, action), so a bridge restarted mid-slot re-sends the
same ids and a device that already applied one does not apply it twice. The tracker follows each
command through accepted -> applied | rejected, or expired when no final answer came before
`expires_ts`; its counts feed the metrics and its `unanswered` list the re-send logic.

`commands_for` is the definition, one pydantic `Command` each; `CommandEncoder` is what the
bridge sends with: the same bytes (tests/bridge/test_decision.py compares them), from per-device
templates made once, because at 1,000 devices building, encoding and addressing 748 models was
most of a slot's decision latency (~15 of ~25 ms). The schema's bounds are still checked for
every value (finite, within the field's range), all at once in numpy. A slot's commands stay
lists (`EncodedCommands`), and the tracker keeps them as one record with a byte of state each:
no object per command is made on the way from the decision to the socket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, overload

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
    """One encoded DCMD: what is published, and what the tracker follows."""

    command_id: str
    device: str
    topic: str
    payload: bytes
    """Byte for byte `encode` of the `Command` that `commands_for` builds."""
    expires_ts: int


class EncodedCommands(Sequence[Outgoing]):
    """One slot's DCMDs from the `CommandEncoder`, as parallel lists: ~750 a slot at 1,000
    devices, and an object per command (an `Outgoing`, a tracker record, a `Publish`) cost
    ~2 ms of the decision. Indexing still gives an `Outgoing`, made on demand."""

    __slots__ = ("command_ids", "devices", "expires_ts", "payloads", "slot", "topics")

    def __init__(
        self,
        slot: int,
        command_ids: list[str],
        devices: list[str],
        topics: list[str],
        payloads: list[bytes],
        expires_ts: int,
    ) -> None:
        self.slot = slot
        self.command_ids = command_ids
        self.devices = devices
        """Shared with the encoder (a site's command devices, in its order): read only."""
        self.topics = topics
        """Shared with the encoder, like `devices`."""
        self.payloads = payloads
        self.expires_ts = expires_ts

    def __len__(self) -> int:
        return len(self.command_ids)

    @overload
    def __getitem__(self, i: int) -> Outgoing: ...
    @overload
    def __getitem__(self, i: slice) -> list[Outgoing]: ...
    def __getitem__(self, i: int | slice) -> Outgoing | list[Outgoing]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return Outgoing(
            self.command_ids[i], self.devices[i], self.topics[i], self.payloads[i], self.expires_ts
        )


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
        self._devices = [device for device, _ in devices]
        self._topics = [top for _, _, top, _, _ in self._parts]
        self._id_tails = [f"{device}.{kind}" for device, kind in devices]
        self._lo = np.array([_FIELDS[kind][1] for _, kind in devices])
        self._hi = np.array([_FIELDS[kind][2] for _, kind in devices])

    def encode(
        self, decision: Decision, slot: int, now_ms: int, expires_ms: int
    ) -> EncodedCommands:
        """One command per controllable device, in `commands_for`'s order."""
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
        # One `to_json` for every value (a JSON number never holds a comma): its float format
        # is what `encode` writes, and one call is a tenth of 748.
        numbers = to_json(values.tolist())[1:-1].split(b",") if len(values) else []
        payloads = [
            b"".join((start, tail, middle, head, number, b"}}"))
            for (_, _, _, tail, head), number in zip(self._parts, numbers, strict=True)
        ]
        ids = [prefix + t for t in self._id_tails]
        return EncodedCommands(slot, ids, self._devices, self._topics, payloads, expires_ms)


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


_STATES = tuple(CommandState)
"""A state's code in `_Batch.states` is its place here (`SENT`, 0, first)."""
_FINAL_CODES = frozenset(_STATES.index(state) for state in FINAL)
_SENT, _ACCEPTED = _STATES.index(CommandState.SENT), _STATES.index(CommandState.ACCEPTED)


class _Batch:
    """One slot's commands as sent and where each stands: one record a slot, its states a
    byte each, instead of a tracked object per command (~750 a slot at 1,000 devices)."""

    __slots__ = ("answers", "commands", "index", "open", "states")

    def __init__(self, commands: EncodedCommands) -> None:
        self.commands = commands
        self.states = bytearray(len(commands))  # every one SENT
        self.answers: dict[int, tuple[float | None, str | None]] = {}
        """Position -> (applied, reason) of a final answer."""
        self.index: dict[str, int] | None = None
        """Command id -> position, made at the slot's first acknowledgement (not in the
        decision)."""
        self.open = len(commands)
        """Commands without a final state yet."""

    def position(self, command_id: str) -> int | None:
        if self.index is None:
            self.index = {cid: i for i, cid in enumerate(self.commands.command_ids)}
        return self.index.get(command_id)

    def view(self, i: int) -> Tracked:
        """Command `i` as a `Tracked` (a copy: the batch keeps the state)."""
        c = self.commands
        applied, reason = self.answers.get(i, (None, None))
        return Tracked(
            c.command_ids[i], c.devices[i], c.expires_ts, c.payloads[i],
            _STATES[self.states[i]], applied, reason,
        )  # fmt: skip


class CommandTracker:
    """Follows every command sent to its final state.

    A slot's commands from the `CommandEncoder` are one `_Batch`, found from an acknowledged
    id by the slot number that starts it; commands sent one by one (`sent`) are a `Tracked`
    each. Either way an id is tracked once: sent again, it keeps its state.
    """

    def __init__(self) -> None:
        self._single: dict[str, Tracked] = {}
        self._batches: dict[int, _Batch] = {}
        """By slot: the ids of slot s's commands all start with `f"{s}."`."""
        self.finished: Counter[CommandState] = Counter()
        self.unknown_acks = 0
        """Acks for ids never sent (or already forgotten): counted, otherwise ignored."""

    @property
    def commands(self) -> dict[str, Tracked]:
        """Every command still followed, by id (copies; for inspection, not the hot path)."""
        out = dict(self._single)
        for batch in self._batches.values():
            out.update(
                (batch.commands.command_ids[i], batch.view(i)) for i in range(len(batch.states))
            )
        return out

    def _find(self, command_id: str) -> Tracked | tuple[_Batch, int] | None:
        tracked = self._single.get(command_id)
        if tracked is not None:
            return tracked
        slot = command_id.partition(".")[0]
        if slot.isascii() and slot.isdigit():
            batch = self._batches.get(int(slot))
            if batch is not None:
                i = batch.position(command_id)
                if i is not None:
                    return batch, i
        return None

    def sent(self, command: Command) -> None:
        if self._find(command.command_id) is None:
            self._single[command.command_id] = Tracked(
                command.command_id, command.device, command.expires_ts, encode(command)
            )

    def sent_encoded(self, commands: EncodedCommands) -> None:
        """`sent` for a slot's commands from the `CommandEncoder`: one record for the slot,
        no object per command (a command id already tracked keeps its state, as in `sent`)."""
        if commands.slot in self._batches or (
            self._single and not self._single.keys().isdisjoint(commands.command_ids)
        ):
            for out in commands:  # the slot sent again (rare): only the ids not yet followed
                if self._find(out.command_id) is None:
                    self._single[out.command_id] = Tracked(
                        out.command_id, out.device, out.expires_ts, out.payload
                    )
            return
        if len(commands):
            self._batches[commands.slot] = _Batch(commands)

    def on_ack(self, ack: Ack) -> Tracked | None:
        """Move a command on; an ack out of order (accepted after applied) changes nothing."""
        found = self._find(ack.command_id)
        if isinstance(found, tuple):
            return self._on_batch_ack(*found, ack)
        tracked = found
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

    def _on_batch_ack(self, batch: _Batch, i: int, ack: Ack) -> Tracked | None:
        """`on_ack` for command `i` of `batch`, the same transitions."""
        if batch.commands.devices[i] != ack.device:
            self.unknown_acks += 1
            return None
        if batch.states[i] not in _FINAL_CODES:
            if ack.status is AckStatus.ACCEPTED:
                batch.states[i] = _ACCEPTED
            else:
                state = CommandState(ack.status.value)
                batch.states[i] = _STATES.index(state)
                batch.answers[i] = (ack.applied, ack.reason)
                batch.open -= 1
                self.finished[state] += 1
        return batch.view(i)

    def expire(self, now_ms: int) -> list[str]:
        """Mark commands past their expiry without a final answer, and forget them and the
        finished ones; returns the ids that expired."""
        expired: list[str] = []
        kept: dict[str, Tracked] = {}
        for cid, tracked in self._single.items():  # one pass, no deletes
            if tracked.state in FINAL:
                continue
            if tracked.expires_ts <= now_ms:
                tracked.state = CommandState.EXPIRED
                expired.append(cid)
            else:
                kept[cid] = tracked
        self._single = kept
        batches: dict[int, _Batch] = {}
        for slot, batch in self._batches.items():
            if not batch.open:
                continue
            if batch.commands.expires_ts > now_ms:
                batches[slot] = batch
            elif batch.open == len(batch.states):  # nothing answered: the whole slot
                expired += batch.commands.command_ids
            else:
                ids = batch.commands.command_ids
                expired += [ids[i] for i, c in enumerate(batch.states) if c not in _FINAL_CODES]
        self._batches = batches
        if expired:
            self.finished[CommandState.EXPIRED] += len(expired)
        return expired

    def unanswered(self) -> list[Command]:
        """Commands with no answer at all yet (candidates for a re-send after a reconnect)."""
        out = [t.command for t in self._single.values() if t.state is CommandState.SENT]
        for batch in self._batches.values():
            payloads = batch.commands.payloads
            out += [decode(Command, payloads[i]) for i, c in enumerate(batch.states) if c == _SENT]
        return out
