"""What bench/chaos.py concludes, computed from what the system itself recorded: the ledger and artifact store on
disk, and the results and dead-letter topics as a consumer saw them. The bench's own bookkeeping only says what was
sent, and when each daemon started and stopped.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from adapters.store import ArtifactStore
from daemon.dead_letter import HEADER_FAILED_AT, HEADER_REASON, HEADER_SOURCE
from daemon.ledger import Ledger

RECOVERY_TARGET_S = 30.0


@dataclass
class Seen:
    """Everything the collector read from the results and dead-letter topics, per broker epoch."""

    results: list[dict] = field(default_factory=list)  # result events (with "_epoch")
    dead: list[dict] = field(default_factory=list)  # {"epoch", "source", "reason", "at"}

    def answer_times(self) -> list[float]:
        times = [datetime.fromisoformat(r["completed_at"]).timestamp() for r in self.results if r.get("completed_at")]
        return sorted(times + [d["at"] for d in self.dead])


def dead_letter_entry(epoch: int, headers: dict) -> dict:
    return {"epoch": epoch, "source": headers.get(HEADER_SOURCE, b"").decode(),
            "reason": headers.get(HEADER_REASON, b"").decode(), "at": float(headers.get(HEADER_FAILED_AT, b"0"))}


def summarize(*, state: Path, model: str, valid: dict[str, dict], hostile: dict[tuple[int, str], str], seen: Seen,
              starts: list[dict], unexpected_exits: list[dict]) -> dict:
    """`valid`: request id -> {"samples", "repeat_of"}; `hostile`: (epoch, source) -> expected reason; `starts`:
    daemon starts in order, {"at", "stopped_at", "how"}; `unexpected_exits`: daemons that died unasked."""
    ledger = Ledger(state / "ledger.sqlite3")
    try:
        rows = {rid: ledger.get_request(rid) for rid in valid}
        chain = _chain(ledger, ArtifactStore(state / "artifacts"), model)
        statuses = defaultdict(int)
        for row in rows.values():
            statuses[row.status if row else "missing"] += 1
        lost = [rid for rid, row in rows.items() if row is None or row.status != "applied"]
        results_by_id = defaultdict(list)
        for r in seen.results:
            if r.get("request_id") in valid:
                results_by_id[r["request_id"]].append(r)
        valid_failed = sorted({rid for rid, row in rows.items() if row is not None and row.status in
                               ("failed", "rejected")}
                              | {rid for rid, rs in results_by_id.items() if any(r["status"] != "applied" for r in rs)})
        versions_per_request = {rid: {r.get("version") for r in rs if r["status"] == "applied"}
                                for rid, rs in results_by_id.items()}
        applied_twice = sorted({rid for rid, n in chain["requests_in_artifacts"].items() if n > 1}
                               | {rid for rid, vs in versions_per_request.items() if len(vs) > 1})
        # A repeat of forgotten samples must come back applied without change, at the head of its time.
        repeats = [rid for rid, v in valid.items() if v.get("repeat_of")]
        unchanged_ok = sum(1 for rid in repeats if rows[rid] and rows[rid].status == "applied"
                           and rows[rid].metrics.get("forgotten") == 0.0)
        answers_per_request = {rid: len(rs) for rid, rs in results_by_id.items()}
        most = max(answers_per_request, key=answers_per_request.get, default=None)
    finally:
        ledger.close()
    dead_by_source = defaultdict(list)
    for d in seen.dead:
        dead_by_source[(d["epoch"], d["source"])].append(d["reason"])
    matched = sum(1 for key, reason in hostile.items() if reason in dead_by_source.get(key, ()))
    wrong = {f"{key[0]}:{key[1]}": dead_by_source[key] for key, reason in hostile.items()
             if dead_by_source.get(key) and reason not in dead_by_source[key]}
    recoveries = _recoveries(starts, seen.answer_times())
    return {
        "valid_requests": len(valid),
        "valid_by_ledger_status": dict(statuses),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "applied_twice": len(applied_twice),
        "applied_twice_ids": applied_twice[:20],
        "valid_failed": len(valid_failed),
        "valid_failed_ids": valid_failed[:20],
        "repeats_of_forgotten_data": len(repeats),
        "repeats_answered_applied_unchanged": unchanged_ok,
        "results_per_valid_request_max": answers_per_request.get(most, 0),
        "results_per_valid_request_max_id": most,
        "crashes_from_input": len(unexpected_exits),
        "hostile_messages": len(hostile),
        "hostile_dead_lettered_with_their_reason": matched,
        "hostile_dead_lettered_with_another_reason": len(wrong),
        "bad_dead_lettered_share": round(matched / len(hostile), 4) if hostile else None,
        "chain_consistent": chain["consistent"],
        "chain_problems": chain["problems"][:10],
        "versions": chain["versions"],
        "recoveries_measured": len(recoveries),
        "recovery_s_max": round(max(recoveries), 2) if recoveries else None,
        "recovery_s_p50": round(sorted(recoveries)[len(recoveries) // 2], 2) if recoveries else None,
    }


def _chain(ledger: Ledger, store: ArtifactStore, model: str) -> dict:
    """One unbroken version chain: every version's parent is the version before it, one head (the last), files
    matching their recorded hashes, each sample forgotten once, every applied request inside the head's lineage."""
    problems = []
    versions = ledger.list_artifacts(model, "version")
    ids = sorted(v.id for v in versions)
    by_id = {v.id: v for v in versions}
    for prev, cur in itertools.pairwise(ids):
        if by_id[cur].parent != prev:
            problems.append(f"{cur}'s parent is {by_id[cur].parent}, not {prev}")
    heads = [v.id for v in versions if v.active]
    if heads != ids[-1:]:
        problems.append(f"heads {heads}, expected [{ids[-1] if ids else None}]")
    for v in versions:
        if not store.verify(model, "versions", v.id):
            problems.append(f"{v.id}: files do not match their sha256")
    requests_in_artifacts: dict[str, int] = defaultdict(int)
    for v in versions:
        for rid in store.meta(model, "versions", v.id).get("request_ids") or []:
            requests_in_artifacts[rid] += 1
    lineage = {a.id for a in ledger.lineage(model, heads[0])} if heads else set()
    counts = defaultdict(int)
    for (sample,) in ledger._db.execute("SELECT sample_id FROM forgotten WHERE model = ?", (model,)):
        counts[sample] += 1
    twice = [s for s, n in counts.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} sample(s) forgotten by more than one version, e.g. {twice[:5]}")
    for row in ledger.list_requests(model, "applied", limit=1_000_000):
        if row.artifact_id not in lineage:
            problems.append(f"applied request {row.request_id} -> {row.artifact_id}, not in the head's lineage")
    return {"consistent": not problems, "problems": problems, "versions": len(versions),
            "requests_in_artifacts": requests_in_artifacts}


def _recoveries(starts: list[dict], answers: list[float]) -> list[float]:
    """For every restart that lived until it answered: seconds from its start to its first answer. A start that
    was stopped before answering (deliberately, e.g. during its group join) is measured at the next start."""
    out = []
    for start in starts[1:]:
        first = next((a for a in answers if a >= start["at"]), None)
        if first is not None and (start["stopped_at"] is None or first <= start["stopped_at"]):
            out.append(first - start["at"])
    return out


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
