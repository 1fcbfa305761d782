"""Time the forward's dense sweep alone (developer tool; official numbers: benchmarks/).

    PYTHONPATH=src python3 scripts/sweep_time.py TAG [MAXNREG]

Prints the median time (ms, triton.testing.do_bench) of kernels.sweep.dense_sweep on random bf16 inputs, causal,
alpha = 1.5, B * N = 16k tokens and H * D = 2048, (N, D) = (4096, 64), (16384, 64) and (16384, 128), with far key
tiles binning one score per row (far_scores=1, training's sweep) and two (far_scores=2, inference's), for whichever
entflash PYTHONPATH points at: run it once per tree (e.g. build/prev/src for a baseline) on one machine to compare.
MAXNREG caps the sweep's registers per thread (a launch experiment).
"""
import dataclasses
import sys

import torch
import triton
from entflash.kernels.forward import alpha_tensor
from entflash.kernels.launch import make_spec
from entflash.kernels.sweep import dense_sweep

tag = sys.argv[1]
cap = dict(maxnreg=int(sys.argv[2])) if len(sys.argv) > 2 else {}
for N, D in ((4096, 64), (16384, 64), (16384, 128)):
    B, H = 16384 // N, 2048 // D
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, N, D, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(B, H, N, D, device="cuda", generator=g).to(torch.bfloat16)
    a_t = alpha_tensor(1.5, H, q.device)
    spec = make_spec(q, k, 1.5, a_t, True, None, None, None)
    spec = dataclasses.replace(spec, sweep_launch=dict(spec.sweep_launch, **cap))
    for far in (1, 2):
        ms = triton.testing.do_bench(lambda: dense_sweep(q, k, a_t, D ** -0.5, spec, far_scores=far),
                                     warmup=50, rep=300, return_mode="median")
        print(f"sweep_time {tag} N={N} D={D} far={far} ms={ms:.3f}", flush=True)
