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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True, help="sequence length (a multiple of 64)")
    parser.add_argument("--d", type=int, default=64, help="head dim")
    parser.add_argument("--strength", type=float, required=True, help="locality strength (the harness's record)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--alpha", type=float, default=1.5)
    parser.add_argument("--blocks", type=int, default=48, help="query blocks sampled")
    args = parser.parse_args(argv)
    if args.n % TILE:
        parser.error(f"--n must be a multiple of {TILE}")
    fractions = tile_fractions(args.n, args.d, args.strength, args.causal, args.alpha, args.blocks)
    print(f"N={args.n} D={args.d} strength={args.strength} {'causal' if args.causal else 'non-causal'}: "
          + ", ".join(f"{name} {value:.3f}" for name, value in fractions.items()))
    return fractions


if __name__ == "__main__":
    main()
