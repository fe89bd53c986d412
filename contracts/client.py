"""Deploy and drive the contract suite through web3 8, on in-process py-evm or any JSON-RPC node.

``Chain`` wraps a ``Web3`` connection with what the rest of the project needs and web3 leaves to
the caller: transactions with explicit gas limits (no estimation round trip) and a short receipt
poll, reverts turned into :class:`~contracts.errors.ContractRevert` carrying the decoded custom
error, snapshots, and moving the clock. ``deploy_suite`` deploys the five contracts with their
roles wired; ``Suite`` has typed methods for the calls the environment and the bridge make.

Every transaction comes from an address the node can sign for (eth-tester's and anvil's
unlocked dev accounts); a production deployment injects a signing middleware into ``Chain.w3``.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

from coincurve import PrivateKey
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD
from web3.providers.eth_tester import EthereumTesterProvider
from web3.types import TxParams, TxReceipt

from contracts import clearing
from contracts.compile import BUILD_DIR, artifact_hashes, load_artifact
from contracts.errors import ChainError, ContractRevert, UnknownRevert

# LoadType and RewardKind live with the model (GridBalance's mirror grants by kind); clients
# keep importing them from here.
from contracts.model import LoadType as LoadType
from contracts.model import (
    PriceParams,
    Side,
    SignedOrder,
    Trade,
    reconciliation_parts,
)
from contracts.model import RewardKind as RewardKind

#: Gas limit of an ordinary transaction. Explicit limits skip eth_estimateGas (one round trip
#: and one extra EVM execution per transaction).
DEFAULT_GAS = 1_000_000
#: Gas limit of a clearing: just under the EIP-7825 per-transaction cap of 2**24.
CLEARING_GAS = 16_000_000
#: EIP-7825's per-transaction gas cap; py-evm does not enforce it, tests assert it.
TX_GAS_CAP = 16_777_216
#: Seconds between receipt polls: web3's default (0.1 s) would dominate a py-evm transaction.
POLL_LATENCY = 0.002

SLOT_SECONDS = 900
_PANIC = keccak(text="Panic(uint256)")[:4]
_ERROR_STRING = keccak(text="Error(string)")[:4]

#: The contracts ``deploy_suite`` deploys, by artifact name.
SUITE = (
    "DeviceRegistry",
    "EnergyTrading",
    "GridBalance",
    "RewardSystem",
    "RewardToken",
    "SlotSettler",
)


class DeviceType(IntEnum):
    """Device kind, as ``IDeviceRegistry.DeviceType``."""

    METER = 0
    INVERTER = 1
    BATTERY = 2
    APPLIANCE = 3
    SENSOR = 4


@dataclass(frozen=True)
class Order:
    """An order as the contract stores it."""

    order_id: int
    owner: str
    energy_wh: int
    duration_slots: int
    side: Side
    cancelled: bool
    limit_price: int
    start_slot: int


@dataclass(frozen=True)
class SlotResult:
    """The stored outcome of a slot's clearing (and whether metering settled it)."""

    cleared: bool
    price: int
    volume_wh: int
    order_count: int
    signed_batch: bool = False
    reconciled: bool = False
    fee_bps: int = 0


@dataclass(frozen=True)
class OrderSignature:
    """A compact EIP-2098 signature of a :class:`~contracts.model.SignedOrder`."""

    r: bytes
    vs: bytes

    def as_tuple(self) -> tuple[bytes, bytes]:
        """The ABI tuple of ``IEnergyTrading.Signature``."""
        return (self.r, self.vs)


@dataclass(frozen=True)
class Device:
    """A registered device."""

    owner: str
    device_type: DeviceType
    active: bool
    capacity_w: int
    last_slot: int
    last_seen: int
    readings: int
    missed_slots: int
    next_nonce: int
    """The lowest nonce its next reading may carry (``nonces``): last used + 1."""


@dataclass(frozen=True)
class SuiteConfig:
    """Deployment parameters of the suite (the defaults suit simulation)."""

    gate_closure_seconds: int = 300
    fee_bps: int = 50
    price: PriceParams = field(default_factory=PriceParams)
    reading_window_seconds: int = 600
    stale_after_slots: int = 8
    transformer_limit_wh: int = 100_000
    min_emergency_seconds: int = 900
    renewable_rate_per_wh: int = 10**14


def _error_table(build_dir: Path = BUILD_DIR) -> dict[bytes, dict[str, Any]]:
    """Selector -> error ABI entry over every artifact (OpenZeppelin's errors included)."""
    table: dict[bytes, dict[str, Any]] = {}
    for path in sorted(build_dir.glob("*.json")):
        for entry in json.loads(path.read_text(encoding="utf-8"))["abi"]:
            if entry["type"] != "error":
                continue
            signature = f"{entry['name']}({','.join(_abi_type(i) for i in entry['inputs'])})"
            table.setdefault(keccak(text=signature)[:4], entry)
    return table


def _abi_type(param: dict[str, Any]) -> str:
    if param["type"].startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in param["components"])
        return f"({inner}){param['type'][5:]}"
    return str(param["type"])


