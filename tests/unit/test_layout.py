"""The house rules docs/architecture.md states, checked on the source: which package may import which, and small
modules in the served packages."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVED = ("daemon", "adapters", "detector")
MAX_LINES = 400


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Top-level package names a module imports, at any depth of the file (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_served_packages_never_import_the_benchmarks_or_the_tests():
    offenders = {str(p.relative_to(REPO)): sorted(_imported(p) & {"bench", "tests"})
                 for package in SERVED for p in _modules(package) if _imported(p) & {"bench", "tests"}}
    assert not offenders, offenders


def test_the_engines_and_the_router_never_import_the_service():
    offenders = [str(p.relative_to(REPO)) for package in ("adapters", "detector") for p in _modules(package)
                 if "daemon" in _imported(p)]
    assert not offenders, offenders


def test_served_modules_stay_small():
    sizes = {str(p.relative_to(REPO)): n for package in SERVED for p in _modules(package)
             if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not sizes, f"modules over {MAX_LINES} lines: {sizes}"


def test_every_model_kind_has_its_own_engine_folder():
    for kind in ("classifier", "lm", "diffusion", "images"):
        assert (REPO / "adapters" / kind / "__init__.py").is_file(), kind
