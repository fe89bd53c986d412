"""The bridge's configuration file (`configs/bridge/NAME.yaml`) and the deployment manifest.

One pydantic model says everything an operator may set, with the defaults that run offline
against a local broker; a wrong value is refused before anything connects, with a message that
names the field and the expected value (`broker.url: expected mqtts://HOST:PORT ...`). Secrets
are never in the file: the broker password is read from a file the config names, so the YAML
can sit in version control.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.coap_resources import parse_endpoint
from bridge.errors import ConfigError
from bridge.topics import ID_PATTERN

_STRICT = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(BaseModel):
    """How the bridge reaches the MQTT broker."""

    model_config = _STRICT
    url: str = "mqtts://127.0.0.1:8883"
    """`mqtts://HOST:PORT` (TLS); `mqtt://` only for a broker on loopback in a lab."""
    ca_file: Path | None = None
    """CA certificate that signed the broker's certificate; None trusts the system store."""
    username: Annotated[str, Field(pattern=f"^{ID_PATTERN}$")] = "bridge"
    password_file: Path | None = None
    """A file holding the broker password (one line); None sends an empty password."""
    keepalive_s: Annotated[int, Field(ge=2, le=600)] = 10
    session_expiry_s: Annotated[int, Field(ge=60, le=30 * 86_400)] = 7 * 86_400
    """How long the broker keeps the bridge's session (and queues its QoS 1 messages) while the
    bridge is away; longer than any outage you mean to survive without losing readings."""
    batch_max: Annotated[int, Field(ge=1, le=100_000)] = 2_000
    """Messages handled, committed (one SQLite transaction) and acknowledged together at most."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("mqtts://") or v.startswith("mqtt://")) or v[-3:] == "://":
            raise ValueError(f"expected mqtts://HOST:PORT (or mqtt://HOST:PORT), got {v!r}")
        return v

    def password(self) -> str:
        if self.password_file is None:
            return ""
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"broker.password_file: expected a readable file ({exc})") from None


class ChainConfig(BaseModel):
    """Where readings and settlements go, and who pays for them."""

    model_config = _STRICT
    deployment: Path = Path("deployment.json")
    """The manifest `microgrid chain deploy` wrote: chain id, addresses, genesis."""
    rpc_url: str | None = None
    """JSON-RPC node (e.g. http://127.0.0.1:8545); None: no chain, readings are only validated."""
    key_file: Path | None = None
    """Hex private key of the relaying account (needs gas); required with `rpc_url`."""
    outbox: Path = Path("bridge-outbox.db")
    """The durable SQLite outbox; keep it on a disk that survives reboots."""
    prosumer_keys: Path | None = None
    """JSON {prosumer name: hex private key} of the accounts that sign the prosumers' orders
    (`microgrid devices register` writes it for a simulated site); None: the bridge submits
    readings only, no orders. The relaying account then needs SlotSettler's OPERATOR_ROLE."""


class TimingConfig(BaseModel):
    """Slot clock and staleness rules."""

    model_config = _STRICT
    slot_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] | None = None
    """Wall-clock slot length; None: the deployment's (900 s). Shorter only in tests and demos."""
    genesis: float | None = None
    """Start of slot 0 (unix s); None: the deployment's."""
    decide_deadline: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    """Fraction of a slot after which the bridge decides without waiting for late devices."""
    max_age_s: Annotated[float, Field(gt=0.0)] = 120.0
    max_clock_skew_s: Annotated[float, Field(ge=0.0)] = 5.0
    command_ttl_slots: Annotated[float, Field(gt=0.0, le=4.0)] = 1.0
    """A command expires after this many slots without an answer."""


