"""`make test` installs what tests/deploy needs by running deploy/ci/install-tools.sh: on a machine without the
tools where it cannot install them (not root), it stops with the exact command to run instead of failing later."""

from __future__ import annotations

import os
import shutil
import subprocess

from deploy_helpers import DEPLOY, ROOT

SCRIPT = DEPLOY / "ci" / "install-tools.sh"


def test_make_test_runs_the_tool_installer():
    makefile = (ROOT / "Makefile").read_text()
    assert "test: install deploy-tools" in makefile and "bash deploy/ci/install-tools.sh" in makefile


def test_without_tools_and_root_it_prints_the_command_to_run(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with none of the tools (and no apt-get)
    bin_dir.mkdir()
    for tool in ("id",):
        os.symlink(shutil.which(tool), bin_dir / tool)
    cmd = [shutil.which("bash"), str(SCRIPT)]
    if os.geteuid() == 0:  # run it as an unprivileged user, as a developer would
        cmd = [shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    out = subprocess.run(cmd, env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1, out
    assert "prometheus kubernetes-client systemd" in out.stderr
    assert "sudo bash deploy/ci/install-tools.sh" in out.stderr
