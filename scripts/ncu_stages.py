"""Launch each fused kernel once, for Nsight Compute to profile (developer tool; it times nothing itself).

    ncu --clock-control none -k regex:'_sweep_kernel|_solve|_output|_dkdv|_dq_kernel|flash_' -c 16 \
        --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
        --section Occupancy --section LaunchStats python3 scripts/ncu_stages.py --n 16384 --d 64 --local 0

On the inputs of scripts/kernel_dev.py (B * N = 16k tokens, H * D = 2048, causal, bf16; `--local` strength of
the shared positional code, 0 = dense attention), it runs, in this order: entflash's training forward and
backward at the fixed alpha (--alpha, default 1.5), the same with a learnable per-head alpha tensor (skipped
with --no-learned), then FlashAttention-2's forward and backward (SDPA flash backend). Between the groups
it synchronizes, so the profiler's kernel list reads in that order. Each kernel runs once: Triton compiles
on the host before a kernel's first launch, so the launch profiled is already the compiled kernel.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_dev import local_inputs  # noqa: E402  (same inputs as the stage timings)


def run_once(q, k, v, alpha, causal):
    """One training forward and backward of entflash (fused backend) on fresh leaf copies of q, k, v."""
    import entflash

    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = entflash.entmax_attention(qq, kk, vv, alpha=alpha, causal=causal, backend="triton")
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()


def run_fa2(q, k, v, causal):
    """One forward and backward of SDPA's FlashAttention-2 backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--local", type=float, default=0.0)
    ap.add_argument("--alpha", type=float, default=1.5)
    ap.add_argument("--noncausal", action="store_true")
    ap.add_argument("--no-learned", action="store_true")
    args = ap.parse_args()
    N, D = args.n, args.d
    B, H = max(1, 16384 // N), 2048 // D
    causal = not args.noncausal
    q, k, v = local_inputs(B, H, N, D, args.local, seed=N + D)
    learned = torch.full((H,), args.alpha, device="cuda", requires_grad=True)
    groups = [lambda: run_once(q, k, v, args.alpha, causal)]
    if not args.no_learned:
        groups.append(lambda: run_once(q, k, v, learned, causal))
    groups.append(lambda: run_fa2(q, k, v, causal))
    for group in groups:
        group()
    print(f"ncu_stages: N={N} D={D} B={B} H={H} causal={causal} local={args.local} alpha={args.alpha} done")


if __name__ == "__main__":
    main()
