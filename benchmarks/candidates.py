"""How many key tiles the forward's later passes visit, against how many hold a non-zero (CPU or GPU).

    python -m benchmarks.candidates --n 16384 --d 64 --strength 1.165 --causal

On the harness's inputs (benchmarks.inputs, one head, bf16) this counts, over evenly spaced 64-row query
blocks and 64-key tiles, the fraction of visible tiles that
  * hold a non-zero p (exact tau, benchmarks.sparsity.row_thresholds);
  * pass the histogram's test (the tiles the dense sweep bins; a separate pass over candidate tiles before
    commit 08329d2) and the Newton/output passes' test, in two forms:
    absolute   the tile's max score exceeds the lowest (row max - 1), resp. lowest tau, of the block's rows;
    relative   the tile's max of (score - its row's max) exceeds the lowest (-1), resp. (tau - row max).
    reference  the tile's max of (score - its row's reference) exceeds the lowest (tau - reference), the reference
               being the row's tau over the keys of the two tiles at the block's diagonal, one histogram bin
               (1/16) lower (the histogram's bound is at most about that far below it).
The kernels use the reference form since the sweep stores tile maxima relative to each row's reference
(entflash.kernels.sweep), the relative form up to 0b24c45, the absolute form before that. Row maxima and tau are
exact here (the kernels use the solver's lower bounds of tau).

    TRITON_INTERPRET=1 python -m benchmarks.candidates --n 2048 --strength 0.952 --causal --kernels

counts with the kernels themselves instead (on the CPU under the Triton interpreter, small N; or on a GPU), two
heads of the same inputs, every query block: the tiles the Newton pass's test passes (the stored tile values
against the sweep's tau bound, entflash.kernels.solve), the tiles the pass then marks (the output pass's and the
backward's), and the tiles holding a non-zero. --far-scores picks the sweep's far-tile rule (1: training's, 2:
inference's, whose output pass takes the candidates of the first test instead of the marks).
"""
from __future__ import annotations

import argparse
import math

import torch

from benchmarks.inputs import StructuredInputs
from benchmarks.sparsity import row_thresholds

TILE = 64


