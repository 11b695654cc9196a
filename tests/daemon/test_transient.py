"""Which failures are the environment's (pause and retry) and which are the request's (count against it)."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from daemon.transient import Transient, kind_of


def test_full_disk_is_recognised_however_a_library_reports_it(tmp_path):
    assert kind_of(OSError(errno.ENOSPC, "No space left on device")) == "disk_full"
    assert kind_of(sqlite3.OperationalError("database or disk is full")) == "disk_full"
    assert kind_of(sqlite3.OperationalError("database is locked")) == "ledger_busy"
    # safetensors (Rust) raises its own error type; only its text says what happened.
    assert kind_of(Exception("Error while serializing: I/O error: No space left on device (os error 28)")) == \
        "disk_full"
    wrapped = RuntimeError("publish failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert kind_of(wrapped) == "disk_full"
    assert kind_of(Transient("io_error", "x")) == "io_error"


@pytest.mark.parametrize("exc", [ValueError("bad tensor"), RuntimeError("CUDA error: an illegal memory access"),
                                 OSError(errno.ENOENT, "No such file"), KeyError("weight")])
def test_other_failures_are_the_requests(exc):
    assert kind_of(exc) is None
