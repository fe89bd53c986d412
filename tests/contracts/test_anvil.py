"""The suite on anvil (npm @foundry-rs/anvil): the JSON-RPC path, with EIP-7825 enforced."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, cast

import pytest
from eth_account import Account
from eth_utils import to_checksum_address
from web3.exceptions import Web3RPCError

from contracts.anvil import free_port, local_anvil, node_cpu_seconds, node_pid, split_cpus
from contracts.client import TX_GAS_CAP, Chain, Side, deploy_suite
from contracts.errors import ChainError, ContractRevert
from contracts.model import PriceParams, SignedOrder
from contracts.settler import PART_PRICE, SlotSender, SlotStep


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    with local_anvil(extra_args=["--enable-tx-gas-limit"]) as url:
        yield url


def test_trade_round_trip_on_anvil(anvil_url: str) -> None:
    chain = Chain.rpc(anvil_url)
    admin, solver, buyer, seller = chain.accounts[:4]
    suite = deploy_suite(chain, admin=admin, solver=solver)
    snapshot = chain.snapshot()
    suite.fund_account(buyer, 10**21)
    slot = suite.current_slot() + 2
    low, high = suite.price_band(slot)
    suite.create_order(buyer, start_slot=slot, energy_wh=500, limit_price=high, side=Side.BUY)
    suite.create_order(seller, start_slot=slot, energy_wh=800, limit_price=low, side=Side.SELL)
    with pytest.raises(ContractRevert) as err:  # custom errors decode over JSON-RPC too
        suite.clear_slot(solver, slot, low, [500, 500])
    assert err.value.name == "EnergyTradingGateOpen" and err.value.args_by_name["slot"] == slot
    chain.travel_to(suite.gate_closes_at(slot))
    assert chain.timestamp() == suite.gate_closes_at(slot)
    result, receipt = suite.solve_and_clear(solver, slot)
    assert result.volume == 500 and receipt["gasUsed"] < 16_777_216
    assert suite.credit_of(seller) == 500 * result.price - 500 * result.price * 50 // 10_000
    credits, escrow = suite.ledger_totals()
    assert credits + escrow == suite.token_balance(suite.trading.address)
    chain.revert(snapshot)
    assert suite.credit_of(seller) == 0 and suite.ledger_totals() == (0, 0)


def test_anvil_enforces_the_per_transaction_gas_cap(anvil_url: str) -> None:
    chain = Chain.rpc(anvil_url)
    admin = chain.accounts[0]
    token = chain.deploy("MockPaymentToken", sender=admin)
    with pytest.raises(ChainError):
        chain.transact(token, "mint", admin, 1, sender=admin, gas=16_777_217)
    chain.transact(token, "mint", admin, 1, sender=admin, gas=16_777_216)


def test_a_submitted_slot_step_is_answered_when_read(anvil_url: str) -> None:
    """`SlotSender.submit` writes the run to the node and returns; `result()` reads the answer
    later, once: a revert raises there with its custom error decoded, and the connection then
    carries the next step."""
    chain = Chain.rpc(anvil_url)
    suite = deploy_suite(chain, admin=chain.accounts[0])
    snapshot = chain.snapshot()
    sender = SlotSender(chain, suite.admin, suite.settler.address)
    start = chain.timestamp() + 10
    refused = sender.submit(SlotStep(parts=0).calldata(), start)
    with pytest.raises(ContractRevert) as err:
        refused.result()
    assert err.value.name == "SlotSettlerInvalidParts"
    with pytest.raises(ChainError, match="read already"):
        refused.result()
    price = SlotStep(parts=PART_PRICE, price_params=PriceParams(base_rate=7).as_args())
    sent = sender.submit(price.calldata(), start + 60)
    receipt = sent.result()
    assert receipt.gas_used > 0 and sent.result() is receipt
    assert chain.timestamp() == start + 60
    assert chain.call(suite.trading, "priceParams")[0][0] == 7
    chain.revert(snapshot)


def test_a_prepared_slot_step_goes_out_only_when_submitted(anvil_url: str) -> None:
    """`SlotSender.prepare` encodes the request and sends nothing (the chain ledger prepares
    before waiting for the previous answer); `submit_prepared` sends it."""
    chain = Chain.rpc(anvil_url)
    suite = deploy_suite(chain, admin=chain.accounts[0])
    snapshot = chain.snapshot()
    sender = SlotSender(chain, suite.admin, suite.settler.address)
    at = chain.timestamp() + 30
    step = SlotStep(parts=PART_PRICE, price_params=PriceParams(base_rate=9).as_args())
    head = chain.w3.eth.block_number
    prepared = sender.prepare(step.calldata(), at)
    assert prepared.request is not None and chain.w3.eth.block_number == head
    assert sender.submit_prepared(prepared).result().gas_used > 0
    assert chain.w3.eth.block_number == head + 1 and chain.timestamp() == at
    assert chain.call(suite.trading, "priceParams")[0][0] == 9
    chain.revert(snapshot)


def test_local_anvil_keeps_recent_states_and_snapshots_only() -> None:
    """`local_anvil` prunes history (`HISTORY_ARGS`): a recent block's state still answers (a
    reverted slot is replayed on its parent block), an old one is refused, and a snapshot taken
    before 20 blocks still restores."""
    with local_anvil() as url:
        chain = Chain.rpc(url)
        admin = chain.accounts[0]
        token = chain.deploy("MockPaymentToken", sender=admin)
        snapshot = chain.snapshot()
        for _ in range(20):
            chain.transact(token, "mint", admin, 1, sender=admin)
        head = chain.w3.eth.block_number
        call = {"to": token.address, "data": token.encode_abi("balanceOf", [admin])}
        parent = chain.w3.eth.call(cast(Any, call), block_identifier=head - 1)
        assert int.from_bytes(parent, "big") == 19
        with pytest.raises(Web3RPCError, match="BlockOutOfRange"):
            chain.w3.eth.call(cast(Any, call), block_identifier=head - 19)
        chain.revert(snapshot)
        assert chain.call(token, "balanceOf", admin) == 0


@pytest.mark.skipif(split_cpus() is None, reason="CPU affinity needs Linux and two CPUs")
def test_local_anvil_runs_every_thread_on_the_cpus_given() -> None:
    """`local_anvil(cpus=...)`: anvil and every thread it starts run on those CPUs only (read
    back from /proc), it answers, and this thread keeps the CPUs it had."""
    split = split_cpus()
    assert split is not None
    node, rest = split
    assert node and rest and not node & rest and node | rest == os.sched_getaffinity(0)
    before = os.sched_getaffinity(0)
    with local_anvil(cpus=node) as url:
        assert Chain.rpc(url).w3.eth.block_number == 0
        pid = node_pid(url)
        assert pid is not None
        threads = os.listdir(f"/proc/{pid}/task")
        assert len(threads) > 1  # anvil's runtime threads, started after the fork
        assert all(os.sched_getaffinity(int(t)) == node for t in threads)
        assert os.sched_getaffinity(0) == before
    refused = local_anvil(cpus={4096})
    with pytest.raises(ChainError, match=r"local_anvil cpus: expected .* got \[4096\]"):
        refused.__enter__()
    assert os.sched_getaffinity(0) == before


def test_unreachable_node_is_a_chain_error() -> None:
    with pytest.raises(ChainError, match="no JSON-RPC node"):
        Chain.rpc(f"http://127.0.0.1:{free_port()}", timeout=0.5)


@pytest.mark.slow
def test_worst_case_full_slot_fits_one_transaction_on_anvil(anvil_url: str) -> None:
    """The real worst case, not an extrapolation: a full slot, every order from its own
    zero-credit account, on anvil's latest fork with EIP-7825 enforced."""
    chain = Chain.rpc(anvil_url)
    admin, solver = chain.accounts[:2]
    suite = deploy_suite(chain, admin=admin, solver=solver)
    slot = suite.current_slot() + 3  # anvil's clock is the wall clock: leave room for set-up
    low, high = suite.price_band(slot)
    wh = 100
    max_orders = chain.call(suite.trading, "MAX_ORDERS_PER_SLOT")
    for i in range(max_orders):
        account = to_checksum_address(f"0x{0xF00D0000 + i:040x}")
        chain.w3.provider.make_request("anvil_impersonateAccount", [account])
        chain.w3.provider.make_request("anvil_setBalance", [account, hex(10**18)])
        if i % 2 == 0:
            suite.fund_account(account, wh * high)  # exactly the escrow: zero credit afterwards
            suite.create_order(
                account, start_slot=slot, energy_wh=wh, limit_price=high, side=Side.BUY
            )
        else:
            suite.create_order(
                account, start_slot=slot, energy_wh=wh, limit_price=low, side=Side.SELL
            )
    chain.travel_to(suite.gate_closes_at(slot))
    result, receipt = suite.solve_and_clear(solver, slot)
    print(f"\nworst-case {max_orders}-order clearing on anvil: {receipt['gasUsed']} gas")
    assert result.volume == max_orders // 2 * wh
    assert receipt["gasUsed"] < 16_777_216