class PolicyConfig(BaseModel):
    """Which frozen policy decides, and how a new one is admitted."""

    model_config = _STRICT
    source: str = "builtin:rule-based"
    """`models:/NAME@ALIAS` (MLflow), a path to an .onnx file, or `builtin:rule-based|idle`."""
    tracking_uri: str = "sqlite:///mlflow.db"
    reload_every_s: Annotated[float, Field(ge=0.0)] = 60.0
    """How often to look whether the MLflow alias moved (0: never)."""
    parity_samples: Annotated[int, Field(ge=1, le=100_000)] = 256
    """Recorded observations a new model must answer (finite, right shape) before it serves."""

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith("builtin:") and v not in ("builtin:rule-based", "builtin:idle"):
            raise ValueError(f"expected builtin:rule-based or builtin:idle, got {v!r}")
        if v.startswith("models:/") and len(v) <= len("models:/"):
            raise ValueError(f"expected models:/NAME@ALIAS, got {v!r}")
        return v


class CoapConfig(BaseModel):
    """Constrained devices reached over CoAP instead of MQTT (docs/iot.md, CoAP)."""

    model_config = _STRICT
    endpoints: dict[str, str] = {}
    """Device id, or a glob such as `bus6-*`, -> `coap://HOST:PORT` where it answers. Devices
    not named here speak MQTT; a key that names no device of the site is refused at start."""
    request_timeout_s: Annotated[float, Field(gt=0.0, le=300.0)] = 5.0
    """A device that has not answered a request by then counts as `timeout` (CoAP itself
    retransmits a confirmable request in the meantime)."""
    retry_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 5.0
    """How often an unreachable device is asked again to be observed."""
    reobserve_s: Annotated[float, Field(gt=0.0, le=86_400.0)] = 300.0
    """An observation silent this long is registered again (a rebooted device forgets its
    observers); a new registration costs one request and delivers nothing twice."""
    oscore_dir: Path | None = None
    """The bridge's ends of the devices' OSCORE contexts, one `<device id>/` folder each
    (`microgrid devices oscore` writes them): every request to a CoAP device, and every answer
    and notification, is encrypted and authenticated with that device's own context. Required
    with `endpoints` unless `insecure`."""
    shadow_oscore_dir: Path | None = None
    """The shadow's (`--dry-run`) ends of its own, read-only OSCORE contexts, one `<device id>/`
    folder each (`microgrid devices oscore --reader shadow` writes them). A dry run never uses
    `oscore_dir`: the live bridge holds those contexts, and two processes on one context would
    reuse its sequence numbers (docs/security.md). Required for a dry run with `endpoints`
    unless `insecure`."""
    insecure: bool = False
    """Plain CoAP: anyone on the devices' network can read their telemetry and command them.
    Only for a lab; the default is OSCORE."""

    @model_validator(mode="after")
    def _secured(self) -> CoapConfig:
        if self.insecure and (self.oscore_dir or self.shadow_oscore_dir) is not None:
            which = "oscore_dir" if self.oscore_dir is not None else "shadow_oscore_dir"
            raise ValueError(
                f"{which}: expected either {which} (OSCORE) or insecure: true, not both"
            )
        if (
            self.oscore_dir is not None
            and self.shadow_oscore_dir is not None
            and self.oscore_dir.resolve() == self.shadow_oscore_dir.resolve()
        ):
            raise ValueError(
                "shadow_oscore_dir: expected the shadow's own contexts (devices oscore "
                "--reader shadow writes OUT/readers/shadow), not the live bridge's oscore_dir"
            )
        if self.endpoints and not self.insecure and self.oscore_dir is None:
            raise ValueError(
                "oscore_dir: expected the folder of the bridge's OSCORE contexts (microgrid "
                "devices oscore), or insecure: true for plain CoAP"
            )
        return self

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: dict[str, str]) -> dict[str, str]:
        for key, url in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_.*?\[\]-]{1,64}", key):
                raise ValueError(f"expected a device id or glob as key, got {key!r}")
            try:
                parse_endpoint(url)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return v


