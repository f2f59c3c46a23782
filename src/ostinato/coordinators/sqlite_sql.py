"""The schema and statements of the SQLite coordinator (``sqlite.py``).

``?`` are query parameters. ``SCHEMA`` runs on every connection and creates only
what is missing, so a database made by an older version gets the tables added
since; ``add_columns`` does the same for columns.
"""

from __future__ import annotations

import sqlite3

from ostinato.coordinators.protocol import STAT_FIELDS

STAT_COLUMNS = STAT_FIELDS

SCHEMA = """
CREATE TABLE IF NOT EXISTS ostinato_loops (
    key TEXT PRIMARY KEY,
    fence INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    holder TEXT,
    holder_pid INTEGER,
    boot TEXT,
    expires REAL,
    held_since REAL,
    paused INTEGER NOT NULL DEFAULT 0,
    passes INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    last_start REAL, last_end REAL, last_duration REAL, last_outcome TEXT,
    last_error TEXT, last_error_at REAL, p50 REAL, p99 REAL,
    running_since REAL, stall_after REAL,
    fail_streak INTEGER, fail_after INTEGER, next_start REAL, zone TEXT,
    forgotten INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ostinato_runners (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    pid INTEGER NOT NULL,
    boot TEXT NOT NULL,
    expires REAL NOT NULL,
    port INTEGER,
    hosts TEXT
);
CREATE TABLE IF NOT EXISTS ostinato_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    fence INTEGER NOT NULL
);
"""
#: Columns added since the first release: (table, column, type), added where missing.
ADDED_COLUMNS = (
    ("ostinato_loops", "fail_streak", "INTEGER"), ("ostinato_loops", "fail_after", "INTEGER"),
    ("ostinato_loops", "next_start", "REAL"), ("ostinato_loops", "zone", "TEXT"),
    ("ostinato_runners", "hosts", "TEXT"),
    ("ostinato_loops", "forgotten", "INTEGER NOT NULL DEFAULT 0"),
)


def add_columns(conn: sqlite3.Connection) -> None:
    """Bring a database made by an older version up to date (idempotent, race-safe)."""
    for table, column, kind in ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column in present:
            continue
        try:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another runner added it first
                raise


_CLEARED = ", ".join(f"{name} = NULL" for name in STAT_COLUMNS)

SQL = {
    "ensure_loop": "INSERT OR IGNORE INTO ostinato_loops (key) VALUES (?)",
    "loop": "SELECT * FROM ostinato_loops WHERE key = ?",
    "grant": "UPDATE ostinato_loops SET fence = ?, owner = ?, holder = ?, holder_pid = ?,"
             " boot = ?, expires = ?, held_since = ? WHERE key = ?",
    "claim": "SELECT owner, fence, boot, expires, paused FROM ostinato_loops"
             " WHERE key = ?",
    "extend": "UPDATE ostinato_loops SET expires = ? WHERE key = ?",
    # Every lease of a renewal that still holds, extended in one statement: the batch is a
    # JSON list of [key, fence, ttl]; the keys returned were extended, the others are looked
    # at one by one (lost, or paused).
    "extend_many": "UPDATE ostinato_loops SET expires = :now + batch.ttl"
                   " FROM (SELECT json_extract(value, '$[0]') AS key, json_extract(value, '$[1]') AS fence,"
                   " json_extract(value, '$[2]') AS ttl FROM json_each(:batch)) AS batch"
                   " WHERE ostinato_loops.key = batch.key AND ostinato_loops.fence = batch.fence"
                   " AND owner = :owner AND boot = :boot AND expires > :now AND paused = 0"
                   " RETURNING ostinato_loops.key",
    # Ends whoever's claim: a paused loop's at renewal, or an operator's revoke.
    "unclaim": "UPDATE ostinato_loops SET owner = NULL, holder = NULL,"
               " holder_pid = NULL, expires = NULL WHERE key = ?",
    "release": "UPDATE ostinato_loops SET owner = NULL, holder = NULL, holder_pid = NULL,"
               " expires = NULL WHERE key = ? AND owner = ? AND fence = ?",
    "forget": f"UPDATE ostinato_loops SET forgotten = 1, paused = 0, passes = 0, errors = 0,"  # noqa: S608 - column names are ours
              f" {_CLEARED} WHERE key = ?",
    "heartbeat": "INSERT INTO ostinato_runners (id, label, pid, boot, expires, hosts) VALUES"
                 " (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET expires = excluded.expires,"
                 " hosts = excluded.hosts",
    # ``{sets}``: the reported fields, ``name = ?`` each.
    "report": "UPDATE ostinato_loops SET passes = passes + ?, errors = errors + ?,"
              " forgotten = 0, {sets} WHERE key = ?",
    "runners": "SELECT id, label, expires, hosts FROM ostinato_runners WHERE boot = ? AND expires > ?",
    "pause": "UPDATE ostinato_loops SET paused = ? WHERE key = ?",
    "loops": "SELECT * FROM ostinato_loops ORDER BY key",
    "ports": "SELECT port FROM ostinato_runners WHERE port IS NOT NULL AND boot = ?"
             " AND expires > ?",
    "register": "INSERT INTO ostinato_runners (id, label, pid, boot, expires, port)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " port = excluded.port, expires = excluded.expires",
    "setting": "SELECT value, fence FROM ostinato_settings WHERE name = ?",
    # Changes no row (rowcount 0) when the stored setting has a greater fence.
    "write_setting": "INSERT INTO ostinato_settings (name, value, fence) VALUES (?, ?, ?)"
                     " ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
                     " fence = excluded.fence WHERE ostinato_settings.fence <= excluded.fence",
}
