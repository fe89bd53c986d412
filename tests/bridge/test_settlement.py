"""The bridge's slot transactions on anvil with a real reading window, the chain's clock driven
slot by slot: each ``SlotSettler.run`` row reconciles the previous slot, posts the price and
settles the slot's orders, once; afterwards every account's credit is what the env's mirror
ledger (`envs.ledger.MirrorLedger`, the suite's rules) gives for the same books and readings.

No broker here: the books are drawn at random (limit prices distinct on each side, so no two
marginal orders share a remainder and the batch order cannot matter), the readings signed with
the meters' keys and relayed by the same outbox, as the run loop does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from coincurve import PrivateKey

from bridge.config import Deployment
from bridge.errors import ConfigError
from bridge.outbox import Outbox, RowState
from bridge.registration import enrol_market, owner_of, prosumer_keys, register_site
from bridge.settlement import RETRY_ON, SlotBook, SlotSettlement, load_prosumer_keys, step_of_args
from bridge.site import SiteManifest
from bridge.site_builder import build_site, device_key
from contracts.client import CLEARING_GAS, Chain, Suite, deploy_suite, deployment_manifest
from contracts.settler import ReadingSigner
from envs import load_scenario
from envs.grid import build_grid
from envs.ledger import MirrorLedger, SlotInput, units
from envs.market import BUY, SELL, Book
from envs.scenario import MarketConfig
from tests.bridge.services import ANVIL_KEYS, anvil

CREDIT = 100.0
TREASURY = 100_000.0
REFERENCE = 250_000
"""0.25 currency per kWh, in money units per Wh."""


@dataclass
class Chainside:
    chain: Chain
    suite: Suite
    site: SiteManifest
    market: SlotSettlement
    outbox: Outbox
    window: int


@pytest.fixture
def chainside(tmp_path: Path) -> Iterator[Chainside]:
    site = build_site(build_grid(load_scenario()), site="site1", seed="0")
    with anvil() as url:
        chain = Chain.rpc(url)
        suite = deploy_suite(chain)
        register_site(chain, suite.registry.address, site)
        enrol_market(
            chain, suite.addresses(), site, chain.accounts[1], credit=units(CREDIT),
            treasury_credit=units(TREASURY),
        )  # fmt: skip
        dep = Deployment.model_validate(json.loads(json.dumps(deployment_manifest(suite))))
        market = SlotSettlement(site, dep, prosumer_keys(site))
        window = int(chain.call(suite.registry, "readingWindow"))
        market.configure(window, dep.slot_seconds)
        outbox = Outbox(tmp_path / "outbox.db", chain, dict(dep.addresses), ANVIL_KEYS[1])
        outbox.backoff_s, outbox.backoff_max_s = 0.05, 0.2
        market.start_credit([units(CREDIT)] * len(site.prosumers), [])
        yield Chainside(chain, suite, site, market, outbox, window)
        outbox.close()


def random_book(rng: np.random.Generator, n: int) -> Book:
    side = rng.choice([BUY, SELL], n)
    qty = rng.integers(200, 3_000, n) * (rng.random(n) < 0.9)
    # Distinct limits on each side, inside the band [0.2, 3] x the reference.
    limit = (REFERENCE * (0.7 + 0.05 * np.arange(n))).astype(np.int64)
    rng.shuffle(limit)
    return Book(qty[None].astype(np.int64), limit[None], side[None].astype(np.int64))


def test_slot_rows_reconcile_the_previous_slot_and_settle_as_the_mirror(
    chainside: Chainside,
) -> None:
    c = chainside
    chain, suite, site, market, outbox = c.chain, c.suite, c.site, c.market, c.outbox
    n = len(site.prosumers)
    assert market.reconciles  # the suite's default window is shorter than a slot
    rng = np.random.default_rng(5)
    config = MarketConfig(initial_credit=CREDIT, treasury_credit=TREASURY)
    mirror = MirrorLedger(1, n, config)
    signer = ReadingSigner(int(chain.w3.eth.chain_id), suite.registry.address)
    meters = [site.device(p.meter) for p in site.prosumers]
    nonces = [0] * n
    metered = np.zeros(n, dtype=np.int64)
    book = Book(*(np.zeros((3, 1, n), np.int64)))
    first = suite.current_slot() + 2
    slots = range(first, first + 5)
    for k, slot in enumerate([*slots, slots.stop]):
        chain.travel_to(suite.slot_start(slot) + 1)  # the gate closed, the slot began
        if k:  # the previous slot's signed readings, relayed by the outbox as the run loop does
            for i, meter in enumerate(meters):
                assert meter is not None
                cap = meter.capacity_w * 900 // 3600
                wh = int(rng.integers(-cap // 2, cap // 2))
                metered[i] = wh
                reading = (meter.address, slot - 1, wh, nonces[i])
                key = PrivateKey(device_key("0", meter.id))
                sig = signer.sign(key, *reading)
                outbox.enqueue(f"reading:{meter.id}:{slot - 1}", "DeviceRegistry",
                               "submitReading", (reading, sig))  # fmt: skip
                nonces[i] += 1
            mirror.settle(
                SlotInput(
                    slot=np.array([slot - 1]), book=book, reference=np.array([REFERENCE]),
                    metered_wh=metered[None].copy(), dr_event=np.zeros(1, dtype=bool),
                    dr_reduction_wh=np.zeros((1, n), dtype=np.int64),
                    emergency=np.zeros(1, dtype=bool),
                )
            )  # fmt: skip
            assert outbox.drain(timeout_s=30)
        # The last round settles an empty book: it only reconciles the slot before.
        # What the run loop knows of the previous slot's meters when it decides this one.
        known = {market.accounts[j]: int(metered[i]) for j, i in enumerate(market.order)}
        book = random_book(rng, n) if slot in slots else Book(*(np.zeros((3, 1, n), np.int64)))
        b = SlotBook(book, REFERENCE, False)
        args = outbox.args(f"slot:{slot - 1}")
        previous = None if args is None else step_of_args(args)
        batch = market.batch(slot, b, previous, known)
        step = market.step(batch, b, previous)
        assert outbox.enqueue(f"slot:{slot}", "SlotSettler", "run", (step.value(),),
                              gas=CLEARING_GAS, retry_on=RETRY_ON)  # fmt: skip
        market.charge(batch)
        outbox.step()
        row = outbox.row(f"slot:{slot}")
        assert row is not None
        if previous is not None:  # the previous slot's readings are not final yet: it waits
            assert row.state is RowState.PENDING and "ReadingsNotFinal" in str(row.last_error)
            chain.travel_to(suite.slot_start(slot) + c.window + 1)
        assert outbox.drain(timeout_s=30), outbox.row(f"slot:{slot}")
        assert outbox.row(f"slot:{slot}").state is RowState.CONFIRMED  # type: ignore[union-attr]

    trading = suite.trading
    settled = [
        int(e["args"]["slot"]) for e in trading.events.SignedBatchSettled().get_logs(from_block=0)
    ]
    reconciled = [
        int(e["args"]["slot"]) for e in trading.events.SlotReconciled().get_logs(from_block=0)
    ]
    assert settled == [*slots, slots.stop]  # each slot once, in order
    assert reconciled == list(slots)
    # The chain's ledger after the last reconciliation is the mirror's.
    owners = [owner_of(site, p.name, chain.accounts[0]) for p in site.prosumers]
    on_chain = [suite.credit_of(a) for a in owners]
    assert on_chain == [int(x) for x in mirror.credits()[0]]
    assert len(set(on_chain)) > 1  # trading and imbalances moved the credits apart
    assert suite.credit_of(chain.accounts[0]) == int(mirror.treasury[0])


def test_order_keys_need_a_trading_site_and_a_key_per_household(
    site: SiteManifest, tmp_path: Path
) -> None:
    """Bad input is refused before anything connects, naming the field."""
    dep = Deployment.model_validate(
        {"chainId": 1, "addresses": {"DeviceRegistry": "0x" + "1" * 40, "SlotSettler": "0x"
         + "2" * 40, "EnergyTrading": "0x" + "3" * 40}, "genesis": 0, "slotSeconds": 900}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="expected a `market` section"):
        SlotSettlement(site, dep, prosumer_keys(site))  # the tiny stand-in site trades nothing
    full = build_site(build_grid(load_scenario()), site="site1", seed="0")
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({full.prosumers[0].name: "ab" * 32}))
    with pytest.raises(ConfigError, match=r"chain\.prosumer_keys: expected a key for every"):
        load_prosumer_keys(path, full)
