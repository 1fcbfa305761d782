"""Attention inputs with controlled structure, and the knob that sets how sparse entmax attention is on them.

q = noise + s * P,  k = noise + s * P,  v = noise, with unit-variance Gaussian noise and P (N, D) a positional
code shared by every batch entry and head: P_i = sqrt(2) * cos(w * i + phi) with w ~ N(0, 1/length^2) and
phi ~ U(0, 2 pi) per dimension, so P_i . P_j ~= D * exp(-(i - j)^2 / (2 length^2)). The strength s adds about
s^2 * sqrt(D) to the scores of nearby pairs: s = 0 is the dense setting (unstructured, ~0% block sparsity),
a large s makes attention local. Optional "sink" keys (the first `sinks` positions) get the same boost for
every query through a shared direction.

The knob is never the result: `calibrate_strength` searches the strength whose *measured* block sparsity
(benchmarks.sparsity, on a sample of query blocks of a small copy of the problem) is closest to a target, and
the harness then measures the sparsity of the full inputs exactly and reports that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from benchmarks.sparsity import block_sparsity

DEFAULT_LENGTH = 32.0  # tokens over which the positional code decorrelates
MAX_STRENGTH = 64.0
CALIBRATION_STEPS = 14
CALIBRATION_BLOCKS = 32


@dataclass
class AttentionInputs:
    """One problem's tensors, (B, H, N, D) each; dout is the upstream gradient for fwd+bwd timing."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor


def positional_code(num_positions: int, head_dim: int, length: float, generator: torch.Generator,
                    device) -> torch.Tensor:
    """(N, D) float32 code whose rows have squared norm ~D and dot products decaying with distance/length."""
    frequency = torch.randn(head_dim, generator=generator, dtype=torch.float64, device=device) / length
    phase = torch.rand(head_dim, generator=generator, dtype=torch.float64, device=device) * 2 * math.pi
    position = torch.arange(num_positions, dtype=torch.float64, device=device).view(-1, 1)
    return (math.sqrt(2.0) * torch.cos(position * frequency + phase)).float()


def make_inputs(batch: int, heads: int, num_positions: int, head_dim: int, *, strength: float,
                length: float = DEFAULT_LENGTH, sinks: int = 0, seed: int = 0, device="cpu",
                dtype: torch.dtype = torch.float32) -> AttentionInputs:
    """Random q, k, v, dout of shape (B, H, N, D) in `dtype`, plus the structured component of strength s.

    strength: 0 gives plain Gaussian inputs (dense attention); larger values make attention more local.
    length: decorrelation length of the positional code in tokens. sinks: number of leading sink keys.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    shape = (batch, heads, num_positions, head_dim)
    q, k, v, dout = (torch.randn(shape, generator=generator, device=device) for _ in range(4))
    if strength > 0:
        code = positional_code(num_positions, head_dim, length, generator, device)
        q.add_(code, alpha=strength)
        k.add_(code, alpha=strength)
        if sinks > 0:
            sink = torch.randn(head_dim, generator=generator, device=device)
            sink.mul_(math.sqrt(head_dim) / sink.norm())
            q.add_(sink, alpha=strength)
            k[:, :, :sinks].add_(sink, alpha=strength)
    return AttentionInputs(*(t.to(dtype) for t in (q, k, v, dout)))


def sample_blocks(num_positions: int, block_rows: int, count: int = CALIBRATION_BLOCKS):
    """`count` evenly spaced query-block indices (first and last included) out of ceil(N / block_rows)."""
    total = math.ceil(num_positions / block_rows)
    if total <= count:
        return list(range(total))
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def calibrate_strength(target: float, num_positions: int, head_dim: int, *, alpha=1.5, causal: bool = True,
                       tile=(64, 64), length: float = DEFAULT_LENGTH, sinks: int = 0, heads: int = 2,
                       seed: int = 12345, device="cpu", dtype: torch.dtype = torch.float32,
                       steps: int = CALIBRATION_STEPS, max_strength: float = MAX_STRENGTH) -> float:
    """The strength s whose sampled block sparsity at `tile` is closest to `target` (0 for target <= 0).

    Searches by bisection (sparsity grows with s) on a (1, heads, N, D) copy of the problem, measuring
    sparsity exactly on evenly spaced query blocks. Targets above what the shape allows (e.g. 95% for a
    short causal sequence, where the diagonal tiles alone are more than 5%) give the strongest s tried.
    """
    if target <= 0:
        return 0.0
    blocks = sample_blocks(num_positions, tile[0])

    def sampled_sparsity(strength: float) -> float:
        inputs = make_inputs(1, heads, num_positions, head_dim, strength=strength, length=length, sinks=sinks,
                             seed=seed, device=device, dtype=dtype)
        measured = block_sparsity(inputs.q, inputs.k, alpha=alpha, causal=causal, tiles=(tuple(tile),),
                                  query_blocks=blocks)
        return next(iter(measured.values()))

    low, high = 0.0, 1.0
    while high < max_strength and sampled_sparsity(high) < target:
        low, high = high, high * 2
    high = min(high, max_strength)
    for _ in range(steps):
        middle = (low + high) / 2
        if sampled_sparsity(middle) < target:
            low = middle
        else:
            high = middle
    return high