def _shape(param: dict[str, Any], value: Any) -> Any:
    """Shape a decoded ABI value as web3 does: checksummed addresses, arrays as lists."""
    kind = str(param["type"])
    if kind.endswith("]"):
        inner = {**param, "type": kind[: kind.rindex("[")]}
        return [_shape(inner, v) for v in value]
    if kind == "tuple":
        return tuple(_shape(c, v) for c, v in zip(param["components"], value, strict=True))
    if kind == "address":
        return to_checksum_address(value)
    return value


def _revert_data(exc: BaseException) -> bytes | None:
    """Pull the raw revert data out of whatever web3 or eth-tester raised."""
    data = getattr(exc, "data", None)
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        return bytes.fromhex(data[2:])
    message = exc.args[0] if exc.args else None
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        # eth-tester puts repr(bytes) in the message, with or without this prefix.
        text = message.removeprefix("execution reverted: ")
        if text.startswith(("b'", 'b"')):
            value = ast.literal_eval(text)
            return value if isinstance(value, bytes) else None
    return None


class Chain:
    """A web3 connection plus the conveniences the suite's callers share."""

    def __init__(self, w3: Web3, *, poll_latency: float = POLL_LATENCY) -> None:
        self.w3 = w3
        self.poll_latency = poll_latency
        self._errors = _error_table()
        self._abi_cache: dict[str, list[dict[str, Any]]] = {}
        self._default_caller: str | None = None

    @classmethod
    def in_process(cls) -> Chain:
        """A fresh py-evm chain through eth-tester (no process, no network)."""
        return cls(Web3(EthereumTesterProvider()))

    @classmethod
    def rpc(cls, url: str, *, timeout: float = 30.0) -> Chain:
        """Any JSON-RPC node over HTTP (anvil locally)."""
        # The chain id never changes under a node: caching it saves a round trip per call.
        provider = Web3.HTTPProvider(
            url, request_kwargs={"timeout": timeout}, cache_allowed_requests=True
        )
        w3 = Web3(provider)
        if not w3.is_connected():
            raise ChainError(f"no JSON-RPC node answers at {url}")
        return cls(w3)

    @property
    def is_tester(self) -> bool:
        """Whether this is the in-process eth-tester chain."""
        return isinstance(self.w3.provider, EthereumTesterProvider)

    @property
    def engine(self) -> str:
        """What executes the contracts: ``py-evm`` (eth-tester), ``revm`` (``contracts.revm``)
        or ``rpc`` (a node over JSON-RPC)."""
        return "py-evm" if self.is_tester else "rpc"

    @property
    def accounts(self) -> list[str]:
        """The node's unlocked accounts."""
        return [str(a) for a in self.w3.eth.accounts]

    def contract(self, name: str, address: str) -> Contract:
        """A handle on deployed contract ``name`` at ``address``."""
        if name not in self._abi_cache:
            self._abi_cache[name] = load_artifact(name)["abi"]
        return self.w3.eth.contract(address=to_checksum_address(address), abi=self._abi_cache[name])

    def deploy(self, name: str, *args: Any, sender: str, gas: int = 8_000_000) -> Contract:
        """Deploy artifact ``name`` with constructor ``args`` from ``sender``."""
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        tx_hash = factory.constructor(*args).transact(self._params(sender, gas))
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=self.poll_latency)
        if receipt["status"] != 1:
            raise ChainError(f"deploying {name} failed (gas used {receipt['gasUsed']})")
        self._abi_cache[name] = artifact["abi"]
        return self.contract(name, str(receipt["contractAddress"]))

    def transact(
        self, contract: Contract, fn: str, *args: Any, sender: str, gas: int = DEFAULT_GAS
    ) -> TxReceipt:
        """Send ``contract.fn(*args)`` from ``sender`` and wait for it; raise on revert.

        A revert raises :class:`ContractRevert` with the decoded custom error. Nodes that do not
        reject reverting transactions up front (eth-tester with an explicit gas limit) mine them
        with status 0; the call is then replayed on the parent block to learn the reason.
        """
        call = getattr(contract.functions, fn)(*args)
        params = self._params(sender, gas)
        try:
            if self.is_tester:
                # Straight to the tester (it mines at once): web3's send pipeline and the
                # receipt poll cost ~20 % of a py-evm transaction.
                tx = {**params, "to": contract.address, "data": call._encode_transaction_data()}
                tx_hash = self._tester().send_transaction(tx)
            else:
                tx_hash = call.transact(params)
        except Exception as exc:
            raise self.decode(exc, contract) from exc
        receipt = (
            self.w3.eth.get_transaction_receipt(tx_hash)
            if self.is_tester
            else self.w3.eth.wait_for_transaction_receipt(tx_hash, poll_latency=self.poll_latency)
        )
        if receipt["status"] == 1:
            return receipt
        try:
            call.call(params, block_identifier=receipt["blockNumber"] - 1)
        except Exception as exc:
            raise self.decode(exc, contract) from exc
        raise UnknownRevert(
            f"{fn} reverted without a reproducible reason (gas used {receipt['gasUsed']} of {gas})"
        )

    def call(self, contract: Contract, fn: str, *args: Any, sender: str | None = None) -> Any:
        """Read ``contract.fn(*args)``; a revert raises :class:`ContractRevert`.

        The call goes straight to the tester or the node's ``eth_call``, skipping web3's request
        pipeline (several provider round trips per call); results are shaped as web3 shapes them.
        """
        bound = getattr(contract.functions, fn)(*args)
        try:
            tx = {
                "from": to_checksum_address(sender) if sender else self._caller(),
                "to": contract.address,
                "data": bound._encode_transaction_data(),
            }
            if self.is_tester:
                raw = self._tester().call(tx, "latest")
            else:
                response = self.w3.provider.make_request(cast(Any, "eth_call"), [tx, "latest"])
                if "error" in response:
                    raise ContractLogicError(
                        str(response["error"].get("message")), data=response["error"].get("data")
                    )
                raw = response["result"]
        except Exception as exc:
            raise self.decode(exc, contract) from exc
        return self._result(bound, raw)

    def _result(self, bound: Any, raw: str | bytes) -> Any:
        """Decode a call's raw return data the way web3 shapes it."""
        outputs = bound.abi["outputs"]
        data = bytes.fromhex(raw[2:]) if isinstance(raw, str) else bytes(raw)
        decoded = self.w3.codec.decode([_abi_type(o) for o in outputs], data)
        values = [_shape(o, v) for o, v in zip(outputs, decoded, strict=True)]
        return values[0] if len(values) == 1 else values

    def call_many(self, contract: Contract, fn: str, args: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Read ``contract.fn(*a)`` for every ``a`` in ``args``: one JSON-RPC batch on a node.

        A node answers a batch in one HTTP round trip, which is what reading every prosumer's
        credit each slot needs; eth-tester has no round trip to save and calls one by one.
        """
        if self.is_tester:
            return [self.call(contract, fn, *a) for a in args]
        bound = [getattr(contract.functions, fn)(*a) for a in args]
        caller = self._caller()
        requests = [
            (
                "eth_call",
                [
                    {"from": caller, "to": contract.address, "data": b._encode_transaction_data()},
                    "latest",
                ],
            )
            for b in bound
        ]
        responses = cast(Any, self.w3.provider).make_batch_request(requests)
        out = []
        for b, response in zip(bound, responses, strict=True):
            if "error" in response:
                err = response["error"]
                raise self.decode(
                    ContractLogicError(str(err.get("message")), data=err.get("data")), contract
                )
            out.append(self._result(b, response["result"]))
        return out

    def decode(self, exc: BaseException, contract: Contract | None = None) -> ChainError:
        """Turn a web3 / eth-tester exception into the ChainError family."""
        data = _revert_data(exc)
        if data is None:
            if isinstance(exc, ContractLogicError | ChainError):
                return UnknownRevert(str(exc))
            kind = type(exc).__name__
            if kind == "TransactionFailed":
                return UnknownRevert(str(exc))
            return ChainError(f"{kind}: {exc}")
        return self.decode_revert(data, contract)

    def decode_revert(self, data: bytes, contract: Contract | None = None) -> ChainError:
        """Decode raw revert ``data`` against the suite's error ABIs."""
        where = self._name_of(contract)
        selector, payload = data[:4], data[4:]
        codec = self.w3.codec
        if selector == _PANIC:
            (code,) = codec.decode(["uint256"], payload)
            return ContractRevert(where, "Panic", {"code": int(code)})
        if selector == _ERROR_STRING:
            (reason,) = codec.decode(["string"], payload)
            return ContractRevert(where, "Error", {"reason": reason})
        entry = self._errors.get(selector)
        if entry is None:
            return UnknownRevert(f"unknown revert data 0x{data.hex()}", data)
        types = [_abi_type(i) for i in entry["inputs"]]
        values = [
            to_checksum_address(v) if t == "address" else v
            for t, v in zip(types, codec.decode(types, payload), strict=True)
        ]
        names = [i["name"] or f"arg{n}" for n, i in enumerate(entry["inputs"])]
        return ContractRevert(where, entry["name"], dict(zip(names, values, strict=True)))

    def _name_of(self, contract: Contract | None) -> str:
        if contract is None:
            return "?"
        for name, abi in self._abi_cache.items():
            if abi is contract.abi or abi == contract.abi:
                return name
        return "?"

    def _params(self, sender: str, gas: int) -> TxParams:
        return {"from": to_checksum_address(sender), "gas": gas}

    # ---------------------------------------------------------------- node control

    def timestamp(self) -> int:
        """Timestamp of the latest block."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def travel_to(self, timestamp: int) -> None:
        """Mine an empty block at ``timestamp`` (must be later than the latest block).

        Afterwards calls see ``timestamp`` and the next transaction runs strictly after it, on
        eth-tester and anvil alike.
        """
        if timestamp <= self.timestamp():
            raise ChainError(f"cannot travel back in time to {timestamp}")
        provider = self.w3.provider
        if isinstance(provider, EthereumTesterProvider):
            # time_travel only sets the *pending* block's timestamp; mining it makes it current.
            tester = self._tester()
            tester.time_travel(timestamp)
            tester.mine_blocks(1)
        else:
            self._rpc("evm_setNextBlockTimestamp", [timestamp])
            self._rpc("evm_mine", [])

    def mine(self, blocks: int = 1) -> None:
        """Mine ``blocks`` empty blocks (voting delays and periods count blocks)."""
        if self.is_tester:
            self._tester().mine_blocks(blocks)
        else:
            self._rpc("anvil_mine", [hex(blocks)])

    def snapshot(self) -> Any:
        """Take a snapshot of the whole chain state; pass the id to :meth:`revert`."""
        provider = self.w3.provider
        if isinstance(provider, EthereumTesterProvider):
            return self._tester().take_snapshot()
        return self._rpc("evm_snapshot", [])

    def revert(self, snapshot_id: Any) -> None:
        """Return to a snapshot (anvil consumes it: take a new one to revert again)."""
        provider = self.w3.provider
        if isinstance(provider, EthereumTesterProvider):
            self._tester().revert_to_snapshot(snapshot_id)
        elif not self._rpc("evm_revert", [snapshot_id]):
            raise ChainError(f"snapshot {snapshot_id} could not be restored")

    def _caller(self) -> str:
        """A funded account to stand in as ``from`` for reads (eth-tester demands one)."""
        if self._default_caller is None:
            self._default_caller = self.accounts[0]
        return self._default_caller

    def _tester(self) -> Any:
        """The eth-tester instance behind an in-process chain."""
        return cast(Any, self.w3.provider).ethereum_tester

    def _rpc(self, method: str, params: list[Any]) -> Any:
        response = self.w3.provider.make_request(cast(Any, method), params)
        if "error" in response:
            raise ChainError(f"{method} failed: {response['error']}")
        return response.get("result")


def sign_reading(
    private_key: bytes,
    *,
    chain_id: int,
    registry: str,
    slot: int,
    energy_wh: int,
    nonce: int,
) -> tuple[tuple[str, int, int, int], bytes]:
    """Sign a meter reading the way a device does; returns ``(reading tuple, signature)``.

    The EIP-712 domain carries ``chain_id`` and the ``registry`` address: that is what makes a
    reading useless on any other chain or registry.
    """
    device = Account.from_key(private_key).address
    message = encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "Reading": [
                    {"name": "device", "type": "address"},
                    {"name": "slot", "type": "uint64"},
                    {"name": "energyWh", "type": "int64"},
                    {"name": "nonce", "type": "uint256"},
                ],
            },
            "primaryType": "Reading",
            "domain": {
                "name": "DeviceRegistry",
                "version": "1",
                "chainId": chain_id,
                "verifyingContract": to_checksum_address(registry),
            },
            "message": {"device": device, "slot": slot, "energyWh": energy_wh, "nonce": nonce},
        }
    )
    signed = Account.sign_message(message, private_key)
    return (device, slot, energy_wh, nonce), bytes(signed.signature)


_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_SIGNED_ORDER_TYPEHASH = keccak(
    text="SignedOrder(address owner,uint64 slot,uint8 side,uint64 energyWh,uint64 limitPrice,"
    "uint8 nonce)"
)


def eip712_domain(name: str, chain_id: int, contract: str) -> bytes:
    """The EIP-712 domain separator (name, version "1", chain id, verifying contract) the
    suite's contracts use: binding chain and address makes a signature worthless elsewhere."""
    words = [
        _DOMAIN_TYPEHASH,
        keccak(text=name),
        keccak(text="1"),
        chain_id.to_bytes(32, "big"),
        int(contract, 16).to_bytes(32, "big"),
    ]
    return keccak(b"".join(words))


def order_domain(chain_id: int, trading: str) -> bytes:
    """EnergyTrading's EIP-712 domain separator on chain ``chain_id`` at address ``trading``."""
    return eip712_domain("EnergyTrading", chain_id, trading)


def order_digest(domain: bytes, order: SignedOrder) -> bytes:
    """The EIP-712 digest an owner signs for ``order`` (``signedOrderDigest``)."""
    fields = [int(order.owner, 16), order.slot, int(order.side)]
    fields += [order.energy_wh, order.limit_price, order.nonce]
    struct = keccak(_SIGNED_ORDER_TYPEHASH + b"".join(v.to_bytes(32, "big") for v in fields))
    return keccak(b"\x19\x01" + domain + struct)


def sign_order(private_key: bytes, domain: bytes, order: SignedOrder) -> OrderSignature:
    """Sign ``order`` with the owner's key (libsecp256k1 through coincurve: ~0.1 ms).

    A simulation signs every prosumer's order every slot, so this skips eth-account's typed-data
    machinery (~1 ms) and hashes the fixed layout directly; tests check it against the contract.
    """
    signature = PrivateKey(private_key).sign_recoverable(order_digest(domain, order), hasher=None)
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    return OrderSignature(r, (s | v << 255).to_bytes(32, "big"))


@dataclass
class Suite:
    """The deployed suite and typed access to it."""

    chain: Chain
    admin: str
    payment_token: Contract
    registry: Contract
    trading: Contract
    rewards: Contract
    reward_token: Contract
    grid: Contract
    genesis: int
    deployment_block: int
    settler: Contract
    """SlotSettler: the operator's one transaction per slot (see ``ISlotSettler``)."""
    config: SuiteConfig = field(default_factory=SuiteConfig)
    """The parameters it was deployed with (the manifest records them)."""
    _order_domain: bytes | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- helpers

    def _tx(
        self, contract: Contract, fn: str, *args: Any, sender: str, gas: int = DEFAULT_GAS
    ) -> TxReceipt:
        return self.chain.transact(contract, fn, *args, sender=sender, gas=gas)

    def _events(self, contract: Contract, event: str, receipt: TxReceipt) -> list[dict[str, Any]]:
        # DISCARD: a receipt also carries other contracts' logs (token transfers), not errors.
        processed = getattr(contract.events, event)().process_receipt(receipt, errors=DISCARD)
        return [dict(e["args"]) for e in processed]

    def addresses(self) -> dict[str, str]:
        """Contract addresses by name (for a deployment manifest)."""
        return {
            "PaymentToken": self.payment_token.address,
            "DeviceRegistry": self.registry.address,
            "EnergyTrading": self.trading.address,
            "GridBalance": self.grid.address,
            "RewardSystem": self.rewards.address,
            "RewardToken": self.reward_token.address,
            "SlotSettler": self.settler.address,
        }

    def slot_start(self, slot: int) -> int:
        """Start timestamp of ``slot``."""
        return self.genesis + slot * SLOT_SECONDS

    def current_slot(self) -> int:
        """The slot of the latest block."""
        return (self.chain.timestamp() - self.genesis) // SLOT_SECONDS

    # ---------------------------------------------------------------- market

    def fund_account(self, account: str, amount: int) -> None:
        """Mint test payment tokens to ``account`` and deposit them (MockPaymentToken only)."""
        self._tx(self.payment_token, "mint", account, amount, sender=account)
        self._tx(self.payment_token, "approve", self.trading.address, amount, sender=account)
        self.deposit(account, amount)

    def deposit(self, account: str, amount: int) -> TxReceipt:
        """Move ``amount`` payment tokens (already approved) into the ledger."""
        return self._tx(self.trading, "deposit", amount, sender=account)

    def deposit_for(self, funder: str, account: str, amount: int) -> TxReceipt:
        """Move ``amount`` of ``funder``'s approved tokens into ``account``'s credit."""
        return self.deposit_for_many(funder, [account], [amount])

    def deposit_for_many(
        self, funder: str, accounts: Sequence[str], amounts: Sequence[int]
    ) -> TxReceipt:
        """Credit many accounts from ``funder``'s approved tokens in one transaction."""
        return self._tx(
            self.trading,
            "depositFor",
            list(accounts),
            [int(a) for a in amounts],
            sender=funder,
            gas=CLEARING_GAS,
        )

    def withdraw(self, account: str, amount: int) -> TxReceipt:
        """Pull ``amount`` of free credit out of the ledger."""
        return self._tx(self.trading, "withdraw", amount, sender=account)

    def create_order(
        self,
        account: str,
        *,
        start_slot: int,
        energy_wh: int,
        limit_price: int,
        side: Side,
        duration_slots: int = 1,
    ) -> int:
        """Place a limit order; returns its id."""
        receipt = self._tx(
            self.trading,
            "createOrder",
            start_slot,
            energy_wh,
            limit_price,
            duration_slots,
            int(side),
            sender=account,
        )
        return int(self._events(self.trading, "OrderCreated", receipt)[0]["orderId"])

    def cancel_order(self, account: str, order_id: int) -> TxReceipt:
        """Cancel an order before its gate closes."""
        return self._tx(self.trading, "cancelOrder", order_id, sender=account)

    def slot_book(self, slot: int) -> list[Order]:
        """The orders of ``slot`` in book order (the order fills are listed in)."""
        ids = self.chain.call(self.trading, "slotOrders", slot)
        return [self.order(int(i)) for i in ids]

    def order(self, order_id: int) -> Order:
        """Order ``order_id``."""
        raw = self.chain.call(self.trading, "getOrder", order_id)
        return Order(order_id, raw[0], raw[1], raw[2], Side(raw[3]), raw[4], raw[5], raw[6])

    def solve(self, slot: int) -> clearing.BookClearing:
        """Clear ``slot``'s current book off-chain with the reference solver."""
        book = self.slot_book(slot)
        return clearing.clear_book(
            [o.energy_wh for o in book],
            [o.limit_price for o in book],
            [int(o.side) for o in book],
            live=[not o.cancelled for o in book],
        )

    def clear_slot(self, solver: str, slot: int, price: int, fills: Sequence[int]) -> TxReceipt:
        """Submit a clearing of ``slot`` (solver role)."""
        return self._tx(
            self.trading,
            "clearSlot",
            slot,
            price,
            [int(f) for f in fills],
            sender=solver,
            gas=CLEARING_GAS,
        )

    def solve_and_clear(self, solver: str, slot: int) -> tuple[clearing.BookClearing, TxReceipt]:
        """Solve ``slot`` off-chain and submit the result."""
        result = self.solve(slot)
        return result, self.clear_slot(solver, slot, result.price, result.fills.tolist())

    def slot_result(self, slot: int) -> SlotResult:
        """Stored result of ``slot``."""
        raw = self.chain.call(self.trading, "slotResult", slot)
        return SlotResult(*raw)

    # ---------------------------------------------------------------- signed batches

    @property
    def order_domain(self) -> bytes:
        """EnergyTrading's EIP-712 domain separator (what :func:`sign_order` takes)."""
        if self._order_domain is None:
            self._order_domain = order_domain(int(self.chain.w3.eth.chain_id), self.trading.address)
        return self._order_domain

    def sign_order(self, private_key: bytes, order: SignedOrder) -> OrderSignature:
        """Sign ``order`` for this deployment with the owner's key."""
        return sign_order(private_key, self.order_domain, order)

    def settle_signed_batch(
        self,
        solver: str,
        slot: int,
        orders: Sequence[SignedOrder],
        signatures: Sequence[OrderSignature],
        *,
        price: int | None = None,
        fills: Sequence[int] | None = None,
        gas: int = CLEARING_GAS,
    ) -> tuple[clearing.BookClearing, TxReceipt]:
        """Settle ``slot`` from signed ``orders`` in one transaction (solver role).

        ``orders`` must be sorted by :attr:`~contracts.model.SignedOrder.key`. Without ``price``
        and ``fills`` the reference solver clears the batch; pass them to submit another
        clearing (the contract verifies whatever it gets).
        """
        result = clearing.clear_book(
            [o.energy_wh for o in orders],
            [o.limit_price for o in orders],
            [int(o.side) for o in orders],
        )
        receipt = self._tx(
            self.trading,
            "settleSignedBatch",
            slot,
            result.price if price is None else price,
            [o.as_tuple() for o in orders],
            [s.as_tuple() for s in signatures],
            [int(f) for f in (result.fills.tolist() if fills is None else fills)],
            sender=solver,
            gas=gas,
        )
        return result, receipt

    def cancel_signed_orders(self, account: str, slot: int, mask: int) -> TxReceipt:
        """Withdraw ``account``'s signed orders for ``slot`` whose nonce bits are in ``mask``."""
        return self._tx(self.trading, "cancelSignedOrders", slot, mask, sender=account)

    def book_trades(self, slot: int, fills: Sequence[int]) -> list[Trade]:
        """The trade list ``clearSlot`` committed to: the slot's book with its ``fills``."""
        return [
            Trade(o.owner, o.side, int(f)) for o, f in zip(self.slot_book(slot), fills, strict=True)
        ]

    def trade_commitment(self, slot: int) -> bytes:
        """The hash chain ``slot``'s settlement stored over its trades."""
        return bytes(self.chain.call(self.trading, "tradeCommitment", slot))

    def reconcile_slot(
        self,
        solver: str,
        slot: int,
        trades: Sequence[Trade],
        members: Sequence[str] = (),
        *,
        max_accounts: int | None = None,
        gas: int = CLEARING_GAS,
    ) -> list[TxReceipt]:
        """Settle ``slot``'s traded against metered energy (solver role, readings final).

        ``trades`` is the committed trade list (the signed batch's orders with their fills, or
        :meth:`book_trades`); ``members`` adds metered accounts that did not trade. With
        ``max_accounts`` the work is split into transactions of at most that many accounts
        (:func:`~contracts.model.reconciliation_parts`); one receipt per transaction.
        """
        return [
            self._tx(
                self.trading,
                "reconcileSlot",
                slot,
                part.trades,
                part.accounts,
                part.rest,
                sender=solver,
                gas=gas,
            )
            for part in reconciliation_parts(trades, members, max_accounts)
        ]

    def credit_of(self, account: str) -> int:
        """Free ledger credit of ``account``."""
        return int(self.chain.call(self.trading, "creditOf", account))

    def ledger_totals(self) -> tuple[int, int]:
        """(sum of credits, sum of escrow)."""
        credits, escrow = self.chain.call(self.trading, "totals")
        return int(credits), int(escrow)

    def token_balance(self, account: str, token: Contract | None = None) -> int:
        """ERC20 balance of ``account`` (payment token by default)."""
        return int(self.chain.call(token or self.payment_token, "balanceOf", account))

    def price_band(self, slot: int) -> tuple[int, int]:
        """Allowed limit-price band of ``slot``."""
        low, high = self.chain.call(self.trading, "priceBand", slot)
        return int(low), int(high)

    def gate_closes_at(self, slot: int) -> int:
        """Timestamp at which the gate of ``slot`` closes."""
        return int(self.chain.call(self.trading, "gateClosesAt", slot))

    # ---------------------------------------------------------------- devices

    def register_device(
        self,
        device: str,
        owner: str,
        device_type: DeviceType,
        capacity_w: int,
        *,
        sender: str | None = None,
    ) -> TxReceipt:
        """Register ``device`` (its signing key's address) for ``owner`` (registrar role)."""
        return self._tx(
            self.registry,
            "registerDevice",
            device,
            owner,
            int(device_type),
            capacity_w,
            sender=sender or self.admin,
        )

    def submit_reading(
        self,
        private_key: bytes,
        slot: int,
        energy_wh: int,
        *,
        sender: str,
        nonce: int | None = None,
    ) -> TxReceipt:
        """Sign a reading with the device key and relay it from ``sender``."""
        device = Account.from_key(private_key).address
        if nonce is None:
            nonce = int(self.chain.call(self.registry, "nonces", device))
        reading, signature = sign_reading(
            private_key,
            chain_id=int(self.chain.w3.eth.chain_id),
            registry=self.registry.address,
            slot=slot,
            energy_wh=energy_wh,
            nonce=nonce,
        )
        return self._tx(self.registry, "submitReading", reading, signature, sender=sender)

    def register_devices(
        self, devices: Sequence[tuple[str, str, DeviceType, int]], *, sender: str | None = None
    ) -> TxReceipt:
        """Register many ``(device, owner, type, capacity_w)`` in one transaction."""
        rows = [(d, o, int(t), c) for d, o, t, c in devices]
        return self._tx(
            self.registry, "registerDevices", rows, sender=sender or self.admin, gas=CLEARING_GAS
        )

    def submit_readings(
        self, readings: Sequence[tuple[bytes, int, int, int]], *, sender: str
    ) -> TxReceipt:
        """Sign and relay many ``(device key, slot, energy_wh, nonce)`` readings in one transaction
        (all or nothing)."""
        chain_id = int(self.chain.w3.eth.chain_id)
        signed = [
            sign_reading(
                key,
                chain_id=chain_id,
                registry=self.registry.address,
                slot=slot,
                energy_wh=wh,
                nonce=nonce,
            )
            for key, slot, wh, nonce in readings
        ]
        return self._tx(
            self.registry,
            "submitReadings",
            [r for r, _ in signed],
            [s for _, s in signed],
            sender=sender,
            gas=CLEARING_GAS,
        )

    def net_metered_wh(self, owners: Sequence[str], slot: int) -> list[int]:
        """Net metered Wh (+ import, - export) of each owner's meters in ``slot``."""
        return [int(v) for v in self.chain.call(self.registry, "netMeteredWh", list(owners), slot)]

    def device(self, device: str) -> Device:
        """The registry's record of ``device``."""
        raw = self.chain.call(self.registry, "getDevice", device)
        return Device(raw[0], DeviceType(raw[1]), *raw[2:9])

    # ---------------------------------------------------------------- rewards

    def fund_rewards(self, amount: int) -> TxReceipt:
        """Mint ``amount`` reward tokens to the admin and put them in the reward budget."""
        self._tx(self.reward_token, "mint", self.admin, amount, sender=self.admin)
        self._tx(self.reward_token, "approve", self.rewards.address, amount, sender=self.admin)
        return self._tx(self.rewards, "fund", amount, sender=self.admin)


def deploy_suite(
    chain: Chain,
    *,
    admin: str | None = None,
    solver: str | None = None,
    treasury: str | None = None,
    payment_token: str | None = None,
    config: SuiteConfig | None = None,
    genesis: int | None = None,
) -> Suite:
    """Deploy the whole suite and wire its roles.

    ``payment_token`` is an existing ERC20's address; without one a MockPaymentToken is deployed
    (local chains only). ``genesis`` (start of slot 0) defaults to the last UTC midnight, so slot
    ``s`` falls in hour ``(s % 96) // 4`` of the day, as the time-of-day multipliers assume.
    Roles: the admin holds every admin role; ``solver`` gets SOLVER_ROLE; GridBalance gets
    EnergyTrading's PAUSER_ROLE and RewardSystem's REWARDER_ROLE. SlotSettler (the one
    transaction per slot) gets SOLVER_ROLE and PARAMETER_ROLE on EnergyTrading, REWARDER_ROLE
    on RewardSystem, EMERGENCY_ROLE and OPERATOR_ROLE on GridBalance, and ``solver`` its
    OPERATOR_ROLE: whoever operates it holds exactly the powers of the solver plus posting prices,
    granting rewards, declaring and ending emergencies and announcing demand-response events
    (its code calls no other operator function of GridBalance).
    """
    cfg = config or SuiteConfig()
    accounts = chain.accounts
    admin = admin or accounts[0]
    solver = solver or admin
    treasury = treasury or admin
    now = chain.timestamp()
    genesis = now - now % 86_400 if genesis is None else genesis
    first_block = int(chain.w3.eth.block_number) + 1

    token = (
        chain.contract("MockPaymentToken", payment_token)
        if payment_token
        else chain.deploy("MockPaymentToken", sender=admin)
    )
    registry = chain.deploy(
        "DeviceRegistry",
        admin,
        genesis,
        cfg.reading_window_seconds,
        cfg.stale_after_slots,
        sender=admin,
    )
    params, tod = cfg.price.as_args()
    trading = chain.deploy(
        "EnergyTrading",
        admin,
        token.address,
        registry.address,
        treasury,
        genesis,
        cfg.gate_closure_seconds,
        cfg.fee_bps,
        params,
        tod,
        sender=admin,
    )
    reward_token = chain.deploy("RewardToken", admin, sender=admin)
    rewards = chain.deploy(
        "RewardSystem",
        admin,
        reward_token.address,
        registry.address,
        cfg.renewable_rate_per_wh,
        sender=admin,
    )
    grid = chain.deploy(
        "GridBalance",
        admin,
        registry.address,
        trading.address,
        rewards.address,
        genesis,
        cfg.transformer_limit_wh,
        cfg.min_emergency_seconds,
        sender=admin,
    )
    role = {name: keccak(text=name) for name in ("SOLVER_ROLE", "PAUSER_ROLE", "REWARDER_ROLE")}
    chain.transact(trading, "grantRole", role["SOLVER_ROLE"], solver, sender=admin)
    chain.transact(trading, "grantRole", role["PAUSER_ROLE"], grid.address, sender=admin)
    chain.transact(rewards, "grantRole", role["REWARDER_ROLE"], grid.address, sender=admin)
    chain.transact(rewards, "grantRole", role["REWARDER_ROLE"], admin, sender=admin)
    settler = chain.deploy(
        "SlotSettler",
        admin,
        solver,
        trading.address,
        registry.address,
        rewards.address,
        grid.address,
        sender=admin,
    )
    for target, name in (
        (trading, "SOLVER_ROLE"),
        (trading, "PARAMETER_ROLE"),
        (rewards, "REWARDER_ROLE"),
        (grid, "EMERGENCY_ROLE"),
        (grid, "OPERATOR_ROLE"),
    ):
        chain.transact(target, "grantRole", role_id(name), settler.address, sender=admin)
    return Suite(
        chain=chain,
        admin=admin,
        payment_token=token,
        registry=registry,
        trading=trading,
        rewards=rewards,
        reward_token=reward_token,
        grid=grid,
        genesis=genesis,
        deployment_block=first_block,
        settler=settler,
        config=cfg,
    )


def deployment_manifest(suite: Suite, governance: Governance | None = None) -> dict[str, Any]:
    """What the bridge needs to find the suite: chain id, addresses, first block, artifact hashes.

    JSON-serialisable; ``microgrid chain deploy`` writes it to disk. The artifact hashes pin
    which compiled code the addresses run, so a bridge can refuse a manifest from other sources.
    ``parameters`` records the scalar deployment parameters (the contracts hold them immutably,
    so an operator reads here what a deployment was made with rather than querying each one).
    """
    cfg = suite.config
    addresses = suite.addresses()
    if governance is not None:
        addresses["MicrogridGovernor"] = governance.governor.address
        addresses["MicrogridTimelock"] = governance.timelock.address
    return {
        "chainId": int(suite.chain.w3.eth.chain_id),
        "addresses": addresses,
        "deploymentBlock": suite.deployment_block,
        "genesis": suite.genesis,
        "slotSeconds": SLOT_SECONDS,
        "parameters": {
            "gateClosureSeconds": cfg.gate_closure_seconds,
            "feeBps": cfg.fee_bps,
            "readingWindowSeconds": cfg.reading_window_seconds,
            "staleAfterSlots": cfg.stale_after_slots,
            "transformerLimitWh": cfg.transformer_limit_wh,
            "minEmergencySeconds": cfg.min_emergency_seconds,
            "renewableRatePerWh": cfg.renewable_rate_per_wh,
        },
        "artifactHashes": artifact_hashes(),
    }


@dataclass
class Governance:
    """The governor and the timelock that holds the suite's parameter roles."""

    governor: Contract
    timelock: Contract


def deploy_governance(
    suite: Suite,
    *,
    voting_delay_blocks: int = 1,
    voting_period_blocks: int = 20,
    quorum_percent: int = 4,
    min_delay_seconds: int = 3_600,
) -> Governance:
    """Deploy MicrogridGovernor + MicrogridTimelock and give the timelock the parameter roles.

    The timelock gets PARAMETER_ROLE on EnergyTrading and RewardSystem; the governor is its only
    proposer and canceller, anyone may execute a passed, queued operation. The deployer's own
    PARAMETER_ROLE (and SlotSettler's, which posts each slot's price) is left in place for
    simulation; a production deployment renounces the one and revokes the other, and its
    operator then runs SlotSettler without the price part.
    """
    chain, admin = suite.chain, suite.admin
    timelock = chain.deploy(
        "MicrogridTimelock", min_delay_seconds, [], ["0x" + "00" * 20], admin, sender=admin
    )
    governor = chain.deploy(
        "MicrogridGovernor",
        suite.reward_token.address,
        timelock.address,
        voting_delay_blocks,
        voting_period_blocks,
        quorum_percent,
        sender=admin,
    )
    for name in ("PROPOSER_ROLE", "CANCELLER_ROLE"):
        chain.transact(timelock, "grantRole", role_id(name), governor.address, sender=admin)
    chain.transact(timelock, "renounceRole", role_id("DEFAULT_ADMIN_ROLE"), admin, sender=admin)
    for target in (suite.trading, suite.rewards):
        chain.transact(
            target, "grantRole", role_id("PARAMETER_ROLE"), timelock.address, sender=admin
        )
    return Governance(governor=governor, timelock=timelock)


def role_id(name: str) -> bytes:
    """The bytes32 id of an AccessControl role (``DEFAULT_ADMIN_ROLE`` is zero)."""
    return bytes(32) if name == "DEFAULT_ADMIN_ROLE" else keccak(text=name)
