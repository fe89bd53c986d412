"""The operator's one transaction per slot (``SlotSettler.run``), on a fast client path.

A simulated slot used to be four or five transactions through web3: each one an encode, a send,
a receipt poll and an event decode, several HTTP round trips on a node. Here a slot is one
``run`` call, and everything around it skips web3's per-call machinery:

* orders and readings are signed with coincurve (libsecp256k1) over EIP-712 digests built from
  a domain separator and type hash computed once (:class:`ReadingSigner`;
  :func:`contracts.client.order_digest` for orders); tests check them bit for bit against
  eth-account's typed-data signing and the contracts' own digests;
* the calldata is one ``eth_abi`` encode of the whole step (:meth:`SlotStep.calldata`);
* :class:`SlotSender` sends it with a fixed gas limit (no estimation): straight into revm
  (``contracts.revm``) or eth-tester on py-evm in process, or as one JSON-RPC batch (next
  block's timestamp + ``eth_sendTransactionSync``, whose answer is the receipt) over one
  persistent HTTP connection (one send a request) on a node, the node's unlocked account
  signing (nothing to sign in Python, as for every other transaction of ``Chain``; anvil
  impersonates it and signs nothing); :meth:`SlotSender.submit` writes
  the batch and returns, and the answer is read when the caller asks for it, so the node mines
  while the caller computes the next slot in the same thread;
* the receipt's logs come back raw and :func:`decode_logs` reads the few events the ledger
  needs by topic, without web3's event processing.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import itertools
import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from coincurve import PrivateKey
from eth_abi import encode
from eth_utils import keccak, to_checksum_address
from sha3 import keccak_256

from contracts.client import CLEARING_GAS, Chain, _abi_type, eip712_domain
from contracts.compile import load_artifact
from contracts.errors import ChainError, UnknownRevert
from contracts.model import SignedOrder
from contracts.revm import Reverted, RevmChain

#: ``SlotStep.parts`` bits, as ``SlotSettler.PART_*``.
PART_RECONCILE = 1
PART_PRICE = 2
PART_SETTLE = 4
PART_READINGS = 8
PART_RECOVER = 16
PART_EMERGENCY = 32
PART_DEMAND_RESPONSE = 64

_ORDER_TYPEHASH = keccak(
    text="SignedOrder(address owner,uint64 slot,uint8 side,uint64 energyWh,uint64 limitPrice,"
    "uint8 nonce)"
)
_READING_TYPEHASH = keccak(text="Reading(address device,uint64 slot,int64 energyWh,uint256 nonce)")


def _run_abi() -> tuple[dict[str, Any], str, bytes]:
    """``run``'s argument ABI, its type string and the selector, from the committed artifact."""
    (entry,) = [e for e in load_artifact("SlotSettler")["abi"] if e.get("name") == "run"]
    kind = _abi_type(entry["inputs"][0])
    return entry["inputs"][0], kind, keccak(text=f"run({kind})")[:4]


#: An ABI encoder of one fixed type: the value's encoding as it stands in a head (static type)
#: or a tail (dynamic type).
_Encode = Callable[[Any], bytes]


