"""Exact block sparsity of alpha-entmax attention, measured chunk by chunk.

For each query row the threshold tau is computed exactly by the reference solver
(`entflash.reference.rowwise.entmax_threshold`, float32 scores from the inputs' values). A tile holds a
non-zero probability iff some row i and key j in it have (alpha-1) * z_ij > tau_i. Block sparsity at a tile
size is 1 - (non-zero tiles) / (valid tiles), where a valid tile holds at least one (query, key) pair the
query may see; causal tiles entirely above the diagonal are not counted.

Speed: tau depends only on the scores above it, and every such score is among a row's largest ones. So tau
is solved on the row's top `candidates` scores, and a row is re-solved on all its scores only when the
smallest candidate still lies inside the support (then the true support may be larger). The result is exact
either way. Scores are formed for (heads x rows) chunks whose float32 size stays under `chunk_elements`, and
causal chunks only see the keys up to their last row.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from entflash.reference.rowwise import entmax_threshold

Tile = Tuple[int, int]
DEFAULT_TILES: Tuple[Tile, ...] = ((64, 64), (128, 64))
DEFAULT_CANDIDATES = 512
DEFAULT_CHUNK_ELEMENTS = 2**28


def tile_name(tile: Tile) -> str:
    """'64x64' for the tile (64, 64): rows (queries) x columns (keys)."""
    return f"{tile[0]}x{tile[1]}"


def _alpha_per_head(alpha, heads: int, device) -> torch.Tensor:
    """alpha (float, 0-dim or (heads,) tensor) as a float32 (heads, 1, 1) tensor without grad."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().to(device)
    return alpha.expand(heads).reshape(heads, 1, 1).clone() if alpha.dim() == 0 else alpha.reshape(heads, 1, 1)


def row_thresholds(scores: torch.Tensor, alpha: torch.Tensor, candidates: int = DEFAULT_CANDIDATES) -> torch.Tensor:
    """Exact entmax thresholds tau (in (alpha-1)*score units) of each row of `scores`.

    scores: (G, R, Nk) float32, masked entries -inf, every row with at least one finite entry.
    alpha: (G, 1, 1) float32. candidates: how many of a row's largest scores the first solve uses.
    Returns tau of shape (G, R, 1).
    """
    num_keys = scores.shape[-1]
    if candidates >= num_keys:
        return entmax_threshold(scores, alpha)
    top = scores.topk(candidates, dim=-1, sorted=False).values
    tau = entmax_threshold(top, alpha).contiguous()
    smallest_candidate = top.amin(dim=-1, keepdim=True)
    incomplete = ((alpha - 1) * smallest_candidate > tau).reshape(-1)
    if bool(incomplete.any()):
        rows = incomplete.nonzero().squeeze(1)
        row_alpha = alpha.expand(tau.shape).reshape(-1, 1)[rows]
        tau.view(-1, 1)[rows] = entmax_threshold(scores.reshape(-1, num_keys)[rows], row_alpha)
    return tau


def valid_tiles(num_queries: int, num_keys: int, tile: Tile, causal: bool, device=None) -> torch.Tensor:
    """Bool (ceil(Nq/tm), ceil(Nk/tn)): tiles holding at least one visible (query, key) pair.

    Causal alignment is bottom-right (query i sees keys j <= i + Nk - Nq), as in docs/ARCHITECTURE.md.
    """
    rows, cols = tile
    query_blocks = torch.arange(math.ceil(num_queries / rows), device=device)
    key_blocks = torch.arange(math.ceil(num_keys / cols), device=device)
    last_query = torch.clamp((query_blocks + 1) * rows, max=num_queries) - 1
    if not causal:
        return torch.ones(query_blocks.numel(), key_blocks.numel(), dtype=torch.bool, device=device)
    reach = last_query + (num_keys - num_queries)
    return (key_blocks * cols).view(1, -1) <= reach.view(-1, 1)


def _grain(tiles: Sequence[Tile]) -> Tile:
    """The finest tile every requested tile is a whole multiple of."""
    return (math.gcd(*[t[0] for t in tiles]), math.gcd(*[t[1] for t in tiles]))


