"""The one timing helper every benchmark uses.

- `device_sync(device)`: a function that waits for queued GPU work (a no-op on CPU),
  so a timer measures the work and not just its launch.
- `timed(fn, ...)`: seconds of one call, over `repeats` calls after a warm-up,
  reduced by the median (or min, the best-of-N, on a noisy shared machine).
- `timed_alternating({name: fn}, ...)`: the same for several sides measured in turns
  (a, b, b, a, a, b, ...), so a neighbour that slows the machine slows every side alike
  and the ratio stays honest.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["device_sync", "timed", "timed_alternating"]


def device_sync(device) -> Callable[[], None]:
    device = torch.device(device)
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None, *,
          warmup: bool = True, reduce: Callable = statistics.median, clock: Callable[[], float] = time.perf_counter
          ) -> float:
    """Seconds per call of fn: `reduce` (median by default) over `repeats` timed calls."""
    if warmup:
        fn()
        sync()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        sync()
        times.append(clock() - t)
    return reduce(times)


def timed_alternating(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None, *,
                      warmup: bool = True, reduce: Callable = statistics.median,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per call of each side, timed in turns; the order flips every round."""
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
        sync()
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            sync()
            t = clock()
            fns[name]()
            sync()
            times[name].append(clock() - t)
    return {name: reduce(t) for name, t in times.items()}
