"""tau solve over candidate tiles: Newton passes from the sweep's histogram bound, from below.

For each block of query rows (one program), starting from the sweep's guaranteed lower bound of tau
(sweep.py: a 16-bin histogram of the window below the row max, solved in registers, at most about one
bin width, 1/16, below the root), NEWTON_ITERS passes over the tiles that can exceed the current tau,
each one Newton step on F^(alpha-1) - 1, which approaches the root from below (common.newton_tau). Heads whose
alpha is below a runtime threshold (all_passes_from_alpha) stop after the first pass: one pass is enough for them,
while near alpha = 2, where F is close to piecewise linear, a change of the support needs a second.
The output sweep (output.py) closes with one more, analytic, Newton correction. The last pass also marks the
tiles where some row exceeds its tau: the output sweep visits those instead of the sweep's looser candidates,
and they are the forward's tile map.
"""
import torch
import triton
import triton.language as tl

from entflash.kernels.common import (compact_candidates, entmax_p_shifted, head_source, key_range, load_rows,
                                     newton_tau, program_coords, score_tile, sub_block_min_rows)
from entflash.kernels.launch import tile_source


@triton.jit
def _newton_pass(q, k_src, kv_b, kv_h, start_m, offs_m, offs_d, stride_kn, stride_kd, stride_tm, D, qk_scale,
                 len_q, len_k, offset, win_left, win_right, tau, tau_low, ref, valid, margin_m, rm1, expo,
                 tmax_ptr, hits_ptr, list_ptr, n_sub_valid, kb_lo, kb_hi, mark,
                 CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 ALPHA_MODE: tl.constexpr, NK_CHUNK: tl.constexpr, KV_TMA: tl.constexpr):
    """One Newton pass over the key tiles that can exceed tau (BLOCK_M,): returns the updated (tau, tau_low).
    With mark (a scalar bool), it also marks the tiles where some row's p is non-zero at this tau."""
    row_sub = tl.arange(0, BLOCK_M) // 64  # each row's 64-row sub-block within the program
    one_i8 = tl.full((BLOCK_M,), 1, tl.int8)
    thr = sub_block_min_rows(tl.where(valid, tau - ref - margin_m, float("inf")), BLOCK_M)
    f_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(kb_lo, kb_hi, NK_CHUNK):
        n_cand = compact_candidates(tmax_ptr, stride_tm, thr, n_sub_valid, c0, kb_hi, list_ptr, BLOCK_M, NK_CHUNK)
        for i in range(0, n_cand):
            kb = tl.load(list_ptr + i)
            xs, offs_n = score_tile(q, k_src, start_m, kb * BLOCK_N, offs_m, offs_d, stride_kn, stride_kd, D,
                                    qk_scale, tau, len_q, len_k, offset, win_left, win_right,
                                    CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_N, DOT_PREC, UPCAST, KV_TMA, kv_b, kv_h)
            p, s, u = entmax_p_shifted(xs, rm1, ALPHA_MODE)
            tile_f = tl.sum(p, axis=1)
            f_i += tile_f
            s_i += tl.sum(s, axis=1)
            # the marking pass: mark the tile for each row's sub-block when the row exceeds this pass's tau, a
            # lower bound of the final one: rows of one sub-block store the same 1 to one byte (no cross-row
            # reduction)
            tl.store(hits_ptr + row_sub * stride_tm + kb, one_i8, mask=(tile_f > 0.0) & mark)
    # F(tau) >= 1 certifies tau <= root: keep the best certified lower bound.
    tau_low = tl.where(valid & (f_i >= 1.0), tl.maximum(tau_low, tau), tau_low)
    tau = tl.maximum(newton_tau(tau, f_i, s_i, expo, ALPHA_MODE), tau_low)
    return tau, tau_low


