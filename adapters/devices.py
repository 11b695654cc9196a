"""Where a model runs and in which precision: the `device` and `dtype` keys of a model's configuration.

`device`: "auto" (the first CUDA GPU when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N".
`dtype`: "float32", "bfloat16" or "float16". Whatever creates a tensor for a model (engines, the detector's
encoder, serving) puts it on `device_of(model)`; nothing assumes the CPU.
"""

from __future__ import annotations

import re

import torch

DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(name: str) -> str:
    """`name` if it is a device this configuration understands, else ValueError (used by config validation)."""
    if not _DEVICE.match(name or ""):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a configured name; "cuda" without a usable GPU is an error, not a silent CPU."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {name!r} configured but torch sees no CUDA GPU (a CPU build of torch, or no driver)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} configured but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_dtype(name: str = "float32") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
