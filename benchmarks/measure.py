"""Timing, first-call time and peak memory of one callable, on CUDA or CPU.

CUDA: the median of `triton.testing.do_bench` (device events, L2 flushed between calls, grads reset).
CPU: the median of a few wall-clock calls (CPU mode only checks the harness; its times mean little).
Peak memory: torch.cuda.max_memory_allocated during one call, minus what was allocated before it.
Host time (CUDA): how long the host takes to queue one call while the GPU works through earlier ones; a call whose
host time comes near its median time is host-bound, and its time then depends on the machine's CPU.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class BenchSettings:
    """do_bench budgets in milliseconds (CUDA) and the number of calls timed on CPU."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_reps: int = 3


def synchronize(device: str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def first_call(fn: Callable[[], object], device: str) -> float:
    """Wall seconds of one synchronized call: the first call also pays JIT compilation and autotuning."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# a call's host time at or above this fraction of its median time marks it host-bound (report.markdown_table)
HOST_BOUND_FRACTION = 0.9


def host_queue_ms(fn: Callable[[], object], device: str, calls: int = 10) -> Optional[float]:
    """Host milliseconds to queue one call of fn (None on CPU): one call and a synchronize, then `calls` calls
    back to back timed without one (the GPU may still be running them), then a synchronize. A call that
    synchronizes inside (reads a value back) counts its GPU time here too."""
    if not device.startswith("cuda"):
        return None
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed / calls * 1e3


def peak_memory_gib(fn: Callable[[], object], device: str) -> Optional[float]:
    """GiB the call allocates at its peak above what was allocated before it (None on CPU)."""
    if not device.startswith("cuda"):
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def median_ms(fn: Callable[[], object], device: str, settings: BenchSettings,
              grad_to_none: Optional[List[torch.Tensor]] = None) -> float:
    """Median milliseconds per call of fn."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=settings.warmup_ms, rep=settings.rep_ms, grad_to_none=grad_to_none,
                              return_mode="median"))
    times = []
    for _ in range(settings.cpu_reps):
        if grad_to_none:
            for tensor in grad_to_none:
                tensor.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
