"""Attention inputs with controlled structure, and the knob that sets how sparse entmax attention is on them.

q = noise + s * P,  k = noise + s * P,  v = noise, with unit-variance Gaussian noise and P (N, D) a rotary-style
positional code shared by every batch entry and head (cos/sin pairs at random frequencies w ~ N(0, 1/length^2)),
so P_i . P_j ~= D * exp(-(i - j)^2 / (2 length^2)), exactly D at i = j. The strength s adds about
s^2 * sqrt(D) to the scores of nearby pairs: s = 0 is the dense setting (unstructured, ~0% block sparsity),
a large s makes attention local. Optional "sink" keys (the first `sinks` positions) get the same boost for
every query through a shared direction.

The knob is never the result: `calibrate_strength` searches the strength whose *measured* block sparsity
(benchmarks.sparsity, on evenly spaced query blocks of the first heads of the very tensors benchmarked) is
closest to a target, and the harness then measures the sparsity of the full inputs exactly and reports that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from benchmarks.sparsity import block_sparsity

DEFAULT_LENGTH = 16.0  # tokens over which the positional code decorrelates
MAX_STRENGTH = 8.0  # logits up to ~s^2 sqrt(D) = 64 sqrt(D): sane for bf16; higher only adds rounding noise
CALIBRATION_STEPS = 10
CALIBRATION_BLOCKS = 32
CALIBRATION_HEADS = 4


@dataclass
class AttentionInputs:
    """One problem's tensors, (B, H, N, D) each; dout is the upstream gradient for fwd+bwd timing."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor


def positional_code(num_positions: int, head_dim: int, length: float, generator: torch.Generator,
                    device) -> torch.Tensor:
    """(N, D) float32 rotary-style code: P_i . P_j = 2 * sum_f cos(w_f (i - j)), with D // 2 frequencies
    w_f ~ N(0, 1/length^2) (an odd D leaves its last column zero).

    The product depends on i - j only, is exactly D at i = j and its largest there, ~D * exp(-(i-j)^2 /
    (2 length^2)) nearby, and O(sqrt(D)) noise far away.
    """
    pairs = head_dim // 2
    frequency = torch.randn(pairs, generator=generator, dtype=torch.float64, device=device) / length
    angle = torch.arange(num_positions, dtype=torch.float64, device=device).view(-1, 1) * frequency
    code = torch.zeros(num_positions, head_dim, dtype=torch.float64, device=device)
    code[:, 0:2 * pairs:2] = math.sqrt(2.0) * torch.cos(angle)
    code[:, 1:2 * pairs:2] = math.sqrt(2.0) * torch.sin(angle)
    return code.float()


class StructuredInputs:
    """The random parts of one problem (noise of q, k, v, dout; positional code; sink direction), generated
    once, from which inputs of any strength are built: so the strength is calibrated on the very tensors
    that are then benchmarked.

    Shapes (B, H, N, D); the parts are kept in float32 on `device`.
    """

    def __init__(self, batch: int, heads: int, num_positions: int, head_dim: int, *,
                 length: float = DEFAULT_LENGTH, sinks: int = 0, seed: int = 0, device="cpu"):
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        shape = (batch, heads, num_positions, head_dim)
        self.q, self.k, self.v, self.dout = (torch.randn(shape, generator=generator, device=device)
                                             for _ in range(4))
        self.code = positional_code(num_positions, head_dim, length, generator, device)
        self.sink = torch.zeros(head_dim, device=device)
        self.sinks = sinks
        if sinks > 0:
            sink = torch.randn(head_dim, generator=generator, device=device)
            self.sink = sink * (math.sqrt(head_dim) / sink.norm())

    def queries_keys(self, strength: float, dtype: torch.dtype, heads: Optional[int] = None):
        """(q, k) in `dtype` at this strength; `heads` keeps only the first heads of batch entry 0."""
        q, k = self.q, self.k
        if heads is not None:
            q, k = q[:1, :heads], k[:1, :heads]
        q = q + strength * (self.code + self.sink)
        k = k + strength * self.code
        k[:, :, :self.sinks] += strength * self.sink
        return q.to(dtype), k.to(dtype)

    def build(self, strength: float, dtype: torch.dtype) -> AttentionInputs:
        """All four tensors in `dtype` at this strength (0: plain Gaussian inputs, dense attention)."""
        q, k = self.queries_keys(strength, dtype)
        return AttentionInputs(q, k, self.v.to(dtype), self.dout.to(dtype))


def make_inputs(batch: int, heads: int, num_positions: int, head_dim: int, *, strength: float,
                length: float = DEFAULT_LENGTH, sinks: int = 0, seed: int = 0, device="cpu",
                dtype: torch.dtype = torch.float32) -> AttentionInputs:
    """Random q, k, v, dout of shape (B, H, N, D) in `dtype`, plus the structured component of strength s.

    strength: 0 gives plain Gaussian inputs (dense attention); larger values make attention more local.
    length: decorrelation length of the positional code in tokens. sinks: number of leading sink keys.
    """
    parts = StructuredInputs(batch, heads, num_positions, head_dim, length=length, sinks=sinks, seed=seed,
                             device=device)
    return parts.build(strength, dtype)


def sample_blocks(num_positions: int, block_rows: int, count: int = CALIBRATION_BLOCKS):
    """`count` evenly spaced query-block indices (first and last included) out of ceil(N / block_rows)."""
    total = math.ceil(num_positions / block_rows)
    if total <= count:
        return list(range(total))
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def calibrate_strength(target: float, parts: StructuredInputs, *, alpha=1.5, causal: bool = True,
                       tile=(64, 64), dtype: torch.dtype = torch.float32, heads: int = CALIBRATION_HEADS,
                       steps: int = CALIBRATION_STEPS, max_strength: float = MAX_STRENGTH) -> float:
    """The strength s whose sampled block sparsity at `tile` is closest to `target` (0 for target <= 0).

    Searches by bisection (sparsity grows with s) on the first `heads` heads of `parts`, measuring sparsity
    exactly on evenly spaced query blocks. Targets above what the shape allows (e.g. 95% for a short
    causal sequence, where the diagonal tiles alone are more than 5%) give the strongest s tried.
    """
    if target <= 0:
        return 0.0
    blocks = sample_blocks(parts.q.shape[2], tile[0])

    def sampled_sparsity(strength: float) -> float:
        q, k = parts.queries_keys(strength, dtype, heads=heads)
        measured = block_sparsity(q, k, alpha=alpha, causal=causal, tiles=(tuple(tile),), query_blocks=blocks)
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


def calibrated_inputs(batch: int, heads: int, num_positions: int, head_dim: int, level: float, *, causal: bool,
                      dtype: torch.dtype, device, alpha=1.5, tile=(64, 64), sinks: int = 0,
                      seed: int = 0) -> Tuple[AttentionInputs, float]:
    """(inputs, strength): one harness case's tensors (B, H, N, D) in `dtype`, their strength calibrated so that
    the block sparsity at `tile` is closest to `level` (calibrate_strength, on these very tensors)."""
    parts = StructuredInputs(batch, heads, num_positions, head_dim, sinks=sinks, seed=seed, device=device)
    strength = calibrate_strength(level, parts, alpha=alpha, causal=causal, tile=tile, dtype=dtype)
    return parts.build(strength, dtype), strength