def _compile(param: dict[str, Any]) -> tuple[_Encode, bool]:
    """(encoder, dynamic) of one ABI type, compiled from its ABI entry into nested closures:
    no validation, no dispatch on the type at encoding time. eth_abi's general encoder validates
    every leaf and took ~30 ms of a 13-prosumer step; an encoder object that dispatched on its
    type name in every call took 0.56 ms, these closures ~0.25 ms (load 7). Tests hold the
    result byte-equal to eth_abi."""
    kind = str(param["type"])
    if kind.endswith("]"):
        item, item_dynamic = _compile({**param, "type": kind[: kind.rindex("[")]})
        size = kind[kind.rindex("[") + 1 : -1]
        if size:  # fixed length: a tuple of `size` items of one type
            encode = _sequence([item] * int(size), [item_dynamic] * int(size))
            return encode, item_dynamic
        if not item_dynamic:
            return lambda v: len(v).to_bytes(32, "big") + b"".join(map(item, v)), True

        def dynamic_array(v: Any) -> bytes:
            n = len(v)
            return n.to_bytes(32, "big") + _sequence([item] * n, [True] * n)(v)

        return dynamic_array, True
    if kind == "tuple":
        fields = [_compile(c) for c in param["components"]]
        dynamic = any(d for _, d in fields)
        return _sequence([f for f, _ in fields], [d for _, d in fields]), dynamic
    if kind == "address":
        return lambda v: bytes(12) + bytes.fromhex(v[2:]), False
    if kind == "bytes32":
        return bytes, False
    if kind == "bytes":

        def dynamic_bytes(v: Any) -> bytes:
            data = bytes(v)
            return len(data).to_bytes(32, "big") + data + bytes(-len(data) % 32)

        return dynamic_bytes, True
    if kind == "string":
        raise ChainError("SlotSettler.run takes no string: the compiled encoder has none")
    if kind == "bool":
        return lambda v: (b"\x00" * 31) + (b"\x01" if v else b"\x00"), False
    if kind.startswith("int"):
        return lambda v: int(v).to_bytes(32, "big", signed=True), False
    return lambda v: int(v).to_bytes(32, "big"), False


def _sequence(items: Sequence[_Encode], dynamic: Sequence[bool]) -> _Encode:
    """Head/tail encoding of a tuple (or of an array's elements)."""
    if not any(dynamic):
        return lambda values: b"".join([f(v) for f, v in zip(items, values, strict=True)])

    def encode(values: Any) -> bytes:
        parts = [f(v) for f, v in zip(items, values, strict=True)]
        # A dynamic item's head is one offset word; a static one stands in the head itself.
        offset = sum(32 if d else len(p) for d, p in zip(dynamic, parts, strict=True))
        heads = []
        tails = []
        for d, p in zip(dynamic, parts, strict=True):
            if d:
                heads.append(offset.to_bytes(32, "big"))
                tails.append(p)
                offset += len(p)
            else:
                heads.append(p)
        return b"".join(heads) + b"".join(tails)

    return encode


_STEP_ABI, _STEP_TYPE, _RUN_SELECTOR = _run_abi()
_STEP_ENCODER, _STEP_DYNAMIC = _compile(_STEP_ABI)
_ENCODE_ARGS = _sequence([_STEP_ENCODER], [_STEP_DYNAMIC])
_NO_PRICE: tuple[Sequence[int], Sequence[int]] = ((0, 0, 0, 0, 0, 0), (0,) * 24)


@dataclass(frozen=True)
class DemandResponse:
    """``ISlotSettler.DemandResponse``: events to settle, then (with `participants`) one to
    announce. An empty `participants` announces nothing."""

    settle: Sequence[int] = ()
    start_slot: int = 0
    duration_slots: int = 0
    target_reduction_wh: int = 0
    incentive_per_wh: int = 0
    peak_bonus: int = 0
    participation_reward: int = 0
    participants: Sequence[tuple[str, int, int, int]] = ()
    """(device, LoadType, priority, baseline Wh per slot), by non-decreasing priority."""

    def value(self) -> tuple[Any, ...]:
        """The ABI tuple."""
        return (
            list(self.settle), self.start_slot, self.duration_slots, self.target_reduction_wh,
            self.incentive_per_wh, self.peak_bonus, self.participation_reward,
            list(self.participants),
        )  # fmt: skip


_NO_DEMAND_RESPONSE = DemandResponse()


def keccak256(data: bytes) -> bytes:
    """Keccak-256 straight from safe-pysha3's C extension: a slot hashes ~50 times, and
    pycryptodome's cffi wrapper (under eth_utils) costs ~7x more a call (5.4 against 38 us for
    96 bytes, measured at load 8)."""
    return bytes(keccak_256(data).digest())


