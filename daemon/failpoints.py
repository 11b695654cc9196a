"""Named crash points, so tests can kill the daemon at an exact step of a request and prove nothing is lost
or applied twice. Inert unless UNLEARND_FAILPOINT is set: ``UNLEARND_FAILPOINT=after_artifact`` makes the
process SIGKILL itself there; ``UNLEARND_FAILPOINT=before_engine:hang`` makes it stop and wait there for an
outside SIGKILL.

Points, in request order: before_engine (in the daemon, before the engine: a kill there is an outside kill),
in_engine (where the engine runs: in the daemon, or in its isolated child process for a request that was in hand at
a crash; a kill there is the engine itself dying), after_artifact (files durable, ledger not yet), after_ledger
(ledger committed, result not yet announced), before_offset_commit (results flushed, offset not committed).
"""

from __future__ import annotations

import os
import signal
import sys
import time

POINTS = ("before_engine", "in_engine", "after_artifact", "after_ledger", "before_offset_commit")


def hit(name: str) -> None:
    spec = os.environ.get("UNLEARND_FAILPOINT")
    if not spec:
        return
    point, _, mode = spec.partition(":")
    if point != name:
        return
    if mode == "hang":
        print(f"failpoint {name}: hanging", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
