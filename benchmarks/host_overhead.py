"""Host time of one entflash attention call, where the GPU work is negligible (tiny shapes).

On a small problem the GPU can finish a call's kernels before the host has launched them; the call's wall time
is then the host's: argument checks, autograd, allocations and kernel launches. This script times that on the
device: calls queued back to back with one synchronize at the end (milliseconds per call), for the forward
alone (no grad), forward + backward (alpha = 1.5; a per-head alpha tensor without a gradient, left unread; a
learnable per-head alpha, its values read by the call's check or left unread: check_alpha=False) and a decoding
step (entmax_attention_with_kvcache, one new token); then the GPU time of each call's kernels (torch.profiler, the
sum of the kernels' own device time: where it is far below the wall time, the call is host-bound) and cProfiles of
forward + backward calls with alpha = 1.5 and with the learnable alpha left unread (top functions by own time).

    PYTHONPATH=src:. python3 -m benchmarks.host_overhead [--out DIR] [--profile-top 25]

writes host_overhead-<commit>.json (the figures, with device, torch/triton versions, commit and date as the
attention harness records them: benchmarks.report) and host_overhead-<commit>.txt (the cProfile and the figures),
file paths in both relative to the working directory. Run it twice with PYTHONPATH naming two source trees (and
ENTFLASH_COMMIT naming their commits) to compare them on the same machine.

    PYTHONPATH=src:. python3 -m benchmarks.host_overhead --cases 4096:64:causal:0.9 4096:64:full:0.97 [--out DIR]

instead asks whether the attention harness's own cases are host-bound: for each N:D:causal|full:level it builds
the harness's inputs (benchmarks.attention.run_case: B * N = 16k tokens, H * D = 2048, bf16, the strength
calibrated to the level) and times entflash's forward and forward + backward, the harness's callables, four ways:
triton's do_bench median with the --paper preset's settings (5 ms warm-up, 20 ms of repetitions) and with ten times
longer ones, the host's time to queue one call (20 calls without a synchronize, while the GPU still works through
them), and the GPU time of one call's kernels (torch.profiler). Where the host's time comes near the kernels', the
harness's ratio depends on the machine's CPU. Writes host_bound-<commit>.json.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path

import torch

import entflash
from benchmarks.measure import host_queue_ms
from benchmarks.report import new_document


def per_call_ms(fn, calls: int) -> float:
    """Wall milliseconds per call of fn over `calls` back-to-back calls (one synchronize at the end)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def kernel_device_ms(fn, calls: int = 20):
    """[(kernel name, device milliseconds per call, launches per call)] of the CUDA kernels fn runs, largest first,
    from torch.profiler over `calls` calls (after three unprofiled ones)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(event.key, event.self_device_time_total / calls / 1e3, event.count // calls)
            for event in profile.key_averages()
            if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0]
    return sorted(rows, key=lambda row: -row[1])


def gpu_kernel_ms(fn, calls: int = 20) -> float:
    """GPU milliseconds per call of fn: the device time of the CUDA kernels it runs, from torch.profiler."""
    return sum(ms for _, ms, _ in kernel_device_ms(fn, calls))


def cprofile_report(fn, calls: int, top: int) -> str:
    """cProfile of `calls` calls of fn (then a synchronize): the top functions by own time, as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def harness_case_timings(spec: str) -> dict:
    """The four timings of the module docstring for one harness case "N:D:causal|full:level"."""
    from triton.testing import do_bench

    from benchmarks.attention import PRESETS, _callables
    from benchmarks.impls import Case, all_implementations
    from benchmarks.inputs import calibrated_inputs

    try:
        n, d, mask, level = spec.split(":")
        seq_len, head_dim, level, causal = int(n), int(d), float(level), {"causal": True, "full": False}[mask]
    except (ValueError, KeyError):
        raise SystemExit(f"--cases: expected N:D:causal|full:level, e.g. 4096:64:causal:0.9, got {spec!r}")
    (batch, heads), dtype = PRESETS["paper"].shape(seq_len, head_dim), torch.bfloat16
    inputs, strength = calibrated_inputs(batch, heads, seq_len, head_dim, level, causal=causal, dtype=dtype,
                                         device="cuda")
    case = Case(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, causal=causal, alpha=1.5,
                target_sparsity=level, strength=strength, device="cuda", dtype=dtype)
    calls, grads = _callables(all_implementations()["ours"], case, inputs)
    record = dict(case=spec, batch=batch, heads=heads, strength=strength)
    for mode, fn in calls.items():
        for name, warmup, rep in (("do_bench_paper_ms", 5, 20), ("do_bench_long_ms", 50, 200)):
            record[f"{mode}_{name}"] = float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads,
                                                       return_mode="median"))
        record[f"{mode}_host_queue_ms"] = host_queue_ms(fn, "cuda", calls=20)
        record[f"{mode}_gpu_kernel_ms"] = gpu_kernel_ms(fn)
        print(spec, mode, " ".join(f"{key[len(mode) + 1:]} {value:.3f}" for key, value in record.items()
                                   if key.startswith(mode + "_")), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the two files")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--cases", nargs="*", default=[],
                        help="harness cases N:D:causal|full:level to time four ways instead (module docstring)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (host time only means something next to a GPU that outruns the host)")
    if args.cases:
        document = new_document("cuda", "host_bound", "none", {"cases": args.cases})
        document["records"] = [harness_case_timings(spec) for spec in args.cases]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"host_bound-{document['commit']}.json").write_text(json.dumps(document, indent=1) + "\n")
        return
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    grad_out = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    alpha_heads = torch.tensor([1.3, 1.6], device="cuda", requires_grad=True)
    alpha_fixed_heads = alpha_heads.detach().clone()  # the same values without a gradient

    def forward():
        entflash.entmax_attention(q, k, v, alpha=1.5, causal=True, backend="triton")

    def forward_backward(alpha=1.5, check_alpha=True):
        out = entflash.entmax_attention(*leaves, alpha=alpha, causal=True, backend="triton",
                                        check_alpha=check_alpha)
        inputs = leaves + ([alpha] if isinstance(alpha, torch.Tensor) and alpha.requires_grad else [])
        torch.autograd.grad(out, inputs, grad_out)

    # one decoding step: a query per sequence against a 128-slot cache holding 100 tokens, appending one
    k_cache, v_cache = k.clone(), v.clone()
    step_q, step_k, step_v = q[:, :, :1], k[:, :, :1], v[:, :, :1]
    cache_seqlens = torch.tensor([100], device="cuda", dtype=torch.int32)

    def decode_step():
        entflash.entmax_attention_with_kvcache(step_q, k_cache, v_cache, cache_seqlens, k_new=step_k,
                                               v_new=step_v, alpha=1.5, backend="triton")

    document = new_document("cuda", "host_overhead", "none", {"calls": args.calls,
                                                                "shape": "B=1 H=2 N=128 D=64 bf16 causal"})
    del document["records"]
    calls = {"fwd": forward, "fwd_bwd": forward_backward,
             "fwd_bwd_alpha_heads_unread": lambda: forward_backward(alpha_fixed_heads, False),
             "fwd_bwd_learned_alpha": lambda: forward_backward(alpha_heads),
             "fwd_bwd_learned_alpha_unread": lambda: forward_backward(alpha_heads, False),
             "decode_step": decode_step}
    document.update(entflash_file=os.path.relpath(entflash.__file__))
    document.update({f"{name}_ms": per_call_ms(fn, args.calls) for name, fn in calls.items()})
    try:
        document.update({f"{name}_gpu_kernel_ms": gpu_kernel_ms(fn) for name, fn in calls.items()})
    except Exception as err:  # the profiler's API moves between torch versions: record why, keep the wall times
        document["gpu_kernel_ms_error"] = f"{type(err).__name__}: {err}"
    report = "".join(f"cProfile, 100 calls of {name}:\n" + cprofile_report(calls[name], 100, args.profile_top)
                     for name in ("fwd_bwd", "fwd_bwd_learned_alpha_unread"))
    report = report.replace(os.getcwd() + os.sep, "")
    report += "\n".join(f"{key:26s} {value:.4f}" if isinstance(value, float) else f"{key:26s} {value}"
                         for key, value in document.items() if key != "settings") + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"host_overhead-{document['commit']}"
    stem.with_suffix(".txt").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
