"""The live stack the bridge's integration tests share: anvil with the suite deployed and the
site's devices registered, mosquitto with a user per device, and the files a bridge config names.

Each test module chooses its own clock (the suite's genesis, where the chain's time goes next);
what every one of them needs besides is the same, so it is written once here.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Deployment, load_deployment
from bridge.registration import enrol_market, prosumer_keys, register_site
from bridge.site import SiteManifest
from contracts.client import Chain
from tests.bridge.broker import Broker, mosquitto
from tests.bridge.services import ANVIL_KEYS, CLI_ENV, REPO, anvil, cli


@dataclass
class Live:
    broker: Broker
    chain: Chain
    deployment: Deployment
    """The manifest `microgrid chain deploy` wrote, as the bridge reads it."""
    deployed_at: int
    """The chain's timestamp when the suite was deployed and the site registered."""


def daytime_genesis(now: int, first_slot: int = 100, stands_for_s: int = 10 * 3600) -> int:
    """A genesis at or before `now` under which slot `first_slot` stands for `stands_for_s`
    seconds into a UTC day, and `now` (the registration) falls in a slot from 4 to
    `first_slot` - 1.

    Why: a stack whose genesis follows the wall clock (`now` less some slots) has its slots
    stand for whatever hour the test runs plus that offset; at night the households have no PV
    to sell and may trade nothing at all, so a test that expects trades passed or failed by the
    hour it ran (test_run's "households traded", 2026-11-28 ~13:25 UTC: slots at ~02:00)."""
    latest = now - 4 * 900
    return latest - (latest + first_slot * 900 - stands_for_s) % 86_400


def chain_deploy(rpc_url: str, manifest: Path, *options: str) -> Deployment:
    """`microgrid chain deploy --rpc URL --manifest PATH OPTIONS...` run as an operator runs it
    (its own process, this checkout's code), and the manifest it wrote read as the bridge reads
    it: the stacks deploy through the command, so what they test is what an operator gets."""
    args = ["chain", "deploy", "--rpc", rpc_url, "--manifest", str(manifest), *options]
    done = subprocess.run(
        cli(*args), env=CLI_ENV, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        pytest.fail(f"`microgrid {' '.join(args)}` failed: {done.stdout[-2000:]}{done.stderr}")
    return load_deployment(manifest)


@contextlib.contextmanager
def live_stack(
    files: Path,
    site: SiteManifest,
    broker_users: list[str],
    genesis: Callable[[int], int],
    *,
    reading_window_seconds: int = 10**8,
    renewable_rate_per_wh: int | None = None,
    fund_rewards: int = 0,
) -> Iterator[Live]:
    """Start both services, deploy the suite with `microgrid chain deploy` (genesis
    `genesis(now)`; by default a reading window long enough for accelerated slots, where the
    chain's time stands still), register `site`, and write `deployment.json`,
    `bridge.password`, `relayer.key` and, for a site that trades, `prosumers.json` (the
    households' order keys) into `files`; stop everything afterwards."""
    with anvil() as url, mosquitto(files / "mosquitto", broker_users) as broker:
        chain = Chain.rpc(url)
        now = chain.timestamp()
        options = ["--no-governance", "--genesis", str(genesis(now))]
        options += ["--reading-window-seconds", str(reading_window_seconds)]
        if renewable_rate_per_wh is not None:
            options += ["--renewable-rate-per-wh", str(renewable_rate_per_wh)]
        options += ["--fund-rewards", str(fund_rewards)]
        deployment = chain_deploy(url, files / "deployment.json", *options)
        register_site(chain, deployment.addresses["DeviceRegistry"], site)
        if site.market is not None:  # a site that trades (not the tiny stand-in of conftest)
            # The bridge (ANVIL_KEYS[1]) settles each slot's orders, signed with the households'
            # keys, from their deposits.
            enrol_market(
                chain, deployment.addresses, site, chain.accounts[1], credit=100 * 10**9,
                treasury_credit=100_000 * 10**9,
            )  # fmt: skip
            keys = {name: key.hex() for name, key in prosumer_keys(site).items()}
            (files / "prosumers.json").write_text(json.dumps(keys))
        (files / "bridge.password").write_text(broker.passwords["bridge"])
        (files / "relayer.key").write_text(ANVIL_KEYS[1].hex())
        yield Live(broker, chain, deployment, now)


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
