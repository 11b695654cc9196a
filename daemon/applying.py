"""Applying admitted requests: engine -> persist (artifact, then ledger) -> answer, with bounded retries.

One request at a time, or a coalesced group (consecutive same-model requests whose engine deltas add up, e.g.
IAU): one engine step, one artifact, one ledger transaction, still one answer per request. A request that was in
hand when a daemon died (a *suspect*) runs in a child process (daemon/isolation.py). An engine failure is retried
with backoff up to `requests.max_attempts`; a transient condition (a full disk, a busy ledger) is raised as
Transient for the loop to pause on, and counts against nothing.

On a ledger shared by several replicas, another replica may get there first (a partition moved mid-request): a
lost race on the head is rebuilt on the new head; a request another replica finished is answered from the ledger,
never applied again.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from adapters.base import Change, EngineError, Forget, InvalidForget, NothingToForget
from adapters.store import ArtifactStore
from daemon import failpoints, isolation, metrics, transient
from daemon.admission import Admitted
from daemon.config import Config
from daemon.ledger import Ledger, LedgerConflict
from daemon.liveness import BrokerLost
from daemon.models import Committed, ModelRegistry
from daemon.outcomes import Outcomes
from daemon.schema import MAX_DETAIL_CHARS, Rejected, forget_reason

log = logging.getLogger("unlearnd")


class Applier:
    def __init__(self, config: Config, registry: ModelRegistry, store: ArtifactStore, ledger: Ledger,
                 outcomes: Outcomes, stop: threading.Event, not_suspect: set[str]):
        self.config = config
        self.registry = registry
        self.store = store
        self.ledger = ledger
        self.outcomes = outcomes
        self.stop = stop
        self.not_suspect = not_suspect  # ids this process interrupted cleanly (a pause, a stop): no crash

    def coalescable(self, a: Admitted) -> bool:
        return (self.config.requests.coalesce and self.registry.engine(a.method, a.request.model).coalescable
                and a.request.forget.sample_ids is not None)

    def apply(self, a: Admitted, attempt: int | None = None) -> None:
        """apply -> persist -> announce for one request, with bounded retries of engine failures."""
        cfg = self.config.requests
        request, method = a.request, a.method
        rid = request.request_id
        if attempt is None:
            self.registry.check_ready(request.model)  # still bootstrapping: pause, and no attempt is recorded
        self.outcomes.flush_before_engine(a.suspect or self.registry.engine(method, request.model).reports_progress)
        try:
            attempt = attempt or self._begin_attempt(a)
        except LedgerConflict:
            self._answer_from_ledger(a)
            return
        log.info("request %s: %s on %s, forget %d %s (attempt %d%s)", rid, method, request.model,
                 request.forget.size(), a.forget.kind, attempt, ", isolated: it was in hand at a crash"
                 if a.suspect else "")
        while True:
            row = self.ledger.get_request(rid)
            failures = row.engine_failures if row is not None else 0
            if failures >= cfg.max_attempts:  # e.g. its isolated engine process died again and again
                self.outcomes.failed(a, f"the engine failed on it {failures} times (requests.max_attempts)")
                return
            target = None
            try:
                failpoints.hit("before_engine")
                target = self.registry.target(request.model)
                # its cheap check first: a request it refuses never reports that its engine started
                self.registry.engine(method, request.model).validate(target, a.forget)
                change = self._engine_change(
                    request.model, method, target, a.forget, a.suspect,
                    progress=lambda info, a=a, attempt=attempt: self.outcomes.progress(a, {"attempt": attempt, **info}
                                                                 if info.get("stage") == "started" else info))
                committed, durations = self._commit_change(request.model, change, target, [a])
                failpoints.hit("after_ledger")
                break
            except LedgerConflict as exc:  # another replica sharing the ledger got there first
                metrics.LEDGER_CONFLICTS.labels(request.model, type(exc).__name__).inc()
                if self._answer_from_ledger(a):
                    return
                log.info("request %s: %s; rebuilding on the new head", rid, exc)
                continue
            except NothingToForget as exc:
                self.outcomes.unchanged(a, target, exc)
                return
            except InvalidForget as exc:
                self.outcomes.rejected(a.msg, Rejected(forget_reason(exc), str(exc), rid, request.model),
                                       method=method, body_hash=a.body_hash)
                return
            except Exception as exc:
                kind = transient.kind_of(exc)
                if kind is not None:
                    self.not_suspect.add(rid)
                    raise transient.as_transient(exc, kind) from exc
                error = f"{type(exc).__name__}: {exc}"[:MAX_DETAIL_CHARS]
                failures = self.ledger.record_engine_failure(rid, error)
                if isinstance(exc, EngineError) and not exc.retryable or failures >= cfg.max_attempts:
                    self.outcomes.failed(a, error)
                    return
                metrics.ENGINE_RETRIES.labels(request.model, method).inc()
                delay = cfg.retry_backoff_s * 2 ** (failures - 1)
                log.warning("request %s: the engine failed (%s, %d of %d); retrying in %.1fs", rid,
                            type(exc).__name__, failures, cfg.max_attempts, delay)
                if self.stop.wait(delay):
                    self.not_suspect.add(rid)
                    raise BrokerLost("stopping during a retry") from None  # uncommitted: redelivered later
                attempt = self._begin_attempt(a)
        self.outcomes.applied([a], committed, change, target, durations)

    def apply_group(self, group: list[Admitted]) -> None:
        """Coalesced apply of same-model requests; anything unusual falls back to one at a time."""
        if len(group) <= 1:
            for a in group:
                self.apply(a)
            return
        isolated = any(a.suspect for a in group)  # one child for the group; if it dies, one child each
        model, method = group[0].request.model, group[0].method
        self.outcomes.flush_before_engine(isolated)
        try:
            with self.ledger.transaction():
                attempts = [self._begin_attempt(a) for a in group]
        except LedgerConflict:  # one of them was finished by another replica meanwhile: each on its own
            for a in group:
                self.apply(a)
            return
        try:
            failpoints.hit("before_engine")
            target = self.registry.target(model)
            engine = self.registry.engine(method, model)
            valid = []
            for a, attempt in zip(group, attempts, strict=True):  # a request that cannot apply is answered alone
                try:
                    engine.validate(target, a.forget)
                    valid.append((a, attempt))
                except NothingToForget as exc:
                    self.outcomes.unchanged(a, target, exc)
                except InvalidForget as exc:
                    self.outcomes.rejected(a.msg, Rejected(forget_reason(exc), str(exc), a.request.request_id, model),
                                           method=method, body_hash=a.body_hash)
            if len(valid) <= 1:
                for a, attempt in valid:
                    self.apply(a, attempt)
                return
            group, attempts = [a for a, _ in valid], [at for _, at in valid]
            merged = group[0].forget
            for a in group[1:]:
                merged = merged.merged(a.forget)
            change = self._engine_change(model, method, target, merged, isolated)
            change.metrics["coalesced_requests"] = float(len(group))
            committed, durations = self._commit_change(model, change, target, group)
            failpoints.hit("after_ledger")
        except Exception as exc:  # e.g. one request names an unknown sample: let each succeed or fail alone
            # (a LedgerConflict too: each request then re-reads the ledger and rebuilds, or answers from it)
            if isinstance(exc, LedgerConflict):
                metrics.LEDGER_CONFLICTS.labels(model, type(exc).__name__).inc()
            kind = transient.kind_of(exc)
            if kind is not None:
                raise transient.as_transient(exc, kind) from exc
            log.info("coalesced apply of %d requests failed (%s); applying one at a time", len(group),
                     type(exc).__name__)
            for a, attempt in zip(group, attempts, strict=True):
                self.apply(a, attempt)
            return
        log.info("coalesced %d requests on %s into %s", len(group), model, committed.artifact_id)
        self.outcomes.applied(group, committed, change, target, durations)

    def _answer_from_ledger(self, a: Admitted) -> bool:
        """After a lost race on a shared ledger: if another replica finished the request, answer as it recorded
        (never apply it again) and return True; False: it is still this replica's to apply, on the new head."""
        row = self.ledger.get_request(a.request.request_id)
        if row is None or row.status not in ("applied", "failed"):
            return False
        log.info("request %s was %s by another replica meanwhile; answering from the ledger",
                 a.request.request_id, row.status)
        self.outcomes.duplicate(row, a.msg)
        return True

    def _begin_attempt(self, a: Admitted) -> int:
        return self.ledger.begin_attempt(
            a.request.request_id, model=a.request.model, method=a.method, subject=a.request.subject,
            body_sha256=a.body_hash, forget_kind=a.forget.kind, forget_count=a.request.forget.size(),
            source=a.msg.source)

    def _engine_change(self, model: str, method: str, target: Any, forget: Forget, isolated: bool,
                       progress: Callable[..., None] | None = None) -> Change:
        # (progress takes one info dict; `...` because the caller's lambda binds its loop variables as defaults)
        """The engine's change for `forget`: in this process (with progress events, for engines that report
        them), or (a suspect) in a child process."""
        if not isolated:
            failpoints.hit("in_engine")
            engine = self.registry.engine(method, model)
            if engine.reports_progress and progress is not None:
                progress({"stage": "started"})
                return engine.apply(target, forget, progress=progress)
            return engine.apply(target, forget)
        scratch = self.store.scratch_dir("isolated")
        try:
            change = isolation.apply_isolated(self.config, model, method, forget, scratch)
        except BaseException as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            if isinstance(exc, EngineError) and not isinstance(exc, (InvalidForget, NothingToForget)):
                metrics.ISOLATED_RUNS.labels("engine_died" if isinstance(exc, isolation.EngineProcessDied)
                                             else "engine_error").inc()
            raise
        metrics.ISOLATED_RUNS.labels("ok").inc()
        return change

    def _commit_change(self, model: str, change: Change, target: Any, group: list[Admitted]
                       ) -> tuple[Committed, dict[str, float]]:
        """The change made durable, and each request's duration: from its poll to the ledger row that applies it,
        which is written once the artifact's files are (an adapter's result measures are taken on the way)."""
        durations: dict[str, float] = {}

        def finish(artifact_id: str) -> None:
            for a in group:
                durations[a.request.request_id] = time.perf_counter() - a.msg.polled_at
                self.outcomes.record_applied(a, artifact_id, change, durations[a.request.request_id])

        try:
            return self.registry.commit(model, change, target=target, request_ids=[a.request.request_id for a in group],
                                        finish=finish), durations
        finally:
            if isinstance(change, isolation.StagedChange):
                change.discard()
