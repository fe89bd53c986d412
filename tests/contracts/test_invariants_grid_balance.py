"""Hypothesis stateful test of GridBalance's demand response against its Python model.

`contracts.model.GridBalanceModel` restates GridBalance's events (announce, cancel, settle
against signed readings and baselines) and its emergency pause so that a simulation can
predict, exactly, what the chain pays. Random announcements (past, present and future start
slots, bad durations, empty, unsorted or foreign participant lists), readings that some meters
skip, settlements early and late, cancellations and emergencies run on the real contract
(py-evm) and on the model in lockstep: every refusal must be the same custom error with the
same arguments, every settlement the same reductions, rewards and ``grantReward`` calls, and
every stored event the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from eth_account import Account
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from contracts.errors import ContractRevert
from contracts.model import DrParticipant, GridBalanceModel, LoadType
from tests.contracts.helpers import (
    CONTRACT_SETTINGS,
    STATEFUL_STEPS,
    events,
    sequences,
    shared_deployment,
)

pytestmark = pytest.mark.usefixtures("deployed_before_hypothesis")

#: Index of a device that is not a registered meter.
FOREIGN = 4
participant = st.tuples(
    st.sampled_from([0, 1, 2, 3] * 5 + [FOREIGN]),  # meter (now and then not a meter)
    st.sampled_from(list(LoadType)),
    st.integers(0, 2),  # priority
    st.integers(0, 4_000),  # baseline Wh per slot
)
#: Mostly a valid list (sorted by priority, 1-4 entries), now and then an unsorted or empty one.
participants = st.tuples(st.lists(participant, max_size=4), st.integers(0, 7)).map(
    lambda drawn: drawn[0] if drawn[1] == 0 else sorted(drawn[0], key=lambda p: p[2])
)
silent_or_wh = st.one_of(st.none(), st.integers(-4_000, 4_000), st.integers(0, 4_000))


class GridBalanceMachine(RuleBasedStateMachine):
    """GridBalance (called by its operator, the admin) and the model, driven in lockstep."""

    def __init__(self) -> None:
        super().__init__()
        self.d = shared_deployment()
        self.d.chain.revert(self.d.snapshot)
        self.suite = self.d.suite
        self.grid = self.suite.grid
        self.devices = [Account.from_key(k).address for k in self.d.meter_keys]
        self.devices.append(self.d.stranger)  # FOREIGN
        self.model = GridBalanceModel(
            genesis=self.suite.genesis,
            meters=dict(zip(self.devices, self.d.users, strict=False)),
        )
        self.readings: dict[tuple[str, int], int] = {}
        self.last_read: dict[str, int] = {}
        # As the market machine: 5 s into a slot ahead of the wall clock, every block its
        # parent + 1 s, so the model's "now" (latest + 1) is the next transaction's timestamp.
        now = max(self.d.chain.timestamp(), int(time.time()))
        genesis = self.suite.genesis
        self.d.chain.travel_to(self.suite.slot_start((now - genesis) // 900 + 1) + 5)

    def _now(self) -> int:
        return self.d.chain.timestamp() + 1

    def _lockstep(self, model_op: Callable[[], Any], fn: str, *args: object) -> tuple[bool, Any]:
        """Run ``model_op``; if the model refuses, the contract must refuse identically."""
        try:
            outcome = model_op()
        except ContractRevert as expected:
            with pytest.raises(ContractRevert) as got:
                self.d.chain.call(self.grid, fn, *args, sender=self.d.admin)
            assert (got.value.name, got.value.args_by_name) == (
                expected.name,
                expected.args_by_name,
            )
            return False, None
        return True, outcome

    @rule(seconds=st.sampled_from([1, 300, 600, 900, 1_500]))
    def advance(self, seconds: int) -> None:
        self.d.chain.travel_to(self.d.chain.timestamp() + seconds)

    @rule(wh=st.lists(silent_or_wh, min_size=4, max_size=4))
    def read(self, wh: list[int | None]) -> None:
        """The meters' readings of the slot that just ended (a None: that meter stays silent)."""
        self._read(self.model.current_slot(self._now()) - 1, wh)

    @rule(wh=st.lists(st.lists(silent_or_wh, min_size=4, max_size=4), min_size=4, max_size=4))
    def meter_the_last_event(self, wh: list[list[int | None]]) -> None:
        """Step slot by slot through the newest event, reading each slot, until its readings
        are final, then settle it: where rewards are paid."""
        if not self.model.events:
            return
        ev = self.model.events[max(self.model.events)]
        end = ev.start_slot + ev.duration_slots
        for slot, values in zip(range(self.model.current_slot(self._now()), end), wh, strict=False):
            self.d.chain.travel_to(max(self.suite.slot_start(slot + 1) + 1, self._now()))
            self._read(slot, values)
        final = self.suite.slot_start(end) + 600
        if final > self._now():
            self.d.chain.travel_to(final)
        self.settle(max(self.model.events))

    def _read(self, slot: int, wh: list[int | None]) -> None:
        now = self._now()
        if slot < 0 or now >= self.suite.slot_start(slot + 1) + 600 - 5:
            return  # its reading window is (about to be) closed
        for key, device, value in zip(self.d.meter_keys, self.devices, wh, strict=False):
            if value is None or self.last_read.get(device, -1) >= slot:
                continue
            self.suite.submit_reading(key, slot, value, sender=self.d.stranger)
            self.readings[device, slot] = value
            self.last_read[device] = slot

    @rule(
        offset=st.sampled_from([1, 1, 1, 2, 3, 0, -1]),
        duration=st.sampled_from([1, 1, 2, 3, 0, 17]),
        listed=participants,
        goal=st.integers(0, 6_000),
        incentive=st.integers(0, 3),
        bonus=st.integers(0, 100),
        participation=st.integers(0, 50),
    )
    def create(
        self,
        offset: int,
        duration: int,
        listed: list[tuple[int, LoadType, int, int]],
        goal: int,
        incentive: int,
        bonus: int,
        participation: int,
    ) -> None:
        start = self.model.current_slot(self._now()) + offset
        people = [DrParticipant(self.devices[m], kind, p, b) for m, kind, p, b in listed]
        args = (start, duration, goal, incentive, bonus, participation)
        ok, event_id = self._lockstep(
            lambda: self.model.create_event(self._now(), *args, people),
            "createEvent",
            *args,
            [p.as_tuple() for p in people],
        )
        if ok:
            receipt = self.d.chain.transact(
                self.grid, "createEvent", *args, [p.as_tuple() for p in people],
                sender=self.d.admin,
            )  # fmt: skip
            (created,) = events(self.grid, "DemandResponseCreated", receipt)
            assert created["eventId"] == event_id
            event("announced")

    @rule()
    def settle_the_newest(self) -> None:
        self.settle(max(self.model.events, default=0))

    @rule(event_id=st.integers(0, 4))
    def settle(self, event_id: int) -> None:
        ok, outcome = self._lockstep(
            lambda: self.model.settle_event(event_id, self._now(), self.readings),
            "settleEvent",
            event_id,
        )
        if not ok:
            return
        receipt = self.d.chain.transact(self.grid, "settleEvent", event_id, sender=self.d.admin)
        got = [
            (e["reductionWh"], e["reward"])
            for e in events(self.grid, "ParticipantSettled", receipt)
        ]
        assert got == list(zip(outcome.reductions, outcome.rewards, strict=True))
        (total,) = events(self.grid, "DemandResponseSettled", receipt)
        assert (total["totalReductionWh"], total["targetMet"]) == (
            outcome.total_reduction_wh,
            outcome.target_met,
        )
        grants = [
            (g["account"], g["amount"], g["kind"])
            for g in events(self.suite.rewards, "RewardGranted", receipt)
        ]
        assert grants == [(a, amount, int(kind)) for a, amount, kind in outcome.grants]
        event("settled, rewards paid" if grants else "settled, nothing paid")

    @rule(
        listed=st.lists(participant.filter(lambda p: p[0] != FOREIGN), min_size=1, max_size=4),
        duration=st.integers(1, 2),
        goal=st.integers(0, 6_000),
        wh=st.lists(st.lists(silent_or_wh, min_size=4, max_size=4), min_size=4, max_size=4),
    )
    def whole_event(
        self,
        listed: list[tuple[int, LoadType, int, int]],
        duration: int,
        goal: int,
        wh: list[list[int | None]],
    ) -> None:
        """A valid event from announcement to settlement (unless an emergency refuses it)."""
        listed = sorted(listed, key=lambda p: p[2])
        self.create(1, duration, listed, goal, 2, 40, 30)
        self.meter_the_last_event(wh)

    @rule(event_id=st.integers(0, 4))
    def cancel(self, event_id: int) -> None:
        ok, _ = self._lockstep(
            lambda: self.model.cancel_event(event_id, self._now()), "cancelEvent", event_id
        )
        if ok:
            self.d.chain.transact(self.grid, "cancelEvent", event_id, sender=self.d.admin)

    @rule(calm=st.integers(0, 3))
    def emergency(self, calm: int) -> None:
        if calm:  # one draw in four: emergencies would otherwise refuse most announcements
            return
        now = self._now()
        ok, _ = self._lockstep(
            lambda: self.model.declare_emergency(now), "declareEmergency", b"test".ljust(32, b"\0")
        )
        if ok:
            self.d.chain.transact(
                self.grid, "declareEmergency", b"test".ljust(32, b"\0"), sender=self.d.admin
            )

    @rule()
    def recover(self) -> None:
        now = self._now()
        ok, _ = self._lockstep(lambda: self.model.recover(now), "recover")
        if ok:
            self.d.chain.transact(self.grid, "recover", sender=self.d.admin)

    @invariant()
    def same_events(self) -> None:
        assert self.d.chain.call(self.grid, "paused") == self.model.paused
        for event_id, ev in self.model.events.items():
            stored = self.d.chain.call(self.grid, "getEvent", event_id)
            assert list(stored) == [
                ev.start_slot, ev.duration_slots, ev.cancelled, ev.settled,
                ev.target_reduction_wh, ev.incentive_per_wh, ev.peak_bonus,
                ev.participation_reward,
            ]  # fmt: skip


TestGridBalance = GridBalanceMachine.TestCase
# Its own 30 sequences beside the 1,000 of the market and reward machines: demand response
# has few rules, and longer sequences let events be announced, metered and settled in one run.
TestGridBalance.settings = settings(
    CONTRACT_SETTINGS, max_examples=sequences(0.03), stateful_step_count=2 * STATEFUL_STEPS
)
