"""Where the ledger's rows live: an embedded SQLite file (one daemon) or a shared PostgreSQL (several replicas).

Both give daemon/ledger.py the same three things: `transaction()` (one atomic, durable unit of change; nested use
joins the outer one), `read()` (rows outside a transaction, or inside the caller's own), and the migrations at
start-up. SQL is written once, SQLite style (`?` placeholders); PostgreSQL gets `%s`. Rows are read by column
name on both (sqlite3.Row, psycopg's dict_row).

SQLite: WAL, `synchronous` FULL (survives power loss) with one connection and a lock around transactions; a
commit that only has to survive a process crash skips the fsync (`relaxed`). PostgreSQL: a psycopg connection
pool, each transaction on one connection held by its thread; `relaxed` is `synchronous_commit = off` for that
transaction. Passwords come from an environment variable, never from the config file; libpq's TLS settings
(sslmode, sslrootcert, sslcert, sslkey) pass through from the URL or `state.ledger_options`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from daemon import ledger_schema

if TYPE_CHECKING:
    from daemon.config import State

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
MIGRATION_LOCK_KEY = 0x756E6C65  # pg_advisory_xact_lock key: replicas starting at once migrate one at a time

Args = Sequence[object]


class Cursor(Protocol):
    """What the ledger reads back from a statement on either backend."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """A transaction's connection on either backend (sqlite3.Connection, or _PgConnection)."""

    def execute(self, sql: str, args: Args = (), /) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Args], /) -> object: ...


@dataclass(frozen=True)
class PostgresTarget:
    """A PostgreSQL ledger: the URL (no password in it), the variable holding the password, libpq options."""

    url: str
    password_env: str = "UNLEARND_LEDGER_PASSWORD"
    options: dict[str, str | int] = field(default_factory=dict)
    pool_min: int = 1
    pool_max: int = 4

    def conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        password = os.environ.get(self.password_env)
        extra = {"password": password} if password else {}
        return make_conninfo(self.url, **{**{k: str(v) for k, v in self.options.items()}, **extra})

    def __str__(self) -> str:  # for messages: never the password
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(self.url)
        return (f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', 5432)}/"
                f"{info.get('dbname', '')}")


Location = str | Path | PostgresTarget


def ledger_location(state: State) -> Path | PostgresTarget:
    """Where a config's ledger lives (`state` is config.State): its PostgreSQL, else the SQLite file."""
    if state.ledger_url:
        return PostgresTarget(state.ledger_url, state.ledger_password_env, dict(state.ledger_options),
                              state.ledger_pool_min, state.ledger_pool_max)
    return state.ledger_path


