"""The pipeline's tables and statements, for SQLite and PostgreSQL.

``bundles`` is the inbox: a row per accepted POST, pending while ``drained_at``
is NULL. The aggregator marks the rows it drained (``drained_at``,
``drained_by`` = its fence) in the transaction that writes their windows and
totals; the prune loop deletes drained rows once they are old. ``windows`` holds
10-second and 1-minute windows (``width``); ``version`` counts the writes to a
10-second window and ``rolled`` the version its minute was last rolled up
from. ``lags`` holds, per 10 seconds of commit time and per partition, how long
drained bundles had waited since they were received.
"""

from __future__ import annotations

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    id INTEGER PRIMARY KEY,
    slot INTEGER NOT NULL,
    app TEXT NOT NULL,
    source TEXT NOT NULL,
    received REAL NOT NULL,
    n INTEGER NOT NULL,
    samples TEXT NOT NULL,
    drained_at REAL,
    drained_by INTEGER
);
CREATE INDEX IF NOT EXISTS bundles_pending ON bundles (slot, id) WHERE drained_at IS NULL;
CREATE INDEX IF NOT EXISTS bundles_drained ON bundles (drained_at) WHERE drained_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS windows (
    width INTEGER NOT NULL,
    app TEXT NOT NULL,
    start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    max REAL NOT NULL,
    buckets TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    rolled INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (width, app, start)
);
CREATE INDEX IF NOT EXISTS windows_unrolled ON windows (width, app, start) WHERE rolled < version;
CREATE TABLE IF NOT EXISTS totals (app TEXT PRIMARY KEY, bundles INTEGER NOT NULL, samples INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lags (
    start INTEGER NOT NULL,
    part INTEGER NOT NULL,
    count INTEGER NOT NULL,
    max REAL NOT NULL,
    buckets TEXT NOT NULL,
    PRIMARY KEY (start, part)
);
"""

POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot integer NOT NULL,
    app text NOT NULL,
    source text NOT NULL,
    received double precision NOT NULL,
    n integer NOT NULL,
    samples text NOT NULL,
    drained_at double precision,
    drained_by bigint
);
CREATE INDEX IF NOT EXISTS bundles_pending ON bundles (slot, id) WHERE drained_at IS NULL;
CREATE INDEX IF NOT EXISTS bundles_drained ON bundles (drained_at) WHERE drained_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS windows (
    width integer NOT NULL,
    app text NOT NULL,
    start bigint NOT NULL,
    count bigint NOT NULL,
    max double precision NOT NULL,
    buckets text NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    rolled bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (width, app, start)
);
CREATE INDEX IF NOT EXISTS windows_unrolled ON windows (width, app, start) WHERE rolled < version;
CREATE TABLE IF NOT EXISTS totals (app text PRIMARY KEY, bundles bigint NOT NULL, samples bigint NOT NULL);
CREATE TABLE IF NOT EXISTS lags (
    start bigint NOT NULL,
    part integer NOT NULL,
    count bigint NOT NULL,
    max double precision NOT NULL,
    buckets text NOT NULL,
    PRIMARY KEY (start, part)
);
"""

# Written with '?' placeholders; PostgreSQL's copy doubles each '%' (the modulo operator) and
# swaps each '?' for '%s' (no text holds a literal '?').
COMMON = {
    "window": "SELECT count, max, buckets FROM windows WHERE width = ? AND app = ? AND start = ?",
    "put_window": (
        "INSERT INTO windows (width, app, start, count, max, buckets) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (width, app, start) DO UPDATE SET count = excluded.count, max = excluded.max,"
        " buckets = excluded.buckets, version = windows.version + 1"
    ),
    "add_totals": (
        "INSERT INTO totals (app, bundles, samples) VALUES (?, ?, ?) ON CONFLICT (app) DO UPDATE"
        " SET bundles = totals.bundles + excluded.bundles, samples = totals.samples + excluded.samples"
    ),
    "lag": "SELECT count, max, buckets FROM lags WHERE start = ? AND part = ?",
    "put_lag": (
        "INSERT INTO lags (start, part, count, max, buckets) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (start, part) DO UPDATE SET count = excluded.count, max = excluded.max,"
        " buckets = excluded.buckets"
    ),
    "unrolled": (
        "SELECT DISTINCT app, start - start % 60 FROM windows WHERE width = 10 AND rolled < version"
        " ORDER BY 1, 2 LIMIT ?"
    ),
    "minute": (
        "SELECT start, count, max, buckets, version FROM windows"
        " WHERE width = 10 AND app = ? AND start >= ? AND start < ? ORDER BY start"
    ),
    "rolled": "UPDATE windows SET rolled = ? WHERE width = 10 AND app = ? AND start = ? AND rolled < ?",
    "prune_bundles": "DELETE FROM bundles WHERE drained_at IS NOT NULL AND drained_at < ?",
    "prune_windows": "DELETE FROM windows WHERE width = ? AND start < ? AND rolled >= version",
    "prune_minutes": "DELETE FROM windows WHERE width = 60 AND start < ?",
    "prune_lags": "DELETE FROM lags WHERE start < ?",
    "totals": "SELECT COALESCE(SUM(bundles), 0), COALESCE(SUM(samples), 0) FROM totals",
    "apps": "SELECT app, bundles, samples FROM totals ORDER BY app",
    "windows": (
        "SELECT start, count, max, buckets FROM windows WHERE width = ? AND app = ? AND start >= ?"
        " ORDER BY start"
    ),
    "recent_windows": (
        "SELECT app, start, count, max, buckets FROM windows WHERE width = 10 AND start >= ?"
        " ORDER BY app, start"
    ),
    "depth": "SELECT COUNT(*) FROM bundles WHERE drained_at IS NULL",
    "lags": "SELECT start, count, max, buckets FROM lags WHERE start >= ? ORDER BY start",
}

# A whole batch of bundles is one statement taking one parameter (a JSON array of rows on
# SQLite, one array per column on PostgreSQL): one statement is atomic on its own, and the
# writer thread hands the GIL over once per batch instead of once per row (see ingest.py).
SQLITE = {
    **COMMON,
    "insert": (
        "INSERT INTO bundles (slot, app, source, received, n, samples)"
        " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),"
        " json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]')"
        " FROM json_each(?) ORDER BY key"
    ),
    "pending": (
        "SELECT id, app, received, samples FROM bundles WHERE drained_at IS NULL"
        " AND slot IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?"
    ),
    "drained": (
        "UPDATE bundles SET drained_at = ?, drained_by = ? WHERE drained_at IS NULL"
        " AND id IN (SELECT value FROM json_each(?))"
    ),
    "has_pending": (
        "SELECT 1 FROM bundles WHERE drained_at IS NULL AND slot IN (SELECT value FROM json_each(?)) LIMIT 1"
    ),
}

POSTGRES = {
    **{name: text.replace("%", "%%").replace("?", "%s") for name, text in COMMON.items()},
    "insert": (
        "INSERT INTO bundles (slot, app, source, received, n, samples)"
        " SELECT * FROM unnest(%s::integer[], %s::text[], %s::text[], %s::float8[], %s::integer[],"
        " %s::text[])"
    ),
    "pending": (
        "SELECT id, app, received, samples FROM bundles WHERE drained_at IS NULL"
        " AND slot = ANY(%s) ORDER BY id LIMIT %s"
    ),
    "drained": (
        "UPDATE bundles SET drained_at = %s, drained_by = %s WHERE drained_at IS NULL AND id = ANY(%s)"
    ),
    "has_pending": "SELECT 1 FROM bundles WHERE drained_at IS NULL AND slot = ANY(%s) LIMIT 1",
}
