"""Every MQTT payload of docs/iot.md as a strict pydantic model, and the one door to decode them.

Payloads are bytes on the wire (the shells only move bytes); `decode` is where they become
typed objects or a `PayloadError` that names the field and the expected value. The models are
strict on purpose: a device that sends `"soc": "0.5"` has a firmware bug worth hearing about,
and coercing it would hide the next, worse one. NaN and infinity are refused for the same reason.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from bridge.errors import PayloadError
from bridge.topics import ID_PATTERN

#: Larger payloads are refused before parsing: a device never needs more, an attacker might.
MAX_PAYLOAD_BYTES = 4096

_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

DeviceId = Annotated[str, StringConstraints(pattern=f"^{ID_PATTERN}$")]
Address = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$")]
SignatureHex = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{130}$")]
TimestampMs = Annotated[int, Field(ge=0, lt=2**53)]
"""Milliseconds since the Unix epoch (UTC), as the sender's clock reads it."""
Counter = Annotated[int, Field(ge=0, lt=2**53)]
Slot = Annotated[int, Field(ge=0, lt=2**63)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0, le=1e6)]
Signed = Annotated[float, Field(ge=-1e6, le=1e6)]


class DeviceKind(StrEnum):
    """What a device is; decides its metrics and the commands it obeys."""

    METER = "meter"
    PV = "pv"
    BATTERY = "battery"
    APPLIANCE = "appliance"
    GRID_SENSOR = "grid_sensor"


class AckStatus(StrEnum):
    """A command's life on the device: accepted on receipt, then applied or rejected."""

    ACCEPTED = "accepted"
    APPLIED = "applied"
    REJECTED = "rejected"


class _Payload(BaseModel):
    model_config = _CONFIG


# ---- births and deaths ------------------------------------------------------------------


class Ratings(_Payload):
    """Nameplate data; the site manifest is authoritative, the birth must agree with it."""

    capacity_w: Annotated[int, Field(gt=0, lt=2**32)]
    """As registered in DeviceRegistry (caps each signed reading)."""
    power_kw: NonNegative | None = None
    capacity_kwh: NonNegative | None = None


class DeviceBirth(_Payload):
    """DBIRTH: a device session starts; `bd_seq` names the session, `seq` restarts at 0."""

    device: DeviceId
    kind: DeviceKind
    address: Address
    """The device key's Ethereum address: the signer of its readings."""
    bd_seq: Counter
    seq: Literal[0]
    ts: TimestampMs
    ratings: Ratings


class DeviceDeath(_Payload):
    """DDEATH: the last will set at connect (or a clean goodbye); `ts` is when it was set."""

    device: DeviceId
    bd_seq: Counter
    ts: TimestampMs


class NodeBirth(_Payload):
    """NBIRTH: the bridge is online; `mode` tells devices whether its commands are live."""

    node: DeviceId
    bd_seq: Counter
    ts: TimestampMs
    mode: Literal["live", "shadow"]
    policy: Annotated[str, StringConstraints(max_length=200)]


class NodeDeath(_Payload):
    """NDEATH: the bridge's last will; devices fall back to their safe defaults."""

    node: DeviceId
    bd_seq: Counter
    ts: TimestampMs


# ---- telemetry --------------------------------------------------------------------------


class MeterMetrics(_Payload):
    """Smart meter at the connection point."""

    kind: Literal["meter"]
    net_kw: Signed
    """Average net power over the slot, import > 0."""
    load_kw: NonNegative
    """Average household consumption over the slot (served load)."""


class PvMetrics(_Payload):
    """PV inverter."""

    kind: Literal["pv"]
    pv_kw: NonNegative
    """Average power fed after curtailment."""
    available_kw: NonNegative
    """Average power the panels could give (before curtailment)."""
    curtailment: Fraction


class BatteryMetrics(_Payload):
    """Battery inverter; sign convention of the environment: charging > 0."""

    kind: Literal["battery"]
    soc: Fraction
    soh: Fraction
    """State of health: capacity / nominal capacity."""
    power_kw: Signed


class ApplianceMetrics(_Payload):
    """A household's flexible loads, seen as one controllable appliance."""

    kind: Literal["appliance"]
    load_kw: NonNegative
    backlog_kwh: NonNegative
    """Deferred energy still to serve."""
    dr_share: Fraction
    """Share of the flexible load currently called off by demand response."""
    demand_kw: NonNegative | None = None
    """The flexible load the household asked for in the slot, before demand response dropped
    or deferred any of it (rebound not included): with it the bridge sees the household's
    demand, as the policy was trained to, and not what demand response left of it."""


