"""A full disk pauses the daemon and fails nothing: a real small filesystem, filled for real.

The daemon runs in its own mount namespace (`unshare`) with a 16 MiB tmpfs as its state directory; the test fills
that filesystem through /proc/<pid>/root until writes fail with ENOSPC, then frees it.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from tests.harness import fill_filesystem, request

SMALL_DISK = ('mount -t tmpfs -o size=16m tmpfs "$1" && cp -a "$2"/. "$1"/ && shift 2 && exec "$@"')


def small_disk_prefix(state, template) -> tuple[str, ...]:
    return ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", SMALL_DISK, "unlearnd-small-disk",
            str(state), str(template))


def _namespaces_work(mount_point) -> bool:
    mount_point.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f'mount -t tmpfs -o size=1m tmpfs "{mount_point}"'], capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_pauses_the_daemon_and_fails_nothing(stack, tmp_path):
    if shutil.which("unshare") is None or not _namespaces_work(tmp_path / "probe"):
        pytest.skip("needs unshare with user and mount namespaces (util-linux) to mount a small tmpfs")
    template = stack.root / "state-template"
    shutil.copytree(stack.state, template)
    proc = stack.start(prefix=small_disk_prefix(stack.state, template), UNLEARND__REQUESTS__TRANSIENT_BACKOFF_MAX_S="1")
    stack.publish(request("before-full", sample_ids=[1]))
    assert stack.results(1, request_id="before-full")[0]["status"] == "applied"

    filler = f"/proc/{proc.pid}/root{stack.state}/filler"
    assert fill_filesystem(filler) > 0
    stack.publish(request("while-full-1", sample_ids=[2]))
    stack.publish(request("while-full-2", sample_ids=[3]))
    stack.wait_metric("unlearnd_paused", 1.0, timeout=60, proc=proc, reason="disk_full")
    time.sleep(3)  # several retries against the full disk
    assert proc.poll() is None
    assert not stack.results(10, timeout=2, request_id="while-full-1")  # waiting, not failed

    subprocess.run(["rm", "-f", filler], check=True)
    for rid in ("while-full-1", "while-full-2"):
        [result] = stack.results(1, request_id=rid, timeout=60)
        assert result["status"] == "applied", result
    stack.wait_metric("unlearnd_paused", 0.0, timeout=30, reason="disk_full")
    assert stack.metric("unlearnd_transient_errors_total", kind="disk_full") >= 2
    assert "Traceback" not in stack.log()