def test_the_largest_signed_batch_settles_in_one_transaction_on_anvil(anvil_url: str) -> None:
    """Property 8 for signed batches, with EIP-7825 enforced: MAX_SIGNED_BATCH orders, each
    from its own never-traded account (buyers hold exactly their escrow), and a cancellation in
    the slot so every order's cancellation bits are read: the worst case the contract admits."""
    chain = Chain.rpc(anvil_url)
    admin = chain.accounts[0]
    suite = deploy_suite(chain, admin=admin)
    orders_max = chain.call(suite.trading, "MAX_SIGNED_BATCH")
    keys = [(0xB0B0_0000 + i).to_bytes(32, "big") for i in range(orders_max)]
    owners = [Account.from_key(k).address for k in keys]
    chain.transact(suite.payment_token, "mint", admin, 10**30, sender=admin)
    chain.transact(suite.payment_token, "approve", suite.trading.address, 10**30, sender=admin)
    slot = suite.current_slot() + 3
    low, high = suite.price_band(slot)
    wh = 100
    buyers = owners[0::2]
    for start in range(0, len(buyers), 100):
        chunk = buyers[start : start + 100]
        suite.deposit_for_many(admin, chunk, [wh * high] * len(chunk))
    suite.cancel_signed_orders(admin, slot, 1 << 255)
    signed = []
    for i, (key, owner) in enumerate(zip(keys, owners, strict=True)):
        side = Side.BUY if i % 2 == 0 else Side.SELL
        order = SignedOrder(owner, slot, side, wh, high if side == Side.BUY else low)
        signed.append((order, suite.sign_order(key, order)))
    signed.sort(key=lambda pair: pair[0].key)
    chain.travel_to(suite.gate_closes_at(slot))
    result, receipt = suite.settle_signed_batch(
        admin, slot, [o for o, _ in signed], [s for _, s in signed], gas=TX_GAS_CAP
    )
    print(f"\n{orders_max}-order signed batch on anvil: {receipt['gasUsed']} gas")
    assert result.volume == orders_max // 2 * wh
    assert receipt["status"] == 1 and receipt["gasUsed"] < TX_GAS_CAP


def test_the_node_cpu_of_a_local_anvil_is_read_and_no_other(anvil_url: str) -> None:
    """`node_cpu_seconds` reads the anvil this process started (benchmarks report it a step)."""
    chain = Chain.rpc(anvil_url)
    before = node_cpu_seconds(anvil_url)
    assert before is not None and before >= 0
    chain.mine(20)
    after = node_cpu_seconds(anvil_url)
    assert after is not None and after >= before
    assert node_cpu_seconds(f"http://127.0.0.1:{free_port()}") is None