#: Checksummed spelling of a 20-byte address: the ledger sees the same few dozen addresses in
#: every slot's logs, and each spelling costs a keccak.
_checksum = functools.lru_cache(maxsize=65_536)(to_checksum_address)


def _event_topic(signature: str) -> bytes:
    return keccak(text=signature)


#: Topic 0 of the events the chain ledger reads, by name.
TOPICS = {
    "SignedBatchSettled": _event_topic(
        "SignedBatchSettled(uint64,uint64,uint64,uint32,uint256,uint256,bytes32)"
    ),
    "AccountReconciled": _event_topic("AccountReconciled(uint64,address,int256,int256,uint256)"),
    "SlotReconciled": _event_topic("SlotReconciled(uint64,uint32,uint256,uint256,uint256,bool)"),
    "RewardGranted": _event_topic("RewardGranted(address,uint8,uint256)"),
    "EmergencyDeclared": _event_topic("EmergencyDeclared(bytes32,address)"),
    "Recovered": _event_topic("Recovered(address)"),
    "DemandResponseCreated": _event_topic(
        "DemandResponseCreated(uint256,uint64,uint8,uint64,uint128,uint256)"
    ),
    "ParticipantSettled": _event_topic("ParticipantSettled(uint256,address,uint64,uint256)"),
    "DemandResponseSettled": _event_topic("DemandResponseSettled(uint256,uint64,bool)"),
}
_NAMES = {topic: name for name, topic in TOPICS.items()}
#: Events whose first topic is a GridBalance event id, not a slot.
_EVENT_IDS = ("DemandResponseCreated", "ParticipantSettled", "DemandResponseSettled")


@dataclass(frozen=True)
class SlotStep:
    """The arguments of one ``SlotSettler.run``: which ``parts`` and what each needs."""

    parts: int
    reconcile_slot: int = 0
    trades: Sequence[tuple[str, int, int, int]] = ()
    """(owner, side, fill Wh, account index) in the settlement's order."""
    accounts: Sequence[str] = ()
    """Every account to reconcile, by increasing address."""
    exporters: Sequence[str] = ()
    """Meters (device addresses) whose export earns the renewable reward."""
    grants: Sequence[tuple[str, int, int]] = ()
    """(account, amount, RewardKind) for ``grantReward``."""
    price_params: tuple[Sequence[int], Sequence[int]] = _NO_PRICE
    """``PriceParams.as_args()``: the params tuple and the 24 time-of-day multipliers."""
    settle_slot: int = 0
    price: int = 0
    orders: Sequence[tuple[str, int, int, int, int, int]] = ()
    signatures: Sequence[tuple[bytes, bytes]] = ()
    fills: Sequence[int] = ()
    readings: Sequence[tuple[str, int, int, int]] = ()
    """(device, slot, Wh, nonce)."""
    reading_signatures: Sequence[bytes] = ()
    demand_response: DemandResponse = _NO_DEMAND_RESPONSE
    """GridBalance events to settle and the one to announce (``PART_DEMAND_RESPONSE``)."""

    def _value(self) -> tuple[Any, ...]:
        params, tod = self.price_params
        return (
            self.parts,
            (self.reconcile_slot, list(self.trades), list(self.accounts), list(self.exporters),
             list(self.grants)),
            tuple(params),
            list(tod),
            (self.settle_slot, self.price, list(self.orders), list(self.signatures),
             list(self.fills)),
            list(self.readings),
            list(self.reading_signatures),
            self.demand_response.value(),
        )  # fmt: skip

    def value(self) -> tuple[Any, ...]:
        """``run``'s one argument as web3 takes it (a client such as the bridge's outbox)."""
        return self._value()

    def calldata(self) -> bytes:
        """``run(step)``'s calldata, by the compiled encoder."""
        return _RUN_SELECTOR + _ENCODE_ARGS([self._value()])

    def calldata_reference(self) -> bytes:
        """The same calldata through eth_abi (validating, slow): what tests compare with."""
        return _RUN_SELECTOR + encode([_STEP_TYPE], [self._value()])


