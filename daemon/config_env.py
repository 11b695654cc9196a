"""Environment overrides of the configuration: `UNLEARND__SECTION__KEY=value` set into the parsed config.toml before
it is validated (daemon/config.py `load`).

A value is read as a TOML value (a number, a boolean, a list...) when it parses as one, else as the text itself;
where the key wants text ("2024" as a group id), the text is put back after validation says so. Each level of the
name matches a key of the file in any case (a variable's name is upper case; a model's name may be in either).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

ENV_PREFIX = "UNLEARND__"

#: key path as set -> (variable name, raw value)
Overrides = dict[tuple[str, ...], tuple[str, str]]


def apply(data: dict[str, Any], environ: Mapping[str, str]) -> Overrides:
    """Set every UNLEARND__ variable into `data`. Raises ValueError for one that crosses a non-table value."""
    return {_set_path(data, key[len(ENV_PREFIX):].lower().split("__"), _parse_scalar(raw)): (key, raw)
            for key, raw in environ.items() if key.startswith(ENV_PREFIX)}


def retype_as_text(data: dict[str, Any], overrides: Overrides, errors: list[Any]) -> bool:
    """Where validation `errors` (pydantic's) say an overridden key wants text and got a TOML number, boolean or
    date, put the variable's text there instead. Returns whether anything changed (then validate again)."""
    retyped = [loc for e in errors if e["type"] in ("string_type", "path_type")
               and (loc := tuple(map(str, e["loc"]))) in overrides and not isinstance(_get_path(data, loc), str)]
    for loc in retyped:
        _set_path(data, list(loc), overrides[loc][1])
    return bool(retyped)


def source_of(loc: tuple[str, ...], overrides: Overrides) -> str:
    """' (from UNLEARND__...)' for an error at or under an overridden key, else ''."""
    names = [name for keys, (name, _) in overrides.items() if loc[:len(keys)] == keys]
    return f" (from {names[0]})" if names else ""


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> tuple[str, ...]:
    path = []
    for i, k in enumerate(keys):
        k = next((have for have in data if have.lower() == k.lower()), k)
        path.append(k)
        if i == len(keys) - 1:
            data[k] = value
            break
        data = data.setdefault(k, {})
        if not isinstance(data, dict):
            raise ValueError(f"environment override {'.'.join(keys)} crosses a non-table value")
    return tuple(path)


def _get_path(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        data = data[k]
    return data


def _parse_scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
