"""The live stack the bridge's integration tests share: anvil with the suite deployed and the
site's devices registered, mosquitto with a user per device, and the files a bridge config names.

Each test module chooses its own clock (the suite's genesis, where the chain's time goes next);
what every one of them needs besides is the same, so it is written once here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.registration import enrol_market, prosumer_keys, register_site
from bridge.site import SiteManifest
from contracts.client import Chain, Suite, SuiteConfig, deploy_suite, deployment_manifest
from tests.bridge.broker import Broker, mosquitto
from tests.bridge.services import ANVIL_KEYS, anvil


@dataclass
class Live:
    broker: Broker
    chain: Chain
    suite: Suite
    deployed_at: int
    """The chain's timestamp when the suite was deployed and the site registered."""


@contextlib.contextmanager
def live_stack(
    files: Path,
    site: SiteManifest,
    broker_users: list[str],
    genesis: Callable[[int], int],
    config: SuiteConfig | None = None,
) -> Iterator[Live]:
    """Start both services, deploy the suite with genesis `genesis(now)` and `config` (default:
    a reading window long enough for accelerated slots, where the chain's time stands still;
    with a `config` given, its RewardSystem is funded), register `site`, and write
    `deployment.json`, `bridge.password`, `relayer.key` and, for a site that trades,
    `prosumers.json` (the households' order keys) into `files`; stop everything afterwards."""
    with anvil() as url, mosquitto(files / "mosquitto", broker_users) as broker:
        chain = Chain.rpc(url)
        now = chain.timestamp()
        suite = deploy_suite(
            chain, genesis=genesis(now), config=config or SuiteConfig(reading_window_seconds=10**8)
        )
        if config is not None:
            suite.fund_rewards(10**30)
        (files / "deployment.json").write_text(json.dumps(deployment_manifest(suite)))
        register_site(chain, suite.registry.address, site)
        if site.market is not None:  # a site that trades (not the tiny stand-in of conftest)
            # The bridge (ANVIL_KEYS[1]) settles each slot's orders, signed with the households'
            # keys, from their deposits.
            enrol_market(
                chain, suite.addresses(), site, chain.accounts[1], credit=100 * 10**9,
                treasury_credit=100_000 * 10**9,
            )  # fmt: skip
            keys = {name: key.hex() for name, key in prosumer_keys(site).items()}
            (files / "prosumers.json").write_text(json.dumps(keys))
        (files / "bridge.password").write_text(broker.passwords["bridge"])
        (files / "relayer.key").write_text(ANVIL_KEYS[1].hex())
        yield Live(broker, chain, suite, now)


def bridge_config(
    files: Path,
    broker: Broker,
    chain: Chain,
    /,
    *,
    slot_seconds: float,
    genesis: float,
    decide_deadline: float,
    outbox: str = "outbox.db",
    metrics_port: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A `bridge run` config (as loaded from YAML) over the files `live_stack` wrote; `extra`
    replaces whole sections (e.g. `chain=` for a shadow bridge without a relay key)."""
    return {
        "site": str(files / "site.json"),
        "broker": {
            "url": broker.url,
            "ca_file": str(broker.ca_file),
            "password_file": str(files / "bridge.password"),
        },
        "chain": {
            "deployment": str(files / "deployment.json"),
            "rpc_url": chain.w3.provider.endpoint_uri,  # type: ignore[attr-defined]
            "key_file": str(files / "relayer.key"),
            "outbox": str(files / outbox),
            **(
                {"prosumer_keys": str(files / "prosumers.json")}
                if (files / "prosumers.json").exists()
                else {}
            ),
        },
        "timing": {
            "slot_seconds": slot_seconds,
            "genesis": genesis,
            "decide_deadline": decide_deadline,
        },
        "metrics_port": metrics_port,
        **extra,
    }
