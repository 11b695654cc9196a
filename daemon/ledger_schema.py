"""The ledger's schema, as numbered migrations applied at start-up (the same for SQLite and PostgreSQL), and the rows
read from it; daemon/ledger.py reads and writes them.

A request's row is one line of the audit trail's state (`status` moves ``processing -> applied | rejected |
failed``); an artifact's row says which files it is and whether it is active; `events` is append-only.


`schema_migrations` records which have run. A migration only ever adds (tables, columns, indexes), so a ledger
written by an older release is brought forward and never rewritten. Migration 1 is written with
`IF NOT EXISTS` because ledgers from before this table existed already hold its tables; migration 2 adds a column
those ledgers may lack. Several replicas starting at once against one PostgreSQL run them one at a time (an
advisory lock), and each migration is one transaction with its version row.

The SQL is written once for SQLite; `for_postgres` maps its types: REAL is 4 bytes in PostgreSQL (timestamps
need 8), INTEGER is 4 bytes there (Kafka offsets and sample ids need 8), and AUTOINCREMENT is an identity column.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from typing import Any

# A row as either backend returns it: sqlite3.Row, or psycopg's dict_row.
Row = sqlite3.Row | dict[str, Any]

INITIAL = """
CREATE TABLE IF NOT EXISTS requests (
    request_id   TEXT PRIMARY KEY,
    model        TEXT,
    method       TEXT,
    subject      TEXT,
    status       TEXT NOT NULL,          -- processing | readmitted | applied | rejected | failed
    attempts     INTEGER NOT NULL DEFAULT 0,
    body_sha256  TEXT,
    forget_kind  TEXT,
    forget_count INTEGER,
    artifact_id  TEXT,                   -- version or adapter the request produced
    metrics      TEXT,                   -- JSON
    reason       TEXT,                   -- DLQ reason code when rejected / failed
    error        TEXT,
    source       TEXT,                   -- topic/partition/offset it was read from
    received_at  REAL NOT NULL,
    completed_at REAL,
    duration_s   REAL
);
CREATE INDEX IF NOT EXISTS requests_by_model ON requests(model, received_at);
CREATE TABLE IF NOT EXISTS artifacts (
    model       TEXT NOT NULL,
    id          TEXT NOT NULL,
    kind        TEXT NOT NULL,           -- version | adapter
    parent      TEXT,                    -- version: the version it was derived from; adapter: the base version
    request_id  TEXT,
    created_at  REAL NOT NULL,
    active      INTEGER NOT NULL,        -- adapters: serving applies it; versions: it is the model's head
    path        TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    metrics     TEXT,
    info        TEXT,
    PRIMARY KEY (model, id)
);
CREATE INDEX IF NOT EXISTS artifacts_by_state ON artifacts(model, kind, active);
CREATE TABLE IF NOT EXISTS forgotten (
    model       TEXT NOT NULL,
    artifact_id TEXT NOT NULL,
    sample_id   INTEGER NOT NULL,
    PRIMARY KEY (model, artifact_id, sample_id)
);
CREATE TABLE IF NOT EXISTS answered (    -- records answered and flushed whose offsets may not be committed yet
    topic       TEXT NOT NULL,
    partition_  INTEGER NOT NULL,
    offset_     INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,           -- the same record, not a new one at an offset a wiped broker reused
    at          REAL NOT NULL,
    PRIMARY KEY (topic, partition_, offset_)
);
CREATE TABLE IF NOT EXISTS events (      -- the audit trail, append-only
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    -- kind: registered | applied | rejected | failed | readmitted | rolled_back | restored
    kind        TEXT NOT NULL,
    model       TEXT,
    artifact_id TEXT,
    request_id  TEXT,
    detail      TEXT                     -- JSON
);
"""

# Tries where the engine raised or its process died (what requests.max_attempts limits).
ENGINE_FAILURES = "ALTER TABLE requests ADD COLUMN engine_failures INTEGER NOT NULL DEFAULT 0"

# At most one head per model, whoever writes: the guard under the head's compare-and-set (ledger.add_artifact).
ONE_HEAD = ("CREATE UNIQUE INDEX IF NOT EXISTS one_head_per_model ON artifacts(model) "
            "WHERE kind = 'version' AND active = 1")

# Artifact ids handed out to writers that share the ledger (PostgreSQL): two replicas racing on one model never
# write their files to one directory. The embedded (single-writer) ledger counts its rows instead.
ID_COUNTERS = """
CREATE TABLE IF NOT EXISTS id_counters (
    model TEXT NOT NULL,
    kind  TEXT NOT NULL,
    next  INTEGER NOT NULL,
    PRIMARY KEY (model, kind)
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str
    adds_column: tuple[str, str] | None = None  # (table, column): skipped where a pre-migrations ledger has it


MIGRATIONS = (
    Migration(1, "initial schema", INITIAL),
    Migration(2, "requests.engine_failures", ENGINE_FAILURES, adds_column=("requests", "engine_failures")),
    Migration(3, "one head per model", ONE_HEAD),
    Migration(4, "artifact id counters", ID_COUNTERS),
)

MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "applied_at REAL NOT NULL)")


def for_postgres(sql: str) -> str:
    sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)


def statements(sql: str) -> list[str]:
    """The statements of a migration, one by one (comments dropped; no statement here holds a ';' in a string)."""
    text = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return [s.strip() for s in text.split(";") if s.strip()]


@dataclass
class RequestRow:
    request_id: str
    model: str | None
    method: str | None
    subject: str | None
    status: str
    attempts: int
    engine_failures: int
    body_sha256: str | None
    forget_kind: str | None
    forget_count: int | None
    artifact_id: str | None
    metrics: dict[str, Any]
    reason: str | None
    error: str | None
    source: str | None
    received_at: float
    completed_at: float | None
    duration_s: float | None


@dataclass
class ArtifactRow:
    model: str
    id: str
    kind: str
    parent: str | None
    request_id: str | None
    created_at: float
    active: bool
    path: str
    sha256: str
    metrics: dict[str, Any]
    info: dict[str, Any]


def request_row(row: Row) -> RequestRow:
    d = dict(row)
    d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else {}
    return RequestRow(**d)


def artifact_row(row: Row) -> ArtifactRow:
    d = dict(row)
    d["active"] = bool(d["active"])
    d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else {}
    d["info"] = json.loads(d["info"]) if d["info"] else {}
    return ArtifactRow(**d)