def _sign(key: PrivateKey, digest: bytes) -> tuple[bytes, int, int]:
    """(r, s, recovery id) of ``digest`` (already hashed)."""
    sig = key.sign_recoverable(digest, hasher=None)
    return sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]


def compact_signature(key: PrivateKey, digest: bytes) -> tuple[bytes, bytes]:
    """An EIP-2098 (r, vs) signature, as ``IEnergyTrading.Signature`` takes it."""
    r, s, v = _sign(key, digest)
    return r, (s | v << 255).to_bytes(32, "big")


class ReadingSigner:
    """Signs meter readings for one DeviceRegistry: domain separator computed once."""

    def __init__(self, chain_id: int, registry: str) -> None:
        self.domain = eip712_domain("DeviceRegistry", chain_id, registry)

    def digest(self, device: str, slot: int, energy_wh: int, nonce: int) -> bytes:
        """``DeviceRegistry.readingDigest`` of the reading."""
        words = _READING_TYPEHASH + int(device, 16).to_bytes(32, "big")
        words += slot.to_bytes(32, "big") + energy_wh.to_bytes(32, "big", signed=True)
        struct = keccak256(words + nonce.to_bytes(32, "big"))
        return keccak256(b"\x19\x01" + self.domain + struct)

    def sign(self, key: PrivateKey, device: str, slot: int, energy_wh: int, nonce: int) -> bytes:
        """The 65-byte (r, s, v) signature ``submitReadings`` takes."""
        r, s, v = _sign(key, self.digest(device, slot, energy_wh, nonce))
        return r + s.to_bytes(32, "big") + bytes([27 + v])


class OrderSigner:
    """Signs EnergyTrading's signed orders for one deployment (``order_domain``): the same
    digest as :func:`contracts.client.order_digest`, hashed without eth_utils' layers."""

    def __init__(self, domain: bytes) -> None:
        self.domain = domain

    def digest(self, order: SignedOrder) -> bytes:
        """``EnergyTrading.signedOrderDigest`` of ``order``."""
        fields = (int(order.owner, 16), order.slot, int(order.side), order.energy_wh)
        words = b"".join(v.to_bytes(32, "big") for v in (*fields, order.limit_price, order.nonce))
        return keccak256(b"\x19\x01" + self.domain + keccak256(_ORDER_TYPEHASH + words))

    def sign(self, key: PrivateKey, order: SignedOrder) -> tuple[bytes, bytes]:
        """The compact (r, vs) signature ``settleSignedBatch`` takes."""
        return compact_signature(key, self.digest(order))


@dataclass(frozen=True)
class Log:
    """One raw log of a receipt."""

    address: str
    topics: list[bytes]
    data: bytes


@dataclass(frozen=True)
class SlotReceipt:
    """What the ledger needs of a mined ``run``: gas and raw logs."""

    gas_used: int
    logs: list[Log]


def _bytes(value: Any) -> bytes:
    return bytes.fromhex(value[2:]) if isinstance(value, str) else bytes(value)


def _int(value: Any) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


def _words(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 32], "big") for i in range(0, len(data), 32)]


def _signed(word: int) -> int:
    return word - (1 << 256) if word >> 255 else word


