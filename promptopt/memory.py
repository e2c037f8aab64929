"""Memory budgets: parse "16GiB" / "512MB", measure peaks on CUDA, format for humans.

Backends report ``memory_bytes(num_prompts, image_size)``; strategies compare it
with a budget parsed here. On CUDA a backend can profile real peaks with
:func:`cuda_peak_bytes`; elsewhere its number is an analytic estimate, and the
backend's docstring says so.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from .errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_bytes(value: str | int | float | None) -> int | None:
    """"16GiB" → 17179869184, "512MB" → 512000000, 1024 → 1024, None → None.

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB,
    GiB, TiB) powers of 1024, as in the SI/IEC conventions.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise BudgetError(f"memory budget {value!r} is not a size")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise BudgetError(f"memory budget must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(
            f"cannot read memory budget {value!r}; write a number of bytes or a size such as 512MB, 8GiB or 16GB"
        )
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise BudgetError(f"memory budget must be positive, got {value!r}")
    return int(n)


def format_bytes(n: int | float | None) -> str:
    """1536 → "1.5 KiB" (binary units, as GPU tools show memory)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cuda") -> int:
    """Peak CUDA memory allocated while ``fn()`` runs (weights already resident included)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("cuda_peak_bytes needs a CUDA device")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))
