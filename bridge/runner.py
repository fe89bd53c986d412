"""The async run loop of `microgrid bridge run`: BridgeCore between MqttLink and the outbox.

Three tasks share one event loop and one BridgeCore (so no locks):

* **receive**: every broker message goes through `core.handle`; rebirth requests go back out,
  readings go into the durable outbox. When the last device has reported the slot that just
  ended, the slot is decided at once (the latency the benchmark measures starts at that
  message's arrival). Messages are taken in batches (whatever has arrived): the batch's readings
  and the device sessions it moved are written in one SQLite transaction, and only then is each
  message acknowledged to the broker (a persistent MQTT session, manual acks). A crash before
  the commit leaves the messages unacknowledged, and the broker delivers them again.
* **the slot's market**: with `chain.prosumer_keys`, each decision also queues the slot's orders,
  clearing and the previous slot's reconciliation as one durable ``SlotSettler.run`` row
  (`bridge.settlement`), after the commands are out.
* **clock**: a slot whose devices have not all reported by `decide_deadline` x slot length is
  decided anyway; the core falls back to the rule-based controller and says which devices were
  missing.
* **outbox**: one worker thread owns the signing connection and the chain; it steps the outbox
  and snapshots its depth for the metrics. Readings are written to SQLite from the loop thread
  (their own connection, WAL), so a node that hangs never holds up telemetry.

Shadow mode (`dry_run`) decides and logs but publishes no command and sends nothing to the chain.
It runs beside the live bridge under its own node id (`<node>-shadow`): its own MQTT client id, so
the broker does not take the live bridge's connection over, and its own NBIRTH/NDEATH, so devices
(which watch the live node's) never see the shadow come and go as their bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bridge import session_store
from bridge.clock import SlotClock, slot_of_year
from bridge.coap import CoapLink
from bridge.coap_resources import match_devices
from bridge.config import BridgeConfig, Deployment
from bridge.core import BridgeCore, ChainWork, Publish
from bridge.dr import DemandResponseEvents
from bridge.metrics import BridgeMetrics
from bridge.mqtt import MqttLink, Received, Will
from bridge.oscore import check_contexts
from bridge.outbox import Outbox
from bridge.policy_source import LoadedPolicy, alias_version, load_policy
from bridge.reading_rows import log_lost, lost_readings
from bridge.settlement import (
    SLOT_KEY,
    SlotSettlement,
    chain_dr_queue,
    load_prosumer_keys,
    step_of_args,
)
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.topics import bridge_subscriptions
from bridge.validation import RejectReason, TelemetryValidator, ValidationLimits
from contracts.errors import ChainError
from contracts.slot_batch import DemandResponseQueue

log = logging.getLogger("bridge.run")


class BridgeRunner:
    """One site's bridge process."""

    def __init__(
        self,
        cfg: BridgeConfig,
        site: SiteManifest,
        deployment: Deployment,
        loaded: LoadedPolicy,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.site = site
        self.wall = wall
        t = cfg.timing
        length = t.slot_seconds or float(deployment.slot_seconds)
        genesis = deployment.genesis if t.genesis is None else t.genesis
        self.clock = SlotClock(
            genesis, length, float(deployment.genesis), float(deployment.slot_seconds)
        )
        domain = ReadingDomain(deployment.chain_id, deployment.addresses["DeviceRegistry"])
        limits = ValidationLimits(t.max_age_s, t.max_clock_skew_s, length, genesis)
        validator = TelemetryValidator(site, domain, limits)
        validator.on_reject = self._log_reject
        self.live = not cfg.dry_run
        self.core = BridgeCore(
            site,
            validator,
            loaded.policy,
            node=cfg.node if self.live else f"{cfg.node}-shadow",
            mode="live" if self.live else "shadow",
            policy_name=loaded.name,
            command_ttl_ms=int(t.command_ttl_slots * length * 1000),
        )
        # bd_seq must grow across restarts so devices tell a new bridge session from an old one.
        self.core.bd_seq = int(wall())
        self.loaded = loaded
        self.deployment = deployment
        self.metrics = BridgeMetrics(self.core)
        self.dr = DemandResponseEvents(site)
        self.n_devices = len(site.devices)
        self.reported: dict[int, set[str]] = defaultdict(set)
        self.ready_at: dict[int, float] = {}
        self.decided: set[int] = set()
        self.slots_decided = 0
        self.stop = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="outbox")
        self.inbox: Outbox | None = None  # loop thread: enqueue only
        self.worker: Outbox | None = None  # executor thread: sign, send, settle
        self.parity: dict[str, float] = {}
        self.failed = False
        self.refused: set[str] = set()
        """Registry versions that failed the parity check: not downloaded again."""
        self._rejects_logged = 0
        # Devices on CoAP: resolved now, so a key naming no device fails before anything connects.
        self.coap_endpoints = match_devices(cfg.coap.endpoints, [d.id for d in site.devices])
        # The live bridge's OSCORE contexts, or in a dry run the shadow's own (never the live
        # ones: see bridge.oscore); each loads (and is free) now, not after the broker.
        self.coap_contexts = cfg.coap_contexts()
        if self.coap_endpoints and self.coap_contexts is not None:
            field = "coap.oscore_dir" if self.live else "coap.shadow_oscore_dir"
            check_contexts(self.coap_contexts, self.coap_endpoints, field)
        self.coap: CoapLink | None = None
        self.market: SlotSettlement | None = None
        """Live with `chain.prosumer_keys`: each slot's orders go to the chain (one row)."""
        self.slots_enqueued = 0
        self.slots_missed = 0
        """Slots that got no row of their own (bridge down, nothing decided): settled empty."""
        self._synced = 0
        """`slots_enqueued` when the tracked credit was last read from the chain."""
        self._market_lock = threading.Lock()
        """Held while a slot's rows are queued and `slots_enqueued` counts them (loop thread),
        and while `_sync_credit` checks that count and puts the chain's state in place
        (executor thread): without it a read taken before a row was queued could replace the
        state that row left (its settled demand-response events put back as open, settled
        again by the next row: ``GridBalanceEventClosed``)."""

    # ---- logging ---------------------------------------------------------------------------
    def _log_reject(self, reason: RejectReason, detail: str) -> None:
        # Every refusal is counted; the log keeps the first ones and then one in a hundred, so
        # a flood of forged messages cannot fill the disk.
        self._rejects_logged += 1
        if self._rejects_logged <= 1000 or self._rejects_logged % 100 == 0:
            log.warning("message refused", extra={"reason": reason.value, "detail": detail})

    # ---- chain -----------------------------------------------------------------------------
    def _open_outbox(self) -> None:
        from bridge.deployment_check import check_deployment
        from contracts.client import Chain

        c = self.cfg.chain
        if c.rpc_url is None or c.key_file is None:
            from bridge.errors import ConfigError

            missing = "chain.rpc_url" if c.rpc_url is None else "chain.key_file"
            raise ConfigError(f"{missing}: expected a value in live mode (or use --dry-run)")
        key = bytes.fromhex(c.key_file.read_text().strip().removeprefix("0x"))
        addresses = dict(self.deployment.addresses)

        def make() -> Outbox:
            return Outbox(c.outbox, Chain.rpc(c.rpc_url or "", timeout=5), addresses, key)

        self.worker = self.executor.submit(make).result()
        # Before anything is queued: a deployment of other contracts is refused, naming the
        # manifest field (see bridge.deployment_check).
        self.executor.submit(check_deployment, self.worker.chain, self.deployment).result()
        self.inbox = Outbox(c.outbox, self.worker.chain, addresses, key)
        if c.prosumer_keys is not None:
            market = SlotSettlement(
                self.site, self.deployment, load_prosumer_keys(c.prosumer_keys, self.site)
            )
            self.executor.submit(self._start_credit, market).result()
            self.market = market
        # Slot rows repaired by the market's rules; a reading lost for good is logged (the
        # meter's later readings still land: see bridge.reading_rows).
        self.worker.repair = None if self.market is None else self.market.repairer(self.worker)
        self.worker.on_failed = log_lost
        # Before connecting: the broker delivers what we had not acknowledged right away.
        sessions, nonces = session_store.load(self.inbox.db)
        self.core.validator.restore(sessions, nonces)
        if sessions:
            log.info("device sessions restored", extra={"devices": len(sessions)})

    def _start_credit(self, market: SlotSettlement) -> None:
        """Executor thread: whether slots reconcile (the chain's reading window), and the
        accounts' credit on chain less what this outbox's slot rows not yet mined will charge
        (see `bridge.settlement`)."""
        assert self.worker is not None
        chain = self.worker.chain
        registry = chain.contract("DeviceRegistry", self.deployment.addresses["DeviceRegistry"])
        rewards = chain.contract("RewardSystem", self.deployment.addresses["RewardSystem"])
        market.configure(
            int(chain.call(registry, "readingWindow")),
            self.deployment.slot_seconds,
            int(chain.call(rewards, "renewableRate")),
        )
        grid = chain.contract("GridBalance", self.deployment.addresses["GridBalance"])
        minimum = int(chain.call(grid, "minEmergencySeconds"))
        wall_slot = self.clock.slot_seconds
        if wall_slot < self.deployment.slot_seconds and minimum > wall_slot:
            # An accelerated clock: the chain's time is not, so an emergency's end waits its
            # minimum in wall seconds and the slot rows behind it wait with it (in order).
            log.warning(
                "accelerated clock: an emergency lasts at least GridBalance.minEmergencySeconds",
                extra={
                    "min_emergency_s": minimum,
                    "wall_slots": math.ceil(minimum / wall_slot),
                },
            )
        unconfirmed = [step_of_args(args) for args in self.worker.unfinished_args("slot:")]
        market.start_credit(self._chain_credit(market), unconfirmed)
        market.start_paused(self._chain_paused(), unconfirmed)

    def _chain_paused(self) -> bool:
        """Whether GridBalance holds the market in an emergency now."""
        assert self.worker is not None
        chain = self.worker.chain
        grid = chain.contract("GridBalance", self.deployment.addresses["GridBalance"])
        return bool(chain.call(grid, "paused"))

    def _chain_credit(self, market: SlotSettlement) -> list[int]:
        assert self.worker is not None
        chain = self.worker.chain
        trading = chain.contract("EnergyTrading", self.deployment.addresses["EnergyTrading"])
        return [
            int(c) for c in chain.call_many(trading, "creditOf", [(a,) for a in market.accounts])
        ]

    def _sync_credit(self) -> None:
        """Executor thread: with every slot row mined, the tracked credit becomes the chain's
        (a reconciliation's charges and payouts are known only once mined)."""
        market, worker, before = self.market, self.worker, self.slots_enqueued
        if market is None or worker is None or self._synced == before:
            return
        if worker.unfinished_args("slot:"):
            return
        credit, paused = self._chain_credit(market), self._chain_paused()
        dr_queue = self._chain_dr_queue(market.dr_queue)
        with self._market_lock:
            if self.slots_enqueued == before:  # no row enqueued meanwhile (loop thread)
                market.credit = np.asarray(credit, dtype=np.int64)
                market.paused = paused
                market.dr_queue = dr_queue  # stored with the next row
                self._synced = before

    def _chain_dr_queue(self, predicted: DemandResponseQueue) -> DemandResponseQueue:
        """GridBalance's open events as the chain holds them (`chain_dr_queue`)."""
        assert self.worker is not None
        chain = self.worker.chain
        grid = chain.contract("GridBalance", self.deployment.addresses["GridBalance"])
        return chain_dr_queue(lambda event_id: chain.call(grid, "getEvent", event_id), predicted)

    def _enqueue_slot(self, slot: int) -> None:
        """Slot `slot`'s orders, by the env's rule on what was just decided, as one durable
        ``SlotSettler.run`` row keyed ``slot:<n>`` (a key already there: nothing happens),
        after empty rows for the slots missed since the last row (`SlotSettlement.enqueue`)."""
        market, obs = self.market, self.core.last_observation
        if market is None or self.inbox is None or obs is None:
            return
        if self.inbox.row(SLOT_KEY.format(slot)) is not None:
            return  # decided again after a restart: settled once already
        _, decision = self.core.decisions[-1]
        book = market.book(obs, decision, self.core.codec)
        metered: dict[str, int] = {}
        for meter, owner in market.meters.items():
            msg = self.core.state.latest.get(meter)
            if msg is not None and msg.reading is not None and msg.reading.slot == slot - 1:
                metered[owner] = msg.reading.energy_wh
        with self._market_lock:
            queued = market.enqueue(self.inbox, slot, book, metered)
            self.slots_enqueued += queued
        if queued > 1:
            self.slots_missed += queued - 1
            log.warning("missed slots settled empty", extra={"slot": slot, "missed": queued - 1})

    def _outbox_pass(self) -> None:
        assert self.worker is not None
        self.worker.step()
        with contextlib.suppress(ChainError, OSError):  # node away: the tracked credit stands
            self._sync_credit()
        self.metrics.outbox.rows = {s.value: n for s, n in self.worker.counts().items()}
        self.metrics.outbox.retries = self.worker.retries()
        self.metrics.outbox.repairs = self.worker.repairs()
        self.metrics.outbox.readings_lost = lost_readings(self.worker)

    async def _outbox_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = min(0.5, self.clock.slot_seconds / 2)
        while not self.stop.is_set():
            await loop.run_in_executor(self.executor, self._outbox_pass)
            await self._sleep(period)

    # ---- MQTT and CoAP ---------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """To a CoAP device through its link, to everyone else through the broker."""
        if self.coap is not None and self.coap.serves(topic):
            self.coap.publish(topic, payload, retain=retain)
        else:
            self.link.publish(topic, payload, retain=retain)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(seconds, 0.0))

    def _commit(self, work: list[ChainWork]) -> None:
        """The batch's readings and the sessions it moved, durable together (one fsync)."""
        changed = self.core.validator.take_dirty()
        if self.inbox is None or not (work or changed):
            return
        with self.inbox.transaction() as db:
            for item in work:
                self.inbox.enqueue(
                    item.key, item.contract, item.fn, item.args, retry_on=item.retry_on
                )
            session_store.save(db, changed)

    async def _receive_loop(self) -> None:
        while not self.stop.is_set():
            first = await self.link.receive(0.2)
            self.metrics.up.set(1 if self.link.connected.is_set() else 0)
            if first is None:
                continue
            batch = [first, *self.link.pending(self.cfg.broker.batch_max - 1)]
            work: list[ChainWork] = []
            for msg in batch:
                for item in self.core.handle(msg.topic, msg.payload, int(self.wall() * 1000)):
                    if isinstance(item, Publish):
                        self._publish(item.topic, item.payload, retain=item.retain)
                    elif self.live:
                        work.append(item)
                if "/DDATA/" in msg.topic:
                    # Commands do not wait for the readings' fsync: deciding needs only memory.
                    await self._maybe_ready(msg)
            self._commit(work)
            for msg in batch:
                self.link.ack(msg)

    async def _maybe_ready(self, msg: Received) -> None:
        device = msg.topic.rsplit("/", 1)[-1]
        held = self.core.state.latest.get(device)
        slot = self.clock.slot(self.wall())
        if held is None or held.slot != slot - 1 or slot in self.decided:
            return
        seen = self.reported[slot - 1]
        seen.add(device)
        if len(seen) == self.n_devices:
            self.ready_at[slot] = msg.at
            await self._decide(slot, msg.at, "ready")

    async def _clock_loop(self) -> None:
        frac = self.cfg.timing.decide_deadline
        while not self.stop.is_set():
            now = self.wall()
            slot = self.clock.slot(now)
            deadline = self.clock.start(slot) + frac * self.clock.slot_seconds
            if slot in self.decided:
                await self._sleep(self.clock.start(slot + 1) - now + 0.001)
            elif now < deadline:
                await self._sleep(deadline - now)
            else:
                await self._decide(slot, time.monotonic(), "deadline")

    async def _decide(self, slot: int, since: float, trigger: str) -> None:
        self.decided.add(slot)
        t = slot_of_year(self.clock.stands_for(slot), self.site.steps_per_day)
        decision, commands = self.core.decide(slot, int(self.wall() * 1000), t=t)
        if self.coap is None:  # all through the broker: one write for the slot
            self.link.publish_many(commands.topics, commands.payloads)
        else:
            for p in commands:
                self._publish(p.topic, p.payload, retain=p.retain)
        events = []
        if self.live:
            events = self.dr.update(slot, decision, self.core.codec, self.core.state, self.clock)
            for e in events:
                self._publish(e.publish.topic, e.publish.payload, retain=True)
                self.metrics.dr_events.labels(e.status).inc()
        latency = time.monotonic() - since
        self.metrics.decision_latency.observe(latency)
        if self.live:  # after the commands: chain work is not the decision's latency
            self._enqueue_slot(slot)
        level = logging.INFO if decision.reason is None else logging.WARNING
        log.log(
            level,
            "slot decided",
            extra={
                "slot": slot,
                "trigger": trigger,
                "source": decision.source.value,
                "fallback": None if decision.reason is None else decision.reason.value,
                "detail": decision.detail,
                "commands": len(commands),
                "dr_events": len(events),
                "latency_ms": round(latency * 1000, 3),
                "shadow_action": None if self.live else np.round(decision.action, 4).tolist(),
            },
        )
        for old in [s for s in self.reported if s < slot - 2]:
            del self.reported[old]
        self.decided = {s for s in self.decided if s >= slot - 2}
        self.slots_decided += 1
        if self.max_slots is not None and self.slots_decided >= self.max_slots:
            self.stop.set()

    # ---- hot reload ------------------------------------------------------------------------
    def parity_check(self, candidate: LoadedPolicy) -> dict[str, float]:
        """The new policy on the recorded observations: it must answer every one, finitely.

        Disagreement with the serving policy is recorded (a retrained model is meant to act
        differently), not refused; an exception, NaN or a wrong shape is refused.
        """
        recorded = list(self.core.observations)
        if not recorded:
            raise ValueError("parity: expected recorded observations, got none yet")
        obs = np.stack(recorded[-self.cfg.policy.parity_samples :])
        act_dim = self.core.codec.act_dim
        new = np.stack([np.asarray(candidate.policy.predict(o), np.float64) for o in obs])
        if new.shape != (len(obs), act_dim):
            raise ValueError(f"parity: expected actions of shape ({act_dim},), got {new.shape}")
        if not np.isfinite(new).all():
            raise ValueError("parity: expected finite actions on every recorded observation")
        old = np.stack([np.asarray(self.core.policy.predict(o), np.float64) for o in obs])
        diff = np.abs(new - old)
        return {
            "samples": float(len(obs)),
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
        }

    def _try_reload(self) -> tuple[LoadedPolicy, dict[str, float] | str] | None:
        """Executor thread: has the alias moved? Load the new version and check it if so.

        Returns the candidate with its parity figures, or with why it was refused; the swap
        itself happens on the loop thread, between two decisions.
        """
        p = self.cfg.policy
        version = alias_version(p.source, p.tracking_uri)
        if version is None or version == self.loaded.version or version in self.refused:
            return None
        candidate = load_policy(p.source, self.core.codec, p.tracking_uri)
        try:
            return candidate, self.parity_check(candidate)
        except Exception as exc:
            return candidate, f"{type(exc).__name__}: {exc}"

    async def _reload_loop(self) -> None:
        every = self.cfg.policy.reload_every_s
        if every <= 0 or not self.cfg.policy.source.startswith("models:/"):
            return
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            await self._sleep(every)
            try:
                result = await loop.run_in_executor(None, self._try_reload)
            except Exception as exc:
                log.warning("policy reload failed", extra={"detail": str(exc)[:300]})
                self.metrics.reloads.labels("error").inc()
                continue
            if result is None:
                continue
            candidate, figures = result
            if isinstance(figures, str):
                self.refused.add(candidate.version or "")
                self.metrics.reloads.labels("rejected").inc()
                log.warning(
                    "policy reload refused", extra={"policy": candidate.name, "detail": figures}
                )
                continue
            self.core.policy = candidate.policy
            self.core.policy_name = candidate.name
            self.loaded = candidate
            self.parity = figures
            self.metrics.reloads.labels("accepted").inc()
            log.warning("policy reloaded", extra={"policy": candidate.name, **figures})
            birth = self.core.birth(int(self.wall() * 1000))
            self.link.birth = Will(birth.topic, birth.payload, True)
            self.link.publish(birth.topic, birth.payload, retain=True)

    # ---- the whole run ---------------------------------------------------------------------
    async def run(self, max_slots: int | None = None) -> dict[str, Any]:
        """Connect, serve until `max_slots` slots are decided or `stop` is set, leave cleanly."""
        self.max_slots = max_slots
        b = self.cfg.broker
        now_ms = int(self.wall() * 1000)
        will, birth = self.core.will(now_ms), self.core.birth(now_ms)
        self.link = MqttLink(
            b.url,
            client_id=f"{self.site.site}-{self.core.node}",
            username=b.username,
            password=b.password(),
            ca_file=b.ca_file,
            will=Will(will.topic, will.payload, True),
            birth=Will(birth.topic, birth.payload, True),
            keepalive=b.keepalive_s,
            # Live: a persistent session with manual acks (nothing received is lost across a
            # crash). Shadow: a clean one, so a dry run takes nothing queued for the live bridge.
            session_expiry_s=b.session_expiry_s if self.live else None,
            # Read ahead as far as one batch: a backlog is committed in few transactions.
            max_queued=b.batch_max,
        )
        if self.live:
            self._open_outbox()
        if self.cfg.metrics_port is not None:
            self.metrics.serve(self.cfg.metrics_port)
        await self.link.connect(bridge_subscriptions(self.site.site))
        if self.coap_endpoints:
            c = self.cfg.coap
            # Its notifications join the broker's queue: one receive loop, one validator.
            self.coap = CoapLink(
                self.site.site, self.coap_endpoints, self.link.queue,
                request_timeout_s=c.request_timeout_s, retry_s=c.retry_s,
                reobserve_s=c.reobserve_s,
                # A (re-)registration first fetches the signed telemetry missed since the last
                # reading held (the validator's, restored from the outbox after a restart).
                resume_after=self.core.validator.last_nonce.get,
                oscore_dir=self.coap_contexts,
                oscore_field="coap.oscore_dir" if self.live else "coap.shadow_oscore_dir",
                read_only=not self.live,
            )  # fmt: skip
            self.metrics.watch_coap(self.coap.stats)
            await self.coap.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # a clean stop: NDEATH, outbox drained
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop.set)
        log.info(
            "bridge started",
            extra={
                "site": self.site.site,
                "mode": self.core.mode,
                "policy": self.loaded.name,
                "slot_seconds": self.clock.slot_seconds,
                "metrics_port": self.metrics.port,
                "devices": self.n_devices,
            },
        )
        loops = [self._receive_loop(), self._clock_loop(), self._reload_loop()]
        if self.worker is not None:
            loops.append(self._outbox_loop())
        tasks = [asyncio.create_task(self._guard(c)) for c in loops]
        try:
            await self.stop.wait()
        finally:
            self.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._shutdown()
        return self.summary()

    async def _guard(self, loop: Coroutine[Any, Any, None]) -> None:
        """A loop that dies takes the bridge down loudly: a half-running bridge is worse."""
        try:
            await loop
        except Exception:
            log.exception("bridge task failed")
            self.failed = True
            self.stop.set()

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        if self.worker is not None:
            worker = self.worker
            # A short drain: what is not confirmed now is durable and goes out on the next start.
            await loop.run_in_executor(self.executor, lambda: worker.drain(timeout_s=5.0))
            await loop.run_in_executor(self.executor, self._outbox_pass)
            await loop.run_in_executor(self.executor, worker.close)
        if self.inbox is not None:
            self.inbox.close()
        self.executor.shutdown(wait=True)
        if self.coap is not None:
            await self.coap.close()
        death = self.core.will(int(self.wall() * 1000))
        await self.link.close((death.topic, death.payload))
        self.metrics.close()

    def summary(self) -> dict[str, Any]:
        core, v = self.core, self.core.validator
        return {
            "site": self.site.site,
            "mode": core.mode,
            "policy": self.loaded.name,
            "slots_decided": self.slots_decided,
            "decisions": {k.value: n for k, n in core.stats.decisions.items()},
            "fallbacks": {k.value: n for k, n in core.stats.fallbacks.items()},
            "telemetry_accepted": v.telemetry_accepted,
            "rejected": {k.value: n for k, n in v.rejected.items()},
            "missed_messages": sum(s.missed for s in v.sessions.values()),
            "commands_sent": core.stats.commands_sent,
            "commands": {k.value: n for k, n in core.tracker.finished.items()},
            "readings_queued": core.stats.readings_queued,
            "slots_enqueued": self.slots_enqueued,
            "slots_missed": self.slots_missed,
            "relayed_readings": v.relayed_readings,
            "broker_sessions_resumed": self.link.session_resumed,
            "outbox": dict(self.metrics.outbox.rows),
            "outbox_retries": self.metrics.outbox.retries,
            "outbox_repairs": dict(self.metrics.outbox.repairs),
            "readings_lost": dict(self.metrics.outbox.readings_lost),
            "dr_events": self.dr.published,
            "dr_unannounced": 0 if self.market is None else self.market.unannounced,
            "metrics_port": self.metrics.port,
            "parity": self.parity,
            **({"coap": self.coap.summary()} if self.coap is not None else {}),
        }