@triton.jit
def _solve_kernel(Q, K, Alpha, Lq, Lk, RowRef, TileMax, TauHist, Tau, TauLow, Lists, Hits,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_tb, stride_th, stride_tm,
                  H, Nq, Nk, D, group, scale, win_left, win_right, NUM_M_BLOCKS, N_SUB_ROWS, all_passes_from_alpha,
                  HAS_LQ: tl.constexpr, HAS_LK: tl.constexpr, CAUSAL: tl.constexpr,
                  WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                  ALPHA_MODE: tl.constexpr, NK_CHUNK: tl.constexpr, NEWTON_ITERS: tl.constexpr,
                  KV_TMA: tl.constexpr):
    b, h, hk, start_m, len_q, len_k, offset = program_coords(
        Lq, Lk, Nq, Nk, H, group, NUM_M_BLOCKS, HAS_LQ, HAS_LK, BLOCK_M)
    alpha = tl.load(Alpha + h).to(tl.float32)
    qk_scale = (alpha - 1.0) * scale
    expo = 2.0 - alpha
    rm1 = expo / (alpha - 1.0)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ptr = (b * H + h) * Nq + offs_m
    tau = tl.load(TauHist + row_ptr, mask=offs_m < Nq, other=float("inf"))
    valid = tau < float("inf")
    ref = tl.load(RowRef + row_ptr, mask=offs_m < Nq, other=float("-inf"))
    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Nq, D)
    k_src = head_source(K, b, hk, stride_kb, stride_kh, KV_TMA)
    tmax_ptr = TileMax + b * stride_tb + h * stride_th + (start_m // 64) * stride_tm
    hits_ptr = Hits + b * stride_tb + h * stride_th + (start_m // 64) * stride_tm
    list_ptr = Lists + (tl.program_id(1) * NUM_M_BLOCKS + tl.program_id(0)) * NK_CHUNK
    n_sub_valid = N_SUB_ROWS - start_m // 64
    lo, hi = key_range(start_m, len_q, len_k, offset, win_left, win_right,
                       CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N)
    kb_lo = lo // BLOCK_N
    kb_hi = (hi + BLOCK_N - 1) // BLOCK_N
    # Rounding margin: recomputed scores may differ from the sweep's by a few ulps (of the row's largest scores,
    # within 1 of tau).
    margin_m = 1e-5 * (2.0 + tl.abs(tl.where(valid, tau, 0.0)))
    tau_low = tau

    # Newton passes from below over the tiles that can exceed tau; this head's last one marks the hit tiles.
    last_pass = tl.where(alpha >= all_passes_from_alpha, NEWTON_ITERS - 1, 0)
    for it in tl.static_range(NEWTON_ITERS):
        if it <= last_pass:
            tau, tau_low = _newton_pass(q, k_src, b, hk, start_m, offs_m, offs_d, stride_kn, stride_kd, stride_tm, D,
                                        qk_scale, len_q, len_k, offset, win_left, win_right, tau, tau_low, ref,
                                        valid, margin_m, rm1, expo, tmax_ptr, hits_ptr, list_ptr, n_sub_valid,
                                        kb_lo, kb_hi, last_pass == it, CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_M,
                                        BLOCK_N, DOT_PREC, UPCAST, ALPHA_MODE, NK_CHUNK, KV_TMA)
    tl.store(Tau + row_ptr, tau, mask=offs_m < Nq)
    tl.store(TauLow + row_ptr, tau_low - margin_m, mask=offs_m < Nq)


def solve_tau(q, k, alpha_t, scale, spec, row_ref, tile_max, tau_hist, newton_iters=1, all_passes_from_alpha=1.0):
    """tau estimate and certified lower bound per query row.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D); alpha_t: (Hq,) float32; row_ref, tile_max, tau_hist: from
    sweep.dense_sweep. Returns (tau, tau_low, hits): tau and tau_low (B, Hq, Nq) float32 in tau units (+inf for
    rows without a visible key): tau is <= the root up to rounding, and within ~1e-5 of it after one Newton
    pass (the output sweep's closing correction squares that error); tau_low (<= tau) is a guaranteed
    lower bound, minus a rounding margin, that decides which tiles may hold non-zeros. hits, like tile_max
    but int8, marks the 64x64 tiles where some row's score exceeded the last Newton pass's tau:
    a superset of the tiles holding non-zeros at the final tau, which the output sweep then visits instead
    of the sweep's candidates, and the forward's tile map (None when newton_iters = 0).
    newton_iters: Newton passes after the histogram bound (0 returns the bound itself); all_passes_from_alpha: heads
    whose alpha is below it run only the first pass (1.0: every head runs them all).
    """
    B, H, Nq, D = q.shape
    tau = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    tau_low = torch.empty_like(tau)
    hits = torch.zeros(tile_max.shape, device=q.device, dtype=torch.int8) if newton_iters > 0 else tile_max
    k_src, k_tma = tile_source(k, spec)
    _solve_kernel[spec.grid](
        q, k_src, alpha_t, spec.lq, spec.lk, row_ref, tile_max, tau_hist, tau, tau_low, spec.lists, hits,
        *q.stride(), *k.stride(), *tile_max.stride()[:3],
        H, Nq, k.shape[2], D, spec.group, float(scale), spec.win_left, spec.win_right,
        spec.num_m_blocks, tile_max.shape[2], float(all_passes_from_alpha), **spec.flags, **spec.tiles,
        ALPHA_MODE=spec.alpha_mode, NK_CHUNK=spec.nk_chunk, NEWTON_ITERS=newton_iters, KV_TMA=k_tma,
        **spec.sparse_launch, **(spec.tma_launch if k_tma else {}))
    return tau, tau_low, (hits if newton_iters > 0 else None)
