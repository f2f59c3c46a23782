"""The statements of the PostgreSQL coordinator (``postgres.py``).

``{s}`` stands for the quoted schema and ``{channel}`` for the event channel;
``%(name)s`` are query parameters. No grant depends on the server's wall clock:
a standby takes an unreleased lease only once it has seen the row unchanged (same
fence, same ``expires``, which every renewal moves) for the holder's ``ttl`` on its
own monotonic clock (``%(seen_fence)s``, ``%(seen_expires)s``). ``expires`` and
``clock_timestamp()`` still decide whether a renewal comes too late (a holder that
loses its lease that way stops: safe whichever way the clock stepped) and what
status shows as held.
"""

from __future__ import annotations

from ostinato.coordinators.protocol import STAT_FIELDS

STAT_COLUMNS = STAT_FIELDS

SQL = {
    "ddl": """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.loops (
    key text PRIMARY KEY, fence bigint NOT NULL DEFAULT 0, owner text, holder text,
    expires timestamptz, held_since float8, locked boolean NOT NULL DEFAULT false,
    paused boolean NOT NULL DEFAULT false,
    passes bigint NOT NULL DEFAULT 0, errors bigint NOT NULL DEFAULT 0,
    last_start float8, last_end float8, last_duration float8, last_outcome text,
    last_error text, last_error_at float8, p50 float8, p99 float8,
    running_since float8, stall_after float8, ttl float8, quiet float8,
    fail_streak bigint, fail_after bigint, next_start float8, zone text,
    forgotten boolean NOT NULL DEFAULT false);
ALTER TABLE {s}.loops ADD COLUMN IF NOT EXISTS ttl float8;
ALTER TABLE {s}.loops ADD COLUMN IF NOT EXISTS quiet float8;
ALTER TABLE {s}.loops ADD COLUMN IF NOT EXISTS fail_streak bigint;
ALTER TABLE {s}.loops ADD COLUMN IF NOT EXISTS fail_after bigint;
ALTER TABLE {s}.loops ADD COLUMN IF NOT EXISTS next_start float8;
ALTER TABLE {s}.loops ADD COLUMN IF NOT EXISTS zone text;
ALTER TABLE {s}.loops ADD COLUMN IF NOT EXISTS forgotten boolean NOT NULL DEFAULT false;
CREATE TABLE IF NOT EXISTS {s}.runners (
    id text PRIMARY KEY, label text NOT NULL, expires timestamptz NOT NULL, hosts text);
ALTER TABLE {s}.runners ADD COLUMN IF NOT EXISTS hosts text;
CREATE TABLE IF NOT EXISTS {s}.settings (
    name text PRIMARY KEY, value text NOT NULL, fence bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.activity (owner text PRIMARY KEY, count bigint NOT NULL);
""",
    # Granted when unclaimed, seen unchanged for its ttl by the caller (%(seen_fence)s,
    # %(seen_expires)s), held by an owner whose activity count the caller saw unchanged for
    # at least the row's ttl (%(silent)s, %(silent_count)s, %(silent_ttl)s: -1 for a count
    # never seen), asked again by its owner, or taken from a dead holder (%(dead)s,
    # %(dead_fence)s: the row whose lock the caller just took). A grant moves the caller's
    # activity count (seeded from the clock in microseconds, so that it never repeats). On
    # refusal the second SELECT shows the row as it was before this statement and, for
    # a locked row, whether its lock is free (taken and given back at once: this
    # connection holds no lease locks).
    "acquire": """
WITH granted AS (
    INSERT INTO {s}.loops AS l (key, fence, owner, holder, expires, held_since, locked, ttl,
                                quiet)
    VALUES (%(key)s, 1, %(owner)s, %(holder)s,
            clock_timestamp() + make_interval(secs => %(ttl)s),
            extract(epoch FROM clock_timestamp()), %(locked)s, %(ttl)s, %(quiet)s)
    ON CONFLICT (key) DO UPDATE SET
        fence = l.fence + 1, owner = excluded.owner, holder = excluded.holder,
        expires = excluded.expires, held_since = excluded.held_since, locked = excluded.locked,
        ttl = excluded.ttl, quiet = excluded.quiet
    WHERE NOT l.paused AND (
        l.owner IS NULL OR l.owner = excluded.owner
        OR (l.fence = %(seen_fence)s AND l.expires = %(seen_expires)s)
        OR (l.owner = %(silent)s AND l.ttl <= %(silent_ttl)s
            AND coalesce((SELECT a.count FROM {s}.activity AS a WHERE a.owner = l.owner), -1)
                = %(silent_count)s)
        OR (l.locked AND l.owner = %(dead)s AND l.fence = %(dead_fence)s))
    RETURNING l.fence, l.last_start),
bumped AS (
    INSERT INTO {s}.activity AS a (owner, count)
    SELECT %(owner)s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint FROM granted
    ON CONFLICT (owner) DO UPDATE SET count = a.count + 1)
SELECT true AS granted, fence, last_start, NULL AS owner, NULL AS holder, false AS paused,
       false AS locked, NULL::timestamptz AS expires, NULL::float8 AS ttl,
       NULL::float8 AS quiet, NULL::float8 AS expires_in, false AS lock_free FROM granted
UNION ALL
SELECT false, fence, NULL, owner, holder, paused, locked, expires, ttl, quiet,
       extract(epoch FROM expires - clock_timestamp())::float8,
       CASE WHEN locked AND NOT paused AND %(probe)s::bigint IS NOT NULL
                 AND pg_try_advisory_lock(%(probe)s::bigint)
            THEN pg_advisory_unlock(%(probe)s::bigint) ELSE false END
FROM {s}.loops WHERE key = %(key)s AND NOT EXISTS (SELECT 1 FROM granted)
""",
    # Many leases asked for at once, none of them held by this session (no advisory lock to
    # carry over): existing rows locked in key order, as a renewal locks them, and granted by
    # the rules of ``acquire``, each with its own leave (a claim seen unchanged, a silent
    # owner); granted rows are marked ``locked`` afterwards (``mark_many``). A row another
    # statement has locked is skipped, never waited for, and answered ``busy``: requests
    # never queue behind one another, nor hold up the renewals queued behind them. Every key
    # with a row is answered; a key without one is left to ``acquire_new``.
    "acquire_many": """
WITH v AS MATERIALIZED (
    SELECT * FROM unnest(%(keys)s::text[], %(ttls)s::float8[], %(seen_fences)s::bigint[],
                         %(seen_expires)s::timestamptz[], %(silent)s::text[],
                         %(silent_counts)s::bigint[], %(silent_ttls)s::float8[],
                         %(probes)s::bigint[])
        AS v(key, ttl, seen_fence, seen_expires, silent, silent_count, silent_ttl, probe)),
ordered AS MATERIALIZED (
    SELECT key FROM {s}.loops WHERE key IN (SELECT key FROM v) ORDER BY key COLLATE "C"
    FOR UPDATE SKIP LOCKED),
granted AS (
    UPDATE {s}.loops AS l SET
        fence = l.fence + 1, owner = %(owner)s, holder = %(holder)s,
        expires = clock_timestamp() + make_interval(secs => v.ttl),
        held_since = extract(epoch FROM clock_timestamp()), locked = false, ttl = v.ttl,
        quiet = %(quiet)s
    FROM v
    WHERE l.key = v.key AND l.key IN (SELECT key FROM ordered) AND NOT l.paused AND (
        l.owner IS NULL OR l.owner = %(owner)s
        OR (l.fence = v.seen_fence AND l.expires = v.seen_expires)
        OR (l.owner = v.silent AND l.ttl <= v.silent_ttl
            AND coalesce((SELECT a.count FROM {s}.activity AS a WHERE a.owner = l.owner), -1)
                = v.silent_count))
    RETURNING l.key, l.fence, l.last_start),
bumped AS (
    INSERT INTO {s}.activity AS a (owner, count)
    SELECT %(owner)s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
    WHERE EXISTS (SELECT 1 FROM granted)
    ON CONFLICT (owner) DO UPDATE SET count = a.count + 1)
SELECT true AS granted, key, fence, last_start, NULL AS owner, NULL AS holder,
       false AS paused, false AS locked, NULL::timestamptz AS expires, NULL::float8 AS ttl,
       NULL::float8 AS quiet, NULL::float8 AS expires_in, false AS lock_free,
       false AS busy FROM granted
UNION ALL
SELECT false, l.key, l.fence, NULL, l.owner, l.holder, l.paused, l.locked, l.expires, l.ttl,
       l.quiet, extract(epoch FROM l.expires - clock_timestamp())::float8,
       CASE WHEN l.locked AND NOT l.paused AND v.probe IS NOT NULL
                 AND pg_try_advisory_lock(v.probe)
            THEN pg_advisory_unlock(v.probe) ELSE false END,
       l.key NOT IN (SELECT key FROM ordered)
FROM {s}.loops AS l JOIN v ON v.key = l.key
WHERE l.key NOT IN (SELECT key FROM granted)
""",
    # First grants of keys that had no row, in key order; a key another runner inserted
    # first is left out (asked again later).
    "acquire_new": """
WITH granted AS (
    INSERT INTO {s}.loops AS l (key, fence, owner, holder, expires, held_since, locked, ttl,
                                quiet)
    SELECT v.key, 1, %(owner)s, %(holder)s, clock_timestamp() + make_interval(secs => v.ttl),
           extract(epoch FROM clock_timestamp()), false, v.ttl, %(quiet)s
    FROM unnest(%(keys)s::text[], %(ttls)s::float8[]) AS v(key, ttl)
    ORDER BY v.key COLLATE "C"
    ON CONFLICT (key) DO NOTHING
    RETURNING l.key, l.fence, l.last_start),
bumped AS (
    INSERT INTO {s}.activity AS a (owner, count)
    SELECT %(owner)s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
    WHERE EXISTS (SELECT 1 FROM granted)
    ON CONFLICT (owner) DO UPDATE SET count = a.count + 1)
SELECT key, fence, last_start FROM granted
""",
    "exists": "SELECT to_regclass(%(loops)s) IS NOT NULL AND to_regclass(%(runners)s) IS NOT NULL"
              " AND to_regclass(%(settings)s) IS NOT NULL AND to_regclass(%(activity)s) IS NOT NULL"
              " AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%(loops)s)"
              " AND attname = 'forgotten' AND NOT attisdropped)"
              " AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%(runners)s)"
              " AND attname = 'hosts' AND NOT attisdropped) AS ok",
    "schema_lock": "SELECT pg_advisory_xact_lock(%(a)s, %(b)s)",
    "try_lock": "SELECT pg_try_advisory_lock(%(lock)s) AS ok",
    "mark": """
WITH got AS (SELECT pg_try_advisory_lock(%(lock)s) AS ok),
marked AS (UPDATE {s}.loops SET locked = true, quiet = %(quiet)s FROM got
           WHERE got.ok AND key = %(key)s AND owner = %(owner)s AND fence = %(fence)s
           RETURNING 1)
SELECT (SELECT ok FROM got) AS ok, EXISTS (SELECT 1 FROM marked) AS marked
""",
    # The advisory locks of many fresh grants taken on the lease connection, and their rows
    # marked with them (in key order, as every statement of many rows locks them).
    "mark_many": """
WITH got AS MATERIALIZED (
    SELECT v.key, v.fence, v.lock, pg_try_advisory_lock(v.lock) AS ok
    FROM unnest(%(keys)s::text[], %(fences)s::bigint[], %(locks)s::bigint[]) AS v(key, fence, lock)),
ordered AS MATERIALIZED (
    SELECT got.* FROM {s}.loops AS r JOIN got ON got.key = r.key WHERE got.ok
    ORDER BY r.key COLLATE "C" FOR UPDATE OF r),
marked AS (
    UPDATE {s}.loops AS l SET locked = true, quiet = %(quiet)s FROM ordered AS got
    WHERE l.key = got.key AND l.owner = %(owner)s AND l.fence = got.fence
    RETURNING l.key)
SELECT got.key, got.ok, marked.key IS NOT NULL AS marked
FROM got LEFT JOIN marked ON marked.key = got.key
""",
    # Rows are locked in key order first (by code point, "C"), as a report locks them (its
    # rows sorted by key in Python): two statements of many rows that lock in different
    # orders can deadlock, and the server then aborts one of them.
    # A paused loop's lease is given up. A ``locked`` row renews only on the session
    # holding its lock (%(mine)s, one flag per key: a list to search would cost the
    # product of the two lengths), so a replaced connection cannot go unnoticed; an
    # unlocked one takes its lock now if it is free (locks: NULL where this session
    # already holds that loop's lock for another grant). Its columns come as text, split
    # by the server: ten thousand keys adapted one by one as an array cost the runner more
    # than the statement (a key is printable: never a newline). Answered are only the leases
    # not kept (``paused`` NULL), paused, or locked (the caller records the lock): every other
    # was kept, and ten thousand rows each round cost the runner more than the rest.
    "renew": """
WITH bumped AS (
    INSERT INTO {s}.activity AS a (owner, count)
    VALUES (%(owner)s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
    ON CONFLICT (owner) DO UPDATE SET count = a.count + 1),
v AS MATERIALIZED (
    SELECT * FROM unnest(string_to_array(%(keys)s, E'\\n'),
                         string_to_array(%(fences)s, ',')::bigint[],
                         string_to_array(%(ttls)s, ',')::float8[],
                         string_to_array(%(locks)s, ',', '')::bigint[],
                         string_to_array(%(mine)s, ',')::boolean[])
        AS v(key, fence, ttl, lock, mine)),
ordered AS MATERIALIZED (
    SELECT v.* FROM {s}.loops AS r JOIN v ON v.key = r.key ORDER BY r.key COLLATE "C"
    FOR UPDATE OF r),
kept AS (
    UPDATE {s}.loops AS l SET
        expires = CASE WHEN l.paused THEN NULL
                       ELSE clock_timestamp() + make_interval(secs => v.ttl) END,
        ttl = v.ttl, quiet = CASE WHEN l.paused THEN l.quiet ELSE %(quiet)s END,
        owner = CASE WHEN l.paused THEN NULL ELSE l.owner END,
        holder = CASE WHEN l.paused THEN NULL ELSE l.holder END,
        locked = CASE WHEN l.paused THEN false WHEN l.locked THEN true
                      ELSE coalesce(pg_try_advisory_lock(v.lock), false) END
    FROM ordered AS v
    WHERE l.key = v.key
      AND l.fence = v.fence AND l.owner = %(owner)s
      AND l.expires > clock_timestamp() AND (NOT l.locked OR v.mine)
    RETURNING l.key, l.paused, l.locked)
SELECT v.key, NULL::boolean AS paused, false AS locked FROM v
WHERE NOT EXISTS (SELECT 1 FROM kept WHERE kept.key = v.key)
UNION ALL
SELECT key, paused, locked FROM kept WHERE paused OR locked
""",
    # One round trip, the unlock of the lease's own lock (%(locks)s: empty when this
    # session does not hold it) included: on a slow link a renewal queued behind a
    # release waits for one round trip, not two.
    "release": """
WITH released AS (
    UPDATE {s}.loops SET owner = NULL, holder = NULL, expires = NULL, locked = false
    WHERE key = %(key)s AND owner = %(owner)s AND fence = %(fence)s RETURNING 1),
unlocked AS (SELECT pg_advisory_unlock(x) FROM unnest(%(locks)s::bigint[]) AS x)
SELECT EXISTS (SELECT 1 FROM released) AS released, (SELECT count(*) FROM unlocked) AS unlocked
""",
    # Many leases given back, their rows locked in key order (as a renewal locks them: no
    # deadlock between the two), the unlocks of their own locks included.
    "release_many": """
WITH v AS MATERIALIZED (
    SELECT * FROM unnest(%(keys)s::text[], %(fences)s::bigint[]) AS v(key, fence)),
ordered AS MATERIALIZED (
    SELECT v.* FROM {s}.loops AS r JOIN v ON v.key = r.key ORDER BY r.key COLLATE "C"
    FOR UPDATE OF r),
released AS (
    UPDATE {s}.loops AS l SET owner = NULL, holder = NULL, expires = NULL, locked = false
    FROM ordered AS v
    WHERE l.key = v.key AND l.fence = v.fence
      AND l.owner = %(owner)s
    RETURNING l.key),
unlocked AS (SELECT pg_advisory_unlock(x) FROM unnest(%(locks)s::bigint[]) AS x)
SELECT array(SELECT key FROM released) AS released, (SELECT count(*) FROM unlocked) AS unlocked
""",
    "revoke": """
UPDATE {s}.loops SET owner = NULL, holder = NULL, expires = NULL, locked = false
WHERE key = %(key)s AND owner IS NOT NULL AND expires > clock_timestamp() RETURNING fence
""",
    # The heartbeat and every loop's stats in one statement: the lease rows it updates
    # stay locked only while the server runs it, never while a busy runner's client
    # gets round to its next statement (a renewal would wait on them). Counts add up;
    # a field a report leaves out (NULL) keeps its stored value, except running_since,
    # which every report replaces. The loops come as one JSON array of arrays, in the
    # order of the columns: seventeen arrays adapted value by value cost the runner of
    # 10,000 loops more than the rest of its report.
    "report": """
WITH beat AS (
    INSERT INTO {s}.runners (id, label, expires, hosts)
    VALUES (%(id)s, %(label)s, clock_timestamp() + make_interval(secs => %(ttl)s), %(hosts)s)
    ON CONFLICT (id) DO UPDATE SET label = excluded.label, expires = excluded.expires,
        hosts = excluded.hosts)
INSERT INTO {s}.loops AS l (key, passes, errors, last_start, last_end, last_duration,
    last_outcome, last_error, last_error_at, p50, p99, running_since, stall_after,
    fail_streak, fail_after, next_start, zone)
SELECT e->>0, (e->>1)::bigint, (e->>2)::bigint, (e->>3)::float8, (e->>4)::float8,
    (e->>5)::float8, e->>6, e->>7, (e->>8)::float8, (e->>9)::float8, (e->>10)::float8,
    (e->>11)::float8, (e->>12)::float8, (e->>13)::bigint, (e->>14)::bigint,
    (e->>15)::float8, e->>16
FROM json_array_elements(%(rows)s::json) AS e
ON CONFLICT (key) DO UPDATE SET passes = l.passes + excluded.passes, forgotten = false,
    errors = l.errors + excluded.errors, running_since = excluded.running_since,
    last_start = coalesce(excluded.last_start, l.last_start),
    last_end = coalesce(excluded.last_end, l.last_end),
    last_duration = coalesce(excluded.last_duration, l.last_duration),
    last_outcome = coalesce(excluded.last_outcome, l.last_outcome),
    last_error = coalesce(excluded.last_error, l.last_error),
    last_error_at = coalesce(excluded.last_error_at, l.last_error_at),
    p50 = coalesce(excluded.p50, l.p50), p99 = coalesce(excluded.p99, l.p99),
    stall_after = coalesce(excluded.stall_after, l.stall_after),
    fail_streak = coalesce(excluded.fail_streak, l.fail_streak),
    fail_after = coalesce(excluded.fail_after, l.fail_after),
    next_start = coalesce(excluded.next_start, l.next_start),
    zone = coalesce(excluded.zone, l.zone)
""",
    "runners": "SELECT id, label, extract(epoch FROM expires)::float8 AS seen, hosts FROM {s}.runners"
               " WHERE expires > clock_timestamp() ORDER BY id",
    "pause": "INSERT INTO {s}.loops (key, paused) VALUES (%(key)s, %(paused)s)"
             " ON CONFLICT (key) DO UPDATE SET paused = excluded.paused",
    "loops": "SELECT * FROM (SELECT *, owner IS NOT NULL AND expires > clock_timestamp() AS held"
             " FROM {s}.loops) AS l WHERE held OR NOT forgotten ORDER BY key",
    # Refused (no row) while a lease on the loop is held; the fence stays.
    "forget": """
UPDATE {s}.loops SET forgotten = true, paused = false, passes = 0, errors = 0,
    last_start = NULL, last_end = NULL, last_duration = NULL, last_outcome = NULL,
    last_error = NULL, last_error_at = NULL, p50 = NULL, p99 = NULL, running_since = NULL,
    stall_after = NULL, fail_streak = NULL, fail_after = NULL, next_start = NULL, zone = NULL
WHERE key = %(key)s AND NOT (owner IS NOT NULL AND expires > clock_timestamp())
RETURNING key
""",
    "known": "SELECT 1 FROM {s}.loops WHERE key = %(key)s",
    "activity": "SELECT owner, count FROM {s}.activity WHERE owner = ANY(%(owners)s::text[])",
    # Longer statement and lock timeouts for this session: a renewal may run, or wait for
    # a report's row locks on a busy server, as long as its leases last.
    "patience": """
SELECT set_config('statement_timeout', %(ms)s, false), set_config('lock_timeout', %(ms)s, false)
""",
    "unlock": "SELECT pg_advisory_unlock(x) FROM unnest(%(locks)s::bigint[]) AS x",
    "notify_many": "SELECT pg_notify(%(channel)s, p) FROM unnest(%(payloads)s::text[]) AS p",
    "listen": "LISTEN {channel}",
    "drop": "DROP SCHEMA IF EXISTS {s} CASCADE",
    "setting": "SELECT value, fence FROM {s}.settings WHERE name = %(name)s",
    # No row when the stored setting has a greater fence (and nothing is changed).
    "write_setting": """
INSERT INTO {s}.settings AS stored (name, value, fence) VALUES (%(name)s, %(value)s, %(fence)s)
ON CONFLICT (name) DO UPDATE SET value = excluded.value, fence = excluded.fence
WHERE stored.fence <= excluded.fence
RETURNING 1
""",
}
