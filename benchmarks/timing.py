"""The one timing helper every benchmark uses.

- `device_sync(device)`: a function that waits for queued GPU work (a no-op on CPU),
  so a timer measures the work and not just its launch.
- `timed(fn, ...)`: seconds of one call, over `repeats` calls after a warm-up,
  reduced by the median (or min, the best-of-N, on a noisy shared machine).
- `timed_alternating({name: fn}, ...)`: the same for several sides measured in turns
  (a, b, b, a, a, b, ...), so a neighbour that slows the machine slows every side alike
  and the ratio stays honest.
- `alternating({name: fn}, ...)`: the same turns for sides that time themselves (each call
  returns its own seconds, e.g. the decode steps after a prefill that is not to be counted).
- `peak_memory(step, device)`: the peak memory one call adds above the level at entry: the
  bytes torch's allocator holds (`PeakAllocated`, exact: on CUDA its counters, on CPU every
  allocation and free the profiler records) and, on CPU, the resident set (`PeakRSS`, sampled
  every millisecond: what the operating system sees, allocator caches and libraries included).
- `profile_split({name: step}, ...)`: where one call of each side spends its time, from
  torch.profiler: the matrix multiplies (the same arithmetic on every side) against the rest.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

import torch

__all__ = ["device_sync", "timed", "timed_alternating", "alternating", "PeakAllocated", "PeakRSS",
           "peak_memory", "GEMM_OPS", "profile_split", "print_profile_split"]

# The matrix-multiply kernels: what a forward and backward through frozen Linears cost on any side.
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")


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
    def self_timed(fn):
        def call():
            sync()
            t = clock()
            fn()
            sync()
            return clock() - t
        return call
    return alternating({name: self_timed(fn) for name, fn in fns.items()}, repeats, warmup=warmup, reduce=reduce)


def alternating(fns: dict[str, Callable[[], float]], repeats: int, *, warmup: bool = True,
                reduce: Callable = statistics.median) -> dict[str, float]:
    """`reduce` over `repeats` calls of each side, in turns (the order flips every round);
    each call returns the seconds it measured itself."""
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
    samples = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            samples[name].append(fns[name]())
    return {name: reduce(t) for name, t in samples.items()}


# ---- memory ----------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_of(events: list[tuple[int, int]]) -> int:
    """The highest running total of (time, +bytes allocated / -bytes freed) events, from 0."""
    total = peak = 0
    for _, nbytes in sorted(events):
        total += nbytes
        peak = max(peak, total)
    return peak


class PeakAllocated:
    """Peak bytes torch's allocator holds above the level at entry, exactly: on CUDA from its
    counters, on CPU from every allocation and free the profiler records."""

    def __init__(self, device):
        self.device, self.peak = torch.device(device), 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.profiler.__exit__(*exc)
            events = self.profiler.profiler.kineto_results.events()
            self.peak = peak_of([(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"])


class PeakRSS:
    """Peak resident set above the level at entry, sampled every millisecond (CPU): what the
    operating system sees, the allocator's caches and the libraries' own buffers included."""

    def __init__(self):
        self.peak = 0

    def __enter__(self):
        self.start, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes() - self.start)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def peak_memory(step: Callable[[], object], device) -> dict[str, int]:
    """Peak bytes one call of `step` adds: {"allocated": ...} and on CPU also {"rss": ...},
    each from its own call: the resident set first, before the profiler's records (which
    `PeakAllocated` needs on CPU) have touched the heap."""
    out = {}
    if torch.device(device).type != "cuda":
        with PeakRSS() as rss:
            step()
        out["rss"] = rss.peak
    with PeakAllocated(device) as alloc:
        step()
    return {"allocated": alloc.peak, **out}


def profile_split(fns: dict[str, Callable[[], object]], top: int = 5) -> dict[str, dict]:
    """One profiled call of each side (after a warm-up call): its total self time, the part spent in the
    matrix multiplies (GEMM_OPS), and the `top` other operators by self time, all in seconds."""
    from torch.profiler import ProfilerActivity, profile
    out = {}
    for name, fn in fns.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        gemm = sum(v for k, v in ops.items() if k in GEMM_OPS)
        rest = sorted(((k, v) for k, v in ops.items() if k not in GEMM_OPS), key=lambda kv: -kv[1])
        out[name] = {"total": sum(ops.values()), "gemm": gemm, "top_rest": rest[:top]}
    return out


def print_profile_split(split: dict[str, dict], target: float = 1.2) -> None:
    """The profile_split table, and what the first side's non-GEMM time would have to be for `target`x."""
    print("\nprofile of one step (torch.profiler self CPU time, s):")
    print(f"{'':12s}{'total':>8s}{'GEMM':>8s}{'rest':>8s}   largest of the rest")
    for name, s in split.items():
        rest = ", ".join(f"{k.replace('aten::', '')} {v:.2f}" for k, v in s["top_rest"][:4])
        print(f"{name:12s}{s['total']:8.2f}{s['gemm']:8.2f}{s['total'] - s['gemm']:8.2f}   {rest}")
    (a, sa), (b, sb) = list(split.items())[:2]
    need = sb["total"] / target - sa["gemm"]
    print(f"for {target}x {b}'s step, {a}'s non-GEMM time would have to be {need:.2f} s "
          f"(it is {sa['total'] - sa['gemm']:.2f} s), with its GEMMs unchanged at {sa['gemm']:.2f} s")
