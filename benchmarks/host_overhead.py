"""Host time of one entflash attention call, where the GPU work is negligible (tiny shapes).

On a small problem the GPU can finish a call's kernels before the host has launched them; the call's wall time
is then the host's: argument checks, autograd, allocations and kernel launches. This script times that on the
device: calls queued back to back with one synchronize at the end (milliseconds per call), for the forward
alone (no grad), forward + backward (alpha = 1.5; a learnable per-head alpha, its values read by the call's check
or left unread: check_alpha=False) and a decoding step (entmax_attention_with_kvcache, one new token), then a
cProfile of forward + backward calls (top functions by own time).

    PYTHONPATH=src:. python3 -m benchmarks.host_overhead [--out DIR] [--profile-top 25]

writes host_overhead-<commit>.json (the figures, with device, torch/triton versions, commit and date as the
attention harness records them: benchmarks.report) and host_overhead-<commit>.txt (the cProfile and the figures),
file paths in both relative to the working directory. Run it twice with PYTHONPATH naming two source trees (and
ENTFLASH_COMMIT naming their commits) to compare them on the same machine.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the two files")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (host time only means something next to a GPU that outruns the host)")
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    grad_out = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    alpha_heads = torch.tensor([1.3, 1.6], device="cuda", requires_grad=True)

    def forward():
        entflash.entmax_attention(q, k, v, alpha=1.5, causal=True, backend="triton")

    def forward_backward(alpha=1.5, check_alpha=True):
        out = entflash.entmax_attention(*leaves, alpha=alpha, causal=True, backend="triton",
                                        check_alpha=check_alpha)
        inputs = leaves + ([alpha] if isinstance(alpha, torch.Tensor) else [])
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
    document.update(entflash_file=os.path.relpath(entflash.__file__),
                    fwd_ms=per_call_ms(forward, args.calls),
                    fwd_bwd_ms=per_call_ms(forward_backward, args.calls),
                    fwd_bwd_learned_alpha_ms=per_call_ms(lambda: forward_backward(alpha_heads), args.calls),
                    fwd_bwd_learned_alpha_unread_ms=per_call_ms(lambda: forward_backward(alpha_heads, False),
                                                                args.calls),
                    decode_step_ms=per_call_ms(decode_step, args.calls))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(100):
        forward_backward()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile_top)
    report = text.getvalue().replace(os.getcwd() + os.sep, "")
    report += "\n".join(f"{key:26s} {value:.4f}" if isinstance(value, float) else f"{key:26s} {value}"
                         for key, value in document.items() if key != "settings") + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"host_overhead-{document['commit']}"
    stem.with_suffix(".txt").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
