"""The ledger: SQLite (WAL) record of every request, every artifact, and what is active.

It is what makes at-least-once delivery an exactly-once effect. A request moves
``processing -> applied | rejected | failed`` (and ``failed -> readmitted -> processing`` when an operator runs
`unlearnd requests retry`); the move to `applied` and the new artifact (or the adapter activation) are one
transaction, so after a crash either both happened or neither did, and a redelivered message is answered from
here instead of being applied again. `attempts` counts every try; `engine_failures` only the tries where the
engine itself failed, which is what `requests.max_attempts` limits. The `answered` table remembers, between the
flush of a poll's answers and its offset commit, which records were answered, so a redelivery after a crash in
that window is not answered twice.

Raw forget data is never stored: only ids, counts and a hash of the body. Sample ids forgotten by a version
are stored because they are what keeps a sample from being forgotten twice or trained on again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, cast

from daemon.ledger_schema import SCHEMA, ArtifactRow, RequestRow, artifact_row, request_row

__all__ = ["ArtifactRow", "Ledger", "RequestRow", "read_adapters"]

TERMINAL = ("applied", "rejected", "failed")


class Ledger:
    def __init__(self, path: str | Path, synchronous: str = "FULL"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._synchronous = synchronous
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a ledger written by an earlier version up to this schema (columns are only ever added)."""
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(requests)")}
        if "engine_failures" not in columns:
            self._db.execute("ALTER TABLE requests ADD COLUMN engine_failures INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable unit of change. Nested use joins the outer transaction."""
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _relaxed_sync(self) -> Iterator[None]:
        with self._lock:
            if self._db.in_transaction or self._synchronous == "NORMAL":  # joins an outer durable transaction
                yield
                return
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                yield
            finally:
                self._db.execute(f"PRAGMA synchronous={self._synchronous}")

    # --- requests -------------------------------------------------------------------------------------------

    def get_request(self, request_id: str) -> RequestRow | None:
        row = self._db.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        return request_row(row) if row else None

    def _written_request(self, request_id: str) -> RequestRow:
        row = self.get_request(request_id)
        if row is None:  # only called right after a transaction wrote it
            raise KeyError(f"request {request_id} vanished from the ledger")
        return row

    def begin_attempt(self, request_id: str, *, model: str, method: str, subject: str | None, body_sha256: str,
                      forget_kind: str, forget_count: int, source: str) -> int:
        """Record that the request is being applied (again); returns the attempt number.

        This marker only has to survive a process crash (it counts attempts, to stop a request that keeps killing
        the daemon), not a power loss: losing it costs one extra try. So its commit skips the fsync; the next
        durable commit (the request's outcome) syncs the WAL, this row included."""
        now = time.time()
        with self._relaxed_sync(), self.transaction() as db:
            db.execute(
                """INSERT INTO requests (request_id, model, method, subject, status, attempts, body_sha256,
                                         forget_kind, forget_count, source, received_at)
                   VALUES (?, ?, ?, ?, 'processing', 1, ?, ?, ?, ?, ?)
                   ON CONFLICT(request_id) DO UPDATE SET status = 'processing', attempts = attempts + 1,
                       model = excluded.model, method = excluded.method, subject = excluded.subject,
                       body_sha256 = excluded.body_sha256, forget_kind = excluded.forget_kind,
                       forget_count = excluded.forget_count, source = excluded.source,
                       reason = NULL, error = NULL""",
                (request_id, model, method, subject, body_sha256, forget_kind, forget_count, source, now),
            )
            # attempts is INTEGER NOT NULL and the row was just written
            return cast(int, db.execute("SELECT attempts FROM requests WHERE request_id = ?",
                                        (request_id,)).fetchone()[0])

    def finish(self, request_id: str, status: str, *, model: str | None = None, method: str | None = None,
               subject: str | None = None, body_sha256: str | None = None, artifact_id: str | None = None,
               metrics: dict[str, Any] | None = None, reason: str | None = None, error: str | None = None,
               source: str | None = None, duration_s: float | None = None) -> None:
        """Record a terminal status (and its audit event) for a request, creating the row if needed."""
        assert status in TERMINAL
        now = time.time()
        with self.transaction() as db:
            db.execute(
                """INSERT INTO requests (request_id, model, method, subject, status, attempts, body_sha256,
                                         artifact_id, metrics, reason, error, source, received_at, completed_at,
                                         duration_s)
                   VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(request_id) DO UPDATE SET status = excluded.status,
                       model = COALESCE(excluded.model, model), method = COALESCE(excluded.method, method),
                       subject = COALESCE(excluded.subject, subject),
                       body_sha256 = COALESCE(excluded.body_sha256, body_sha256),
                       artifact_id = excluded.artifact_id, metrics = excluded.metrics, reason = excluded.reason,
                       error = excluded.error, source = COALESCE(excluded.source, source),
                       completed_at = excluded.completed_at, duration_s = excluded.duration_s""",
                (request_id, model, method, subject, status, body_sha256, artifact_id, json.dumps(metrics or {}),
                 reason, error, source, now, now, duration_s),
            )
            self._event(db, status, model, artifact_id, request_id, {"reason": reason} if reason else None)

    def record_engine_failure(self, request_id: str, error: str) -> int:
        """Count a try where the engine itself failed; returns the count so far."""
        with self.transaction() as db:
            db.execute("UPDATE requests SET engine_failures = engine_failures + 1, error = ? WHERE request_id = ?",
                       (error, request_id))
            # engine_failures is INTEGER NOT NULL (default 0) and the row was just updated
            return cast(int, db.execute("SELECT engine_failures FROM requests WHERE request_id = ?",
                                        (request_id,)).fetchone()[0])

    def readmit(self, request_id: str, *, reason: str) -> RequestRow:
        """Let a failed request be applied once more (after an operator fixed its cause): its next delivery is
        treated as new, with a fresh budget of engine failures."""
        with self.transaction() as db:
            row = self.get_request(request_id)
            if row is None or row.status != "failed":
                raise ValueError(f"request {request_id} is {row.status if row else 'unknown'}, not failed")
            db.execute("UPDATE requests SET status = 'readmitted', engine_failures = 0 WHERE request_id = ?",
                       (request_id,))
            self._event(db, "readmitted", row.model, None, request_id, {"reason": reason})
        return self._written_request(request_id)

    # --- answered records (redelivery after a crash) ---------------------------------------------------------

    def mark_answered(self, records: list[tuple[str, int, int, str]]) -> None:
        """(topic, partition, offset, fingerprint) of records whose answers were just flushed. Only has to survive
        a process crash (losing it costs one repeated answer), so its commit skips the fsync."""
        now = time.time()
        with self._relaxed_sync(), self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO answered (topic, partition_, offset_, fingerprint, at) "
                           "VALUES (?, ?, ?, ?, ?)", [(*r, now) for r in records])

    def answered_between(self, topic: str, partition: int, first: int, last: int) -> dict[int, str]:
        """offset -> fingerprint of the records of one partition, in [first, last], marked answered."""
        rows = self._db.execute("SELECT offset_, fingerprint FROM answered WHERE topic = ? AND partition_ = ? "
                                "AND offset_ BETWEEN ? AND ?", (topic, partition, first, last)).fetchall()
        return {r[0]: r[1] for r in rows}

    def forget_answered(self, committed: dict[tuple[str, int], int]) -> None:
        """Offsets below a committed offset are never redelivered: their marks are no longer needed."""
        with self._relaxed_sync(), self.transaction() as db:
            db.executemany("DELETE FROM answered WHERE topic = ? AND partition_ = ? AND offset_ < ?",
                           [(topic, partition, offset) for (topic, partition), offset in committed.items()])

    def record_rejection(self, reason: str, source: str, *, request_id: str | None = None,
                         model: str | None = None) -> None:
        """An audit trace for a rejection that must not touch a request row (no readable id, or an id conflict)."""
        with self.transaction() as db:
            self._event(db, "rejected", model, None, request_id, {"reason": reason, "source": source})

    def list_requests(self, model: str | None = None, status: str | None = None, limit: int = 50) -> list[RequestRow]:
        sql, args = "SELECT * FROM requests WHERE 1=1", list[object]()
        if model:
            sql, args = sql + " AND model = ?", args + [model]
        if status:
            sql, args = sql + " AND status = ?", args + [status]
        rows = self._db.execute(sql + " ORDER BY received_at DESC LIMIT ?", (*args, limit)).fetchall()
        return [request_row(r) for r in rows]

    # --- artifacts ------------------------------------------------------------------------------------------

    def add_artifact(self, model: str, artifact_id: str, kind: str, *, parent: str | None, request_id: str | None,
                     path: str, sha256: str, metrics: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
                     forgotten_ids: tuple[int, ...] = ()) -> None:
        """Record a new artifact and make it active (a version becomes the head; an adapter is switched on)."""
        with self.transaction() as db:
            if kind == "version":  # the previous head steps down (only it: history stays untouched)
                db.execute("UPDATE artifacts SET active = 0 WHERE model = ? AND kind = 'version' AND active = 1",
                           (model,))
            db.execute(
                """INSERT INTO artifacts (model, id, kind, parent, request_id, created_at, active, path, sha256,
                                          metrics, info) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)""",
                (model, artifact_id, kind, parent, request_id, time.time(), path, sha256, json.dumps(metrics or {}),
                 json.dumps(info or {})),
            )
            db.executemany("INSERT INTO forgotten (model, artifact_id, sample_id) VALUES (?, ?, ?)",
                           [(model, artifact_id, int(i)) for i in forgotten_ids])
            self._event(db, "registered" if request_id is None else "published", model, artifact_id, request_id,
                        {"kind": kind, "parent": parent, "sha256": sha256})

    def get_artifact(self, model: str, artifact_id: str) -> ArtifactRow | None:
        row = self._db.execute("SELECT * FROM artifacts WHERE model = ? AND id = ?", (model, artifact_id)).fetchone()
        return artifact_row(row) if row else None

    def _written_artifact(self, model: str, artifact_id: str) -> ArtifactRow:
        row = self.get_artifact(model, artifact_id)
        if row is None:  # only called right after a transaction wrote it
            raise KeyError(f"{model} artifact {artifact_id} vanished from the ledger")
        return row

    def find_artifact(self, artifact_id: str) -> ArtifactRow | None:
        """An artifact by id alone (ids are unique per model; the first match is returned)."""
        row = self._db.execute("SELECT * FROM artifacts WHERE id = ? ORDER BY created_at", (artifact_id,)).fetchone()
        return artifact_row(row) if row else None

    def list_artifacts(self, model: str | None = None, kind: str | None = None) -> list[ArtifactRow]:
        sql, args = "SELECT * FROM artifacts WHERE 1=1", list[object]()
        if model:
            sql, args = sql + " AND model = ?", args + [model]
        if kind:
            sql, args = sql + " AND kind = ?", args + [kind]
        return [artifact_row(r) for r in self._db.execute(sql + " ORDER BY created_at, id", args).fetchall()]

    def count_artifacts(self, model: str, kind: str, *, active_only: bool = False) -> int:
        sql = "SELECT COUNT(*) FROM artifacts WHERE model = ? AND kind = ?" + (" AND active = 1" if active_only else "")
        return cast(int, self._db.execute(sql, (model, kind)).fetchone()[0])  # COUNT(*) is always an integer

    def head(self, model: str) -> ArtifactRow | None:
        row = self._db.execute("SELECT * FROM artifacts WHERE model = ? AND kind = 'version' AND active = 1",
                               (model,)).fetchone()
        return artifact_row(row) if row else None

    def next_id(self, model: str, kind: str) -> str:
        """Sequential ids (v0001, a0001). Deterministic on retry: the counter moves only when a row commits."""
        n = self.count_artifacts(model, kind)
        return f"{'v' if kind == 'version' else 'a'}{n:04d}"

    def lineage(self, model: str, version_id: str) -> list[ArtifactRow]:
        """The version and its ancestors, newest first."""
        chain, current = [], self.get_artifact(model, version_id)
        while current is not None:
            chain.append(current)
            current = self.get_artifact(model, current.parent) if current.parent else None
        return chain

    def forgotten_ids(self, model: str, version_id: str) -> frozenset[int]:
        """Samples forgotten along a version's lineage: what that version no longer knows."""
        ids = [a.id for a in self.lineage(model, version_id)]
        if not ids:
            return frozenset()
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(f"SELECT sample_id FROM forgotten WHERE model = ? AND artifact_id IN ({marks})",
                                (model, *ids)).fetchall()
        return frozenset(r[0] for r in rows)

    def set_head(self, model: str, version_id: str, *, reason: str) -> ArtifactRow:
        """Rollback of a classifier: make an existing version the head again (its tensors are kept as written)."""
        with self.transaction() as db:
            target = self.get_artifact(model, version_id)
            if target is None or target.kind != "version":
                raise KeyError(f"{model} has no version {version_id}")
            previous = self.head(model)
            db.execute("UPDATE artifacts SET active = 0 WHERE model = ? AND kind = 'version' AND active = 1", (model,))
            db.execute("UPDATE artifacts SET active = 1 WHERE model = ? AND id = ?", (model, version_id))
            self._event(db, "rolled_back", model, version_id, None,
                        {"from": previous.id if previous else None, "reason": reason})
        return self._written_artifact(model, version_id)

    def set_adapter_active(self, model: str, adapter_id: str, active: bool, *, reason: str) -> ArtifactRow:
        with self.transaction() as db:
            target = self.get_artifact(model, adapter_id)
            if target is None or target.kind != "adapter":
                raise KeyError(f"{model} has no adapter {adapter_id}")
            db.execute("UPDATE artifacts SET active = ? WHERE model = ? AND id = ?", (int(active), model, adapter_id))
            self._event(db, "restored" if active else "rolled_back", model, adapter_id, None, {"reason": reason})
        return self._written_artifact(model, adapter_id)

    def events(self, model: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM events", []
        if model:
            sql, args = sql + " WHERE model = ?", [model]
        rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [{**dict(r), "detail": json.loads(r["detail"]) if r["detail"] else None} for r in rows]

    def events_after(self, seq: int, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
        """Audit events of the given kinds recorded after `seq`, oldest first (whoever wrote them: daemon or CLI)."""
        marks = ",".join("?" * len(kinds))
        rows = self._db.execute(f"SELECT seq, kind, model, artifact_id FROM events WHERE seq > ? AND kind IN ({marks})"
                                " ORDER BY seq", (seq, *kinds)).fetchall()
        return [dict(r) for r in rows]

    @staticmethod
    def _event(db: sqlite3.Connection, kind: str, model: str | None, artifact_id: str | None, request_id: str | None,
               detail: dict[str, Any] | None) -> None:
        db.execute("INSERT INTO events (at, kind, model, artifact_id, request_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
                   (time.time(), kind, model, artifact_id, request_id, json.dumps(detail) if detail else None))


def read_adapters(path: str | Path, model: str) -> list[ArtifactRow]:
    """Every adapter of `model`, read without creating or writing anything: `unlearnd serve` builds its adapter
    set from this (a router may mount the state read-only). Raises sqlite3.Error or OSError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM artifacts WHERE model = ? AND kind = 'adapter' ORDER BY created_at, id",
                          (model,)).fetchall()
    return [artifact_row(r) for r in rows]
