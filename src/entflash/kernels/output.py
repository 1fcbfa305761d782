"""Sparse output sweep: O = sum p v over the tiles that can hold non-zeros, closed by one analytic
Newton correction, plus what the backward needs (O2, S) and the 64x64 tile map.

The tile map is the solve stage's hit map when it ran a Newton pass (the tiles where some row exceeded the
last pass's tau); without one (16-bit inference) it is formed here, per visited tile, only when asked for.

With F = sum p, S = sum s (s = p^(2-alpha)) and O2 = sum s v at the solver's tau, a Newton step
dtau = (alpha-1) c, c = (F - 1) / S, changes each p by -c s to first order, so the corrected output
is O - c O2 (its weights sum to exactly 1) and the reported tau is tau + (alpha-1) c: no separate
final solver pass.
"""
import torch
import triton
import triton.language as tl

from entflash.kernels.common import (compact_candidates, entmax_p_shifted, head_rows, head_source, key_range,
                                     load_rows, mma, program_coords, score_tile, sub_block_max_rows,
                                     sub_block_min_rows)
from entflash.kernels.launch import plan_descriptor, tile_sources


@triton.jit
def _output_kernel(Q, K, V, Alpha, Lq, Lk, RowRef, TileMax, TauIn, TauLow, Lists, Hits,
                   Out, TauOut, Support, TileMap, O2, S2,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_ob, stride_oh, stride_om, stride_od,
                   stride_tb, stride_th, stride_tm,
                   H, Nq, Nk, D, group, scale, win_left, win_right, NUM_M_BLOCKS, N_SUB_ROWS,
                   HAS_LQ: tl.constexpr, HAS_LK: tl.constexpr, CAUSAL: tl.constexpr,
                   WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                   ALPHA_MODE: tl.constexpr, NK_CHUNK: tl.constexpr,
                   FOLD: tl.constexpr, SAVE_BWD: tl.constexpr, COUNT_SUPPORT: tl.constexpr,
                   FROM_HITS: tl.constexpr, WRITE_MAP: tl.constexpr, KV_TMA: tl.constexpr):
    b, h, hk, start_m, len_q, len_k, offset = program_coords(
        Lq, Lk, Nq, Nk, H, group, NUM_M_BLOCKS, HAS_LQ, HAS_LK, BLOCK_M)
    alpha = tl.load(Alpha + h).to(tl.float32)
    qk_scale = (alpha - 1.0) * scale
    rm1 = (2.0 - alpha) / (alpha - 1.0)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ptr = (b * H + h) * Nq + offs_m
    in_rows = offs_m < Nq
    tau = tl.load(TauIn + row_ptr, mask=in_rows, other=float("inf"))
    tau_low = tl.load(TauLow + row_ptr, mask=in_rows, other=float("inf"))
    ref = tl.load(RowRef + row_ptr, mask=in_rows, other=float("-inf"))
    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Nq, D)
    k_src = head_source(K, b, hk, stride_kb, stride_kh, KV_TMA)
    v_src = head_source(V, b, hk, stride_vb, stride_vh, KV_TMA)
    tile_off = b * stride_tb + h * stride_th + (start_m // 64) * stride_tm
    n_sub_valid = N_SUB_ROWS - start_m // 64
    sub = tl.arange(0, BLOCK_M // 64)
    lo, hi = key_range(start_m, len_q, len_k, offset, win_left, win_right,
                       CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N)
    # tile values are relative to each row's reference (sweep.py)
    thr = sub_block_min_rows(tl.where(tau_low < float("inf"), tau_low - ref, float("inf")), BLOCK_M)

    # tau - tau_low >= 0, 0 on rows without a visible key (tau = tau_low = +inf, where x - tau is -inf)
    low_gap = tl.where(tau_low < float("inf"), tau - tau_low, 0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    f_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # 16-bit inputs sum S on the tensor cores: s times a (BLOCK_N, 16) block of ones, every column of acc_s
    # holding the row sums (three instructions per score fewer than a float32 row sum of the rounded s). Not for
    # float32 (its exact products are FMA loops) nor for head dims above 64 (sm_90: the D = 128 kernel, already at
    # the register cap, spilled 12 words instead of 4)
    S_BY_MMA: tl.constexpr = (q.dtype != tl.float32) & (BLOCK_D <= 64)
    acc_s = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_i = tl.zeros((BLOCK_M,), dtype=tl.int32)
    list_ptr = Lists + (tl.program_id(1) * NUM_M_BLOCKS + tl.program_id(0)) * NK_CHUNK
    kb_hi = (hi + BLOCK_N - 1) // BLOCK_N
    for c0 in range(lo // BLOCK_N, kb_hi, NK_CHUNK):
        if FROM_HITS:
            n_cand = compact_candidates(Hits + tile_off, stride_tm, thr, n_sub_valid, c0, kb_hi, list_ptr,
                                        BLOCK_M, NK_CHUNK, True)
        else:
            n_cand = compact_candidates(TileMax + tile_off, stride_tm, thr, n_sub_valid, c0, kb_hi, list_ptr,
                                        BLOCK_M, NK_CHUNK)
        for i in range(0, n_cand):
            kb = tl.load(list_ptr + i)
            xs, offs_n = score_tile(q, k_src, start_m, kb * BLOCK_N, offs_m, offs_d, stride_kn, stride_kd, D,
                                    qk_scale, tau, len_q, len_k, offset, win_left, win_right,
                                    CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_N, DOT_PREC, UPCAST, KV_TMA, b, hk)
            if WRITE_MAP:  # some score above tau_low: max(x - tau) + (tau - tau_low) > 0
                hit = sub_block_max_rows(tl.max(xs, axis=1) + low_gap, BLOCK_M) > 0
                tl.store(TileMap + tile_off + sub * stride_tm + kb, hit.to(tl.int8), mask=sub < n_sub_valid)
            p, s, u = entmax_p_shifted(xs, rm1, ALPHA_MODE)
            v = head_rows(v_src, b, hk, kb * BLOCK_N, offs_n, offs_d, stride_vn, stride_vd, len_k, D, BLOCK_N, BLOCK_D,
                        KV_TMA)
            acc = mma(p.to(v.dtype), v, acc, DOT_PREC, UPCAST)
            # S sums the s that O2's product reads, rounded to the input dtype like it: the backward's
            # delta = dO . O2 / S is then a weighted mean of dO . v with one set of weights (exactly dO . v on a
            # row with one non-zero, whose gradients are zero; a float32 S left about 2^-9 of dO . v there in bf16).
            # On 16-bit inputs the tensor cores form it from the same rounded operand.
            s_operand = s.to(v.dtype)
            if FOLD:
                acc2 = mma(s_operand, v, acc2, DOT_PREC, UPCAST)
            f_i += tl.sum(p, axis=1)
            if S_BY_MMA:
                acc_s = mma(s_operand, tl.full((BLOCK_N, 16), 1.0, tl.float32).to(v.dtype), acc_s, DOT_PREC, UPCAST)
            else:
                s_i += tl.sum(s, axis=1)
            if COUNT_SUPPORT:
                n_i += tl.sum((u > 0).to(tl.int32), axis=1)

    if S_BY_MMA:
        s_i = tl.max(acc_s, axis=1)
    c = tl.where(s_i > 0, (f_i - 1.0) / tl.where(s_i > 0, s_i, 1.0), 0.0)
    if FOLD:
        out = acc - c[:, None] * acc2
    else:
        # without O2, close by exact row normalization (first order in the solver's tau error)
        out = acc / tl.where(f_i > 0, f_i, 1.0)[:, None]
    # a NaN alpha (a tensor alpha left unread: check_alpha=False) makes every score NaN, which no comparison with
    # tau passes: its rows would come out as zeros, so they are made NaN (sm_90: 197 -> 221 registers at D = 64,
    # alpha = 1.5, still two 4-warp programs per SM)
    if alpha != alpha:
        out += float("nan")
    d_mask = in_rows[:, None] & (offs_d[None, :] < D)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_mask)
    tl.store(TauOut + row_ptr, tau + (alpha - 1.0) * c, mask=in_rows)
    tl.store(Support + row_ptr, n_i if COUNT_SUPPORT else n_i - 1, mask=in_rows)
    if SAVE_BWD:
        tl.store(S2 + row_ptr, s_i, mask=in_rows)
        tl.store(O2 + row_ptr[:, None] * D + offs_d[None, :], acc2, mask=d_mask)


def sparse_output(q, k, v, alpha_t, scale, spec, row_ref, tile_max, tau, tau_low, hits=None, *, out=None,
                  save_bwd=True, fold=True, count_support=True, need_map=True):
    """Output sweep over candidate tiles.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); alpha_t (Hq,) float32; row_ref, tile_max from the sweep; tau,
    tau_low (B, Hq, Nq) float32 and hits (int8 map like tile_max, or None) from solve.solve_tau: with hits,
    the sweep visits the tiles it marks, else those whose tile_max value exceeds tau_low. Returns a dict:
      out (B, Hq, Nq, D) in q's dtype (strides like q), tau (B, Hq, Nq) float32 (after the closing
      Newton correction), support (B, Hq, Nq) int32 (count of p > 0), tile_map (B, Hq, ceil(Nq/64),
      ceil(Nk/64)) bool (a superset of the tiles holding non-zeros: hits when given, else formed here; None
      with need_map=False and no hits), o2 (B, Hq, Nq, D) float32 = sum s v and s (B, Hq, Nq) float32 = sum s, both at
      the solver's tau. `out`, if given, is a preallocated output tensor (like q) to write into.
    save_bwd=False (inference): o2 and s come back None. fold=False (only without save_bwd)
    also skips computing O2 (one matmul of two per tile) and closes the output by exact row
    normalization instead of the O2-based Newton correction: cheaper, but first order in the solver's
    tau error (~1e-3 relative after one Newton pass, under half-precision output rounding).
    count_support=False skips the support count (three operations per score) and fills support with -1.
    """
    B, H, Nq, D = q.shape
    dev = q.device
    out = torch.empty_like(q) if out is None else out
    tau_out = torch.empty((B, H, Nq), device=dev, dtype=torch.float32)
    support = torch.empty((B, H, Nq), device=dev, dtype=torch.int32)
    write_map = hits is None and need_map
    tile_map = torch.zeros(tile_max.shape, device=dev, dtype=torch.int8) if write_map else hits
    o2 = torch.empty((B, H, Nq, D) if save_bwd else (1,), device=dev, dtype=torch.float32)
    s2 = torch.empty((B, H, Nq) if save_bwd else (1,), device=dev, dtype=torch.float32)
    (k_src, v_src), kv_tma = tile_sources((k, v), lambda t: plan_descriptor(t, spec))
    _output_kernel[spec.grid](
        q, k_src, v_src, alpha_t, spec.lq, spec.lk, row_ref, tile_max, tau, tau_low,
        spec.lists,
        hits if hits is not None else tile_max,
        out, tau_out, support, tile_map if write_map else tile_max, o2, s2,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *tile_max.stride()[:3],
        H, Nq, k.shape[2], D, spec.group, float(scale), spec.win_left, spec.win_right,
        spec.num_m_blocks, tile_max.shape[2], **spec.flags, **spec.tiles,
        ALPHA_MODE=spec.alpha_mode, NK_CHUNK=spec.nk_chunk, FOLD=bool(fold or save_bwd),
        SAVE_BWD=bool(save_bwd), COUNT_SUPPORT=bool(count_support), FROM_HITS=hits is not None, WRITE_MAP=write_map,
        KV_TMA=kv_tma, **spec.sparse_launch, **(spec.tma_launch if kv_tma else {}))
    return dict(out=out, tau=tau_out, support=support,
                tile_map=tile_map.view(torch.bool) if tile_map is not None else None,
                o2=o2 if save_bwd else None, s=s2 if save_bwd else None)
