"""The ledger's `answered` table: which records' answers a poll flushed before its offset commit, so that a record
redelivered after a crash in between is not answered twice (daemon/outcomes.py marks them, daemon/admission.py
reads them). A part of Ledger (daemon/ledger.py), kept apart as its own concern."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any

from daemon.ledger_backends import Args, Connection


class AnsweredMarks:
    def transaction(self, relaxed: bool = False) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # Ledger's

    def read_rows(self, sql: str, args: Args = ()) -> list[Any]:
        raise NotImplementedError  # Ledger's

    def mark_answered(self, records: list[tuple[str, int, int, str]]) -> None:
        """(topic, partition, offset, fingerprint) of records whose answers were just flushed. Only has to survive
        a process crash (losing it costs one repeated answer), so its commit skips the fsync."""
        now = time.time()
        with self.transaction(relaxed=True) as db:
            db.executemany("INSERT INTO answered (topic, partition_, offset_, fingerprint, at) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT (topic, partition_, offset_) DO UPDATE SET fingerprint = excluded.fingerprint, "
                           "at = excluded.at", [(*r, now) for r in records])

    def answered_between(self, topic: str, partition: int, first: int, last: int) -> dict[int, str]:
        """offset -> fingerprint of the records of one partition, in [first, last], marked answered."""
        rows = self.read_rows("SELECT offset_, fingerprint FROM answered WHERE topic = ? AND partition_ = ? "
                          "AND offset_ BETWEEN ? AND ?", (topic, partition, first, last))
        return {r["offset_"]: r["fingerprint"] for r in rows}

    def forget_answered(self, committed: dict[tuple[str, int], int]) -> None:
        """Offsets below a committed offset are never redelivered: their marks are no longer needed."""
        with self.transaction(relaxed=True) as db:
            db.executemany("DELETE FROM answered WHERE topic = ? AND partition_ = ? AND offset_ < ?",
                           [(topic, partition, offset) for (topic, partition), offset in committed.items()])

