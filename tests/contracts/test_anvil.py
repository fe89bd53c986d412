"""The suite on anvil (npm @foundry-rs/anvil): the JSON-RPC path, with EIP-7825 enforced."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_utils import to_checksum_address

from contracts.client import Chain, Side, deploy_suite
from contracts.errors import ChainError, ContractRevert

REPO = Path(__file__).resolve().parents[2]


def _anvil_binary() -> Path:
    found = sorted(REPO.glob("node_modules/@foundry-rs/anvil-*/bin/anvil"))
    if not found:
        pytest.fail("anvil is missing from node_modules: run `npm ci` (make setup does)")
    return found[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(_anvil_binary()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--quiet",
            "--enable-tx-gas-limit",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                Chain.rpc(url, timeout=1)
                break
            except ChainError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"anvil did not start: {err[:500]}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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


def test_unreachable_node_is_a_chain_error() -> None:
    with pytest.raises(ChainError, match="no JSON-RPC node"):
        Chain.rpc(f"http://127.0.0.1:{_free_port()}", timeout=0.5)


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
