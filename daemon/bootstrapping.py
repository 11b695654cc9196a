"""What the model kinds whose first version trains for minutes share (diffusion, images: both train a DDPM).

Such a model is built in the background once the daemon is consuming (models.<name>.bootstrap.when, default
"background" for these kinds; `build_in_background` is the daemon's thread that does it). Until its first version
exists, requests for it raise `ModelNotReady`, a transient condition: the daemon pauses (`unlearnd_paused{reason=
"bootstrapping"}`) and retries the request, never fails or loses it. The training reports its progress in the log
(`progress_logger`), and the recipe it follows is the demo's dataclass with the model's [bootstrap] tables over it
(`override`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from daemon.transient import Transient

if TYPE_CHECKING:
    from daemon.ledger import ArtifactRow
    from daemon.models import ModelRegistry

PROGRESS_EVERY = 0.1  # log a bootstrap line every 10% of the training steps
RETRY_S = 30.0  # first delay before a failed background bootstrap is tried again; doubles up to RETRY_MAX_S
RETRY_MAX_S = 600.0
T = TypeVar("T")


class ModelNotReady(Transient):
    """A request (or a command) needs a model whose first version is still being built."""

    def __init__(self, name: str):
        super().__init__("bootstrapping", f"model {name!r} has no version yet: it is being built in the background")


def build_in_background(registry: ModelRegistry, names: list[str], stop: threading.Event,
                        on_ready: Callable[[str, ArtifactRow | None], None]) -> None:
    """The daemon's bootstrap thread: build models' first versions off the consuming path (progress in the log),
    calling `on_ready` with each model's head. A failure is logged and tried again with backoff; a stop ends it at
    once (nothing half-written: the next start begins again)."""
    from adapters.diffusion.training import TrainingStopped

    log = logging.getLogger("unlearnd")
    for name in names:
        delay = RETRY_S
        while not stop.is_set():
            try:
                head = registry.ensure_bootstrapped(name, progress=False, stop=stop)
            except TrainingStopped:
                log.info("bootstrap of %s stopped; the next start begins it again", name)
                return
            except Exception:
                log.exception("bootstrap of %s failed; trying again in %.0fs", name, delay)
                stop.wait(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            on_ready(name, head)
            break


def override(obj: T, values: dict[str, Any], table: str) -> T:
    """`obj` (a recipe's dataclass) with `values` (a [bootstrap] table) over its fields; TOML lists become tuples.
    Raises ValueError naming `bootstrap.<table>` and the keys the dataclass does not know."""
    known = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]  # a dataclass instance
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"bootstrap.{table}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]  # a dataclass instance


def progress_logger(name: str, log: logging.Logger, clock: Callable[[], float] = time.monotonic
                    ) -> Callable[[str, int, int], None]:
    """on_progress(stage, done, total) for a bootstrap: a line in `log` (the kind's own logger) every
    PROGRESS_EVERY of the DDPM's steps (stage "ddpm"), one per other stage (a diffusion model's judge and
    measures).

    The time left is the DDPM's pace since its first step times the steps to go: the first step carries the
    one-off costs (loading, allocation, torch's first calls), and an estimate from it alone said hours for a
    run of minutes, so the first line gives none."""
    started = clock()
    state: dict[str, Any] = {"next": 0.0, "first": None}

    def report(stage: str, done: int, total: int) -> None:
        elapsed = clock() - started
        if stage == "ddpm":
            if state["first"] is None:
                state["first"] = (done, elapsed)
            share = done / total
            if share + 1e-9 >= state["next"] or done == total:
                state["next"] = share + PROGRESS_EVERY
                first_done, first_elapsed = state["first"]
                if done > first_done:
                    left = (elapsed - first_elapsed) / (done - first_done) * (total - done)
                    log.info("bootstrapping %s: DDPM step %d/%d (%.0f%%), %.0fs elapsed, about %.0fs left", name,
                             done, total, 100 * share, elapsed, left)
                else:
                    log.info("bootstrapping %s: DDPM step %d/%d, %.0fs elapsed (the time left follows once its pace "
                             "is known)", name, done, total, elapsed)
        elif stage == "judge" and done == total:
            log.info("bootstrapping %s: judge trained (%d epochs)", name, total)
        elif stage == "measure" and done == 0:
            log.info("bootstrapping %s: measuring what each class's samples look like to the judge", name)

    return report
