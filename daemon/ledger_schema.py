"""The ledger's on-disk layout (SQLite tables) and the rows read from it; daemon/ledger.py reads and writes them.

A request's row is one line of the audit trail's state (`status` moves ``processing -> applied | rejected |
failed``); an artifact's row says which files it is and whether it is active; `events` is append-only.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id   TEXT PRIMARY KEY,
    model        TEXT,
    method       TEXT,
    subject      TEXT,
    status       TEXT NOT NULL,          -- processing | readmitted | applied | rejected | failed
    attempts     INTEGER NOT NULL DEFAULT 0,
    engine_failures INTEGER NOT NULL DEFAULT 0,  -- tries where the engine raised or its process died
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


def request_row(row: sqlite3.Row) -> RequestRow:
    d = dict(row)
    d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else {}
    return RequestRow(**d)


def artifact_row(row: sqlite3.Row) -> ArtifactRow:
    d = dict(row)
    d["active"] = bool(d["active"])
    d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else {}
    d["info"] = json.loads(d["info"]) if d["info"] else {}
    return ArtifactRow(**d)