def decode_logs(logs: Sequence[Log]) -> dict[str, list[dict[str, Any]]]:
    """The ledger's events among ``logs``, by name, decoded by hand (others skipped).

    Topics are unique across the suite's contracts, so the emitting contract need not be checked
    for these names; the caller compares the figures with what it expects anyway.
    """
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in TOPICS}
    for log in logs:
        name = _NAMES.get(log.topics[0]) if log.topics else None
        if name is None:
            continue
        w = _words(log.data)
        event: dict[str, Any]
        if name == "SignedBatchSettled":
            event = {"price": w[0], "volume": w[1], "count": w[2], "fee": w[3], "held": w[4]}
        elif name == "AccountReconciled":
            event = {
                "account": _checksum(log.topics[2][12:]),
                "imbalance": _signed(w[0]),
                "credited": _signed(w[1]),
                "unpaid": w[2],
            }
        elif name == "SlotReconciled":
            event = {"charged": w[1], "paid": w[2], "unpaid": w[3], "complete": bool(w[4])}
        elif name in ("EmergencyDeclared", "Recovered"):
            event = {"by": _checksum(log.topics[1][12:])}
        elif name == "DemandResponseCreated":
            event = {"event_id": int.from_bytes(log.topics[1], "big"), "start_slot": w[0]}
            event |= {"duration_slots": w[1], "target": w[2], "incentive": w[3]}
            event["participants"] = w[4]
        elif name == "ParticipantSettled":
            event = {"event_id": int.from_bytes(log.topics[1], "big")}
            event |= {"device": _checksum(log.topics[2][12:]), "reduction": w[0], "reward": w[1]}
        elif name == "DemandResponseSettled":
            event = {"event_id": int.from_bytes(log.topics[1], "big"), "total": w[0]}
            event["target_met"] = bool(w[1])
        else:
            event = {"account": _checksum(log.topics[1][12:]), "amount": w[0]}
        slotted = name not in ("RewardGranted", *_EVENT_IDS)
        event["slot"] = int.from_bytes(log.topics[1], "big") if slotted else None
        out[name].append(event)
    return out


def read_http_response(reader: Any) -> tuple[int, bytes, bool]:
    """(status, body, whether the server closes the connection) of one HTTP/1.1 response read
    from the buffered binary stream `reader` (a socket's ``makefile("rb")``).

    Parsed by hand: the status line, the headers up to the blank line, then a body of
    ``Content-Length`` bytes, chunks, or (neither given) everything up to the close.
    ``http.client`` runs every response's headers through the ``email`` package's parser:
    reading a slot's answer took ~0.7 ms of Python CPU that way and ~0.35 ms this way (load 3).
    """
    status_line = reader.readline(_LINE_MAX)
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise http.client.BadStatusLine(repr(status_line))
    length = -1
    close = parts[0] == b"HTTP/1.0"  # 1.0 closes unless told otherwise: close to be safe
    chunked = False
    while True:
        line = reader.readline(_LINE_MAX)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    if chunked:
        return int(parts[1]), _read_chunks(reader), close
    if length < 0:  # no length: the body runs to the end of the connection
        return int(parts[1]), reader.read(), True
    data = reader.read(length)
    if len(data) != length:
        raise http.client.IncompleteRead(data, length - len(data))
    return int(parts[1]), data, close


#: Longest status or header line read (http.client's own limit).
_LINE_MAX = 65_536


def _read_chunks(reader: Any) -> bytes:
    """A chunked body (RFC 9112, 7.1): hex-sized chunks up to the zero one, then trailers."""
    out: list[bytes] = []
    while True:
        line = reader.readline(_LINE_MAX)
        if not line:
            raise http.client.IncompleteRead(b"".join(out))
        size = int(line.split(b";", 1)[0], 16)
        if size == 0:
            while reader.readline(_LINE_MAX) not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(out)
        chunk = reader.read(size)
        if len(chunk) != size:
            raise http.client.IncompleteRead(chunk, size - len(chunk))
        out.append(chunk)
        reader.readline(_LINE_MAX)


class SentSlot:
    """A ``run`` on its way: the receipt, or how to wait for it (`SlotSender.submit`)."""

    def __init__(
        self,
        receipt: SlotReceipt | None = None,
        finish: Callable[[], SlotReceipt] | None = None,
    ) -> None:
        self._receipt = receipt
        self._finish = finish

    def result(self) -> SlotReceipt:
        """The receipt, read once (raises the decoded error of a revert)."""
        if self._receipt is None:
            finish, self._finish = self._finish, None
            if finish is None:
                raise ChainError("SlotSettler.run: its answer was read already and failed")
            self._receipt = finish()
        return self._receipt