class BridgeConfig(BaseModel):
    """`microgrid bridge run --config FILE`: everything one site's bridge needs."""

    model_config = _STRICT
    site: Path = Path("site.json")
    """Site manifest written by `microgrid devices site`."""
    node: Annotated[str, Field(pattern=f"^{ID_PATTERN}$")] = "bridge"
    broker: BrokerConfig = BrokerConfig()
    chain: ChainConfig = ChainConfig()
    timing: TimingConfig = TimingConfig()
    policy: PolicyConfig = PolicyConfig()
    coap: CoapConfig = CoapConfig()
    dry_run: bool = False
    """Shadow mode: decide and log, publish no command and send nothing to the chain."""
    metrics_port: Annotated[int, Field(ge=0, le=65_535)] | None = 9108
    """Prometheus endpoint on 127.0.0.1; 0 picks a free port, None disables it."""
    log_file: Path | None = None
    """JSON log lines go to stderr, and here too when set."""

    def coap_contexts(self) -> Path | None:
        """The folder of the OSCORE contexts this run uses: the live bridge's, or in a dry run
        the shadow's own; None for plain CoAP (or no CoAP device).

        Raises ConfigError for a dry run with CoAP devices but no `coap.shadow_oscore_dir`.
        """
        c = self.coap
        if c.insecure or not c.endpoints:
            return None
        if not self.dry_run:
            return c.oscore_dir
        if c.shadow_oscore_dir is None:
            raise ConfigError(
                "coap.shadow_oscore_dir: expected the shadow's own OSCORE contexts for a dry run "
                "(microgrid devices oscore --reader shadow writes OUT/readers/shadow); the live "
                "bridge's must never be used by a second process"
            )
        return c.shadow_oscore_dir

    def resolve(self, base: Path) -> BridgeConfig:
        """Relative paths are taken from the config file's folder, as a reader expects."""

        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else base / p

        return self.model_copy(
            update={
                "site": fix(self.site),
                "log_file": fix(self.log_file),
                "broker": self.broker.model_copy(
                    update={
                        "ca_file": fix(self.broker.ca_file),
                        "password_file": fix(self.broker.password_file),
                    }
                ),
                "coap": self.coap.model_copy(
                    update={
                        "oscore_dir": fix(self.coap.oscore_dir),
                        "shadow_oscore_dir": fix(self.coap.shadow_oscore_dir),
                    }
                ),
                "chain": self.chain.model_copy(
                    update={
                        "deployment": fix(self.chain.deployment),
                        "key_file": fix(self.chain.key_file),
                        "outbox": fix(self.chain.outbox),
                        "prosumer_keys": fix(self.chain.prosumer_keys),
                    }
                ),
            }
        )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(x) for x in err["loc"]) or "<file>"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "no such field (a typo?)"
    return f"{where}: {msg}"


def load_bridge_config(path: str | Path, **overrides: Any) -> BridgeConfig:
    """Read, validate and resolve a bridge YAML; errors name the field and the expected value.

    Paths in the file are relative to the file's folder (so `configs/bridge/local.yaml` can
    name `../../site.json`), except where they are absolute.
    """
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: expected a readable YAML bridge config ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of settings, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = BridgeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{p}: {_first_error(exc)}") from None
    return cfg.resolve(p.parent)


class Deployment(BaseModel):
    """The part of `microgrid chain deploy`'s manifest the bridge reads."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    chain_id: int = Field(alias="chainId", gt=0)
    addresses: dict[str, str]
    genesis: int = Field(ge=0)
    slot_seconds: int = Field(alias="slotSeconds", gt=0)
    artifact_hashes: dict[str, str] | None = Field(default=None, alias="artifactHashes")
    """SHA-256 of each compiled artifact the suite was deployed from (`microgrid chain deploy`
    writes them): what `bridge.deployment_check` holds against the bridge's own build."""

    @field_validator("addresses")
    @classmethod
    def _registry(cls, v: dict[str, str]) -> dict[str, str]:
        if "DeviceRegistry" not in v:
            raise ValueError(f"expected a DeviceRegistry address, got only {sorted(v)}")
        return v


def load_deployment(path: str | Path) -> Deployment:
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"chain.deployment: expected the JSON manifest of `microgrid chain deploy` at {p} "
            f"({exc})"
        ) from None
    try:
        return Deployment.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{p}: {_first_error(exc)}") from None
