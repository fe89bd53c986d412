"""The durable outbox against a real anvil: idempotency, nonces, retries, and SIGKILL mid-send."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from web3 import Web3

from bridge.outbox import Outbox, RowState
from contracts.client import Chain
from contracts.errors import ContractRevert
from tests.bridge.services import ANVIL_KEYS, REPO, anvil, free_port


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    with anvil() as url:
        yield url


def _chain(url: str) -> Chain:
    return Chain(Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 2})))


def _token(url: str) -> str:
    chain = Chain.rpc(url)
    return str(chain.deploy("MockPaymentToken", sender=chain.accounts[0]).address)


def _mints(chain: Chain, token: str, to: str) -> list[int]:
    """Every mint the chain executed to `to`: Transfer events from the zero address."""
    contract = chain.contract("MockPaymentToken", token)
    logs = contract.events.Transfer().get_logs(
        from_block=0, argument_filters={"from": "0x" + "00" * 20, "to": to}
    )
    return sorted(int(e["args"]["value"]) for e in logs)


def test_enqueue_is_idempotent_by_key(tmp_path: Path) -> None:
    box = Outbox(
        tmp_path / "o.db", _chain("http://127.0.0.1:9"), {"T": "0x" + "11" * 20}, ANVIL_KEYS[1]
    )
    assert box.enqueue("reading:m1:7", "T", "mint", ["0x" + "22" * 20, 5])
    assert not box.enqueue("reading:m1:7", "T", "mint", ["0x" + "22" * 20, 6])
    assert box.counts() == {RowState.PENDING: 1} and box.backlog() == 1
    with pytest.raises(Exception, match="contract: expected one of"):
        box.enqueue("x", "Nope", "mint", [])


def test_drain_confirms_in_contiguous_nonce_order(anvil_url: str, tmp_path: Path) -> None:
    token = _token(anvil_url)
    chain = _chain(anvil_url)
    to = chain.accounts[6]
    box = Outbox(tmp_path / "o.db", chain, {"MockPaymentToken": token}, ANVIL_KEYS[1])
    for i in range(5):
        box.enqueue(f"mint:{i}", "MockPaymentToken", "mint", [to, 10 + i], gas=100_000)
    assert box.drain(timeout_s=30)
    rows = [box.row(f"mint:{i}") for i in range(5)]
    assert all(r is not None and r.state is RowState.CONFIRMED for r in rows)
    nonces = [r.nonce for r in rows if r is not None]
    assert nonces == list(range(nonces[0], nonces[0] + 5))
    assert _mints(chain, token, to) == [10, 11, 12, 13, 14]


def test_a_final_revert_fails_and_a_named_one_waits(anvil_url: str, tmp_path: Path) -> None:
    token = _token(anvil_url)
    chain = _chain(anvil_url)
    me = chain.accounts[1]
    box = Outbox(
        tmp_path / "o.db", chain, {"MockPaymentToken": token}, ANVIL_KEYS[1], backoff_s=0.01
    )
    box.enqueue(
        "spend",
        "MockPaymentToken",
        "transfer",
        [chain.accounts[7], 5],
        retry_on={"ERC20InsufficientBalance"},
    )
    box.enqueue("approve-zero", "MockPaymentToken", "approve", ["0x" + "00" * 20, 1])
    failed: list[tuple[str, str]] = []
    box.on_failed = lambda key, error: failed.append((key, error))
    nonce_before = chain.w3.eth.get_transaction_count(me)
    for _ in range(3):
        box.step()
    spend, approve = box.row("spend"), box.row("approve-zero")
    assert spend is not None and spend.state is RowState.PENDING and spend.attempts >= 1
    assert spend.last_error is not None and "ERC20InsufficientBalance" in spend.last_error
    assert approve is not None and approve.state is RowState.FAILED
    assert approve.last_error is not None and "ERC20InvalidSpender" in approve.last_error
    # Counted once by the error's name, and shown to the hook once.
    assert box.failures() == {"ERC20InvalidSpender": 1} and box.failures("spend") == {}
    assert failed == [("approve-zero", "ERC20InvalidSpender")]
    assert chain.w3.eth.get_transaction_count(me) == nonce_before  # no nonce burnt on a revert
    Chain.rpc(anvil_url).transact(
        chain.contract("MockPaymentToken", token), "mint", me, 5, sender=chain.accounts[0]
    )
    assert box.drain(timeout_s=30)
    assert box.row("spend").state is RowState.CONFIRMED  # type: ignore[union-attr]


def test_a_lane_keeps_its_order_through_a_wait(anvil_url: str, tmp_path: Path) -> None:
    """A row told to wait holds back the later rows of its lane (keys equal up to the last
    ``:``), whatever their own backoff; another lane goes on."""
    token = _token(anvil_url)
    chain = _chain(anvil_url)
    me, to = chain.accounts[1], chain.accounts[8]
    box = Outbox(
        tmp_path / "o.db", chain, {"MockPaymentToken": token}, ANVIL_KEYS[1], backoff_s=0.01
    )
    box.enqueue(
        "pay:1", "MockPaymentToken", "transfer", [to, 7], retry_on={"ERC20InsufficientBalance"}
    )
    box.enqueue("pay:2", "MockPaymentToken", "mint", [to, 1], gas=100_000)
    box.enqueue("other:1", "MockPaymentToken", "mint", [to, 2], gas=100_000)
    for _ in range(3):
        box.step()
    first, second, other = (box.row(k) for k in ("pay:1", "pay:2", "other:1"))
    assert first is not None and first.state is RowState.PENDING and first.attempts >= 1
    assert second is not None and second.state is RowState.PENDING and second.attempts == 0
    assert other is not None and other.state is RowState.CONFIRMED
    Chain.rpc(anvil_url).transact(
        chain.contract("MockPaymentToken", token), "mint", me, 7, sender=chain.accounts[0]
    )
    assert box.drain(timeout_s=30)
    first, second = box.row("pay:1"), box.row("pay:2")
    assert first is not None and second is not None
    assert first.state is second.state is RowState.CONFIRMED
    assert first.nonce is not None and second.nonce is not None and first.nonce < second.nonce


def test_node_down_then_back(tmp_path: Path) -> None:
    port = free_port()
    with anvil(port) as url:
        token = _token(url)  # a fresh chain deploys it at the same address every time
    chain = _chain(f"http://127.0.0.1:{port}")
    box = Outbox(
        tmp_path / "o.db", chain, {"MockPaymentToken": token}, ANVIL_KEYS[1], backoff_s=0.01
    )
    to = "0x" + "33" * 20
    box.enqueue("m", "MockPaymentToken", "mint", [Web3.to_checksum_address(to), 3], gas=100_000)
    assert box.step() == 0  # nobody answers: no exception, nothing moved
    row = box.row("m")
    assert row is not None and row.state is RowState.PENDING and row.attempts == 1
    with anvil(port) as url:
        assert _token(url) == token
        assert box.drain(timeout_s=30)
        assert _mints(chain, token, Web3.to_checksum_address(to)) == [3]


def _worker(db: Path, url: str, token: str, n: int, pause: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.bridge.outbox_worker",
            str(db),
            url,
            token,
            str(n),
            str(pause),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("window", ["signed", "sent"])
def test_sigkill_mid_send_gives_every_mint_exactly_once(
    anvil_url: str, tmp_path: Path, window: str
) -> None:
    """SIGKILL right after a row is durably signed (before broadcast) or right after broadcast
    (before its receipt is recorded); the restarted process must neither lose nor repeat it."""
    n = 6
    token = _token(anvil_url)
    db = tmp_path / "outbox.db"
    proc = _worker(db, anvil_url, token, n, pause=0.5)
    seen = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(window):
            seen += 1
            if seen == 3:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    chain = _chain(anvil_url)
    to = chain.accounts[5]
    assert len(_mints(chain, token, to)) < n  # the kill really landed mid-way
    again = _worker(db, anvil_url, token, n, pause=0.0)
    out, err = again.communicate(timeout=90)
    assert "drained" in out, err[-2000:]
    assert _mints(chain, token, to) == [2**i for i in range(n)]
    box = Outbox(db, chain, {"MockPaymentToken": token}, ANVIL_KEYS[1])
    assert box.counts() == {RowState.CONFIRMED: n}


def test_a_refused_row_is_repaired_and_one_mined_reverted_is_sent_again(
    anvil_url: str, tmp_path: Path
) -> None:
    """The caller's `repair` hook: a row whose pre-flight reverts, and one that passed its
    pre-flight but was mined with status 0 (a transaction mined before it in the same block
    took the balance it spends), are sent again with the hook's smaller arguments, each
    counted once in `repairs`; the reverted one changed nothing and takes a new nonce."""
    token = _token(anvil_url)
    chain = _chain(anvil_url)
    me, thief, to = chain.accounts[1], chain.accounts[7], chain.accounts[8]
    seen: list[tuple[str, str]] = []

    def repair(key: str, err: ContractRevert, args: list[Any]) -> tuple[list[Any], str] | None:
        seen.append((key, err.name))
        if err.name == "ERC20InvalidReceiver":
            return [to, args[1]], "receiver"
        if err.name == "ERC20InsufficientBalance" and args[1] > 1:
            return [args[0], 1], "amount"
        return None

    box = Outbox(
        tmp_path / "o.db", chain, {"MockPaymentToken": token}, ANVIL_KEYS[1], backoff_s=0.01,
        repair=repair,
    )  # fmt: skip
    contract = chain.contract("MockPaymentToken", token)
    admin = Chain.rpc(anvil_url)
    admin.transact(contract, "mint", me, 7, sender=chain.accounts[0])
    # Before the outbox seeds its nonce from the node: it owns `me`'s nonces from then on.
    admin.transact(contract, "approve", thief, 5, sender=me)
    box.enqueue("to-nobody", "MockPaymentToken", "transfer", ["0x" + "00" * 20, 1])
    assert box.drain(timeout_s=30)
    assert seen == [("to-nobody", "ERC20InvalidReceiver")]
    # Signed and sent while the balance is there; the thief's transferFrom, with a higher tip,
    # is mined first in the same block.
    rpc = chain.w3.provider
    rpc.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        box.enqueue("spend", "MockPaymentToken", "transfer", [to, 5])
        box.step()
        assert box.row("spend").state is RowState.SIGNED  # type: ignore[union-attr]
        first_nonce = box.row("spend").nonce  # type: ignore[union-attr]
        chain.w3.eth.send_transaction(
            {"from": thief, "to": token, "maxPriorityFeePerGas": 100 * 10**9,
             "maxFeePerGas": 200 * 10**9,
             "data": contract.encode_abi("transferFrom", [me, thief, 5])}
        )  # fmt: skip
        rpc.make_request("evm_mine", [])  # type: ignore[arg-type]
    finally:
        rpc.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    # The receipt: status 0; the hook asked, the row signed again with a new nonce.
    assert box.drain(timeout_s=30)
    row = box.row("spend")
    assert row is not None and row.state is RowState.CONFIRMED and row.nonce != first_nonce
    assert seen[1:] == [("spend", "ERC20InsufficientBalance")]
    assert box.repairs() == {"ERC20InvalidReceiver": 1, "ERC20InsufficientBalance": 1}
    assert [int(contract.functions.balanceOf(a).call()) for a in (me, thief, to)] == [0, 5, 2]
