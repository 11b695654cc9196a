"""One state directory, one daemon: an exclusive lock next to the SQLite ledger.

Two daemons on one ledger fork version chains and apply requests twice, so the second refuses to start and names
the holder. The lock is `flock(2)` on `<ledger>.lock`: the kernel releases it when the holder exits, even by
SIGKILL, so a crash never leaves a stale lock behind. The file's text (pid, host, start time) is only for the
message. The ledger must live on a local filesystem anyway (SQLite WAL), where flock is reliable.

A PostgreSQL ledger (`state.ledger_url`) is shared by design: several replicas write it at once, and what keeps
them from forking a chain or applying a request twice is the ledger's own guarded transactions
(daemon/ledger.py), so no lock is taken for it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.config import State


class StateLocked(RuntimeError):
    pass


class StateLock:
    def __init__(self, ledger_path: Path):
        self.path = Path(f"{ledger_path}.lock")
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise StateLocked(f"the ledger {self.path.with_suffix('')} is in use by another unlearnd daemon "
                              f"({holder}); stop it, or give this one its own state.dir") from None
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class SharedLedger:
    """The lock of a shared (PostgreSQL) ledger: nothing to hold."""

    def acquire(self) -> SharedLedger:
        return self

    def release(self) -> None:
        pass


def state_lock(state: State) -> StateLock | SharedLedger:
    """The lock a daemon takes on its state (`state` is config.State): exclusive for SQLite, none when shared."""
    return SharedLedger() if state.ledger_url else StateLock(state.ledger_path)
