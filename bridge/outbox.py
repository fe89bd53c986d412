"""The durable outbox: every chain transaction the bridge owes, sent exactly once across crashes.

Why each piece is there:

* **Idempotency keys.** Work enters with a caller-chosen key (``reading:<device>:<slot>``,
  ``slot:<n>`` for a slot's market transaction); a second `enqueue` with the same key is a
  no-op, so a bridge that re-derives its work after a restart adds nothing twice.
* **Sign, persist, then send.** A row gets its nonce and its signed raw transaction in one SQLite
  transaction *before* anything goes on the wire. After a crash the same bytes are re-broadcast:
  the same hash, the same nonce, so the chain executes it at most once, whether the crash came
  before the send, after it, or after it was mined.
* **Nonces are the outbox's own.** The next nonce lives in the database, seeded from the node's
  pending count, and only moves in the transaction that signs; rows are signed in key order so
  nonces are contiguous and one stuck transaction holds back only those after it.
* **Lanes keep their order.** Rows whose keys agree up to the last ``:`` (a lane: ``slot:``, one
  device's ``reading:<device>:``) are signed in the order they were queued: a row waits while an
  earlier row of its lane is still pending (in its backoff, or told to wait). Each row's backoff
  has its own jitter, so without lanes a later slot's row could go first: a slot that declares
  an emergency, mined before the slot that still trades, would pause the market under it and
  its orders be repaired away; a meter's later reading would be refused for its nonce.
* **Retries with capped exponential backoff** when the node is unreachable or a call reverts
  with an error the caller named as "not yet" (e.g. a slot that has not ended); any other revert
  is final (`failed`, with the decoded custom error), because repeating it cannot help. A
  failed row leaves its lane (the rows behind it go on) and is counted in the `failures` table
  by the error's name (`failures`, the `on_failed` hook): a meter's reading lost for good is
  a figure the operator sees, by reason, not a silent gap.
* **Repair instead of failing**, where the caller knows how (`repair`): a row whose call
  reverts (in the pre-flight, or mined with status 0) is shown to the caller's hook, which may
  give smaller arguments that leave the refused part out (the bridge's slot rows drop orders the
  chain refuses and keep the slot's clearing and reconciliation, so later rows that depend on it
  are not wedged). Only a row that changed nothing on chain is rewritten: one never sent, or one
  mined reverted, whose nonce is spent and which gets a new one. Each repair is kept in the
  `repairs` table (key, error, what was dropped) for the metrics and the operator.

SQLite in WAL mode with ``synchronous=FULL``: a row reported signed or confirmed survives a
SIGKILL or a power cut. It is sans-socket except for `Chain`, which the caller supplies.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from eth_account import Account
from hexbytes import HexBytes

from bridge.errors import OutboxError
from contracts.client import Chain
from contracts.errors import ChainError, ContractRevert

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    contract TEXT NOT NULL,
    fn TEXT NOT NULL,
    args TEXT NOT NULL,
    gas INTEGER NOT NULL,
    retry_on TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL,
    nonce INTEGER,
    tx_hash TEXT,
    raw_tx BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, id);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS repairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    error TEXT NOT NULL,
    dropped TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    error TEXT NOT NULL,
    at REAL NOT NULL
);
"""

#: What a repair hook returns for "not yet, as it is" whatever the row's `retry_on` names: the
#: revert is one the caller knows will pass once another row is mined (a slot row that would
#: settle while an earlier row's end of an emergency still waits for the chain's minimum).
WAIT: Literal["wait"] = "wait"

#: A caller's repair hook: (row key, the decoded revert, the row's args) -> (args to send
#: instead, a word for what they leave out), `WAIT`, or None to retry as is if the revert is
#: a "not yet" of the row's `retry_on`, else fail.
Repair = Callable[
    [str, ContractRevert, list[Any]], tuple[Sequence[Any], str] | Literal["wait"] | None
]


class RowState(StrEnum):
    PENDING = "pending"
    """Enqueued; no nonce yet."""
    SIGNED = "signed"
    """Nonce taken and raw transaction stored; may or may not be on the chain yet."""
    CONFIRMED = "confirmed"
    """Mined with status 1."""
    FAILED = "failed"
    """Refused for good (a revert the caller did not mark as retryable)."""


