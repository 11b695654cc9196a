"""The artifact store shared by several processes (replicas on one volume): start-up cleaning removes what dead
writers left in the staging area and never a live writer's files (real processes, real flock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from adapters.store import ArtifactStore

LONG_AGO = time.time() - 3600

WRITER = """
import sys, time
from adapters.store import ArtifactStore
store = ArtifactStore(sys.argv[1])
scratch = store.scratch_dir("isolated")
(scratch / "half-written").write_bytes(b"x")
print(scratch, flush=True)
time.sleep(600)
"""


def _writer(root: Path) -> tuple[subprocess.Popen, Path]:
    """Another process with a write in progress in the store: (process, its scratch directory)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def _age(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (LONG_AGO, LONG_AGO))


def test_a_live_replicas_write_survives_another_replicas_start_and_a_dead_ones_is_removed(tmp_path):
    proc, scratch = _writer(tmp_path)
    try:
        own_dir = scratch.parent
        lock = Path(f"{own_dir}.lock")
        _age(own_dir, lock)  # old enough that only the lock tells the writer is alive
        starting = ArtifactStore(tmp_path)
        assert starting.clean_staging() == 0
        assert (scratch / "half-written").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert starting.clean_staging() == 1
    assert not own_dir.exists() and not lock.exists()


def test_a_fresh_lock_and_a_recent_legacy_entry_are_left_alone_an_old_legacy_entry_goes(tmp_path):
    proc, scratch = _writer(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    legacy_new = tmp_path / ".staging" / "digits.versions.v0003.1234abcd"
    legacy_old = tmp_path / ".staging" / "digits.versions.v0002.5678abcd"
    legacy_new.mkdir()
    legacy_old.mkdir()
    _age(legacy_old)
    store = ArtifactStore(tmp_path)
    assert store.clean_staging() == 1  # the old legacy entry; the dead writer's lock file is too young to judge
    assert legacy_new.exists() and not legacy_old.exists() and scratch.exists()
    _age(Path(f"{scratch.parent}.lock"))
    assert store.clean_staging() == 1 and not scratch.parent.exists()


def test_a_store_cleans_around_its_own_write_and_close_gives_it_up(tmp_path):
    store = ArtifactStore(tmp_path)
    mine = store.scratch_dir("isolated")
    _age(mine.parent, Path(f"{mine.parent}.lock"))
    assert store.clean_staging() == 0 and mine.exists()
    artifact = store.publish("m", "versions", "v0001", lambda d: (d / "w.bin").write_bytes(b"w"))
    assert artifact.path.is_dir() and store.verify("m", "versions", "v0001")
    store.close()
    assert list((tmp_path / ".staging").iterdir()) == []
