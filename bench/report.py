"""How every benchmark hands back its result: the JSON (ending in its `summary`) on stdout, and in `--out`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict, out: Path | None, *, indent: int = 2, default: Any = str) -> dict:
    """Print `result` as JSON and write the same text to `out` (its folder created: a fresh clone has none)."""
    text = json.dumps(result, indent=indent, default=default)
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result
