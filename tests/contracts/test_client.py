"""contracts.client: deployment wiring, error decoding, signing, snapshots and the clock."""

from __future__ import annotations

import json

import pytest
from eth_account import Account
from eth_utils import keccak

from contracts.client import (
    PriceParams,
    deploy_governance,
    deployment_manifest,
    role_id,
    sign_reading,
)
from contracts.compile import artifact_hashes
from contracts.errors import ChainError, ContractRevert, UnknownRevert
from tests.contracts.helpers import World


def test_roles_are_wired(world: World) -> None:
    suite, chain = world.suite, world.chain
    assert chain.call(suite.trading, "hasRole", role_id("SOLVER_ROLE"), world.solver)
    assert chain.call(suite.trading, "hasRole", role_id("PAUSER_ROLE"), suite.grid.address)
    assert chain.call(suite.rewards, "hasRole", role_id("REWARDER_ROLE"), suite.grid.address)
    assert chain.call(suite.trading, "hasRole", role_id("DEFAULT_ADMIN_ROLE"), world.admin)
    assert not chain.call(suite.trading, "hasRole", role_id("SOLVER_ROLE"), world.stranger)
    assert chain.call(suite.trading, "genesis") == suite.genesis and suite.genesis % 86_400 == 0
    assert set(suite.addresses()) == {
        "PaymentToken",
        "DeviceRegistry",
        "EnergyTrading",
        "GridBalance",
        "RewardSystem",
        "RewardToken",
        "SlotSettler",
    }


def test_panic_string_and_unknown_reverts_decode(world: World) -> None:
    chain, codec = world.chain, world.chain.w3.codec
    panic = chain.decode_revert(
        keccak(text="Panic(uint256)")[:4] + codec.encode(["uint256"], [0x11])
    )
    assert (
        isinstance(panic, ContractRevert)
        and panic.name == "Panic"
        and panic.args_by_name == {"code": 0x11}
    )
    reason = chain.decode_revert(
        keccak(text="Error(string)")[:4] + codec.encode(["string"], ["nope"])
    )
    assert isinstance(reason, ContractRevert) and reason.args_by_name == {"reason": "nope"}
    unknown = chain.decode_revert(b"\xde\xad\xbe\xef")
    assert isinstance(unknown, UnknownRevert) and unknown.data == b"\xde\xad\xbe\xef"


def test_reverting_transactions_name_the_contract(world: World) -> None:
    with pytest.raises(ContractRevert) as err:
        world.suite.withdraw(world.stranger, 1)
    assert err.value.contract == "EnergyTrading"
    assert str(err.value).startswith("EnergyTradingInsufficientCredit(")
    assert isinstance(err.value, ChainError)


def test_out_of_gas_is_an_unknown_revert(world: World) -> None:
    with pytest.raises(UnknownRevert):
        world.chain.transact(
            world.suite.payment_token, "mint", world.admin, 1, sender=world.admin, gas=25_000
        )


def test_signed_readings_recover_to_the_device(world: World) -> None:
    key = bytes.fromhex("11" * 32)
    reading, signature = sign_reading(
        key,
        chain_id=world.chain.w3.eth.chain_id,
        registry=world.suite.registry.address,
        slot=3,
        energy_wh=-7,
        nonce=2,
    )
    digest = world.chain.call(world.suite.registry, "readingDigest", reading)
    assert Account._recover_hash(digest, signature=signature) == Account.from_key(key).address
    assert reading == (Account.from_key(key).address, 3, -7, 2)


def test_snapshots_and_time_travel(world: World) -> None:
    chain = world.chain
    snapshot = chain.snapshot()
    start = chain.timestamp()
    chain.travel_to(start + 1_000)
    assert chain.timestamp() == start + 1_000
    world.suite.fund_account(world.users[0], 5)
    chain.revert(snapshot)
    assert chain.timestamp() == start and world.suite.credit_of(world.users[0]) == 0
    with pytest.raises(ChainError, match="back in time"):
        chain.travel_to(start)


def test_price_params_need_24_hours() -> None:
    with pytest.raises(ValueError, match="24"):
        PriceParams(tod_multiplier_bps=(1,) * 23).as_args()


def test_manifest_names_chain_addresses_block_and_artifacts(world: World) -> None:
    governance = deploy_governance(world.suite)
    manifest = deployment_manifest(world.suite, governance)
    assert json.loads(json.dumps(manifest)) == manifest  # plain JSON
    assert manifest["chainId"] == world.chain.w3.eth.chain_id
    assert manifest["addresses"]["EnergyTrading"] == world.suite.trading.address
    assert manifest["addresses"]["MicrogridTimelock"] == governance.timelock.address
    assert manifest["artifactHashes"]["EnergyTrading"] == artifact_hashes()["EnergyTrading"]
    first = world.chain.w3.eth.get_block(manifest["deploymentBlock"])
    deployed = {
        world.chain.w3.eth.get_transaction_receipt(h)["contractAddress"]
        for h in first["transactions"]
    }
    assert world.suite.payment_token.address in deployed  # the suite starts in that block