class GridSensorMetrics(_Payload):
    """A feeder sensor: extreme voltages and loadings over the slot."""

    kind: Literal["grid_sensor"]
    v_min_pu: Annotated[float, Field(ge=0.0, le=2.0)]
    v_max_pu: Annotated[float, Field(ge=0.0, le=2.0)]
    line_loading: Annotated[float, Field(ge=0.0, le=100.0)]
    trafo_loading: Annotated[float, Field(ge=0.0, le=100.0)]
    trafo_net_kw: Signed | None = None
    """Net power through the transformer, import > 0: minus the meters, the background load."""


Metrics = Annotated[
    MeterMetrics | PvMetrics | BatteryMetrics | ApplianceMetrics | GridSensorMetrics,
    Field(discriminator="kind"),
]


class SignedReading(_Payload):
    """The slot's energy, EIP-712 signed exactly as DeviceRegistry.submitReading checks it."""

    slot: Slot
    energy_wh: Annotated[int, Field(ge=-(2**63), lt=2**63)]
    nonce: Annotated[int, Field(ge=0, lt=2**256)]
    signature: SignatureHex


class Telemetry(_Payload):
    """DDATA: the metrics of slot `slot` (just finished), and its signed energy reading."""

    device: DeviceId
    bd_seq: Counter
    seq: Counter
    ts: TimestampMs
    slot: Slot
    metrics: Metrics
    reading: SignedReading | None = None
    """Required of meters (their readings settle trades); optional for other kinds."""


# ---- commands, acknowledgements, demand response ----------------------------------------


class BatterySetpoint(_Payload):
    kind: Literal["battery_setpoint"]
    power_kw: Signed
    """Charging > 0; the device still refuses what its own limits forbid."""


class PvCurtailment(_Payload):
    kind: Literal["pv_curtailment"]
    fraction: Fraction


class DemandResponse(_Payload):
    kind: Literal["demand_response"]
    share: Fraction


class Rebirth(_Payload):
    """Ask a device to publish DBIRTH again (the bridge lost track of its session)."""

    kind: Literal["rebirth"]


Action = Annotated[
    BatterySetpoint | PvCurtailment | DemandResponse | Rebirth, Field(discriminator="kind")
]


class Command(_Payload):
    """DCMD: one action for one device, valid for slot `slot` until `expires_ts`."""

    command_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
    device: DeviceId
    ts: TimestampMs
    slot: Slot
    expires_ts: TimestampMs
    action: Action


class Ack(_Payload):
    """DACK: what the device did with a command; `applied` is the value it actually set."""

    command_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
    device: DeviceId
    bd_seq: Counter
    seq: Counter
    ts: TimestampMs
    status: AckStatus
    reason: Annotated[str, StringConstraints(max_length=200)] | None = None
    applied: Signed | None = None


class DrEvent(_Payload):
    """DREVENT: a demand-response event for one consumer (retained: a reconnect sees it)."""

    event_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
    device: DeviceId
    ts: TimestampMs
    status: Literal["start", "end"]
    start_ts: TimestampMs
    end_ts: TimestampMs
    target_kw: NonNegative
    """Reduction asked of the consumer's flexible load."""
    incentive_per_kwh: NonNegative


# ---- decoding ---------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)

_EXPECTED = {
    "missing": "a value (the field is required)",
    "extra_forbidden": "no such field",
    "json_invalid": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "finite_number": "a finite number",
    "bool_type": "a boolean",
    "union_tag_not_found": "a 'kind' field",
    "none_required": "null",
}


def _expected(err: Any) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<="}.get(
            kind, "<"
        )
        bound = next(iter(ctx.values()))
        return f"a value {op} {bound}"
    if kind == "string_pattern_mismatch":
        return f"a string matching {ctx['pattern']}"
    if kind == "string_too_long":
        return f"at most {ctx['max_length']} characters"
    if kind in ("literal_error", "enum"):
        return f"one of {ctx['expected']}"
    if kind == "union_tag_invalid":
        return f"'kind' one of {ctx['expected_tags']}"
    return _EXPECTED.get(kind, err["msg"])


def decode(model: type[M], payload: bytes) -> M:
    """Decode JSON bytes into `model`, or raise a PayloadError naming the first bad field."""
    name = model.__name__
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(name, "<payload>", f"at most {MAX_PAYLOAD_BYTES} bytes", len(payload))
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or "<payload>"
        raise PayloadError(name, field, _expected(err), err.get("input")) from None


def encode(message: BaseModel) -> bytes:
    """The wire form: compact JSON, UTF-8."""
    return message.model_dump_json(exclude_none=True).encode()