@dataclass(frozen=True)
class PreparedSlot:
    """A ``run`` ready to send (`SlotSender.prepare`)."""

    calldata: bytes
    timestamp: int
    tx: dict[str, Any] | None = None
    """The transaction (None: revm, which takes the calldata as it is)."""
    request: tuple[list[int], bytes] | None = None
    """On a node: the JSON-RPC batch's ids and encoded body."""


class SlotSender:
    """Sends ``run`` calls from ``sender`` to the settler at a chosen block timestamp."""

    def __init__(self, chain: Chain, sender: str, settler: str, gas: int = CLEARING_GAS) -> None:
        self.chain = chain
        self.gas = gas
        self._sender = to_checksum_address(sender)
        self._to = to_checksum_address(settler)
        self._engine = chain.engine
        self._tester = chain._tester() if self._engine == "py-evm" else None
        self._url = "" if self._engine != "rpc" else str(cast(Any, chain.w3.provider).endpoint_uri)
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._ids = itertools.count(1)
        self._sync = True
        if self._url:
            self._impersonate()

    def _impersonate(self) -> None:
        """Let anvil take the sender's transactions unsigned (other nodes: nothing changes).

        The sender is one of the node's unlocked accounts, so this grants nothing new; but an
        unlocked account's transaction is signed by the node and its sender then recovered
        from that signature again (~0.5 ms of anvil's ~7 ms a slot, measured with perf), while
        an impersonated one skips both.
        """
        # Not anvil: the node signs, as for every other transaction of ``Chain``.
        with contextlib.suppress(ChainError):
            self.chain._rpc("anvil_impersonateAccount", [self._sender])

    def revert_and_snapshot(self, snapshot: Any) -> Any:
        """Revert the chain to ``snapshot`` and take a new one; returns the new snapshot's id.

        On a node both go in one JSON-RPC batch over the sender's own connection (through web3
        they were two requests, ~25 ms of an episode reset at load 4); in process, as
        ``Chain.revert`` and ``Chain.snapshot`` do it.
        """
        if not self._url:
            self.chain.revert(snapshot)
            return self.chain.snapshot()
        reverted, taken = self._post([("evm_revert", [snapshot]), ("evm_snapshot", [])])
        if "error" in reverted or not reverted.get("result"):
            raise ChainError(f"snapshot {snapshot} could not be restored: {reverted}")
        if "error" in taken:
            raise ChainError(f"evm_snapshot failed: {taken['error']}")
        return taken["result"]

    def send(self, calldata: bytes, timestamp: int) -> SlotReceipt:
        """Mine ``calldata`` in a block at ``timestamp``; raise the decoded error on revert."""
        return self.submit(calldata, timestamp).result()

    def submit(self, calldata: bytes, timestamp: int) -> SentSlot:
        """Start mining ``calldata`` at ``timestamp``; the receipt comes from ``result()``.

        On a node the request is written to the socket and the node mines while the caller works
        on; ``result()`` reads the answer (a revert raises there). In process (revm, py-evm) the
        transaction runs here and then: nothing would run beside it.
        """
        return self.submit_prepared(self.prepare(calldata, timestamp))

    def prepare(self, calldata: bytes, timestamp: int) -> PreparedSlot:
        """Everything of `submit` that comes before the send: on a node, the encoded request.

        A caller that must wait for the previous transaction before sending this one (the chain
        ledger: a revert must raise first) prepares first and waits after: from the node's
        answer to the next request the node idles, and the JSON encoding of the request
        (~0.1 ms) no longer stands in that gap.
        """
        if self._engine == "revm":
            return PreparedSlot(calldata, timestamp)
        tx = {"from": self._sender, "to": self._to, "gas": self.gas, "data": "0x" + calldata.hex()}
        if self._tester is not None:
            return PreparedSlot(calldata, timestamp, tx)
        return PreparedSlot(calldata, timestamp, tx, self._request(self._rpc_calls(tx, timestamp)))

    def submit_prepared(self, slot: PreparedSlot) -> SentSlot:
        """`submit` of what `prepare` made."""
        if slot.tx is None:
            return SentSlot(receipt=self._send_revm(slot.calldata, slot.timestamp))
        tx, timestamp = slot.tx, slot.timestamp
        if slot.request is None:
            return SentSlot(receipt=self._send_tester(tx, timestamp))
        ids, body = slot.request
        self._send_body(body)
        return SentSlot(finish=lambda: self._receipt_of(tx, timestamp, self._finish(ids, body)))

    def _send_revm(self, calldata: bytes, timestamp: int) -> SlotReceipt:
        # In-process revm (contracts.revm.RevmChain): the raw calldata straight in, raw logs out.
        chain = cast(RevmChain, self.chain)
        try:
            done = chain.execute(self._sender, self._to, calldata, self.gas, timestamp)
        except Reverted as exc:
            settler = self.chain.contract("SlotSettler", self._to)
            raise self.chain.decode_revert(exc.data, settler) from exc
        logs = [Log(address, topics, data) for address, topics, data in done.logs]
        return SlotReceipt(done.gas_used, logs)

    def _send_tester(self, tx: dict[str, Any], timestamp: int) -> SlotReceipt:
        tester = self._tester
        assert tester is not None
        tester.time_travel(timestamp)  # the pending block's timestamp; sending mines it
        try:
            tx_hash = tester.send_transaction(tx)
        except Exception as exc:
            raise self.chain.decode(exc, self.chain.contract("SlotSettler", self._to)) from exc
        receipt = tester.get_transaction_receipt(tx_hash)
        if receipt["status"] != 1:
            self._explain(tx, int(receipt["block_number"]), int(receipt["gas_used"]))
        logs = [
            Log(str(x["address"]), [_bytes(t) for t in x["topics"]], _bytes(x["data"]))
            for x in receipt["logs"]
        ]
        return SlotReceipt(int(receipt["gas_used"]), logs)

    def _rpc_calls(self, tx: dict[str, Any], timestamp: int) -> list[tuple[str, list[Any]]]:
        # EIP-7966's eth_sendTransactionSync answers with the receipt (anvil has it): with the
        # block time in the same batch, a slot is one HTTP round trip. Other nodes: poll.
        method = "eth_sendTransactionSync" if self._sync else "eth_sendTransaction"
        return [("evm_setNextBlockTimestamp", [timestamp]), (method, [tx])]

    def _send_rpc(self, tx: dict[str, Any], timestamp: int) -> SlotReceipt:
        return self._receipt_of(tx, timestamp, self._post(self._rpc_calls(tx, timestamp)))

    def _receipt_of(
        self, tx: dict[str, Any], timestamp: int, answers: list[dict[str, Any]]
    ) -> SlotReceipt:
        """The receipt of the batch `_rpc_calls` made, checked: mined, at `timestamp`."""
        clock, sent = answers
        if "error" in clock:
            raise ChainError(f"evm_setNextBlockTimestamp failed: {clock['error']}")
        if "error" in sent:
            err = sent["error"]
            if self._sync and err.get("code") == -32601:  # method not found
                self._sync = False
                return self._send_rpc(tx, timestamp)
            data = err.get("data")
            if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
                raise self.chain.decode_revert(bytes.fromhex(data[2:]))
            raise ChainError(f"SlotSettler.run was refused: {err}")
        receipt = sent["result"] if self._sync else self._poll(sent["result"])
        mined_at = receipt.get("blockTimestamp")  # anvil's receipts carry it
        if mined_at is not None and _int(mined_at) != timestamp:
            raise ChainError(f"SlotSettler.run was mined at {_int(mined_at)}, not {timestamp}")
        if _int(receipt["status"]) != 1:
            self._explain(tx, _int(receipt["blockNumber"]), _int(receipt["gasUsed"]))
        # JSON-RPC spells every topic and datum as a 0x-hex string: straight to bytes.
        hexed = bytes.fromhex
        logs = [
            Log(x["address"], [hexed(t[2:]) for t in x["topics"]], hexed(x["data"][2:]))
            for x in receipt["logs"]
        ]
        return SlotReceipt(_int(receipt["gasUsed"]), logs)

    def _poll(self, tx_hash: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (got,) = self._post([("eth_getTransactionReceipt", [tx_hash])])
            if got.get("result") is not None:
                return cast(dict[str, Any], got["result"])
            time.sleep(self.chain.poll_latency)
        raise ChainError(f"no receipt for SlotSettler.run {tx_hash} within 30 s")

    def _post(self, calls: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
        """One JSON-RPC batch over a persistent connection; answers in request order."""
        return self._finish(*self._begin(calls))

    def _begin(self, calls: list[tuple[str, list[Any]]]) -> tuple[list[int], bytes]:
        """Write one JSON-RPC batch to the persistent connection; `_finish` reads its answers.

        A raw socket with TCP_NODELAY and the body in the same send as the head: urllib3
        (under requests and web3) sends them apart, and Nagle's algorithm with delayed ACKs then
        stalls every request by milliseconds on loopback; http.client sends them apart too.
        Between the two calls the node works and this thread goes on with its own: no worker
        thread, so no GIL hand-over either way
        (a thread woken by the node's answer waited up to the 5 ms switch interval while the
        environment computed the next slot).
        """
        ids, body = self._request(calls)
        self._send_body(body)
        return ids, body

    def _request(self, calls: list[tuple[str, list[Any]]]) -> tuple[list[int], bytes]:
        """(ids, body) of one JSON-RPC batch of `calls`."""
        ids = [next(self._ids) for _ in calls]
        body = json.dumps(
            [
                {"jsonrpc": "2.0", "id": i, "method": m, "params": p}
                for i, (m, p) in zip(ids, calls, strict=True)
            ]
        ).encode()
        return ids, body

    def _send_body(self, body: bytes) -> None:
        try:
            self._write(body)
        except (OSError, http.client.HTTPException):
            self._close()
            self._write(body)  # a keep-alive connection the node closed: once more

    def _finish(self, ids: list[int], body: bytes) -> list[dict[str, Any]]:
        """The answers to the batch `_begin` wrote, in request order."""
        try:
            answer = self._read()
        except (OSError, http.client.HTTPException):
            # The node closed the connection before answering: send once more on a new one
            # (a batch that did mine fails the second time on its block timestamp).
            self._close()
            self._write(body)
            answer = self._read()
        by_id = {a.get("id"): a for a in answer}
        return [by_id[i] for i in ids]

    def _write(self, body: bytes) -> None:
        if self._sock is None:
            url = urlsplit(self._url)
            host, port = url.hostname or "127.0.0.1", url.port or 80
            sock = socket.create_connection((host, port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._reader = sock.makefile("rb")
            self._head = (
                f"POST {url.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Type: application/json\r\nContent-Length: "
            ).encode()
        # Head and body in one send: http.client sends them apart, and with TCP_NODELAY each
        # send wakes the node, which reads the head, goes back to sleep and is woken again.
        self._sock.sendall(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)

    def _read(self) -> Any:
        if self._sock is None:
            raise http.client.NotConnected("no request in flight")
        status, data, close = read_http_response(self._reader)
        if close:
            self._close()
        if status != 200:
            raise ChainError(f"JSON-RPC node answered HTTP {status}: {data[:200]!r}")
        return json.loads(data)

    def _close(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = None

    def _explain(self, tx: dict[str, Any], block: int, gas_used: int) -> None:
        """A mined revert: replay it on the parent block for the custom error, then raise."""
        settler = self.chain.contract("SlotSettler", self._to)
        try:
            self.chain.w3.eth.call(cast(Any, tx), block_identifier=block - 1)
        except Exception as exc:
            raise self.chain.decode(exc, settler) from exc
        raise UnknownRevert(
            f"SlotSettler.run reverted without a reproducible reason (gas used {gas_used})"
        )
