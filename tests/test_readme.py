"""The README a newcomer reads on a fresh clone: its links point inside the clone, the benchmark files it names as
the figures' sources are committed and well-formed, and the torch it says `make install` picks is the one here."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_relative_links_resolve_inside_the_repository():
    targets = re.findall(r"\]\((?!https?://|#)([^)\s]+)\)", README)
    missing = [t for t in targets if not (REPO / t.split("#")[0]).resolve().is_relative_to(REPO)
               or not (REPO / t.split("#")[0]).exists()]
    assert not missing, f"README links outside the clone or to nothing: {missing}"
    assert "../shared" not in README


def test_benchmark_sources_named_in_the_readme_are_committed():
    named = set(re.findall(r"bench/results/(\w+)\.json", README))
    committed = set(subprocess.run(["git", "ls-files", "bench/results"], cwd=REPO, capture_output=True, text=True,
                                   check=True).stdout.split())
    present = {Path(f).stem for f in committed if f.endswith(".json")}
    assert {"daemon", "classifier"} <= present
    for name in present:
        result = json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())
        assert list(result)[-1] == "summary", name
    assert named, "the README names no bench/results file"


def test_installed_torch_is_the_pinned_cpu_build():
    import torch

    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r"^TORCH\s*\?=\s*torch==(\S+)$", makefile, re.M).group(1)
    assert pinned.endswith("+cpu") and pinned.split("+")[0] in (REPO / "pyproject.toml").read_text()
    assert torch.__version__ == pinned and torch.version.cuda is None
