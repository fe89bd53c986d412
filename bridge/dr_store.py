"""The bridge's open demand-response events, kept in the outbox's SQLite file beside the slot
rows that announce and settle them.

A slot row's demand-response part names the GridBalance event ids it settles, and the ids are
predicted by the bridge (`contracts.slot_batch.DemandResponseQueue`): events announced by rows
already queued and not yet settled must still be settled by later rows after a restart, or
their households never get the incentive they earned. So the queue is written in the same
SQLite transaction as the row that changed it (`bridge.settlement.SlotSettlement.enqueue`): a
row and the queue it leaves are durable together, or neither is.
"""

from __future__ import annotations

import sqlite3

from contracts.slot_batch import DemandResponseQueue

SCHEMA = """
CREATE TABLE IF NOT EXISTS dr_events (
    event_id INTEGER PRIMARY KEY,
    slot INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dr_counter (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    next_id INTEGER NOT NULL
);
"""


def ensure_schema(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)


def load(db: sqlite3.Connection) -> DemandResponseQueue:
    """The queue as last committed (empty, ids from 1, in a new file)."""
    ensure_schema(db)
    events = db.execute("SELECT event_id, slot FROM dr_events ORDER BY event_id").fetchall()
    counter = db.execute("SELECT next_id FROM dr_counter WHERE id = 0").fetchone()
    return DemandResponseQueue(
        open=[(int(e), int(s)) for e, s in events],
        next_id=1 if counter is None else int(counter[0]),
    )


def save(db: sqlite3.Connection, queue: DemandResponseQueue) -> None:
    """Replace the stored queue with `queue` (a handful of rows); call inside the caller's
    transaction, with the row that changed it."""
    db.execute("DELETE FROM dr_events")
    db.executemany("INSERT INTO dr_events (event_id, slot) VALUES (?, ?)", queue.open)
    db.execute(
        "INSERT INTO dr_counter (id, next_id) VALUES (0, ?)"
        " ON CONFLICT(id) DO UPDATE SET next_id = excluded.next_id",
        (queue.next_id,),
    )
