"""The bridge's sans-I/O protocol object: bytes and clock values in, publishes and chain work out.

Like h11 or aiomqtt's core, it owns no socket and no timer. The MQTT shell feeds it every
message (`handle`) and calls `decide` once per slot; it answers with `Publish` items to send
and `ChainWork` items for the outbox. Everything it decided is also in `stats`, which the
metrics endpoint exports. This is where validation, state, the codec, the policy, the shield,
the fallback and the command tracker meet, and it is tested without a broker.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np

from agents.baselines import RuleBasedPolicy
from agents.policy import Policy
from agents.shield import Shield
from bridge.commands import CommandEncoder, CommandTracker
from bridge.decision import Decision, FallbackReason, Source, decide
from bridge.messages import Ack, NodeBirth, NodeDeath, Rebirth, Telemetry, encode
from bridge.messages import Command as CommandMsg
from bridge.observation import Observation, ObservationBuilder, SiteState
from bridge.site import SiteManifest
from bridge.topics import MessageType, TopicError, parse_topic, topic
from bridge.validation import Rejected, RejectReason, TelemetryValidator


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = False


class Publishes(Sequence[Publish]):
    """A slot's commands to publish, as the encoder made them: a list of topics and one of
    payloads, with no object per command (`MqttLink.publish_many` takes the lists as they
    are). Indexing or iterating gives `Publish` items, made on demand."""

    __slots__ = ("payloads", "topics")

    def __init__(self, topics: list[str], payloads: list[bytes]) -> None:
        if len(topics) != len(payloads):
            raise ValueError(f"publishes: {len(topics)} topics for {len(payloads)} payloads")
        self.topics = topics
        self.payloads = payloads

    def __len__(self) -> int:
        return len(self.topics)

    @overload
    def __getitem__(self, i: int) -> Publish: ...
    @overload
    def __getitem__(self, i: slice) -> list[Publish]: ...
    def __getitem__(self, i: int | slice) -> Publish | list[Publish]:
        if isinstance(i, slice):
            return [Publish(t, p) for t, p in zip(self.topics[i], self.payloads[i], strict=True)]
        return Publish(self.topics[i], self.payloads[i])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ChainWork:
    """One call for the outbox, with its idempotency key."""

    key: str
    contract: str
    fn: str
    args: tuple[object, ...]
    retry_on: tuple[str, ...] = ()


@dataclass
class Stats:
    decisions: Counter[Source] = field(default_factory=Counter)
    fallbacks: Counter[FallbackReason] = field(default_factory=Counter)
    commands_sent: int = 0
    shield_modified: int = 0
    readings_queued: int = 0


class BridgeCore:
    """One site's bridge logic."""

    def __init__(
        self,
        site: SiteManifest,
        validator: TelemetryValidator,
        policy: Policy,
        *,
        node: str = "bridge",
        mode: str = "live",
        policy_name: str = "",
        command_ttl_ms: int = 900_000,
        ramp_kw_per_step: float | None = None,
        decisions_kept: int = 4096,
    ) -> None:
        self.site = site
        self.validator = validator
        self.codec = site.make_codec()
        self.builder = ObservationBuilder(site, self.codec)
        self.shield = Shield(site.batteries.params(), self.codec, site.dt_h, ramp_kw_per_step)
        self.policy = policy
        self.fallback = RuleBasedPolicy(self.codec)
        self.state = SiteState()
        self.builder.track(self.state)
        self.tracker = CommandTracker()
        self.encoder = CommandEncoder(site, self.codec)
        self.node = node
        self.mode = mode
        self.policy_name = policy_name
        self.command_ttl_ms = command_ttl_ms
        self.bd_seq = 0
        self.stats = Stats()
        self.last_setpoint_kw: np.ndarray | None = None
        self.decisions: deque[tuple[int, Decision]] = deque(maxlen=decisions_kept)
        self.observations: deque[np.ndarray] = deque(maxlen=decisions_kept)
        """Recent encoded observations: the set a new policy must answer before a hot reload."""
        self.last_observation: Observation | None = None
        """What the last decision saw (the slot's orders are bid from it)."""

    # ---- session of the bridge itself ------------------------------------------------------
    def birth(self, now_ms: int) -> Publish:
        msg = NodeBirth(
            node=self.node, bd_seq=self.bd_seq, ts=now_ms, mode=self.mode,  # type: ignore[arg-type]
            policy=self.policy_name[:200],
        )  # fmt: skip
        return Publish(topic(self.site.site, MessageType.NBIRTH, self.node), encode(msg), True)

    def will(self, now_ms: int) -> Publish:
        msg = NodeDeath(node=self.node, bd_seq=self.bd_seq, ts=now_ms)
        return Publish(topic(self.site.site, MessageType.NDEATH, self.node), encode(msg), True)

    # ---- inbound ---------------------------------------------------------------------------
    def handle(self, topic_text: str, payload: bytes, now_ms: int) -> list[Publish | ChainWork]:
        """One device message; returns what to publish or queue because of it."""
        v = self.validator
        try:
            t = parse_topic(topic_text)
        except TopicError:
            v.rejected[RejectReason.MALFORMED] += 1
            return []
        if t.site != self.site.site:
            return []
        if t.message_type is MessageType.DDATA:
            out = v.on_telemetry(t.entity, payload, now_ms)
            if isinstance(out, Rejected):
                # Off time or out of session, so not acted on, but a valid reading is owed to
                # the chain (one for a slot not yet ended waits in the outbox: "not yet").
                relay = [] if out.relay is None else self._reading_work(out.relay)
                if out.reason is RejectReason.NO_SESSION and self.site.device(t.entity):
                    return [self._rebirth(t.entity, now_ms), *relay]
                return relay
            self.state.update(out)
            return self._reading_work(out)
        if t.message_type is MessageType.DBIRTH:
            v.on_birth(t.entity, payload, now_ms)
        elif t.message_type is MessageType.DDEATH:
            v.on_death(t.entity, payload)
        elif t.message_type is MessageType.DACK:
            ack = v.on_ack(t.entity, payload)
            if isinstance(ack, Ack):
                self.tracker.on_ack(ack)
        return []

    def _rebirth(self, device: str, now_ms: int) -> Publish:
        cmd = CommandMsg(
            command_id=f"rebirth.{device}.{now_ms}", device=device, ts=now_ms, slot=0,
            expires_ts=now_ms + 60_000, action=Rebirth(kind="rebirth"),
        )  # fmt: skip
        return Publish(topic(self.site.site, MessageType.DCMD, device), encode(cmd))

    def _reading_work(self, msg: Telemetry) -> list[Publish | ChainWork]:
        r = msg.reading
        if r is None:
            return []
        device = self.validator.device(msg.device)
        if device is None:
            return []
        self.stats.readings_queued += 1
        reading = (device.address, r.slot, r.energy_wh, r.nonce)
        return [
            ChainWork(
                key=f"reading:{msg.device}:{r.slot}",
                contract="DeviceRegistry",
                fn="submitReading",
                args=(reading, bytes.fromhex(r.signature[2:])),
                retry_on=("DeviceRegistrySlotNotEnded",),
            )
        ]

    # ---- once per slot ---------------------------------------------------------------------
    def _price_multiplier(self, slot: int) -> float:
        """The price signal decided for `slot` (1.0 if this bridge did not decide it)."""
        for decided, decision in reversed(self.decisions):
            if decided == slot:
                return float(self.codec.decode_action(decision.action).price_multiplier)
            if decided < slot:
                break
        return 1.0

    def decide(
        self,
        slot: int,
        now_ms: int,
        community_price: float | None = None,
        t: int | None = None,
    ) -> tuple[Decision, Publishes]:
        """Decide slot `slot` from the telemetry of slot - 1; commands unless in shadow mode.

        `t` is the env's slot of the year that `slot` stands for (`clock.slot_of_year` of
        `SlotClock.stands_for`); None reads it from `now_ms`, right only on an unaccelerated
        clock.
        """
        if t is None:
            t = self.builder.slot_of_year(now_ms // 1000)
        price = community_price
        if price is None:
            # The env observes the seed formula's price of the slot just ended, under the price
            # signal decided for it; the tariff only where the site or its sensor lack it.
            price = self.builder.community_price(
                self.state, slot - 1, t - 1, self._price_multiplier(slot - 1)
            )
        if price is None:
            price = float(self.site.import_price[t % self.site.steps_per_day])
        obs = self.last_observation = self.builder.build(self.state, slot - 1, t, price)
        if not obs.missing:
            self.observations.append(obs.obs)
        decision = decide(obs, self.policy, self.fallback, self.shield, self.last_setpoint_kw)
        self.decisions.append((slot, decision))
        self.stats.decisions[decision.source] += 1
        if decision.reason is not None:
            self.stats.fallbacks[decision.reason] += 1
        if bool(np.asarray(decision.report.modified).any()):
            self.stats.shield_modified += 1
        self.last_setpoint_kw = np.asarray(decision.report.applied_kw, dtype=np.float64)
        self.tracker.expire(now_ms)
        if self.mode != "live":
            return decision, Publishes([], [])
        commands = self.encoder.encode(decision, slot, now_ms, now_ms + self.command_ttl_ms)
        self.tracker.sent_encoded(commands)
        self.stats.commands_sent += len(commands)
        return decision, Publishes(commands.topics, commands.payloads)