@dataclass(frozen=True)
class Row:
    key: str
    state: RowState
    nonce: int | None
    tx_hash: str | None
    attempts: int
    last_error: str | None


def _encode_args(args: Sequence[Any]) -> str:
    def enc(v: Any) -> Any:
        if isinstance(v, bytes | bytearray):
            return {"bytes": bytes(v).hex()}
        if isinstance(v, tuple | list):
            return [enc(x) for x in v]
        return v

    return json.dumps([enc(a) for a in args])


def _decode_args(text: str) -> list[Any]:
    def dec(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"bytes"}:
            return bytes.fromhex(v["bytes"])
        if isinstance(v, list):
            return tuple(dec(x) for x in v)
        return v

    return [dec(a) for a in json.loads(text)]


class Outbox:
    """A SQLite-backed queue of contract calls, signed by one account and sent exactly once."""

    def __init__(
        self,
        path: str | Path,
        chain: Chain,
        addresses: dict[str, str],
        private_key: bytes,
        *,
        backoff_s: float = 0.5,
        backoff_max_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        on_signed: Callable[[str, int], None] | None = None,
        on_sent: Callable[[str, str], None] | None = None,
        on_failed: Callable[[str, str], None] | None = None,
        repair: Repair | None = None,
    ) -> None:
        self.chain = chain
        self.addresses = addresses
        self.account = Account.from_key(private_key)
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.on_signed = on_signed
        """Called with (key, nonce) once a signed row is durable: a hook for metrics and tests."""
        self.on_sent = on_sent
        self.on_failed = on_failed
        """Called with (key, error name) when a row fails for good: a hook for the logs."""
        self.repair = repair
        """Called on the worker's thread for every revert of a row (see the module docstring)."""
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._chain_id: int | None = None

    def close(self) -> None:
        self.db.close()

    # ---- producer side --------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One SQLite transaction (one fsync) around several `enqueue` calls and the caller's own
        writes on the yielded connection: all of them are durable together, or none is.

        The bridge puts one batch of received messages' readings and the device sessions they
        moved in one transaction: an fsync per reading cost more than the decision itself.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def enqueue(
        self,
        key: str,
        contract: str,
        fn: str,
        args: Sequence[Any],
        *,
        gas: int = 1_000_000,
        retry_on: Collection[str] = (),
    ) -> bool:
        """Queue `contract.fn(*args)` under `key`; False (and nothing queued) if `key` exists."""
        if contract not in self.addresses:
            raise OutboxError(
                f"contract: expected one of {sorted(self.addresses)} from the manifest, "
                f"got {contract!r}"
            )
        cur = self.db.execute(
            "INSERT OR IGNORE INTO outbox (key, contract, fn, args, gas, retry_on, state, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                contract,
                fn,
                _encode_args(args),
                gas,
                json.dumps(sorted(retry_on)),
                RowState.PENDING.value,
                self.clock(),
            ),
        )
        return cur.rowcount == 1

    # ---- inspection -----------------------------------------------------------------------
    def row(self, key: str) -> Row | None:
        r = self.db.execute(
            "SELECT key, state, nonce, tx_hash, attempts, last_error FROM outbox WHERE key = ?",
            (key,),
        ).fetchone()
        return None if r is None else Row(r[0], RowState(r[1]), r[2], r[3], r[4], r[5])

    def args(self, key: str) -> list[Any] | None:
        """The stored arguments of the row `key` (None if there is none)."""
        r = self.db.execute("SELECT args FROM outbox WHERE key = ?", (key,)).fetchone()
        return None if r is None else _decode_args(r[0])

    def unfinished_args(self, prefix: str) -> list[list[Any]]:
        """The stored arguments of the rows keyed `prefix`... not yet confirmed or failed."""
        rows = self.db.execute(
            "SELECT args FROM outbox WHERE key >= ? AND key < ? AND state IN (?, ?) ORDER BY id",
            (prefix, prefix + "\uffff", RowState.PENDING.value, RowState.SIGNED.value),
        ).fetchall()
        return [_decode_args(r[0]) for r in rows]

    def counts(self) -> dict[RowState, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
        return {RowState(s): n for s, n in rows}

    def retries(self) -> int:
        """Attempts beyond the first, over every row: a node or contract that keeps refusing."""
        (n,) = self.db.execute(
            "SELECT COALESCE(SUM(MAX(attempts - 1, 0)), 0) FROM outbox"
        ).fetchone()
        return int(n)

    def repairs(self) -> dict[str, int]:
        """Repaired rows by the revert that caused the repair (error name)."""
        rows = self.db.execute("SELECT error, COUNT(*) FROM repairs GROUP BY error").fetchall()
        return {e: int(n) for e, n in rows}

    def failures(self, prefix: str = "") -> dict[str, int]:
        """Rows keyed `prefix`... that failed for good, by the name of the error that failed
        them (the custom error's; ``reverted`` for a mined revert not reproducible now)."""
        rows = self.db.execute(
            "SELECT error, COUNT(*) FROM failures WHERE key >= ? AND key < ? GROUP BY error",
            (prefix, prefix + "\uffff"),
        ).fetchall()
        return {e: int(n) for e, n in rows}

    def latest(self, prefix: str) -> str | None:
        """The key of the row keyed `prefix`... enqueued last (None if there is none)."""
        r = self.db.execute(
            "SELECT key FROM outbox WHERE key >= ? AND key < ? ORDER BY id DESC LIMIT 1",
            (prefix, prefix + "\uffff"),
        ).fetchone()
        return None if r is None else str(r[0])

    def backlog(self) -> int:
        """Rows not yet final: what a health check watches."""
        c = self.counts()
        return c.get(RowState.PENDING, 0) + c.get(RowState.SIGNED, 0)

    # ---- the worker -----------------------------------------------------------------------
    def step(self, max_rows: int = 50) -> int:
        """One pass: settle signed rows, then sign and send pending ones; returns rows moved.

        Never raises for chain trouble: a node that does not answer leaves rows where they are,
        with the attempt counted and the next try pushed back.
        """
        moved = 0
        for work in (self._settle_signed, self._sign_pending):
            try:
                moved += work(max_rows)
            except (ChainError, OSError):  # requests' connection errors are OSErrors
                break
        return moved

    def drain(self, timeout_s: float = 30.0, poll_s: float = 0.05) -> bool:
        """Step until nothing is pending or signed, or `timeout_s`; True if drained."""
        deadline = time.monotonic() + timeout_s
        while self.backlog():
            if time.monotonic() > deadline:
                return False
            self.step()
            if self.backlog():
                time.sleep(poll_s)
        return True

    def _backoff(self, attempts: int) -> float:
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** max(attempts - 1, 0))
        return delay * (0.5 + random.random() / 2)  # jitter: many bridges, one node

    def _defer(self, row_id: int, attempts: int, error: str) -> None:
        self.db.execute(
            "UPDATE outbox SET attempts = ?, next_attempt = ?, last_error = ? WHERE id = ?",
            (attempts, self.clock() + self._backoff(attempts), error[:500], row_id),
        )

    def _finish(self, row_id: int, state: RowState, error: str | None = None) -> None:
        self.db.execute(
            "UPDATE outbox SET state = ?, finished = ?, last_error = COALESCE(?, last_error)"
            " WHERE id = ?",
            (state.value, self.clock(), error, row_id),
        )

    def _fail(self, row_id: int, key: str, err: ChainError | None) -> None:
        """Failed for good: finished, and counted in `failures` under the error's name in the
        same SQLite transaction (a crash cannot keep one without the other)."""
        if err is None:
            name = "reverted"
        else:
            name = err.name if isinstance(err, ContractRevert) else type(err).__name__
        own = not self.db.in_transaction
        if own:
            self.db.execute("BEGIN IMMEDIATE")
        try:
            self._finish(row_id, RowState.FAILED, str(err or "reverted (not reproducible now)"))
            self.db.execute(
                "INSERT INTO failures (key, error, at) VALUES (?, ?, ?)", (key, name, self.clock())
            )
        except BaseException:
            if own:
                self.db.execute("ROLLBACK")
            raise
        if own:
            self.db.execute("COMMIT")
        if self.on_failed is not None:
            self.on_failed(key, name)

    def _w3_error(self, exc: Exception) -> ChainError:
        return exc if isinstance(exc, ChainError) else ChainError(f"{type(exc).__name__}: {exc}")

    def _settle_signed(self, limit: int) -> int:
        rows = self.db.execute(
            "SELECT id, key, contract, fn, args, tx_hash, raw_tx, attempts, retry_on FROM outbox"
            " WHERE state = ? ORDER BY nonce LIMIT ?",
            (RowState.SIGNED.value, limit),
        ).fetchall()
        moved = 0
        w3 = self.chain.w3
        for row_id, key, contract, fn, args, tx_hash, raw, attempts, retry_on in rows:
            try:
                receipt = w3.eth.get_transaction_receipt(HexBytes(tx_hash))
            except Exception as exc:
                if type(exc).__name__ != "TransactionNotFound":
                    raise self._w3_error(exc) from exc
                receipt = None
            if receipt is not None:
                if receipt["status"] == 1:
                    self._finish(row_id, RowState.CONFIRMED)
                else:
                    self._reverted(row_id, key, contract, fn, args, retry_on)
                moved += 1
                continue
            if self.clock() < self._next_attempt(row_id):
                break  # keep nonce order: later rows wait behind this one
            try:
                w3.eth.send_raw_transaction(raw)
            except Exception as exc:
                text = str(exc).lower()
                if "already known" in text or "already imported" in text:
                    pass  # in the pool from before the crash: wait for its receipt
                elif "nonce too low" in text:
                    # Mined, and the receipt races us: look again next pass.
                    self._defer(row_id, attempts + 1, str(exc))
                    break
                else:
                    self._defer(row_id, attempts + 1, str(exc))
                    raise self._w3_error(exc) from exc
            if self.on_sent is not None:
                self.on_sent(key, tx_hash)
        return moved

    def _next_attempt(self, row_id: int) -> float:
        (value,) = self.db.execute(
            "SELECT next_attempt FROM outbox WHERE id = ?", (row_id,)
        ).fetchone()
        return float(value)

    def _revert_reason(self, contract: str, fn: str, args: str) -> ChainError | None:
        """Why the mined call reverted, as the call fails now (None: it would not fail now)."""
        call = getattr(self.chain.contract(contract, self.addresses[contract]).functions, fn)
        try:
            call(*_decode_args(args)).call({"from": self.account.address})
        except Exception as exc:
            return self.chain.decode(exc)
        return None

    def _reverted(
        self, row_id: int, key: str, contract: str, fn: str, args: str, retry_on: str
    ) -> None:
        """A row mined with status 0 changed nothing: repaired, queued again for a "not yet",
        else failed for good. Its nonce is spent; signing it again takes a new one."""
        err = self._revert_reason(contract, fn, args)
        if isinstance(err, ContractRevert):
            repaired = self._repaired(row_id, key, err, args)
            if repaired is True:
                return
            if repaired == WAIT or err.name in json.loads(retry_on):
                self._requeue(row_id, args, str(err))
                return
        self._fail(row_id, key, err)

    def _repaired(
        self, row_id: int, key: str, err: ContractRevert, args: str
    ) -> bool | Literal["wait"]:
        """Ask the caller's hook; if it gives new arguments, the row takes them (pending) and
        this is True; `WAIT` if the hook says "not yet"."""
        if self.repair is None:
            return False
        fixed = self.repair(key, err, _decode_args(args))
        if fixed is None:
            return False
        if isinstance(fixed, str):  # WAIT
            return WAIT
        new_args, dropped = fixed
        self.db.execute(
            "INSERT INTO repairs (key, error, dropped, at) VALUES (?, ?, ?, ?)",
            (key, err.name, dropped, self.clock()),
        )
        self._requeue(row_id, _encode_args(new_args), f"repaired ({dropped}): {err}")
        return True

    def _requeue(self, row_id: int, args: str, error: str) -> None:
        self.db.execute(
            "UPDATE outbox SET state = ?, args = ?, nonce = NULL, tx_hash = NULL, raw_tx = NULL,"
            " next_attempt = 0, last_error = ? WHERE id = ?",
            (RowState.PENDING.value, args, error[:500], row_id),
        )

    def _sign_pending(self, limit: int) -> int:
        rows = self.db.execute(
            "SELECT id, key, contract, fn, args, gas, retry_on, attempts FROM outbox"
            " WHERE state = ? AND next_attempt <= ? ORDER BY id LIMIT ?",
            (RowState.PENDING.value, self.clock(), limit),
        ).fetchall()
        if not rows:
            return 0
        w3 = self.chain.w3
        moved = 0
        for row_id, key, contract, fn, args, gas, retry_on, attempts in rows:
            if self._behind_in_lane(row_id, key):
                continue
            call = getattr(self.chain.contract(contract, self.addresses[contract]).functions, fn)(
                *_decode_args(args)
            )
            try:  # pre-flight: never burn a nonce on a call that reverts now
                if self._chain_id is None:
                    self._chain_id = int(w3.eth.chain_id)
                # On the pending state: a row signed and sent just before (the same device's
                # previous reading, the previous slot's settlement) counts even while the node
                # is still mining it, as it will when this one is mined after it.
                call.call({"from": self.account.address}, block_identifier="pending")
            except Exception as exc:
                err = self.chain.decode(exc)
                if isinstance(err, ContractRevert):
                    repaired = self._repaired(row_id, key, err, args)
                    if repaired is True:
                        moved += 1
                        continue
                    if repaired == WAIT or err.name in json.loads(retry_on):
                        self._defer(row_id, attempts + 1, str(err))
                        continue
                    self._fail(row_id, key, err)
                    moved += 1
                    continue
                self._defer(row_id, attempts + 1, str(err))
                raise err from exc
            base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas") or 0)
            tip = 10**9
            self.db.execute("BEGIN IMMEDIATE")
            try:
                nonce = self._take_nonce()
                tx = call.build_transaction(
                    {
                        "from": self.account.address,
                        "nonce": nonce,
                        "gas": gas,
                        "chainId": self._chain_id,
                        "maxPriorityFeePerGas": tip,
                        "maxFeePerGas": 4 * base_fee + tip,
                    }
                )
                signed = self.account.sign_transaction(tx)
                tx_hash = "0x" + bytes(signed.hash).hex()
                self.db.execute(
                    "UPDATE outbox SET state = ?, nonce = ?, tx_hash = ?, raw_tx = ?,"
                    " attempts = ? WHERE id = ?",
                    (
                        RowState.SIGNED.value,
                        nonce,
                        tx_hash,
                        bytes(signed.raw_transaction),
                        attempts + 1,
                        row_id,
                    ),
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            if self.on_signed is not None:
                self.on_signed(key, nonce)
            moved += 1
            try:
                w3.eth.send_raw_transaction(signed.raw_transaction)
            except Exception as exc:
                # Durable already: the settle pass re-broadcasts it when the node is back.
                raise self._w3_error(exc) from exc
            if self.on_sent is not None:
                self.on_sent(key, tx_hash)
        return moved

    def _behind_in_lane(self, row_id: int, key: str) -> bool:
        """Whether an earlier row of `key`'s lane (the key up to its last ``:``) is still
        pending: this one waits for it (see "Lanes" in the module docstring)."""
        lane, sep, _ = key.rpartition(":")
        if not sep:
            return False
        prefix = lane + sep
        return (
            self.db.execute(
                "SELECT 1 FROM outbox WHERE key >= ? AND key < ? AND state = ? AND id < ? LIMIT 1",
                (prefix, prefix + "\uffff", RowState.PENDING.value, row_id),
            ).fetchone()
            is not None
        )

    def _take_nonce(self) -> int:
        """Inside the signing transaction: the stored next nonce, seeded from the node once."""
        row = self.db.execute("SELECT value FROM meta WHERE name = 'next_nonce'").fetchone()
        if row is None:
            nonce = int(self.chain.w3.eth.get_transaction_count(self.account.address, "pending"))
        else:
            nonce = int(row[0])
        self.db.execute(
            "INSERT INTO meta (name, value) VALUES ('next_nonce', ?)"
            " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (str(nonce + 1),),
        )
        return nonce
