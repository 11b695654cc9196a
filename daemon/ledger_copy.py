"""Moving to a shared ledger: copy an embedded (SQLite) ledger's history into the PostgreSQL that replicas will
share, so that the new replicas keep the dedupe history, version heads and audit trail of the daemon they replace.
"""

from __future__ import annotations

from daemon.ledger import Ledger

COPIED_TABLES = ("requests", "artifacts", "forgotten", "events")


class TargetNotEmpty(RuntimeError):
    pass


def rows_held(ledger: Ledger) -> dict[str, int]:
    """How many rows each copied table of `ledger` holds."""
    return {table: int(ledger.read_rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]) for table in COPIED_TABLES}


def copy_ledger(source: Ledger, target: Ledger) -> dict[str, int]:
    """Copy every request, artifact, forgotten id and audit event of `source` into an empty `target` (e.g. an
    SQLite ledger into the PostgreSQL that replicas will share); returns the rows copied per table. Answered marks
    are not copied: they belong to offsets the old daemon committed. A target that holds anything is refused
    (TargetNotEmpty): merging two histories could fork a model's chain."""
    counts: dict[str, int] = {}
    with target.transaction() as db:
        held = {table: n for table, n in rows_held(target).items() if n}
        if held:
            raise TargetNotEmpty(f"the target ledger is not empty ({', '.join(f'{n} {t}' for t, n in held.items())})")
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
