"""contracts.revm: the suite on in-process revm behaves as on py-evm, clock and snapshots included.

The client tests that need no block history run here again against a revm deployment (this
module's ``world_module`` replaces the py-evm one), so deployment wiring, custom-error decoding,
halts, ecrecover of signed readings and time travel are checked on both engines.
"""

from __future__ import annotations

import pytest

from contracts.client import deploy_suite
from contracts.errors import ChainError, ContractRevert
from contracts.revm import RevmChain, RevmNode
from tests.contracts.helpers import World
from tests.contracts.test_client import (
    test_out_of_gas_is_an_unknown_revert,
    test_panic_string_and_unknown_reverts_decode,
    test_reverting_transactions_name_the_contract,
    test_roles_are_wired,
    test_signed_readings_recover_to_the_device,
    test_snapshots_and_time_travel,
)

__all__ = [
    "test_out_of_gas_is_an_unknown_revert",
    "test_panic_string_and_unknown_reverts_decode",
    "test_reverting_transactions_name_the_contract",
    "test_roles_are_wired",
    "test_signed_readings_recover_to_the_device",
    "test_snapshots_and_time_travel",
]


@pytest.fixture(scope="module")
def world_module() -> World:
    chain = RevmChain()
    accounts = chain.accounts
    admin, solver, treasury, stranger = accounts[0], accounts[1], accounts[2], accounts[9]
    suite = deploy_suite(chain, admin=admin, solver=solver, treasury=treasury)
    return World(chain, suite, admin, solver, treasury, accounts[3:9], stranger)


def test_the_chain_reports_its_engine_and_chain_id(world: World) -> None:
    assert world.chain.engine == "revm" and not world.chain.is_tester
    assert world.chain.w3.eth.chain_id == RevmNode().chain_id
    assert world.chain.w3.eth.block_number > 0
    with pytest.raises(ChainError, match="does not serve eth_getLogs"):
        world.chain.w3.eth.get_logs({})


def test_events_of_a_transaction_decode_through_web3(world: World) -> None:
    suite, user = world.suite, world.users[0]
    receipt = world.chain.transact(suite.payment_token, "mint", user, 9, sender=world.admin)
    assert receipt["status"] == 1 and receipt["gasUsed"] > 21_000
    zero = "0x" + "00" * 20
    assert suite._events(suite.payment_token, "Transfer", receipt) == [
        {"from": zero, "to": user, "value": 9}
    ]
    suite.fund_account(world.users[1], 7)
    assert suite.credit_of(world.users[1]) == 7


def test_a_revert_leaves_no_trace_and_still_mines_a_block(world: World) -> None:
    chain = world.chain
    before = chain.w3.eth.block_number
    with pytest.raises(ContractRevert, match="EnergyTradingInsufficientCredit"):
        world.suite.withdraw(world.users[2], 1)
    assert chain.w3.eth.block_number == before + 1
    assert world.suite.credit_of(world.users[2]) == 0


def test_snapshots_are_consumed_by_a_revert_and_may_share_a_position(world: World) -> None:
    chain, suite, user = world.chain, world.suite, world.users[3]
    outer = chain.snapshot()
    same_place = chain.snapshot()  # nothing ran in between: one checkpoint for both
    suite.fund_account(user, 3)
    inner = chain.snapshot()
    suite.fund_account(user, 4)
    chain.revert(same_place)
    assert suite.credit_of(user) == 0
    with pytest.raises(ChainError, match=f"snapshot {inner} could not be restored"):
        chain.revert(inner)  # later snapshots went with the revert, as on anvil
    suite.fund_account(user, 5)
    chain.revert(outer)  # the earlier snapshot at the shared position still works
    assert suite.credit_of(user) == 0


def test_reads_cannot_change_state(world: World) -> None:
    chain, suite = world.chain, world.suite
    with pytest.raises(ChainError):  # a state change inside a static call halts
        chain.call(suite.payment_token, "mint", world.admin, 1)
    assert chain.call(suite.payment_token, "balanceOf", world.admin) == 0


def test_the_next_block_time_must_move_forward(world: World) -> None:
    assert isinstance(world.chain, RevmChain)
    node = world.chain.node
    with pytest.raises(ChainError, match="back in time"):
        node.set_next_timestamp(node.timestamp)
    node.set_next_timestamp(node.timestamp + 60)
    before = node.timestamp
    world.chain.mine()
    assert node.timestamp == before + 60
    world.chain.mine(2)
    assert node.timestamp == before + 62