def tile_fractions(num_positions: int, head_dim: int, strength: float, causal: bool, alpha: float = 1.5,
                   blocks: int = 48, seed: int = 0) -> dict:
    """Fractions of visible (query block, key tile) pairs in each category; see the module docstring."""
    parts = StructuredInputs(1, 1, num_positions, head_dim, seed=seed)
    q, k = parts.queries_keys(strength, torch.bfloat16)
    q, k = q[0, 0].float(), k[0, 0].float()
    num_tiles = num_positions // TILE
    counts = dict(nonzero=0, absolute_histogram=0, absolute_newton=0, relative_histogram=0, relative_newton=0,
                  reference_newton=0)
    total = 0
    for block in range(0, num_tiles, max(1, num_tiles // blocks)):
        rows = slice(block * TILE, (block + 1) * TILE)
        scores = q[rows] @ k.T / math.sqrt(head_dim)
        if causal:
            query = torch.arange(block * TILE, (block + 1) * TILE)[:, None]
            scores = scores.masked_fill(torch.arange(num_positions)[None] > query, float("-inf"))
        visible_tiles = block + 1 if causal else num_tiles
        x = (alpha - 1) * scores[:, :visible_tiles * TILE]  # tau units
        row_max = x.max(dim=1).values
        tau = row_thresholds(scores[None], torch.tensor([[[alpha]]]))[0, :, 0]
        tiles = x.reshape(TILE, visible_tiles, TILE)
        tile_max = tiles.amax(dim=(0, 2))
        relative = (tiles - row_max[:, None, None]).amax(dim=(0, 2))
        counts["nonzero"] += (tiles > tau[:, None, None]).any(dim=2).any(dim=0).sum().item()
        counts["absolute_histogram"] += (tile_max > (row_max - 1).min()).sum().item()
        counts["absolute_newton"] += (tile_max > tau.min()).sum().item()
        counts["relative_histogram"] += (relative > -1).sum().item()
        counts["relative_newton"] += (relative > (tau - row_max).min()).sum().item()
        near = scores[:, max(0, block - 1) * TILE:(block + 1) * TILE]  # the tiles at the diagonal, the sweep's first
        reference = row_thresholds(near[None], torch.tensor([[[alpha]]]))[0, :, 0] - 1 / 16
        above_reference = (tiles - reference[:, None, None]).amax(dim=(0, 2))
        counts["reference_newton"] += (above_reference > (tau - reference).min()).sum().item()
        total += visible_tiles
    return {name: count / total for name, count in counts.items()}


def kernel_fractions(num_positions: int, head_dim: int, strength: float, causal: bool, alpha: float = 1.5,
                     far_scores: int = 1, device="cpu") -> dict:
    """Fractions of visible (64-row query block, 64-key tile) pairs that the forward kernels' Newton pass tests in
    (newton_candidates), that it marks (marked) and that hold a non-zero (nonzero), on two heads of the harness's
    inputs in bf16 (module docstring)."""
    from entflash.kernels.forward import alpha_tensor
    from entflash.kernels.launch import make_spec
    from entflash.kernels.solve import solve_tau
    from entflash.kernels.sweep import dense_sweep

    parts = StructuredInputs(1, 2, num_positions, head_dim, seed=0, device=device)
    q, k = parts.queries_keys(strength, torch.bfloat16)
    scale = head_dim ** -0.5
    alpha_t = alpha_tensor(alpha, 2, q.device)
    spec = make_spec(q, k, alpha, alpha_t, causal, None, None, None)
    row_ref, tile_values, tau_bound = dense_sweep(q, k, alpha_t, scale, spec, far_scores)
    _, _, marked = solve_tau(q, k, alpha_t, scale, spec, row_ref, tile_values, tau_bound, 1)
    margin = 1e-5 * (2.0 + tau_bound.abs())  # the solve kernel's rounding margin
    lowest = torch.where(torch.isfinite(tau_bound), tau_bound - row_ref - margin, torch.full_like(tau_bound, math.inf))
    tiles = num_positions // TILE
    candidates = tile_values > lowest.view(1, 2, tiles, TILE).amin(dim=3)[..., None]
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(num_positions, num_positions, dtype=torch.bool,
                                               device=q.device).triu(1), -math.inf)
    tau = row_thresholds(scores.float().view(2, num_positions, -1), torch.tensor([[[alpha]]], device=q.device))
    nonzero = ((alpha - 1) * scores.float().view(2, num_positions, -1) > tau).view(2, tiles, TILE, tiles, TILE)
    visible = torch.ones(tiles, tiles, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    total = 2 * visible.sum().item()
    return dict(newton_candidates=(candidates[0] & visible).sum().item() / total,
                marked=(marked[0].bool() & visible).sum().item() / total,
                nonzero=nonzero.any(dim=4).any(dim=2).sum().item() / total)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True, help="sequence length (a multiple of 64)")
    parser.add_argument("--d", type=int, default=64, help="head dim")
    parser.add_argument("--strength", type=float, required=True, help="locality strength (the harness's record)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--alpha", type=float, default=1.5)
    parser.add_argument("--blocks", type=int, default=48, help="query blocks sampled")
    parser.add_argument("--kernels", action="store_true", help="count with the kernels (module docstring)")
    parser.add_argument("--far-scores", type=int, default=1, choices=(1, 2), help="with --kernels: the sweep's rule")
    args = parser.parse_args(argv)
    if args.n % TILE:
        parser.error(f"--n must be a multiple of {TILE}")
    if args.kernels:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        fractions = kernel_fractions(args.n, args.d, args.strength, args.causal, args.alpha, args.far_scores, device)
    else:
        fractions = tile_fractions(args.n, args.d, args.strength, args.causal, args.alpha, args.blocks)
    print(f"N={args.n} D={args.d} strength={args.strength} {'causal' if args.causal else 'non-causal'}: "
          + ", ".join(f"{name} {value:.3f}" for name, value in fractions.items()))
    return fractions


if __name__ == "__main__":
    main()
