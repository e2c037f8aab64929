"""Memory budgets: parse "16GiB" / "512MB", measure peaks on CUDA, format for humans.

Backends report ``memory_bytes(num_prompts, image_size)``; strategies compare it
with a budget parsed here. On CUDA a backend measures instead of extrapolating:
:class:`CudaPeakProfiler` runs the exact call once per key (device, dtype, input
size, mode, rows or contexts × batch) and caches the peak it needed above what
was already allocated. Elsewhere the number is an analytic estimate
(:mod:`promptopt.backends.memory_models`). Whatever the figure, a CUDA out-of-memory
error inside a step becomes a one-line :class:`BudgetError`
(:class:`out_of_memory_as_budget_error`).
"""

from __future__ import annotations

import math
import re
import traceback
from dataclasses import dataclass
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


def cuda_peak_increment(fn: Callable[[], object], device: torch.device | str = "cuda") -> int:
    """Peak CUDA memory ``fn()`` allocates above what was allocated when it started (bytes)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("cuda_peak_increment needs a CUDA device")
    torch.cuda.synchronize(device)
    before = int(torch.cuda.memory_allocated(device))
    return cuda_peak_bytes(fn, device) - before


#: Headroom on a profiled increment. The same call on the same input allocates the same tensors in
#: the same order, so its increment only moves with the allocator's block reuse: the caching
#: allocator hands out a cached block whole when it is less than 1 MiB larger than the request, so
#: each block alive at the peak may count up to 1 MiB more than when profiled — tens of MB on steps
#: of several GB. On the H100 the same SegGPT call measured in two process states differed by at
#: most 1 % (17 MB), and that was resident memory (other cached inputs), which the profiler adds
#: at the time of asking rather than through the margin.
PROFILE_MARGIN = 0.02


@dataclass(frozen=True)
class ProfileKey:
    """What a profiled peak depends on: device, dtype, input size, mode and the batch shape."""

    device: str
    dtype: str
    input_size: tuple[int, ...]
    mode: tuple[str, ...]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, device: torch.device | str, dtype: torch.dtype | str, input_size: tuple[int, ...],
           mode: str | tuple[str, ...], shape: int | tuple[int, ...]) -> "ProfileKey":
        """Normalise the parts: "cuda" and "cuda:0" name the same device, torch.float32 and "float32" the same dtype.

        ``shape`` is the row count of an inference call, or (contexts, batch) of a tuning step.
        """
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        dt = str(dtype).replace("torch.", "")
        try:
            size = tuple(int(v) for v in input_size)
            dims = (int(shape),) if isinstance(shape, int) else tuple(int(v) for v in shape)
        except (TypeError, ValueError):
            raise ValueError(f"profile key: input_size and shape must be integers, got {input_size!r}, {shape!r}") from None
        if not dims or min(dims) < 1 or not size or min(size) < 1:
            raise ValueError(f"profile key: input_size and shape must be positive, got {input_size!r}, {shape!r}")
        modes = (mode,) if isinstance(mode, str) else tuple(str(m) for m in mode)
        return cls(str(dev), dt, size, modes, dims)


class CudaPeakProfiler:
    """Measure-once cache of peak memory increments, one per :class:`ProfileKey`.

    :meth:`peak_bytes` runs ``fn`` the first time a key is asked for and keeps
    the peak it allocated above what was allocated before (the *increment*:
    the call's own tensors, independent of caches that grow later). Every
    answer is ``resident + increment × (1 + margin)`` with ``resident`` the
    memory allocated at the time of asking (weights and caches as they are
    now). ``measure`` and ``resident`` default to the CUDA allocator's
    counters; they are parameters so the caching logic runs anywhere.
    """

    def __init__(self, margin: float = PROFILE_MARGIN,
                 measure: Callable[[Callable[[], object], torch.device], int] = cuda_peak_increment,
                 resident: Callable[[torch.device], int] | None = None) -> None:
        if not margin >= 0:
            raise ValueError(f"profile margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self._measure = measure
        self._resident = resident if resident is not None else (lambda d: int(torch.cuda.memory_allocated(d)))
        self._increments: dict[ProfileKey, int] = {}
        #: how many times ``fn`` was profiled (cache misses)
        self.measurements = 0

    def __contains__(self, key: ProfileKey) -> bool:
        return key in self._increments

    def increment(self, key: ProfileKey, fn: Callable[[], object]) -> int:
        """The key's measured increment (bytes), profiling ``fn`` on the key's device if it is new."""
        if key not in self._increments:
            inc = int(self._measure(fn, torch.device(key.device)))
            if inc < 0:
                raise ValueError(f"profiled increment for {key} is negative ({inc}); was memory freed during the call?")
            self._increments[key] = inc
            self.measurements += 1
        return self._increments[key]

    def peak_bytes(self, key: ProfileKey, fn: Callable[[], object]) -> int:
        """Memory allocated now plus the key's increment with the margin (profiling ``fn`` on a miss)."""
        inc = self.increment(key, fn)
        return int(self._resident(torch.device(key.device))) + int(math.ceil(inc * (1.0 + self.margin)))

    def clear(self) -> None:
        self._increments.clear()


def _oom_types() -> tuple[type[BaseException], ...]:
    types = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):  # torch >= 2.5: the device-generic base class
        types.append(torch.OutOfMemoryError)
    return tuple(types)


class out_of_memory_as_budget_error:
    """Context manager: a CUDA out-of-memory error inside the block becomes a one-line :class:`BudgetError`.

    The message names the step, the estimated peak that was compared with the
    budget, and the budget::

        with out_of_memory_as_budget_error("forward selection step 3 (k=4)", estimate, budget):
            oracle.score(candidate)

    The frames of the failed step are cleared before the error propagates, so
    the tensors they held are freed and the caller can save its state (and the
    cached blocks are returned to the driver). Other exceptions pass through.
    """

    def __init__(self, step: str, estimate: int | None, budget: int | None) -> None:
        self.step = step
        self.estimate = estimate
        self.budget = budget

    def __enter__(self) -> "out_of_memory_as_budget_error":
        return self

    def message(self) -> str:
        budget = f"budget {format_bytes(self.budget)}" if self.budget is not None else "no memory budget set"
        return (f"out of GPU memory during {self.step}: estimated peak {format_bytes(self.estimate)}, {budget}; "
                "other processes may hold GPU memory: set --memory-budget to what is free, or lower k / the batch size")

    def __exit__(self, typ, value, tb) -> bool:
        if value is None or not isinstance(value, _oom_types()):
            return False
        traceback.clear_frames(tb)
        value.__traceback__ = None
        del tb, value
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise BudgetError(self.message()) from None
