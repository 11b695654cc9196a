"""A real PostgreSQL server for tests and benchmarks: initdb + pg_ctl in a temporary directory, on loopback.

The binaries are the Debian `postgresql` package's (deploy/ci/install-tools.sh installs it): found on PATH, else
under /usr/lib/postgresql/<version>/bin. PostgreSQL refuses to run as root, so as root the cluster is created
and run as the `postgres` user (the package creates it), or `nobody`. Authentication is `trust` on 127.0.0.1
only; each user of the server gets a database of its own (`new_database`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from daemon.broker import free_port

USER = "unlearnd"


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                            reverse=True):
        if Path(candidate, "initdb").is_file() and Path(candidate, "pg_ctl").is_file():
            return Path(candidate)
    return None


def _run_as() -> list[str]:
    """A prefix that runs a command as a non-root user when we are root."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return ["runuser", "-u", name, "--"]
    raise RuntimeError("running as root and no `postgres` or `nobody` user to run PostgreSQL as")


class PostgresServer:
    def __init__(self, bin_dir: Path, port: int | None = None):
        self.bin_dir = bin_dir
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="unlearnd-pg-"))
        self.data = self.root / "data"
        self._as = _run_as()
        if self._as:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, user=self._as[2])

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *args], check=True, capture_output=True, text=True, cwd=self.root,
                              timeout=120)

    def start(self) -> PostgresServer:
        """A new cluster, started."""
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        return self.resume()

    def resume(self) -> PostgresServer:
        """Start the cluster's server (again, after `halt`), on the same port and data."""
        # fsync stays on: the crash tests kill daemons and servers, and the settings are the product's.
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200 "
                   "-c shared_buffers=32MB")
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                      str(self.root / "log"), "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as exc:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {exc.stderr}\n{log}") from None
        return self

    def halt(self, mode: str = "immediate") -> None:
        """Stop the server, keeping its data (`immediate`: no shutdown checkpoint, as after a crash)."""
        subprocess.run([*self._as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                       capture_output=True, cwd=self.root, timeout=60)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def database_from(self, state: Path) -> str:
        """A new database holding what the SQLite ledger of state directory `state` holds (its versions' files
        stay where that state keeps them); returns its URL."""
        from daemon.ledger import Ledger
        from daemon.ledger_backends import PostgresTarget
        from daemon.ledger_copy import copy_ledger

        url = self.new_database()
        source, target = Ledger(state / "ledger.sqlite3"), Ledger(PostgresTarget(url))
        copy_ledger(source, target)
        source.close()
        target.close()
        return url

    def stop(self) -> None:
        """Stop the server and delete the cluster."""
        self.halt("fast")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
