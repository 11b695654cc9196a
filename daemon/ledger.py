"""The ledger: the record of every request, every artifact, and what is active (SQLite, or a shared PostgreSQL).

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
An image erasure's artifact records its receipt (the image id, the hashes of the source file, the result
file and the mask, the mask's size and box): what proves the erasure, never the pixels or the mask itself.

Several replicas may share one PostgreSQL ledger (daemon/ledger_backends.py). What keeps them from forking a
chain or applying a request twice is here, in the transaction that records an outcome: a new version moves the
head only from the parent it was built on (compare-and-set, backed by a unique index: one head per model), and a
request already applied or failed is never applied or reopened again. A writer that loses either race gets
`HeadMoved` or `AppliedElsewhere` and nothing of its transaction is kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from daemon import ledger_backends
from daemon.ledger_answered import AnsweredMarks
from daemon.ledger_backends import Args, Connection, Location, SQLiteBackend, open_backend
from daemon.ledger_schema import ArtifactRow, RequestRow, artifact_row, request_row

if TYPE_CHECKING:
    from daemon.config import State

__all__ = ["AppliedElsewhere", "ArtifactRow", "HeadMoved", "Ledger", "LedgerConflict", "RequestRow", "open_ledger",
           "read_adapters"]

TERMINAL = ("applied", "rejected", "failed")
#: What a request's final row keeps from its earlier rows when the final write does not say (e.g. a failure
#: recorded without the body's digest).
_KEEP_UNLESS_GIVEN = ", ".join(f"{c} = COALESCE(excluded.{c}, requests.{c})" for c in (
    "model", "method", "subject", "body_sha256", "forget_kind", "forget_count", "source"))
#: The first letter of each kind of artifact's ids: versions, LoRA adapters, image erasures (an images model's
#: edited images and their receipts; an erasure is recorded active and never moves the head).
ID_PREFIX = {"version": "v", "adapter": "a", "erasure": "e"}


class LedgerConflict(RuntimeError):
    """Another writer of a shared ledger got there first; this transaction was rolled back."""


class HeadMoved(LedgerConflict):
    """The model's head is no longer the parent the new version was built on (or the id was taken)."""


class AppliedElsewhere(LedgerConflict):
    """The request was applied (or failed) by another writer meanwhile."""


