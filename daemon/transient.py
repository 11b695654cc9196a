"""Conditions of the environment, not of a request: a full disk, a ledger another process holds locked, a shared
ledger's database out of reach (`ledger_busy` too).

The daemon never counts these against a request and never fails one because of them. It pauses its pipeline,
retries the message with backoff (unlearnd_paused{reason}, unlearnd_transient_errors_total{kind}), and carries on
when the condition clears. `kind_of` names the condition of an exception, or None for anything else.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Callable

log = logging.getLogger("unlearnd")

KINDS = ("disk_full", "ledger_busy", "io_error", "bootstrapping")  # bootstrapping: a model still being built

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_IO = {errno.EIO, errno.EROFS}


class Transient(Exception):
    """Raised out of message handling: pause, then handle the same message again."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


# How libraries that are not Python's own report a full disk in their messages: the C library's text ("No space
# left on device") and Rust's io::Error ("... (os error 28)"), e.g. safetensors' SafetensorError.
_DISK_FULL_TEXT = tuple(t for e in _DISK_FULL for t in (os.strerror(e), f"(os error {e})"))


def kind_of(exc: BaseException | None) -> str | None:
    """The transient condition behind `exc` (or anything in its cause chain), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Transient):
            return exc.kind
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL or any(t in str(exc) for t in _DISK_FULL_TEXT):
            return "disk_full"
        if isinstance(exc, OSError) and exc.errno in _IO:
            return "io_error"
        if isinstance(exc, sqlite3.OperationalError):
            text = str(exc).lower()
            if "disk is full" in text or "database or disk is full" in text:
                return "disk_full"
            if "locked" in text or "busy" in text:
                return "ledger_busy"
            if "disk i/o error" in text or "readonly" in text or "unable to open" in text:
                return "io_error"
        if _is_postgres_unavailable(exc):  # a shared ledger's server restarting or out of reach
            return "ledger_busy"
        exc = exc.__cause__ or exc.__context__
    return None


def _is_postgres_unavailable(exc: BaseException) -> bool:
    """psycopg's OperationalError (connection lost or refused, server shutting down) or the pool's timeout;
    checked by class name so that SQLite-only installs never import psycopg."""
    names = {c.__module__.split(".")[0] + "." + c.__name__ for c in type(exc).__mro__}
    return bool(names & {"psycopg.OperationalError", "psycopg_pool.PoolTimeout"})


def as_transient(exc: BaseException, kind: str) -> Transient:
    return exc if isinstance(exc, Transient) else Transient(kind, f"{type(exc).__name__}: {exc}")


def unless_transient(chore: Callable[[], None]) -> None:
    """Run a chore the daemon does between messages; a transient condition (a shared ledger's server gone, a full
    disk) skips it this round. The messages themselves meet the same condition and pause the pipeline."""
    try:
        chore()
    except Exception as exc:
        kind = kind_of(exc)
        if kind is None:
            raise
        log.debug("%s skipped this round (%s: %s)", getattr(chore, "__name__", "a chore"), kind, exc)
