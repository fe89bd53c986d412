"""The device session table, kept in the outbox's SQLite file beside the readings it vouches for.

After a crash the broker delivers again every message the bridge had not acknowledged. To take
them, a restarted bridge must know each device's session (`bd_seq`, last `seq`) and last reading
nonce as they were when those messages' readings were committed: otherwise it refuses them as
`no_session` (and the readings are lost) or accepts a replay. So the entries change in the same
SQLite transaction as the readings, and the messages are acknowledged only after it commits.
"""

from __future__ import annotations

import sqlite3

from bridge.validation import Session

SCHEMA = """
CREATE TABLE IF NOT EXISTS device_sessions (
    device TEXT PRIMARY KEY,
    bd_seq INTEGER,
    last_seq INTEGER,
    alive INTEGER,
    missed INTEGER,
    last_nonce INTEGER
);
"""


def ensure_schema(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)


def load(db: sqlite3.Connection) -> tuple[dict[str, Session], dict[str, int]]:
    """(sessions, last reading nonce) per device, as last committed."""
    ensure_schema(db)
    sessions: dict[str, Session] = {}
    nonces: dict[str, int] = {}
    rows = db.execute(
        "SELECT device, bd_seq, last_seq, alive, missed, last_nonce FROM device_sessions"
    )
    for device, bd_seq, last_seq, alive, missed, last_nonce in rows:
        if bd_seq is not None:
            sessions[device] = Session(int(bd_seq), int(last_seq), bool(alive), int(missed))
        if last_nonce is not None:
            nonces[device] = int(last_nonce)
    return sessions, nonces


def save(db: sqlite3.Connection, changed: dict[str, tuple[Session | None, int | None]]) -> None:
    """Upsert the changed entries; call inside the caller's transaction."""
    db.executemany(
        "INSERT INTO device_sessions (device, bd_seq, last_seq, alive, missed, last_nonce)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(device) DO UPDATE SET bd_seq = excluded.bd_seq,"
        " last_seq = excluded.last_seq, alive = excluded.alive, missed = excluded.missed,"
        " last_nonce = excluded.last_nonce",
        [
            (
                device,
                None if s is None else s.bd_seq,
                None if s is None else s.last_seq,
                None if s is None else int(s.alive),
                None if s is None else s.missed,
                nonce,
            )
            for device, (s, nonce) in changed.items()
        ],
    )