class Ledger(AnsweredMarks):
    def __init__(self, location: Location, synchronous: str = "FULL"):
        """`location`: the SQLite file, or a PostgresTarget (see `open_ledger`)."""
        self._b = open_backend(location, synchronous)
        self.location = location
        self.shared = self._b.dialect == "postgresql"  # several writers: ids are handed out, not counted
        if isinstance(self._b, SQLiteBackend):
            self.path = self._b.path
            self._db = self._b.db  # the SQLite connection (benchmarks read from it)
        ledger_backends.migrate(self._b)

    def close(self) -> None:
        self._b.close()

    @contextmanager
    def transaction(self, relaxed: bool = False) -> Iterator[Connection]:
        """One atomic, durable unit of change. Nested use joins the outer transaction. `relaxed`: the commit only
        has to survive a process crash, not a power loss (no fsync)."""
        with self._b.transaction(relaxed) as db:
            yield db

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Held by one writer of a shared ledger at a time (e.g. a model's first-start bootstrap); a no-op for the
        embedded ledger, whose state lock already makes its daemon the only writer."""
        with self._b.exclusive(name):
            yield

    def read_rows(self, sql: str, args: Args = ()) -> list[Any]:
        return self._b.read(sql, args)

    def _one(self, sql: str, args: Args = ()) -> Any:
        rows = self._b.read(sql, args)
        return rows[0] if rows else None

    # --- requests -------------------------------------------------------------------------------------------

    def get_request(self, request_id: str) -> RequestRow | None:
        row = self._one("SELECT * FROM requests WHERE request_id = ?", (request_id,))
        return request_row(row) if row else None

    def _written_request(self, request_id: str) -> RequestRow:
        row = self.get_request(request_id)
        if row is None:  # only called right after a transaction wrote it
            raise KeyError(f"request {request_id} vanished from the ledger")
        return row

    def begin_attempt(self, request_id: str, *, model: str, method: str, subject: str | None, body_sha256: str,
                      forget_kind: str, forget_count: int, source: str) -> int:
        """Record that the request is being applied (again); returns the attempt number. Raises AppliedElsewhere
        when another writer of a shared ledger applied or failed it meanwhile (its row is left as it is).

        This marker only has to survive a process crash (it counts attempts, to stop a request that keeps killing
        the daemon), not a power loss: losing it costs one extra try. So its commit skips the fsync; the next
        durable commit (the request's outcome) syncs the WAL, this row included."""
        now = time.time()
        with self.transaction(relaxed=True) as db:
            db.execute(
                """INSERT INTO requests (request_id, model, method, subject, status, attempts, body_sha256,
                                         forget_kind, forget_count, source, received_at)
                   VALUES (?, ?, ?, ?, 'processing', 1, ?, ?, ?, ?, ?)
                   ON CONFLICT(request_id) DO UPDATE SET status = 'processing', attempts = requests.attempts + 1,
                       model = excluded.model, method = excluded.method, subject = excluded.subject,
                       body_sha256 = excluded.body_sha256, forget_kind = excluded.forget_kind,
                       forget_count = excluded.forget_count, source = excluded.source,
                       reason = NULL, error = NULL
                   WHERE requests.status NOT IN ('applied', 'failed')""",
                (request_id, model, method, subject, body_sha256, forget_kind, forget_count, source, now),
            )
            row = db.execute("SELECT status, attempts FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            if row["status"] != "processing":
                raise AppliedElsewhere(f"request {request_id} is already {row['status']}")
            return int(row["attempts"])

    def finish(self, request_id: str, status: str, *, model: str | None = None, method: str | None = None,
               subject: str | None = None, body_sha256: str | None = None, artifact_id: str | None = None,
               metrics: dict[str, Any] | None = None, reason: str | None = None, error: str | None = None,
               source: str | None = None, duration_s: float | None = None, forget_kind: str | None = None,
               forget_count: int | None = None) -> None:
        """Record a terminal status (and its audit event) for a request, creating the row if needed. An applied
        request's row is final (on a shared ledger, a late writer's outcome is not kept); a failed one is never
        made rejected (a message reusing its id is not its outcome)."""
        assert status in TERMINAL
        now = time.time()
        with self.transaction() as db:
            db.execute(
                f"""INSERT INTO requests (request_id, model, method, subject, status, attempts, body_sha256,
                                         artifact_id, metrics, reason, error, source, received_at, completed_at,
                                         duration_s, forget_kind, forget_count)
                   VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(request_id) DO UPDATE SET status = excluded.status, {_KEEP_UNLESS_GIVEN},
                       artifact_id = excluded.artifact_id, metrics = excluded.metrics, reason = excluded.reason,
                       error = excluded.error, completed_at = excluded.completed_at, duration_s = excluded.duration_s
                   WHERE requests.status <> 'applied'
                     AND NOT (requests.status = 'failed' AND excluded.status = 'rejected')""",
                (request_id, model, method, subject, status, body_sha256, artifact_id, json.dumps(metrics or {}),
                 reason, error, source, now, now, duration_s, forget_kind, forget_count),
            )
            self._event(db, status, model, artifact_id, request_id, {"reason": reason} if reason else None)

    def claim_unapplied(self, request_ids: list[str]) -> None:
        """Inside the transaction that will mark these requests applied: raise AppliedElsewhere if another writer
        applied or failed one of them meanwhile. The rows stay locked until the commit (PostgreSQL: FOR UPDATE;
        SQLite: the one write lock), so no second writer can claim them in between."""
        lock = " FOR UPDATE" if self.shared else ""
        with self.transaction() as db:
            for rid in request_ids:
                row = db.execute(f"SELECT status FROM requests WHERE request_id = ?{lock}", (rid,)).fetchone()
                if row is not None and row["status"] in ("applied", "failed"):
                    raise AppliedElsewhere(f"request {rid} is already {row['status']}")

    def record_engine_failure(self, request_id: str, error: str) -> int:
        """Count a try where the engine itself failed; returns the count so far."""
        with self.transaction() as db:
            db.execute("UPDATE requests SET engine_failures = engine_failures + 1, error = ? WHERE request_id = ?",
                       (error, request_id))
            return int(db.execute("SELECT engine_failures FROM requests WHERE request_id = ?",
                                  (request_id,)).fetchone()["engine_failures"])

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

    def record_rejection(self, reason: str, source: str, *, request_id: str | None = None,
                         model: str | None = None) -> None:
        """An audit trace for a rejection that must not touch a request row (no readable id, or an id conflict)."""
        with self.transaction() as db:
            self._event(db, "rejected", model, None, request_id, {"reason": reason, "source": source})

    def list_requests(self, model: str | None = None, status: str | None = None, limit: int | None = 50
                      ) -> list[RequestRow]:
        """The newest requests first (`limit` None: all)."""
        sql, args = "SELECT * FROM requests WHERE 1=1", list[object]()
        if model:
            sql, args = sql + " AND model = ?", args + [model]
        if status:
            sql, args = sql + " AND status = ?", args + [status]
        sql += " ORDER BY received_at DESC"
        if limit is not None:
            sql, args = sql + " LIMIT ?", args + [limit]
        return [request_row(r) for r in self.read_rows(sql, args)]

    # --- artifacts ------------------------------------------------------------------------------------------

    def add_artifact(self, model: str, artifact_id: str, kind: str, *, parent: str | None, request_id: str | None,
                     path: str, sha256: str, metrics: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
                     forgotten_ids: tuple[int, ...] = ()) -> None:
        """Record a new artifact and make it active (a version becomes the head; an adapter is switched on).

        A version moves the head only from `parent`, the version it was built on (None: the model has no head
        yet). If another writer moved it meanwhile, or took the id, HeadMoved is raised and nothing is kept."""
        try:
            with self.transaction() as db:
                if kind == "version":  # the previous head steps down (only it: history stays untouched)
                    self._move_head_from(db, model, parent)
                db.execute(
                    """INSERT INTO artifacts (model, id, kind, parent, request_id, created_at, active, path, sha256,
                                              metrics, info) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)""",
                    (model, artifact_id, kind, parent, request_id, time.time(), path, sha256,
                     json.dumps(metrics or {}), json.dumps(info or {})),
                )
                db.executemany("INSERT INTO forgotten (model, artifact_id, sample_id) VALUES (?, ?, ?)",
                               [(model, artifact_id, int(i)) for i in forgotten_ids])
                self._event(db, "registered" if request_id is None else "published", model, artifact_id, request_id,
                            {"kind": kind, "parent": parent, "sha256": sha256})
        except LedgerConflict:
            raise
        except Exception as exc:
            if ledger_backends.unique_violation(exc):
                raise HeadMoved(f"{model}: {artifact_id} or a head was recorded by another writer") from exc
            raise

    @staticmethod
    def _move_head_from(db: Connection, model: str, parent: str | None) -> None:
        """Compare-and-set: the head steps down only if it is `parent`. Under PostgreSQL's READ COMMITTED a
        concurrent writer blocks on the row and then sees it already stepped down (0 rows): it lost."""
        if parent is None:
            head = db.execute("SELECT id FROM artifacts WHERE model = ? AND kind = 'version' AND active = 1",
                              (model,)).fetchone()
            if head is not None:
                raise HeadMoved(f"{model} already has a head ({head['id']})")
            return
        moved = db.execute("UPDATE artifacts SET active = 0 WHERE model = ? AND kind = 'version' AND active = 1 "
                           "AND id = ?", (model, parent)).rowcount
        if moved != 1:
            raise HeadMoved(f"{model}: the head is no longer {parent}")

    def get_artifact(self, model: str, artifact_id: str) -> ArtifactRow | None:
        row = self._one("SELECT * FROM artifacts WHERE model = ? AND id = ?", (model, artifact_id))
        return artifact_row(row) if row else None

    def _written_artifact(self, model: str, artifact_id: str) -> ArtifactRow:
        row = self.get_artifact(model, artifact_id)
        if row is None:  # only called right after a transaction wrote it
            raise KeyError(f"{model} artifact {artifact_id} vanished from the ledger")
        return row

    def find_artifact(self, artifact_id: str) -> ArtifactRow | None:
        """An artifact by id alone (ids are unique per model; the first match is returned)."""
        row = self._one("SELECT * FROM artifacts WHERE id = ? ORDER BY created_at", (artifact_id,))
        return artifact_row(row) if row else None

    def list_artifacts(self, model: str | None = None, kind: str | None = None) -> list[ArtifactRow]:
        sql, args = "SELECT * FROM artifacts WHERE 1=1", list[object]()
        if model:
            sql, args = sql + " AND model = ?", args + [model]
        if kind:
            sql, args = sql + " AND kind = ?", args + [kind]
        return [artifact_row(r) for r in self.read_rows(sql + " ORDER BY created_at, id", args)]

    def count_artifacts(self, model: str, kind: str, *, active_only: bool = False) -> int:
        active = " AND active = 1" if active_only else ""
        sql = f"SELECT COUNT(*) AS n FROM artifacts WHERE model = ? AND kind = ?{active}"
        return int(self._one(sql, (model, kind))["n"])

    def head(self, model: str) -> ArtifactRow | None:
        row = self._one("SELECT * FROM artifacts WHERE model = ? AND kind = 'version' AND active = 1", (model,))
        return artifact_row(row) if row else None

    def next_id(self, model: str, kind: str) -> str:
        """Sequential ids (v0001, a0001, e0001 for image erasures). Deterministic on retry: the counter moves only
        when a row commits."""
        n = self.count_artifacts(model, kind)
        return f"{ID_PREFIX.get(kind, 'a')}{n:04d}"

    def allocate_id(self, model: str, kind: str) -> str:
        """The id a new artifact's files are written under. One writer (SQLite, behind the state lock): `next_id`,
        the same on a retry after a crash. A shared ledger: handed out once, so two replicas racing on one model
        never write into one directory (a retry after a crash takes a new id; the orphan keeps the old one)."""
        if not self.shared:
            return self.next_id(model, kind)
        with self.transaction() as db:
            row = db.execute(
                """INSERT INTO id_counters (model, kind, next)
                   VALUES (?, ?, (SELECT COUNT(*) FROM artifacts WHERE model = ? AND kind = ?))
                   ON CONFLICT (model, kind) DO UPDATE SET next = id_counters.next + 1
                   RETURNING next""", (model, kind, model, kind)).fetchone()
        return f"{ID_PREFIX.get(kind, 'a')}{row['next']:04d}"

    def lineage(self, model: str, version_id: str) -> list[ArtifactRow]:
        """The version and its ancestors, newest first."""
        chain, current = list[ArtifactRow](), self.get_artifact(model, version_id)
        while current is not None:
            chain.append(current)
            current = self.get_artifact(model, current.parent) if current.parent else None
        return chain

    def served_artifacts(self, model: str) -> frozenset[str]:
        """The artifacts whose changes the model serves now: its head's lineage, its active adapters and its image
        erasures (never undone). An applied request whose artifact is not among them was rolled back."""
        head = self.head(model)
        lineage = {a.id for a in self.lineage(model, head.id)} if head is not None else set()
        rows = self.read_rows("SELECT id FROM artifacts WHERE model = ? AND kind <> 'version' AND active = 1", (model,))
        return frozenset(lineage | {r["id"] for r in rows})

    def rolled_back(self, row: RequestRow, served: frozenset[str] | None = None) -> bool:
        """Whether an applied request's change is no longer served: a rollback took the model's head past its
        version, or switched its adapter off (`served`: served_artifacts of its model, when the caller has it)."""
        if row.status != "applied" or not row.model or not row.artifact_id:
            return False
        return row.artifact_id not in (served if served is not None else self.served_artifacts(row.model))

    def forgotten_ids(self, model: str, version_id: str) -> frozenset[int]:
        """Samples forgotten along a version's lineage: what that version no longer knows."""
        ids = [a.id for a in self.lineage(model, version_id)]
        if not ids:
            return frozenset()
        marks = ",".join("?" * len(ids))
        rows = self.read_rows(f"SELECT sample_id FROM forgotten WHERE model = ? AND artifact_id IN ({marks})",
                          (model, *ids))
        return frozenset(r["sample_id"] for r in rows)

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
        sql, args = "SELECT * FROM events", list[object]()
        if model:
            sql, args = sql + " WHERE model = ?", [model]
        rows = self.read_rows(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit))
        return [{**dict(r), "detail": json.loads(r["detail"]) if r["detail"] else None} for r in rows]

    def events_after(self, seq: int, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
        """Audit events of the given kinds recorded after `seq`, oldest first (whoever wrote them: daemon or CLI)."""
        marks = ",".join("?" * len(kinds))
        rows = self.read_rows(f"SELECT seq, kind, model, artifact_id FROM events WHERE seq > ? AND kind IN ({marks})"
                          " ORDER BY seq", (seq, *kinds))
        return [dict(r) for r in rows]

    @staticmethod
    def _event(db: Connection, kind: str, model: str | None, artifact_id: str | None, request_id: str | None,
               detail: dict[str, Any] | None) -> None:
        db.execute("INSERT INTO events (at, kind, model, artifact_id, request_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
                   (time.time(), kind, model, artifact_id, request_id, json.dumps(detail) if detail else None))


def open_ledger(state: State) -> Ledger:
    """The ledger a config names (`state` is config.State)."""
    return Ledger(ledger_backends.ledger_location(state), state.ledger_synchronous)


def read_adapters(location: Location, model: str) -> list[ArtifactRow]:
    """Every adapter of `model`, read without creating or writing anything: `unlearnd serve` builds its adapter
    set from this (a router may mount the state read-only). Raises a database error or OSError when unreadable."""
    rows = ledger_backends.read_only_rows(location, "SELECT * FROM artifacts WHERE model = ? AND kind = 'adapter' "
                                    "ORDER BY created_at, id", (model,))
    return [artifact_row(r) for r in rows]