class SQLiteBackend:
    dialect = "sqlite"

    def __init__(self, path: Path, synchronous: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._synchronous = synchronous
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("PRAGMA foreign_keys=ON")

    def read(self, sql: str, args: Args = ()) -> list[Any]:
        return self.db.execute(sql, args).fetchall()

    @contextmanager
    def transaction(self, relaxed: bool = False) -> Iterator[Connection]:
        with self._lock:
            if self.db.in_transaction:
                yield self.db
                return
            with self._relaxed_sync(relaxed):
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")

    @contextmanager
    def _relaxed_sync(self, relaxed: bool) -> Iterator[None]:
        if not relaxed or self._synchronous == "NORMAL":
            yield
            return
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self.db.execute(f"PRAGMA synchronous={self._synchronous}")

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        yield

    def columns(self, db: Connection, table: str) -> set[str]:
        return {r["name"] for r in db.execute(f"PRAGMA table_info({table})").fetchall()}

    def lock_for_migrations(self, db: Connection) -> None:
        pass  # BEGIN IMMEDIATE already holds the write lock

    def schema(self, sql: str) -> str:
        return sql

    def close(self) -> None:
        self.db.close()


class _PgConnection:
    """A psycopg connection that takes the ledger's `?` placeholders."""

    def __init__(self, conn: Any):
        self.conn = conn

    def execute(self, sql: str, args: Args = (), /) -> Cursor:
        cursor: Cursor = self.conn.execute(_pg_sql(sql), args or None)
        return cursor

    def executemany(self, sql: str, rows: Iterable[Args], /) -> None:
        rows = list(rows)
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(_pg_sql(sql), rows)


POOL_WAIT_S = 10.0
POOL_OPEN_S = 30.0  # how long opening the ledger waits for a first connection (a database starting beside it)


class LedgerUnreachable(RuntimeError):
    """The PostgreSQL ledger did not answer when it was opened (the message says where and why)."""


def _connect_error(target: PostgresTarget) -> str | None:
    """Why one plain connection to the ledger fails now (psycopg's own words), or None if it does not."""
    import psycopg

    try:
        psycopg.connect(target.conninfo(), connect_timeout=5).close()
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


class PostgresBackend:
    dialect = "postgresql"

    def __init__(self, target: PostgresTarget):
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self.target = target
        self._local = threading.local()  # the connection of this thread's open transaction
        # `timeout`: how long a ledger call waits for a connection before it fails as the ledger being away (the
        # daemon then pauses and retries: daemon/transient.py); psycopg_pool's own default is 30 s.
        self.pool: Any = ConnectionPool(target.conninfo(), min_size=target.pool_min, max_size=target.pool_max,
                                        kwargs={"autocommit": True, "row_factory": dict_row},
                                        check=ConnectionPool.check_connection, name="unlearnd-ledger", open=False,
                                        timeout=POOL_WAIT_S)
        try:
            self.pool.open(wait=True, timeout=POOL_OPEN_S)
        except Exception as exc:  # psycopg_pool.PoolTimeout: the cause is only in its log lines
            self.pool.close()
            raise LedgerUnreachable(f"cannot reach the PostgreSQL ledger {target} within {POOL_OPEN_S:.0f} s "
                                    f"({_connect_error(target) or exc})") from None

    def _current(self) -> _PgConnection | None:
        current: _PgConnection | None = getattr(self._local, "conn", None)
        return current

    def read(self, sql: str, args: Args = ()) -> list[Any]:
        current = self._current()
        if current is not None:
            return current.execute(sql, args).fetchall()
        with self.pool.connection() as conn:
            return _PgConnection(conn).execute(sql, args).fetchall()

    @contextmanager
    def transaction(self, relaxed: bool = False) -> Iterator[Connection]:
        current = self._current()
        if current is not None:
            yield current
            return
        with self.pool.connection() as conn, conn.transaction():
            wrapped = _PgConnection(conn)
            if relaxed:  # survives a crash of the daemon, not of the database server: like SQLite's NORMAL
                conn.execute("SET LOCAL synchronous_commit = off")
            self._local.conn = wrapped
            try:
                yield wrapped
            finally:
                self._local.conn = None

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """A session advisory lock on its own connection (released when that closes, so also by a crash)."""
        import psycopg

        with psycopg.connect(self.target.conninfo(), autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (name,))
            yield

    def columns(self, db: Connection, table: str) -> set[str]:
        rows = db.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                          "AND table_name = ?", (table,)).fetchall()
        return {r["column_name"] for r in rows}

    def lock_for_migrations(self, db: Connection) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))

    def schema(self, sql: str) -> str:
        return ledger_schema.for_postgres(sql)

    def close(self) -> None:
        self.pool.close()


Backend = SQLiteBackend | PostgresBackend


def unique_violation(exc: BaseException) -> bool:
    """A UNIQUE / PRIMARY KEY conflict, from either backend."""
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc)
    return getattr(exc, "sqlstate", None) == "23505"


def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def migrate(backend: Backend) -> list[int]:
    """Apply the migrations this ledger has not had yet; returns their versions."""
    applied = []
    with backend.transaction() as db:
        backend.lock_for_migrations(db)
        db.execute(backend.schema(ledger_schema.MIGRATIONS_TABLE))
        done = {r["version"] for r in db.execute("SELECT version FROM schema_migrations").fetchall()}
        for m in ledger_schema.MIGRATIONS:
            if m.version in done:
                continue
            skip = m.adds_column is not None and m.adds_column[1] in backend.columns(db, m.adds_column[0])
            if not skip:
                for statement in ledger_schema.statements(backend.schema(m.sql)):
                    db.execute(statement)
            db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                       (m.version, m.name, time.time()))
            applied.append(m.version)
    return applied


def open_backend(location: Location, synchronous: str = "FULL") -> Backend:
    if isinstance(location, PostgresTarget):
        return PostgresBackend(location)
    return SQLiteBackend(Path(location), synchronous)


def read_only_rows(location: Location, sql: str, args: Args = ()) -> list[dict[str, Any]]:
    """Rows read without creating or writing anything (`unlearnd serve` may see the state read-only)."""
    if isinstance(location, PostgresTarget):
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(location.conninfo(), autocommit=True, row_factory=dict_row, connect_timeout=5) as conn:
            conn.execute("SET default_transaction_read_only = on")
            return conn.execute(_pg_sql(sql), args).fetchall()
    path = Path(location)
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(sql, args).fetchall()]
