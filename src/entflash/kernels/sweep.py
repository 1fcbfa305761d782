"""The one dense sweep of the forward: row max and per-64x64-tile max of the scores.

Every later stage (solve.py, output.py, the backward) only visits key tiles whose max can exceed
the rows' lower bound of tau, so this is the only pass whose cost grows with every visible key.
"""
import torch
import triton
import triton.language as tl

from entflash.kernels.common import key_range, load_rows, program_coords, score_tile, sub_block_max


@triton.jit
def _sweep_kernel(Q, K, Alpha, Lq, Lk, RowMax, TileMax,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_tb, stride_th, stride_tm,
                  H, Nq, Nk, D, group, scale, win_left, win_right, NUM_M_BLOCKS, N_SUB_ROWS,
                  HAS_LQ: tl.constexpr, HAS_LK: tl.constexpr, CAUSAL: tl.constexpr,
                  WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    b, h, hk, start_m, len_q, len_k, offset = program_coords(
        Lq, Lk, Nq, Nk, H, group, NUM_M_BLOCKS, HAS_LQ, HAS_LK, BLOCK_M)
    alpha = tl.load(Alpha + h).to(tl.float32)
    qk_scale = (alpha - 1.0) * scale
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Nq, D)
    k_base = K + b * stride_kb + hk * stride_kh
    tmax_ptr = TileMax + b * stride_tb + h * stride_th
    sub_rows = start_m // 64 + tl.arange(0, BLOCK_M // 64)
    lo, hi = key_range(start_m, len_q, len_k, offset, win_left, win_right,
                       CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        x, offs_n = score_tile(q, k_base, start_n, offs_m, offs_d, stride_kn, stride_kd, D,
                               qk_scale, len_q, len_k, offset, win_left, win_right,
                               CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_N, DOT_PREC, UPCAST)
        m_i = tl.maximum(m_i, tl.max(x, axis=1))
        tl.store(tmax_ptr + sub_rows * stride_tm + start_n // BLOCK_N,
                 sub_block_max(x, BLOCK_M, BLOCK_N), mask=sub_rows < N_SUB_ROWS)
    tl.store(RowMax + (b * H + h) * Nq + offs_m, m_i, mask=offs_m < Nq)


def dense_sweep(q, k, alpha_t, scale, spec):
    """Row max and per-tile max of x = (alpha - 1) * scale * q k^T under the visibility mask.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D) (fp16/bf16/fp32, any strides); alpha_t: (Hq,) float32;
    scale: python float; spec: the launch.StageSpec shared by the forward stages.
    Returns row_max (B, Hq, Nq) float32 (-inf for rows without a visible key) and
    tile_max (B, Hq, ceil(Nq/64), ceil(Nk/64)) float32 (-inf for tiles never visited), both in tau units.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    n_sub, n_kt = triton.cdiv(Nq, 64), triton.cdiv(Nk, 64)
    row_max = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    tile_max = torch.full((B, H, n_sub, n_kt), float("-inf"), device=q.device, dtype=torch.float32)
    _sweep_kernel[spec.grid](
        q, k, alpha_t, spec.lq, spec.lk, row_max, tile_max,
        *q.stride(), *k.stride(), *tile_max.stride()[:3],
        H, Nq, Nk, D, spec.group, float(scale), spec.win_left, spec.win_right,
        spec.num_m_blocks, n_sub, **spec.flags, **spec.tiles, **spec.sweep_launch)
    return row_max, tile_max

