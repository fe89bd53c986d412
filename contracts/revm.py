"""In-process revm (Rust, through pyrevm): the `evm` ledger's default engine.

py-evm interprets every opcode in Python (~5 us each); one slot's ``SlotSettler.run`` executes
~112k of them, so py-evm spends most of a second per slot whatever the client does. revm runs
the same compiled bytecode natively, in this process, with the same precompiles (ecrecover for
every signed order and reading), keccak and logs.

:class:`RevmNode` is a revm instance plus what a node adds around the EVM: a block clock (every
transaction mines its own block, as eth-tester's and anvil's automine do; the next block's time
can be set, as ``evm_setNextBlockTimestamp`` does), a few funded dev accounts, and snapshots.
:class:`RevmChain` is a :class:`~contracts.client.Chain` over it, so ``deploy_suite`` and the
``Suite`` helpers run unchanged; a small web3 provider answers the few node queries they make
(chain id, block number).

Limit of pyrevm 0.3.7, the one release: it keeps every transaction in its journal and never
finalizes it (that is what makes its snapshots cheap and revertible), so an account or storage
slot touched once stays *warm* for the rest of the journal, and SSTORE prices against the value
it had when first loaded. Execution and state are exact; ``gas_used`` is not: it reads lower
than a node's for the same transaction (see docs/trading.md for the measured gap). Exact gas
is what the ``py-evm`` engine and anvil give.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from pyrevm import EVM, BlockEnv, CfgEnv, Env, JournalCheckpoint
from web3 import Web3
from web3.contract import Contract
from web3.datastructures import AttributeDict
from web3.providers.base import BaseProvider
from web3.types import RPCEndpoint, RPCResponse, TxReceipt

from contracts.client import DEFAULT_GAS, Chain
from contracts.compile import EVM_VERSION, load_artifact
from contracts.errors import ChainError, UnknownRevert

#: The chain id the contracts see (EIP-712 domains include it).
CHAIN_ID = 1337
#: Block gas limit: room for one EIP-7825-capped transaction and then some.
BLOCK_GAS_LIMIT = 60_000_000
#: Gas of a read (``eth_call``).
CALL_GAS = 50_000_000
#: revm's spec names are capitalised ("Cancun"); an unknown name silently means "latest".
SPEC = EVM_VERSION.capitalize()
_DEV_ACCOUNTS = 10
_DEV_BALANCE = 10**24

_REVERT = re.compile(r"^Revert \{ gas_used: (\d+), output: 0x([0-9a-fA-F]*) \}")


@dataclass(frozen=True)
class Execution:
    """One mined transaction: its block, gas, return data (or new contract) and raw logs."""

    block: int
    timestamp: int
    gas_used: int
    output: bytes
    logs: list[tuple[str, list[bytes], bytes]]
    """(address, topics, data) of every log, in order."""
    created: str | None = None


class Reverted(ChainError):
    """A transaction reverted: revert data (a custom error's encoding) and the gas it used."""

    def __init__(self, data: bytes, gas_used: int) -> None:
        super().__init__(f"reverted with 0x{data.hex()} (gas used {gas_used})")
        self.data = data
        self.gas_used = gas_used


def _dev_account(i: int) -> str:
    """Dev account ``i``: an address nobody holds a key for (revm takes any caller)."""
    return str(to_checksum_address(keccak(text=f"microgrid revm dev account {i}")[12:]))


class RevmNode:
    """One revm instance with a block clock, dev accounts and snapshots (module docstring)."""

    def __init__(self, chain_id: int = CHAIN_ID, timestamp: int | None = None) -> None:
        self.chain_id = chain_id
        self.number = 0
        self.timestamp = int(time.time()) if timestamp is None else int(timestamp)
        self._next: int | None = None
        self.evm = EVM(
            env=Env(cfg=CfgEnv(chain_id=chain_id), block=self._block()),
            gas_limit=BLOCK_GAS_LIMIT,
            spec_id=SPEC,
        )
        self.accounts = [_dev_account(i) for i in range(_DEV_ACCOUNTS)]
        for account in self.accounts:
            self.evm.set_balance(account, _DEV_BALANCE)
        self._ids = itertools.count(1)
        self._snapshots: dict[int, tuple[JournalCheckpoint, int, int, int | None]] = {}

    def _block(self) -> BlockEnv:
        return BlockEnv(
            number=self.number,
            timestamp=self.timestamp,
            gas_limit=BLOCK_GAS_LIMIT,
            basefee=0,
            prevrandao=keccak(self.number.to_bytes(32, "big")),
        )

    # ---------------------------------------------------------------- clock

    def set_next_timestamp(self, timestamp: int) -> None:
        """The next block's time (``evm_setNextBlockTimestamp``); must be later than the latest."""
        if timestamp <= self.timestamp:
            raise ChainError(
                f"cannot travel back in time to {timestamp} (latest block: {self.timestamp})"
            )
        self._next = int(timestamp)

    def mine(self) -> None:
        """Open the next block: one second after the latest unless a time was set."""
        self.number += 1
        self.timestamp = self._next if self._next is not None else self.timestamp + 1
        self._next = None
        self.evm.set_block_env(self._block())

    # ---------------------------------------------------------------- execution

    def execute(self, sender: str, to: str | None, data: bytes, gas: int) -> Execution:
        """Mine one transaction (a contract creation when ``to`` is None).

        Raises :class:`Reverted` with the revert data, UnknownRevert when it halts (out of gas,
        invalid opcode) and ChainError for what revm refuses to run (a gas limit over the
        block's).
        """
        self.mine()
        evm = self.evm
        created = None
        try:
            if to is None:
                created = str(to_checksum_address(evm.deploy(sender, data, gas=gas)))
                output = b""
            else:
                output = bytes(evm.message_call(sender, to, data, gas=gas))
        except RuntimeError as exc:
            raise _failure(exc) from None
        finally:
            evm.reset_transient_storage()  # EIP-1153: transient storage ends with the tx
        result = evm.result
        assert result is not None
        logs = []
        for log in result.logs:
            topics, payload = log.data
            logs.append((str(log.address), [bytes(t) for t in topics], bytes(payload)))
        return Execution(self.number, self.timestamp, result.gas_used, output, logs, created)

    def call(self, sender: str, to: str, data: bytes) -> bytes:
        """A read on the latest block (``eth_call``): a static call, so nothing can change."""
        try:
            return bytes(self.evm.message_call(sender, to, data, gas=CALL_GAS, is_static=True))
        except RuntimeError as exc:
            raise _failure(exc) from None

    # ---------------------------------------------------------------- snapshots

    def snapshot(self) -> int:
        """Snapshot state and clock; an id for :meth:`revert`."""
        key = self._checkpoint()
        sid = next(self._ids)
        self._snapshots[sid] = (key, self.number, self.timestamp, self._next)
        return sid

    def _checkpoint(self) -> JournalCheckpoint:
        # pyrevm keys checkpoints by journal position: a second one at the same position would
        # replace the first, so snapshots taken without a change in between share one.
        # Every transaction or call lengthens the journal and a revert shortens it to the
        # snapshot's length, so an equal length means nothing ran since that snapshot.
        here = self.evm.journal_len
        for key, *_ in self._snapshots.values():
            if key.journal_i == here:
                return key
        return self.evm.snapshot()

    def revert(self, sid: int) -> None:
        """Return to snapshot ``sid``; it and every later one are consumed (as anvil does)."""
        if sid not in self._snapshots:
            raise ChainError(f"snapshot {sid} could not be restored")
        key, self.number, self.timestamp, self._next = self._snapshots[sid]
        self.evm.revert(key)
        gone = [s for s in self._snapshots if s >= sid]
        for s in gone:
            del self._snapshots[s]
        # Earlier snapshots that shared the checkpoint need it taken again (same position).
        if any(k == key for k, *_ in self._snapshots.values()):
            again = self.evm.snapshot()
            for s, (k, *clock) in list(self._snapshots.items()):
                if k == key:
                    self._snapshots[s] = (again, *clock)  # type: ignore[assignment]
        self.evm.set_block_env(self._block())


def _failure(exc: RuntimeError) -> ChainError:
    text = str(exc)
    match = _REVERT.match(text)
    if match:
        return Reverted(bytes.fromhex(match.group(2)), int(match.group(1)))
    if text.startswith("Halt"):  # out of gas, invalid opcode...: no revert data to decode
        return UnknownRevert(f"the transaction halted: {text[:300]}")
    return ChainError(f"revm refused the transaction: {text[:300]}")


class RevmProvider(BaseProvider):
    """The node queries web3 itself makes of a :class:`RevmChain` (chain id, block number,
    accounts, the latest block); everything else goes through ``Chain``'s methods."""

    def __init__(self, node: RevmNode) -> None:
        super().__init__()
        self.node = node

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        node = self.node
        result: Any
        if method == "eth_chainId":
            result = hex(node.chain_id)
        elif method == "eth_blockNumber":
            result = hex(node.number)
        elif method == "eth_accounts":
            result = list(node.accounts)
        elif method == "eth_getBlockByNumber" and params and params[0] in ("latest", "pending"):
            result = {
                "number": hex(node.number),
                "timestamp": hex(node.timestamp),
                "gasLimit": hex(BLOCK_GAS_LIMIT),
                "baseFeePerGas": "0x0",
            }
        else:
            raise ChainError(f"the in-process revm chain does not serve {method}")
        return cast(RPCResponse, {"jsonrpc": "2.0", "id": 0, "result": result})

    def is_connected(self, show_traceback: bool = False) -> bool:
        return True


class RevmChain(Chain):
    """A :class:`Chain` on an in-process :class:`RevmNode`."""

    def __init__(self, node: RevmNode | None = None) -> None:
        self.node = node or RevmNode()
        super().__init__(Web3(RevmProvider(self.node)))

    @property
    def engine(self) -> str:
        return "revm"

    @property
    def accounts(self) -> list[str]:
        return list(self.node.accounts)

    def deploy(self, name: str, *args: Any, sender: str, gas: int = 8_000_000) -> Contract:
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        data = bytes(HexBytes(factory.constructor(*args).data_in_transaction))
        try:
            done = self.node.execute(sender, None, data, gas)
        except Reverted as exc:
            raise ChainError(f"deploying {name} failed (gas used {exc.gas_used})") from exc
        self._abi_cache[name] = artifact["abi"]
        assert done.created is not None
        return self.contract(name, done.created)

    def transact(
        self, contract: Contract, fn: str, *args: Any, sender: str, gas: int = DEFAULT_GAS
    ) -> TxReceipt:
        data = bytes(HexBytes(getattr(contract.functions, fn)(*args)._encode_transaction_data()))
        sender = str(to_checksum_address(sender))
        try:
            done = self.node.execute(sender, contract.address, data, gas)
        except Reverted as exc:
            raise self.decode_revert(exc.data, contract) from exc
        return _receipt(done, sender, contract.address)

    def execute(self, sender: str, to: str, data: bytes, gas: int, timestamp: int) -> Execution:
        """Mine raw calldata at ``timestamp``: the settler's fast path (no web3 encoding)."""
        self.node.set_next_timestamp(timestamp)
        return self.node.execute(sender, to, data, gas)

    def call(self, contract: Contract, fn: str, *args: Any, sender: str | None = None) -> Any:
        bound = getattr(contract.functions, fn)(*args)
        data = bytes(HexBytes(bound._encode_transaction_data()))
        caller = str(to_checksum_address(sender)) if sender else self.node.accounts[0]
        try:
            raw = self.node.call(caller, contract.address, data)
        except Reverted as exc:
            raise self.decode_revert(exc.data, contract) from exc
        return self._result(bound, raw)

    def call_many(self, contract: Contract, fn: str, args: Sequence[tuple[Any, ...]]) -> list[Any]:
        return [self.call(contract, fn, *a) for a in args]

    def timestamp(self) -> int:
        return self.node.timestamp

    def travel_to(self, timestamp: int) -> None:
        self.node.set_next_timestamp(timestamp)
        self.node.mine()

    def mine(self, blocks: int = 1) -> None:
        for _ in range(blocks):
            self.node.mine()

    def snapshot(self) -> Any:
        return self.node.snapshot()

    def revert(self, snapshot_id: Any) -> None:
        self.node.revert(int(snapshot_id))


def _receipt(done: Execution, sender: str, to: str | None) -> TxReceipt:
    """A web3-shaped receipt (what ``process_receipt`` reads) of a successful transaction."""
    tx_hash = HexBytes(keccak(done.block.to_bytes(32, "big") + b"revm-tx"))
    block_hash = HexBytes(keccak(done.block.to_bytes(32, "big") + b"revm-block"))
    logs = [
        AttributeDict(
            {
                "address": to_checksum_address(address),
                "topics": [HexBytes(t) for t in topics],
                "data": HexBytes(data),
                "logIndex": i,
                "transactionIndex": 0,
                "transactionHash": tx_hash,
                "blockHash": block_hash,
                "blockNumber": done.block,
                "removed": False,
            }
        )
        for i, (address, topics, data) in enumerate(done.logs)
    ]
    return cast(
        TxReceipt,
        AttributeDict(
            {
                "status": 1,
                "gasUsed": done.gas_used,
                "cumulativeGasUsed": done.gas_used,
                "blockNumber": done.block,
                "blockHash": block_hash,
                "transactionHash": tx_hash,
                "transactionIndex": 0,
                "from": sender,
                "to": to,
                "contractAddress": done.created,
                "logs": logs,
            }
        ),
    )
