"""Apply a request in a child process, so that what kills the engine is told apart from what kills the daemon.

A request that was in hand when the daemon died is a *suspect*: maybe it killed the daemon (a segfault, an OOM
kill), maybe a deploy or an operator did. The daemon cannot tell from the ledger alone, so it applies a suspect
here: a fresh interpreter (`python -m daemon.isolation`) that loads the target, runs the engine and writes the
artifact's files into a scratch directory of the store. The parent then publishes those files and commits the
ledger exactly as for an in-process change.

- The child dies (signal, non-zero exit) while the daemon lives: the engine died on this request. That counts
  against it (`engine_failures`), and `requests.max_attempts` such deaths fail it.
- The daemon dies: the kernel kills the child with it (PR_SET_PDEATHSIG). Nothing is counted; the request is
  still a suspect on the next start.

Job in (stdin, JSON): the config, model, method, forget and scratch directory. Answer out (the last
line of stdout, JSON): one of `staged`, `nothing_to_forget`, `invalid_forget` (with its dead-letter `reason`),
`error`. Raw forget data travels only through the pipe, never through a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from adapters.base import Change, EngineError, Forget, InvalidForget, NothingToForget
from daemon.config import Config


class EngineProcessDied(EngineError):
    """The child applying a request died without answering: counted against the request."""


class StagedChange(Change):
    """A change whose files a child process already wrote; `save` moves them into the store's staging dir."""

    def __init__(self, kind: str, files: Path, metrics: dict[str, Any], forgotten_ids: tuple[int, ...],
                 info: dict[str, Any], artifact_id: str | None = None):
        super().__init__(metrics, forgotten_ids=forgotten_ids, info=info)
        self.kind = kind
        self.files = files
        self.artifact_id = artifact_id  # the id the child wrote into the files (an adapter's gate names it)

    def save(self, directory: Path) -> None:
        for entry in self.files.iterdir():
            shutil.move(str(entry), directory / entry.name)

    def discard(self) -> None:
        shutil.rmtree(self.files, ignore_errors=True)


def apply_isolated(config: Config, model: str, method: str, forget: Forget, scratch: Path) -> StagedChange:
    """Run the engine for one request in a child; raises what the engine raised there, or EngineProcessDied."""
    job = {"config": config.model_dump(mode="json"), "model": model, "method": method,
           "forget": dataclasses.asdict(forget), "out": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.isolation"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=os.getcwd())
    out, _ = proc.communicate(json.dumps(job).encode())
    answer = _last_json_line(out)
    if proc.returncode != 0 or answer is None:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        raise EngineProcessDied(f"the engine process {how} while applying the request")
    if "staged" in answer:
        s = answer["staged"]
        return StagedChange(s["kind"], scratch, s["metrics"], tuple(s["forgotten_ids"]), s["info"],
                            s.get("artifact_id"))
    if "nothing_to_forget" in answer:
        raise NothingToForget(answer["nothing_to_forget"])
    if "invalid_forget" in answer:
        raise InvalidForget(answer["invalid_forget"], answer.get("reason", "invalid_forget"))
    from daemon.transient import Transient

    if answer.get("transient"):
        raise Transient(answer["transient"], answer["error"])
    raise EngineError(answer["error"], retryable=answer.get("retryable", True))


def _last_json_line(out: bytes) -> dict[str, Any] | None:
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if isinstance(answer, dict):
            return answer
    return None


def _forget(d: dict[str, Any]) -> Forget:
    return Forget(sample_ids=tuple(d["sample_ids"]), texts=tuple(d["texts"]), qa=tuple(tuple(p) for p in d["qa"]),
                  class_label=d["class_label"], concept=d["concept"], image=d["image"], mask=d["mask"])


def _child() -> None:
    from daemon.broker import die_with_parent

    die_with_parent(signal.SIGKILL)
    if os.getppid() == 1:  # the daemon died before the line above ran
        sys.exit(1)
    job = json.loads(sys.stdin.read())
    from adapters.store import ArtifactStore
    from daemon import failpoints
    from daemon.ledger import open_ledger
    from daemon.logs import setup_logging
    from daemon.models import ModelRegistry
    from daemon.transient import kind_of

    config = Config.model_validate(job["config"])
    setup_logging(config.logging)
    ledger = open_ledger(config.state)  # the parent's backend: its SQLite file, or the shared PostgreSQL
    registry = ModelRegistry(config, ArtifactStore(config.state.artifacts_path), ledger)
    answer: dict[str, object]
    try:
        target = registry.target(job["model"])
        failpoints.hit("in_engine")
        change = registry.engine(job["method"], job["model"]).apply(target, _forget(job["forget"]))
        # The id the parent's commit gives it: on SQLite the next in line (the daemon holds the state lock and
        # commits nothing meanwhile); on a shared ledger one handed out to this try alone.
        artifact_id = ledger.allocate_id(job["model"], change.kind)
        registry.artifact_writer(job["model"], change, artifact_id, target)(Path(job["out"]))
        answer = {"staged": {"kind": change.kind, "artifact_id": artifact_id, "metrics": change.metrics,
                             "forgotten_ids": list(change.forgotten_ids), "info": change.info}}
    except NothingToForget as exc:
        answer = {"nothing_to_forget": exc.already_forgotten}
    except InvalidForget as exc:
        answer = {"invalid_forget": str(exc), "reason": exc.reason}
    except Exception as exc:  # reported to the parent, which decides: retry, fail, or pause
        answer = {"error": f"{type(exc).__name__}: {exc}"[:1000], "retryable": getattr(exc, "retryable", True),
                  "transient": kind_of(exc)}
    finally:
        ledger.close()
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _child()
