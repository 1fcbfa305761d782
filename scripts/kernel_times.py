"""GPU time of each kernel of one entflash forward + backward, on the attention harness's inputs (developer tool;
official numbers: benchmarks/).

    PYTHONPATH=src:. python3 scripts/kernel_times.py 16384:0 32768:0 16384:0.6 [--d 64] [--full]

For each N:level (B * N = 16k tokens, H * D = 2048, bf16, alpha = 1.5, causal unless --full, the strength
calibrated to the 64x64 block sparsity `level` as benchmarks.attention does), runs three warm-up calls, then five
forward + backward calls under torch.profiler (benchmarks.host_overhead.kernel_device_ms) and prints each CUDA
kernel's device time per call (ms, largest first) and their total. Where a kernel's time grows faster than its
tiles (4x from N to 2N), that kernel is the one that scales badly.
"""
import argparse

import torch

import entflash
from benchmarks.attention import PRESETS
from benchmarks.host_overhead import kernel_device_ms
from benchmarks.inputs import calibrated_inputs

CALLS = 5


def kernel_times(seq_len: int, level: float, head_dim: int, causal: bool):
    """[(kernel name, device ms per call, launches per call)], largest first."""
    batch, heads = PRESETS["paper"].shape(seq_len, head_dim)
    inputs, _ = calibrated_inputs(batch, heads, seq_len, head_dim, level, causal=causal, dtype=torch.bfloat16,
                                  device="cuda")
    leaves = [t.detach().requires_grad_() for t in (inputs.q, inputs.k, inputs.v)]

    def forward_backward():
        out = entflash.entmax_attention(*leaves, alpha=1.5, causal=causal, backend="triton")
        out.backward(inputs.dout)

    return kernel_device_ms(forward_backward, CALLS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="N:level, e.g. 16384:0 (dense) or 32768:0.6")
    parser.add_argument("--d", type=int, default=64, help="head dim")
    parser.add_argument("--full", action="store_true", help="non-causal attention")
    args = parser.parse_args()
    for case in args.cases:
        n, level = case.split(":")
        rows = kernel_times(int(n), float(level), args.d, not args.full)
        print(f"== N={n} D={args.d} level={level} {'non-causal' if args.full else 'causal'}: "
              f"total {sum(ms for _, ms, _ in rows):.3f} ms per call")
        for name, ms, launches in rows[:12]:
            print(f"  {ms:8.3f} ms  x{launches}  {name[:70]}")


if __name__ == "__main__":
    main()
