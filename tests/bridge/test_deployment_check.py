"""A live bridge refuses, at start-up and before it connects to the broker, a deployment whose
contracts are not the ones it encodes its calls for (`bridge.deployment_check`): an old manifest
(another build's ``artifactHashes``, e.g. the SlotSettler before ``run``'s input changed), a
manifest without hashes, and addresses that run other code or none. Each error names the
manifest field and says to deploy again with ``microgrid chain deploy``. Against anvil."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.config import BridgeConfig, ChainConfig, Deployment, load_deployment
from bridge.deployment_check import check_deployment, same_code
from bridge.errors import ConfigError
from bridge.policy_source import load_policy
from bridge.runner import BridgeRunner
from bridge.site import SiteManifest
from contracts.client import Chain
from contracts.compile import load_artifact
from tests.bridge.services import ANVIL_KEYS, anvil

DEPLOY = r"microgrid chain deploy"


@dataclass
class Deployed:
    chain: Chain
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """The suite on anvil, deployed by the operator's command (docs/iot.md, step 1)."""
    from typer.testing import CliRunner

    from training.cli import app

    manifest = tmp_path_factory.mktemp("deploy") / "deployment.json"
    with anvil() as url:
        args = ["chain", "deploy", "--rpc", url, "--manifest", str(manifest), "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == json.loads(manifest.read_text())
        yield Deployed(Chain.rpc(url), json.loads(manifest.read_text()))


def test_devices_register_against_the_deployed_suite(
    deployed: Deployed, site: SiteManifest, tmp_path: Path
) -> None:
    """`microgrid devices register` (docs/iot.md, step 2) on the manifest `chain deploy` wrote:
    every device's key registered once, a rerun skips them, the order keys' folder is made."""
    from typer.testing import CliRunner

    from training.cli import app

    site.save(tmp_path / "site.json")
    (tmp_path / "deployment.json").write_text(json.dumps(deployed.manifest))
    url = deployed.chain.w3.provider.endpoint_uri  # type: ignore[attr-defined]
    args = ["devices", "register", "--site", str(tmp_path / "site.json"),
            "--deployment", str(tmp_path / "deployment.json"), "--rpc", url, "--json"]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["registered"] == len(site.devices)
    again = CliRunner().invoke(app, args)
    assert json.loads(again.output) == {"registered": 0, "already": len(site.devices)}


def test_deploy_options_reach_the_contracts_and_the_manifest(tmp_path: Path) -> None:
    """What the bridge's stacks deploy with (`tests/bridge/stack.py`), through the command as
    a process: the genesis, reading window, reward rate and budget are the contracts' own, and
    the manifest, read as the bridge reads it, records them."""
    from tests.bridge.stack import chain_deploy

    manifest = tmp_path / "deployment.json"
    with anvil() as url:
        chain = Chain.rpc(url)
        genesis = chain.timestamp() - 50 * 900
        dep = chain_deploy(
            url, manifest, "--no-governance", "--genesis", str(genesis),
            "--reading-window-seconds", "123456", "--renewable-rate-per-wh", "7",
            "--fund-rewards", str(10**30),
        )  # fmt: skip
        registry = chain.contract("DeviceRegistry", dep.addresses["DeviceRegistry"])
        rewards = chain.contract("RewardSystem", dep.addresses["RewardSystem"])
        assert dep.genesis == genesis == chain.call(registry, "genesis")
        assert chain.call(registry, "readingWindow") == 123456
        assert chain.call(rewards, "renewableRate") == 7
        assert chain.call(rewards, "unallocated") == 10**30
        assert "MicrogridGovernor" not in dep.addresses
    data = json.loads(manifest.read_text())
    assert data["parameters"]["readingWindowSeconds"] == 123456
    assert data["parameters"]["renewableRatePerWh"] == 7 and data["rewardsFunded"] == 10**30


def start(d: Deployed, site: SiteManifest, manifest: dict[str, Any], files: Path) -> None:
    """`bridge run` in live mode over `manifest`, for one slot (it fails before that)."""
    (files / "deployment.json").write_text(json.dumps(manifest))
    (files / "relayer.key").write_text(ANVIL_KEYS[1].hex())
    cfg = BridgeConfig(
        chain=ChainConfig(
            deployment=files / "deployment.json",
            rpc_url=d.chain.w3.provider.endpoint_uri,  # type: ignore[attr-defined]
            key_file=files / "relayer.key",
            outbox=files / "outbox.db",
        ),
        metrics_port=None,
    )
    dep = load_deployment(cfg.chain.deployment)
    loaded = load_policy("builtin:rule-based", site.make_codec(), "")
    asyncio.run(BridgeRunner(cfg, site, dep, loaded).run(max_slots=1))


def test_the_deployment_of_this_build_passes(deployed: Deployed) -> None:
    check_deployment(deployed.chain, Deployment.model_validate(deployed.manifest))


def test_an_old_settler_is_refused_before_the_bridge_connects(
    deployed: Deployed, site: SiteManifest, tmp_path: Path
) -> None:
    """The manifest of the previous build (SlotSettler's artifact hash differs): refused by
    `bridge run` itself, before the broker (there is none here) is dialled."""
    m = deployed.manifest
    old = {**m, "artifactHashes": {**m["artifactHashes"], "SlotSettler": "ab" * 32}}
    with pytest.raises(
        ConfigError, match=rf"chain\.deployment: artifactHashes\.SlotSettler: .*{DEPLOY}"
    ):
        start(deployed, site, old, tmp_path)
    bare = {k: v for k, v in m.items() if k != "artifactHashes"}
    with pytest.raises(
        ConfigError, match=rf"chain\.deployment: artifactHashes: expected .*{DEPLOY}"
    ):
        start(deployed, site, bare, tmp_path)


def test_addresses_that_run_other_code_are_refused(deployed: Deployed) -> None:
    """Hashes copied over, but the settler's address runs another build (the same code with
    other metadata, put there with ``anvil_setCode``), another contract, or nothing."""
    chain, m = deployed.chain, deployed.manifest
    settler = m["addresses"]["SlotSettler"]
    original = bytes(chain.w3.eth.get_code(chain.w3.to_checksum_address(settler)))
    other_build = original[:-3] + bytes([original[-3] ^ 0xFF]) + original[-2:]
    chain.w3.provider.make_request("anvil_setCode", [settler, "0x" + other_build.hex()])
    try:
        with pytest.raises(
            ConfigError, match=rf"addresses\.SlotSettler: expected this bridge's .*{DEPLOY}"
        ):
            check_deployment(chain, Deployment.model_validate(m))
    finally:
        chain.w3.provider.make_request("anvil_setCode", [settler, "0x" + original.hex()])
    for elsewhere, found in ((m["addresses"]["EnergyTrading"], "bytes of other code"),
                             ("0x" + "7" * 40, "no code")):  # fmt: skip
        moved = {**m, "addresses": {**m["addresses"], "SlotSettler": elsewhere}}
        with pytest.raises(ConfigError, match=rf"addresses\.SlotSettler: .*found .*{found}"):
            check_deployment(chain, Deployment.model_validate(moved))
    check_deployment(chain, Deployment.model_validate(m))  # restored


def test_immutables_are_the_only_bytes_allowed_to_differ() -> None:
    built = bytes.fromhex(str(load_artifact("GridBalance")["deployedBytecode"])[2:])
    zero = built.index(bytes(32))  # an immutable's placeholder
    filled = built[:zero] + b"\x01" * 32 + built[zero + 32 :]
    assert same_code(filled, built)
    assert not same_code(filled[:-1], built)
    changed = next(i for i, b in enumerate(built) if b != 0)
    assert not same_code(
        built[:changed] + bytes([built[changed] ^ 1]) + built[changed + 1 :], built
    )
