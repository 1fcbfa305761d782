"""entflash's own host time per attention call, with every Triton launch replaced by a no-op (developer tool, runs on
a CPU; official numbers: benchmarks/, and benchmarks.host_overhead for the whole host time next to a GPU).

    TRITON_INTERPRET=1 PYTHONPATH=src python3 scripts/host_python_time.py [--calls 300] [--profile-top 0]

On a GPU machine a small problem's wall time is the host's (benchmarks.host_overhead): entflash's Python (argument
checks, launch plans, allocations, tensor descriptors), autograd, and Triton's launch path for each kernel. This
script measures the first two on the CPU: under the Triton interpreter, with the interpreter's kernel runner
patched out, a call does all of its host work except running kernels. It prints milliseconds per call (median
of 5 rounds of --calls calls) for a bf16 inference forward and a forward + backward (B=1, H=2, N=128, D=64, causal,
alpha = 1.5; the descriptors are built as on an H100, since the interpreter plans TMA too), the launches per call,
and with --profile-top a cProfile of forward + backward calls (top functions by own time). Run it on two trees
(PYTHONPATH) on one machine to compare; the figures are this CPU's, not a GPU host's.
"""
import argparse
import cProfile
import os
import pstats
import statistics
import time
import warnings

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    raise SystemExit("host_python_time: set TRITON_INTERPRET=1 (the launches it patches out are the interpreter's)")

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import entflash  # noqa: E402

launches = 0


def _no_launch(self, *args, grid, warmup, **kwargs):
    """InterpretedFunction.run without running the kernel: counts the launch."""
    global launches
    launches += 1


InterpretedFunction.run = _no_launch


def per_call_ms(fn, calls: int) -> float:
    """Median over 5 rounds of the wall milliseconds per call of `calls` calls of fn."""
    for _ in range(10):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile-top", type=int, default=0, help="print a cProfile's top N functions (0: none)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the kernels never run: nothing they would warn about is real
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, generator=generator).to(torch.bfloat16) for _ in range(3))
    grad_out = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def forward():
        with torch.no_grad():
            entflash.entmax_attention(q, k, v, alpha=1.5, causal=True, backend="triton")

    def forward_backward():
        out = entflash.entmax_attention(*leaves, alpha=1.5, causal=True, backend="triton")
        torch.autograd.grad(out, leaves, grad_out)

    global launches
    for name, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        ms = per_call_ms(fn, args.calls)
        launches = 0
        fn()
        print(f"{name:8s} {ms:.3f} ms per call, {launches} launches")
    if args.profile_top:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            forward_backward()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile_top)


if __name__ == "__main__":
    main()
