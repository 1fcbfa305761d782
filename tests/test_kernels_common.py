"""The shared jit helpers of entflash.kernels.common that decide which work a kernel may skip, checked
against brute force (CPU through Triton's interpreter, or the GPU)."""
from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl

from entflash.kernels.common import tile_interior, visible_mask

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BM, BN = 16, 16


@triton.jit
def _interior_probe(Interior, AllVisible, n_row_tiles, n_col_tiles, len_q, len_k, offset, win_left, win_right,
                    CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr):
    """For the tile (program_id(0), program_id(1)): tile_interior's answer and whether visible_mask is all True."""
    m0 = tl.program_id(0) * BM
    n0 = tl.program_id(1) * BN
    interior = tile_interior(m0, n0, BM, BN, len_q, len_k, offset, win_left, win_right, CAUSAL, WIN_LEFT, WIN_RIGHT)
    vis = visible_mask(m0 + tl.arange(0, BM), n0 + tl.arange(0, BN), len_q, len_k, offset, win_left, win_right,
                       CAUSAL, WIN_LEFT, WIN_RIGHT)
    every = tl.min(tl.min(vis.to(tl.int32), axis=1), axis=0)
    slot = tl.program_id(0) * n_col_tiles + tl.program_id(1)
    tl.store(Interior + slot, interior.to(tl.int32))
    tl.store(AllVisible + slot, every)


@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (False, (40, 30)), (True, (37, None)),
                                            (False, (None, 5))])
@pytest.mark.parametrize("len_q, len_k", [(64, 64), (50, 80), (80, 47)])
def test_tile_interior_is_exactly_the_fully_visible_tiles(causal, window, len_q, len_k):
    """common.tile_interior (which lets score tiles skip the visibility mask, forward and backward) is True
    exactly for the tiles where every (query, key) pair is visible, at every offset (bottom-right alignment)."""
    left, right = window if window is not None else (None, None)
    n_row_tiles, n_col_tiles = triton.cdiv(96, BM), triton.cdiv(96, BN)
    interior = torch.full((n_row_tiles * n_col_tiles,), -1, dtype=torch.int32, device=DEV)
    every = torch.full_like(interior, -1)
    _interior_probe[(n_row_tiles, n_col_tiles)](
        interior, every, n_row_tiles, n_col_tiles, len_q, len_k, len_k - len_q, left or 0, right or 0,
        CAUSAL=causal, WIN_LEFT=left is not None, WIN_RIGHT=right is not None, BM=BM, BN=BN)
    assert (interior >= 0).all() and (every >= 0).all()
    assert torch.equal(interior, every)
    assert not interior.all()  # tiles past the lengths are never interior


def test_tile_interior_matches_a_python_count_of_visible_pairs():
    """The same predicate against a plain Python count for a grid of lengths (causal, both window sides)."""
    checked_interior = 0
    for len_q, len_k in itertools.product((16, 33), (16, 40)):
        n_row_tiles, n_col_tiles = triton.cdiv(48, BM), triton.cdiv(48, BN)
        interior = torch.zeros(n_row_tiles * n_col_tiles, dtype=torch.int32, device=DEV)
        every = torch.zeros_like(interior)
        offset, left, right = len_k - len_q, 40, 20
        _interior_probe[(n_row_tiles, n_col_tiles)](
            interior, every, n_row_tiles, n_col_tiles, len_q, len_k, offset, left, right,
            CAUSAL=True, WIN_LEFT=True, WIN_RIGHT=True, BM=BM, BN=BN)
        for tile_row, tile_col in itertools.product(range(n_row_tiles), range(n_col_tiles)):
            visible = all(i < len_q and j < len_k and j <= i + offset and i + offset - left <= j <= i + offset + right
                          for i in range(tile_row * BM, (tile_row + 1) * BM)
                          for j in range(tile_col * BN, (tile_col + 1) * BN))
            assert bool(interior[tile_row * n_col_tiles + tile_col]) == visible
            checked_interior += visible
    assert checked_interior > 0
