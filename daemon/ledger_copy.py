"""Moving to a shared ledger: copy an embedded (SQLite) ledger's history into the PostgreSQL that replicas will
share, so that the new replicas keep the dedupe history, version heads and audit trail of the daemon they replace.
"""

from __future__ import annotations

from daemon.ledger import Ledger

COPIED_TABLES = ("requests", "artifacts", "forgotten", "events")


def copy_ledger(source: Ledger, target: Ledger) -> dict[str, int]:
    """Copy every request, artifact, forgotten id and audit event of `source` into an empty `target` (e.g. an
    SQLite ledger into the PostgreSQL that replicas will share); returns the rows copied per table. Answered marks
    are not copied: they belong to offsets the old daemon committed."""
    counts: dict[str, int] = {}
    with target.transaction() as db:
        for table in COPIED_TABLES:
            rows = [dict(r) for r in source.read_rows(f"SELECT * FROM {table}")]
            if rows:
                columns = list(rows[0])
                db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                               [tuple(r[c] for c in columns) for r in rows])
            counts[table] = len(rows)
        if target.shared:  # the audit trail's identity column goes on after the copied events
            db.execute("SELECT setval(pg_get_serial_sequence('events', 'seq'), COALESCE(MAX(seq), 0) + 1, false) "
                       "FROM events")
    return counts