def _coarsen(fine: torch.Tensor, factor: Tile) -> torch.Tensor:
    """OR-reduce a (..., A, B) bool tile map by `factor` along its last two axes (padding with False)."""
    fr, fc = factor
    a, b = fine.shape[-2:]
    padded = torch.nn.functional.pad(fine, (0, (-b) % fc, 0, (-a) % fr), value=False)
    shape = padded.shape[:-2] + (padded.shape[-2] // fr, fr, padded.shape[-1] // fc, fc)
    return padded.reshape(shape).any(dim=-1).any(dim=-2)


def _chunk_tile_map(q_rows, k_heads, positions, alpha, causal, scale, num_queries, grain, candidates):
    """Fine tile map (G, blocks from positions[0]'s to positions[-1]'s, ceil(Nk/gn)) of query rows `positions`.

    positions: sorted query indices made of whole blocks of grain[0] rows (the last block may be short).
    Blocks between them that were not given stay False.
    """
    num_keys = k_heads.shape[1]
    offset = num_keys - num_queries
    key_stop = num_keys
    if causal:
        key_stop = min(num_keys, math.ceil((int(positions[-1]) + offset + 1) / grain[1]) * grain[1])
    scores = torch.matmul(q_rows.float(), k_heads[:, :key_stop].float().transpose(1, 2)).mul_(scale)
    if causal:
        hidden = torch.arange(key_stop, device=scores.device).view(1, -1) > (positions + offset).view(-1, 1)
        scores.masked_fill_(hidden, float("-inf"))
    score_threshold = row_thresholds(scores, alpha, candidates) / (alpha - 1)  # p > 0  <=>  z > tau/(alpha-1)
    key_pad = (-key_stop) % grain[1]
    padded = torch.nn.functional.pad(scores, (0, key_pad), value=float("-inf")) if key_pad else scores
    block_max = padded.reshape(scores.shape[0], scores.shape[1], -1, grain[1]).amax(dim=-1)
    above = (block_max > score_threshold).to(torch.int32)
    first_block = int(positions[0]) // grain[0]
    block_of_row = torch.div(positions, grain[0], rounding_mode="floor") - first_block
    counts = torch.zeros(above.shape[0], int(block_of_row[-1]) + 1, above.shape[-1], dtype=torch.int32,
                         device=above.device)
    counts.index_add_(1, block_of_row, above)
    full = torch.zeros(counts.shape[0], counts.shape[1], math.ceil(num_keys / grain[1]), dtype=torch.bool,
                       device=above.device)
    full[:, :, :counts.shape[-1]] = counts > 0
    return full


def block_sparsity(q: torch.Tensor, k: torch.Tensor, *, alpha=1.5, causal: bool = False,
                   scale: Optional[float] = None, tiles: Iterable[Tile] = DEFAULT_TILES,
                   query_blocks: Optional[Sequence[int]] = None, candidates: int = DEFAULT_CANDIDATES,
                   chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Dict[str, float]:
    """Exact block sparsity of entmax attention for q (B, Hq, Nq, D), k (B, Hkv, Nk, D), per tile size.

    alpha: float or (Hq,) tensor. scale: default 1/sqrt(D). tiles: (rows, keys) sizes, e.g. (64, 64).
    query_blocks: indices of query blocks (of lcm-of-tile-rows rows) to measure, default all; the sparsity
    is then over those blocks' valid tiles only (used to calibrate inputs cheaply).
    Returns {"64x64": sparsity in [0, 1], ...}.
    """
    tiles = tuple(tuple(t) for t in tiles)
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    grain = _grain(tiles)
    unit = math.lcm(*[t[0] for t in tiles])
    if query_blocks is None:
        query_blocks = range(math.ceil(num_queries / unit))
    query_blocks = sorted(set(int(b) for b in query_blocks))
    alpha_heads = _alpha_per_head(alpha, heads, q.device).repeat(batch, 1, 1)
    q_flat = q.reshape(batch * heads, num_queries, head_dim)
    k_flat = k.repeat_interleave(heads // k.shape[1], dim=1).reshape(batch * heads, num_keys, head_dim)
    blocks_per_chunk = max(1, chunk_elements // max(num_keys, 1) // unit)
    heads_per_chunk = max(1, chunk_elements // (blocks_per_chunk * unit * max(num_keys, 1)))
    nonzero = {t: 0 for t in tiles}
    valid = {t: 0 for t in tiles}
    valid_maps = {t: valid_tiles(num_queries, num_keys, t, causal, q.device) for t in tiles}
    for first in range(0, len(query_blocks), blocks_per_chunk):
        chunk_blocks = query_blocks[first:first + blocks_per_chunk]
        positions = torch.cat([torch.arange(b * unit, min((b + 1) * unit, num_queries)) for b in chunk_blocks])
        positions = positions.to(q.device)
        tile_rows = {t: torch.tensor([b * (unit // t[0]) + j for b in chunk_blocks for j in range(unit // t[0])
                                      if (b * unit + j * t[0]) < num_queries], device=q.device) for t in tiles}
        for h0 in range(0, batch * heads, heads_per_chunk):
            h1 = min(batch * heads, h0 + heads_per_chunk)
            fine = _chunk_tile_map(q_flat[h0:h1, positions], k_flat[h0:h1], positions, alpha_heads[h0:h1],
                                   causal, scale, num_queries, grain, candidates)
            for t in tiles:
                coarse = _coarsen(fine, (t[0] // grain[0], t[1] // grain[1]))
                first_row = chunk_blocks[0] * (unit // t[0])
                mask = valid_maps[t][tile_rows[t]]
                nonzero[t] += int((coarse[:, tile_rows[t] - first_row] & mask).sum())
                valid[t] += int(mask.sum()) * (h1 - h0)
    return {tile_name(t): 1.0 - nonzero[t] / max(valid[t], 1) for t in tiles}


