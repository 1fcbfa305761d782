"""Fused block-sparse backward of alpha-entmax attention (Triton).

Three launches:

* ``_prepare_kernel``: two jobs that need nothing but the forward's outputs and dO, in one launch (a launch
  costs host time, which small problems see): per line of the forward's tile map (a query block's row, and a key
  block's column) the list of marked tiles along it, and per query row delta_i = dO_i . O2_i / S_i from the
  forward's O2 and S;
* ``_dkdv_kernel``: one program per (batch, kv head, key block); it loops over the query heads of the
  GQA group and over the query blocks the transposed tile map marks, and sums dK, dV over the group in
  registers (no atomics);
* ``_dq_kernel``: one program per (batch, query head, query block), looping over marked key blocks;
  when alpha is learned it also forms, from the tiles it visits anyway, the six row sums that give
  each row's dL/dalpha (DESIGN.md section 1), summed into (Hq,) with torch.

Each program walks its compact list of marked blocks, so unmarked tiles cost nothing. Every reduction has a
fixed order: results are bit-identical run to run.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from entflash.kernels.common import (LN2, compact_marked, entmax_s, head_rows, head_source, log2_floored, mma,
                                     tile_interior, valid_lengths, visible_mask)
from entflash.kernels.forward import alpha_tensor
from entflash.kernels import launch
from entflash.kernels.launch import (alpha_mode, cdiv, dot_args, interpreting, mask_args, next_power_of_2, tile_sources,
                                     tma_plan, tma_tiles)

MAP_BLOCK = 64  # granularity of the forward's tile map (docs/ARCHITECTURE.md)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _one_block_list(map_base, s_line, s_entry, n_map_lines, n_entries, group, cnt_ptr, idx_ptr,
                    LINES: tl.constexpr, CHUNK: tl.constexpr):
    """Into idx_ptr[:count], ascending, the map entries (tiles along the other axis) that any of map lines
    [group * LINES, group * LINES + LINES) marks, and count into cnt_ptr (common.compact_marked, CHUNK entries
    per call)."""
    count = tl.sum(tl.zeros([1], dtype=tl.int32), axis=0)
    first = map_base + group * LINES * s_line
    for lo in range(0, n_entries, CHUNK):
        count += compact_marked(first, s_line, s_entry, n_map_lines - group * LINES, lo, n_entries, idx_ptr + count,
                                LINES, CHUNK)
    tl.store(cnt_ptr, count)


@triton.jit
def _delta_rows(DO, O2, S, DELTA, bh, block, s_dob, s_doh, s_dom, s_dod, s_o2b, s_o2h, s_o2m, s_o2d, s_sb, s_sh, s_sm,
                Hq, Nq, D, BR: tl.constexpr, BD: tl.constexpr):
    """delta_i = dO_i . O2_i / S_i (0 where S_i = 0) of rows [block * BR, block * BR + BR) of (batch * head) bh,
    into DELTA, fp32 (B, Hq, Nq) contiguous."""
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    rows = block * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    rmask = rows < Nq
    m2 = rmask[:, None] & (cols[None, :] < D)
    do = tl.load(DO + b * s_dob + h * s_doh + rows[:, None] * s_dom + cols[None, :] * s_dod,
                 mask=m2, other=0.0).to(tl.float32)
    o2 = tl.load(O2 + b * s_o2b + h * s_o2h + rows[:, None] * s_o2m + cols[None, :] * s_o2d,
                 mask=m2, other=0.0).to(tl.float32)
    ssum = tl.load(S + b * s_sb + h * s_sh + rows * s_sm, mask=rmask, other=0.0).to(tl.float32)
    live = ssum > 0.0
    delta = tl.where(live, tl.sum(do * o2, axis=1) / tl.where(live, ssum, 1.0), 0.0)
    tl.store(DELTA + bh.to(tl.int64) * Nq + rows, delta, mask=rmask)


@triton.jit
def _prepare_kernel(MAP, ROW_CNT, ROW_IDX, COL_CNT, COL_IDX, s_mb, s_mh, s_mr, s_mc, H, n_map_rows, n_map_cols,
                    n_row_lists, n_col_lists,
                    DO, O2, S, DELTA, s_dob, s_doh, s_dom, s_dod, s_o2b, s_o2h, s_o2m, s_o2d, s_sb, s_sh, s_sm, Nq, D,
                    ROW_LINES: tl.constexpr, ROW_CHUNK: tl.constexpr, COL_LINES: tl.constexpr,
                    COL_CHUNK: tl.constexpr, WITH_DELTA: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """The backward's first launch, one job per program (batch * head, job): programs below n_row_lists list the
    key tiles of ROW_LINES map rows (a dQ program's query block), the next n_col_lists the query tiles of
    COL_LINES map columns (a dK/dV program's key block), in the layouts block_lists returns; with WITH_DELTA the
    programs after them form delta for BR query rows each (_delta_rows; the DO, O2, S arguments are not read
    without it). One launch instead of two: each costs the host tens of microseconds, which a small problem's
    wall time shows (benchmarks.host_overhead)."""
    bh = tl.program_id(0)
    job = tl.program_id(1)
    map_base = MAP + (bh // H).to(tl.int64) * s_mb + (bh % H).to(tl.int64) * s_mh
    if job < n_row_lists:
        row = bh.to(tl.int64) * n_row_lists + job
        _one_block_list(map_base, s_mr, s_mc, n_map_rows, n_map_cols, job, ROW_CNT + row, ROW_IDX + row * n_map_cols,
                        ROW_LINES, ROW_CHUNK)
    elif job < n_row_lists + n_col_lists:
        row = bh.to(tl.int64) * n_col_lists + job - n_row_lists
        _one_block_list(map_base, s_mc, s_mr, n_map_cols, n_map_rows, job - n_row_lists, COL_CNT + row,
                        COL_IDX + row * n_map_rows, COL_LINES, COL_CHUNK)
    elif WITH_DELTA:
        _delta_rows(DO, O2, S, DELTA, bh, job - n_row_lists - n_col_lists, s_dob, s_doh, s_dom, s_dod,
                    s_o2b, s_o2h, s_o2m, s_o2d, s_sb, s_sh, s_sm, H, Nq, D, BR, BD)


@triton.jit
def _head_terms(ALPHA, h, scale):
    """Head h's alpha - 1, score coefficient (alpha - 1) * scale and power r - 1 = (2 - alpha) / (alpha - 1), from
    the (Hq,) float32 alpha table, in the same float32 operations as the forward kernels (their tau is in units of
    that coefficient)."""
    alpha = tl.load(ALPHA + h)
    return alpha - 1.0, (alpha - 1.0) * scale, (2.0 - alpha) / (alpha - 1.0)


@triton.jit
def _dkdv_step(k, v, dk, dv, q_src, do_src, b, h, t_base, d_base, m0, n0, offs_d,
               s_qm, s_qd, s_dom, s_dod, s_tm, coef, sexp, D, Lq, Lk, off, wl, wr,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
               CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
               ALPHA_MODE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Add the tile of queries [m0, m0+BM) x keys [n0, n0+BN) to dK (unscaled) and dV; the tile is kept
    transposed (keys are rows). Interior tiles skip the visibility mask. q_src, do_src: common.head_rows's
    sources (tensor descriptors with TMA, else pointers at this (batch, head))."""
    offs_m = m0 + tl.arange(0, BM)
    offs_n = n0 + tl.arange(0, BN)
    mmask = offs_m < Lq
    q = head_rows(q_src, b, h, m0, offs_m, offs_d, s_qm, s_qd, Lq, D, BM, BD, TMA)
    do = head_rows(do_src, b, h, m0, offs_m, offs_d, s_dom, s_dod, Lq, D, BM, BD, TMA)
    tau = tl.load(t_base + offs_m * s_tm, mask=mmask, other=float("inf"))
    delta = tl.load(d_base + offs_m, mask=mmask, other=0.0)
    zero = tl.zeros([offs_n.shape[0], offs_m.shape[0]], dtype=tl.float32)
    x = coef * mma(k, tl.trans(q), zero, DOT_PREC, UPCAST) - tau[None, :]
    u = tl.maximum(x, 0.0)
    if not tile_interior(m0, n0, BM, BN, Lq, Lk, off, wl, wr, CAUSAL, WIN_LEFT, WIN_RIGHT):
        vis = tl.trans(visible_mask(offs_m, offs_n, Lq, Lk, off, wl, wr, CAUSAL, WIN_LEFT, WIN_RIGHT))
        u = tl.where(vis, u, 0.0)
    s = entmax_s(u, sexp, ALPHA_MODE)
    dv = mma((u * s).to(do.dtype), do, dv, DOT_PREC, UPCAST)
    g = mma(v, tl.trans(do), zero, DOT_PREC, UPCAST)
    dz = s * (g - delta[None, :])
    dk = mma(dz.to(q.dtype), q, dk, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, TAU, DELTA, ALPHA, DK, DV, CNT, IDX, SEQQ, SEQK,
                 s_qb, s_qh, s_qm, s_qd,
                 s_kb, s_kh, s_kn, s_kd,
                 s_vb, s_vh, s_vn, s_vd,
                 s_dob, s_doh, s_dom, s_dod,
                 s_tb, s_th, s_tm,
                 s_dkb, s_dkh, s_dkn, s_dkd,
                 s_dvb, s_dvh, s_dvn, s_dvd,
                 Hq, Hkv, G, Nq, Nk, D, n_kblocks, n_qblocks, wl, wr, scale,
                 QB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                 CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                 HAS_LQ: tl.constexpr, HAS_LK: tl.constexpr, ALPHA_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
                 UPCAST: tl.constexpr, TMA: tl.constexpr):
    """dK, dV of one (batch, kv head, key block of BN), summed over the query heads of its group.

    The list IDX holds marked query blocks of QB rows; each is visited in QB // BM steps of BM rows. ALPHA: the
    (Hq,) float32 alpha of each head (_head_terms). TMA: Q and DO are tensor descriptors (common.head_rows).
    """
    bkv = tl.program_id(0)
    n = tl.program_id(1)
    b = bkv // Hkv
    kvh = bkv % Hkv
    Lq, Lk, off = valid_lengths(SEQQ, SEQK, b, Nq, Nk, HAS_LQ, HAS_LK)
    b64 = b.to(tl.int64)
    offs_n = n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    kmask = (offs_n < Lk)[:, None] & dmask[None, :]  # keys past the key length are never read
    store_mask = (offs_n < Nk)[:, None] & dmask[None, :]  # ... but their (zero) gradients are written
    k = tl.load(K + b64 * s_kb + kvh * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=kmask, other=0.0)
    v = tl.load(V + b64 * s_vb + kvh * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=kmask, other=0.0)
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    for hh in range(0, G):
        h = kvh * G + hh
        _, coef, sexp = _head_terms(ALPHA, h, scale)
        row = (b64 * Hq + h) * n_kblocks + n
        cnt = tl.load(CNT + row)
        q_src = head_source(Q, b64, h, s_qb, s_qh, TMA)
        do_src = head_source(DO, b64, h, s_dob, s_doh, TMA)
        t_base = TAU + b64 * s_tb + h * s_th
        d_base = DELTA + (b64 * Hq + h) * Nq
        for t in range(0, cnt):
            m = tl.load(IDX + row * n_qblocks + t)
            for sub in tl.static_range(QB // BM):
                dk, dv = _dkdv_step(k, v, dk, dv, q_src, do_src, b, h, t_base, d_base, m * QB + sub * BM,
                                    n * BN, offs_d, s_qm, s_qd, s_dom, s_dod, s_tm, coef, sexp,
                                    D, Lq, Lk, off, wl, wr, BM, BN, BD, CAUSAL, WIN_LEFT, WIN_RIGHT,
                                    ALPHA_MODE, DOT_PREC, UPCAST, TMA)
    dk = dk * scale
    tl.store(DK + b64 * s_dkb + kvh * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + b64 * s_dvb + kvh * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _dq_step(q, do, tau, delta, dq, k_src, v_src, b, kvh, m0, n0, offs_d,
             s_kn, s_kd, s_vn, s_vd, coef, sexp, D, Lq, Lk, off, wl, wr,
             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
             CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
             ALPHA_MODE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Add the tile of queries [m0, m0+BM) x keys [n0, n0+BN) to dQ (unscaled); interior tiles skip
    the visibility mask. Returns (dq, g, u, s): g = dO v^T, u = [x - tau]_+ and s = p^(2-alpha) of the
    tile, for the alpha row sums. k_src, v_src: common.head_rows's sources (tensor descriptors with TMA, else
    pointers at this (batch, kv head))."""
    offs_m = m0 + tl.arange(0, BM)
    offs_n = n0 + tl.arange(0, BN)
    k = head_rows(k_src, b, kvh, n0, offs_n, offs_d, s_kn, s_kd, Lk, D, BN, BD, TMA)
    v = head_rows(v_src, b, kvh, n0, offs_n, offs_d, s_vn, s_vd, Lk, D, BN, BD, TMA)
    zero = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=tl.float32)
    x = coef * mma(q, tl.trans(k), zero, DOT_PREC, UPCAST) - tau[:, None]
    u = tl.maximum(x, 0.0)
    if not tile_interior(m0, n0, BM, BN, Lq, Lk, off, wl, wr, CAUSAL, WIN_LEFT, WIN_RIGHT):
        vis = visible_mask(offs_m, offs_n, Lq, Lk, off, wl, wr, CAUSAL, WIN_LEFT, WIN_RIGHT)
        u = tl.where(vis, u, 0.0)
    s = entmax_s(u, sexp, ALPHA_MODE)
    g = mma(do, tl.trans(v), zero, DOT_PREC, UPCAST)
    dz = s * (g - delta[:, None])
    dq = mma(dz.to(k.dtype), k, dq, DOT_PREC, UPCAST)
    return dq, g, u, s


@triton.jit
def _alpha_tile_sums(g, u, s, a_gp, a_p, a_gd, a_d, a_gpl, a_pl):
    """Add one tile to the row sums of g p, p, g d, d, g p log2 u, p log2 u, where d = p - s (the caller turns
    the last two into sums of p log p with the factor ln 2 / (alpha - 1)). d is small where the formula amplifies
    most (alpha near 1, s = p^(2-alpha) ~ p), and summing it directly keeps the difference of the two weighted
    means exact to float32 (_alpha_row_grad)."""
    p = u * s
    d = p - s
    # log2(u) is the one entmax_s took for s (same operand: the compiler computes it once), floored so that the
    # product is 0 at u = 0
    pl = p * log2_floored(u)
    return (a_gp + tl.sum(g * p, axis=1), a_p + tl.sum(p, axis=1),
            a_gd + tl.sum(g * d, axis=1), a_d + tl.sum(d, axis=1),
            a_gpl + tl.sum(g * pl, axis=1), a_pl + tl.sum(pl, axis=1))


@triton.jit
def _alpha_row_grad(am1, a_gp, a_p, a_gd, a_d, a_gpl, a_pl):
    """Per-row dL/dalpha (DESIGN.md section 1) from the row sums, with p renormalized by sum_j p:
    sum_j g_j [(p_j - s^_j)/(a-1)^2 - (p_j log p_j - s^_j H)/(a-1)], s^ = s / sum s, H = sum p log p.
    Renormalizing removes the rounding of tau, which the formula amplifies by 1/(a-1)^2. The difference of the
    means gp - gs = sum g p / P - sum g s / S is formed as (sum g d - gs sum d) / P with d = p - s (an identity
    for S = P - sum d): as two separate float32 means it lost their common digits, and at alpha = 1.01 with
    large logits dalpha came out 2.4% off. 0 on empty rows."""
    live = a_p > 0.0
    P = tl.where(live, a_p, 1.0)
    S = P - a_d
    logP = tl.log(P)
    gp = a_gp / P
    gs = (a_gp - a_gd) / tl.where(live & (S > 0.0), S, 1.0)
    gp_minus_gs = (a_gd - gs * a_d) / P
    ent = a_pl / P - logP
    gpl = a_gpl / P - gp * logP
    da = gp_minus_gs / (am1 * am1) - (gpl - gs * ent) / am1
    return tl.where(live, da, 0.0)


@triton.jit
def _dq_kernel(Q, K, V, DO, TAU, DELTA, ALPHA, DAROW, DQ, CNT, IDX, SEQQ, SEQK,
               s_qb, s_qh, s_qm, s_qd,
               s_kb, s_kh, s_kn, s_kd,
               s_vb, s_vh, s_vn, s_vd,
               s_dob, s_doh, s_dom, s_dod,
               s_tb, s_th, s_tm,
               s_dqb, s_dqh, s_dqm, s_dqd,
               Hq, G, Nq, Nk, D, n_qblocks, n_kblocks, wl, wr, scale,
               KB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
               CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
               HAS_LQ: tl.constexpr, HAS_LK: tl.constexpr, ALPHA_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
               UPCAST: tl.constexpr, REVERSE: tl.constexpr, ALPHA_GRAD: tl.constexpr, TMA: tl.constexpr):
    """dQ of one (batch, query head, query block of BM) over its marked key blocks of KB keys, each
    visited in KB // BN steps. With ALPHA_GRAD it also writes the rows' dL/dalpha into DAROW, from six
    row sums formed here from the tiles it visits anyway (no extra sweep, nothing saved by the forward:
    the stored output is rounded to the input dtype, too coarse for alpha near 1). TMA: K and V are tensor
    descriptors (common.head_rows)."""
    bh = tl.program_id(0)
    m = tl.program_id(1)
    if REVERSE:  # causal: the last query blocks have the most work, start them first
        m = n_qblocks - 1 - m
    b = bh // Hq
    h = bh % Hq
    kvh = h // G
    Lq, Lk, off = valid_lengths(SEQQ, SEQK, b, Nq, Nk, HAS_LQ, HAS_LK)
    b64 = b.to(tl.int64)
    am1, coef, sexp = _head_terms(ALPHA, h, scale)
    offs_m = m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    mmask = offs_m < Nq
    qmask = (offs_m < Lq)[:, None] & dmask[None, :]  # rows past the query length are never read
    q = tl.load(Q + b64 * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=qmask, other=0.0)
    do = tl.load(DO + b64 * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod,
                 mask=qmask, other=0.0)
    tau = tl.load(TAU + b64 * s_tb + h * s_th + offs_m * s_tm, mask=mmask, other=float("inf"))
    delta = tl.load(DELTA + (b64 * Hq + h) * Nq + offs_m, mask=mmask, other=0.0)
    k_src = head_source(K, b64, kvh, s_kb, s_kh, TMA)
    v_src = head_source(V, b64, kvh, s_vb, s_vh, TMA)
    row = (b64 * Hq + h) * n_qblocks + m
    cnt = tl.load(CNT + row)
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    a_gp = tl.zeros([BM], dtype=tl.float32)
    a_p = tl.zeros([BM], dtype=tl.float32)
    a_gd = tl.zeros([BM], dtype=tl.float32)
    a_d = tl.zeros([BM], dtype=tl.float32)
    a_gpl = tl.zeros([BM], dtype=tl.float32)
    a_pl = tl.zeros([BM], dtype=tl.float32)
    lcoef = LN2 / am1
    for t in range(0, cnt):
        n = tl.load(IDX + row * n_kblocks + t)
        for sub in tl.static_range(KB // BN):
            dq, g, u, s = _dq_step(q, do, tau, delta, dq, k_src, v_src, b, kvh, m * BM, n * KB + sub * BN,
                                   offs_d, s_kn, s_kd, s_vn, s_vd, coef, sexp, D, Lq, Lk, off,
                                   wl, wr, BM, BN, BD, CAUSAL, WIN_LEFT, WIN_RIGHT, ALPHA_MODE, DOT_PREC, UPCAST,
                                   TMA)
            if ALPHA_GRAD:
                a_gp, a_p, a_gd, a_d, a_gpl, a_pl = _alpha_tile_sums(g, u, s, a_gp, a_p, a_gd, a_d, a_gpl, a_pl)
    dq = dq * scale
    tl.store(DQ + b64 * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])  # padded rows get zeros
    if ALPHA_GRAD:
        tl.store(DAROW + (b64 * Hq + h) * Nq + offs_m,
                 _alpha_row_grad(am1, a_gp, a_p, a_gd, a_d, lcoef * a_gpl, lcoef * a_pl), mask=mmask)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
LIST_CHUNK = 512  # most map entries one compact_marked call scans (longer lines take several calls)


def _list_chunk(n_entries: int) -> int:
    """Entries per compact_marked call for map lines of n_entries tiles: the whole line, up to LIST_CHUNK."""
    return min(LIST_CHUNK, max(16, next_power_of_2(n_entries)))


def block_lists(tile_map: torch.Tensor, row_lines: int, col_lines: int):
    """Compact lists of the marked tiles of a (B, H, R, C) bool or int8 tile map, in one launch: one list per
    group of row_lines map rows (its entries are column indices) and one per group of col_lines map columns
    (row indices).

    Returns row_counts (B, H, ceil(R / row_lines)) int32, row_indices (B, H, ceil(R / row_lines), C) int32,
    col_counts (B, H, ceil(C / col_lines)) int32 and col_indices (B, H, ceil(C / col_lines), R) int32: the
    first counts[b, h, l] entries of indices[b, h, l] are the tiles marked in any line of group l, ascending
    (the rest is not written)."""
    return _prepare(tile_map, row_lines, col_lines, None)[0]


def prepare_backward(tile_map: torch.Tensor, row_lines: int, col_lines: int, grad_out: torch.Tensor,
                     o2: torch.Tensor, s_sum: torch.Tensor):
    """block_lists(tile_map, row_lines, col_lines) and delta_i = dO_i . O2_i / S_i (0 where S_i = 0), a
    (B, Hq, Nq) float32 tensor, in one launch; grad_out and o2 (B, Hq, Nq, D), s_sum (B, Hq, Nq), tile_map's
    B and H are Hq. Returns (lists, delta)."""
    return _prepare(tile_map, row_lines, col_lines, (grad_out, o2, s_sum))


def _prepare(tile_map, row_lines, col_lines, delta_inputs):
    """The launch of _prepare_kernel behind block_lists and prepare_backward: (lists, delta or None)."""
    if tile_map.dtype == torch.bool:
        tile_map = tile_map.view(torch.int8)
    B, H, R, C = tile_map.shape
    n_row_lists, n_col_lists = cdiv(R, row_lines), cdiv(C, col_lines)
    new = functools.partial(torch.empty, dtype=torch.int32, device=tile_map.device)
    row_counts, row_indices = new((B, H, n_row_lists)), new((B, H, n_row_lists, C))
    col_counts, col_indices = new((B, H, n_col_lists)), new((B, H, n_col_lists, R))
    lists = row_counts, row_indices, col_counts, col_indices
    jobs = n_row_lists + n_col_lists if R and C else 0
    # without delta_inputs the delta programs' arguments are placeholders (never read: WITH_DELTA)
    delta, delta_args, delta_blocks, BR, BD = None, (tile_map,) * 4 + (0,) * 13, 0, 32, 16
    if delta_inputs is not None:
        grad_out, o2, s_sum = delta_inputs
        Nq, D = grad_out.shape[2], grad_out.shape[3]
        BD = max(16, next_power_of_2(D))
        BR = 32 if BD <= 128 else 16
        delta = torch.empty((B, H, Nq), dtype=torch.float32, device=tile_map.device)
        delta_blocks = cdiv(Nq, BR)
        delta_args = (grad_out, o2, s_sum, delta, *grad_out.stride(), *o2.stride(), *s_sum.stride(), Nq, D)
    if B * H and jobs + delta_blocks:
        _prepare_kernel[(B * H, jobs + delta_blocks)](
            tile_map, *lists, *tile_map.stride(), H, R, C, n_row_lists if jobs else 0, n_col_lists if jobs else 0,
            *delta_args, ROW_LINES=row_lines, ROW_CHUNK=_list_chunk(C), COL_LINES=col_lines, COL_CHUNK=_list_chunk(R),
            WITH_DELTA=delta_inputs is not None, BR=BR, BD=BD, num_warps=4)
    return lists, delta


def _check_blocks(cfg: dict) -> None:
    """The block sizes the kernels can walk the 64x64 tile map with (ValueError naming the entry otherwise): a dQ
    program covers whole map rows (bm_dq a multiple of 64) in key steps that split a map tile (bn_dq divides
    64); a dK/dV program covers whole map columns (bn_kv) in query steps that split a tile (bm_kv)."""
    for name, whole in (("bm_dq", True), ("bn_dq", False), ("bn_kv", True), ("bm_kv", False)):
        size = cfg[name]
        ok = size % MAP_BLOCK == 0 if whole else (size >= 16 and MAP_BLOCK % size == 0)
        if not ok:
            want = "a multiple of 64" if whole else "a divisor of 64, at least 16"
            raise ValueError(f"attention_backward: blocks[{name!r}] must be {want}, got {size}")


def _alloc_like(t: torch.Tensor) -> torch.Tensor:
    """Uninitialized output shaped and strided like t (the kernels write every element)."""
    return torch.empty_like(t)


def _pick_blocks(D: int, dtype: torch.dtype):
    """Block sizes and launch options for head dim D and input dtype (GPU tuning; small tiles under the
    interpreter).

    bm_dq: query rows per dQ program (multiple of 64); bn_dq: keys per dQ inner step (16, 32 or 64);
    bn_kv: keys per dK/dV program (multiple of 64); bm_kv: query rows per dK/dV inner step (16, 32 or 64);
    warps, stages: the launch's num_warps and num_stages. A `blocks=` dict given to attention_backward overrides
    these entries (checked by _check_blocks) and may add maxnreg (a cap on registers per thread, for launch
    experiments: scripts/kernel_dev.py --bwd-configs).
    """
    if interpreting():
        return dict(bm_dq=64, bn_dq=64, bm_kv=64, bn_kv=64, warps=4, stages=1)
    if D <= 128 and dtype == torch.float32:
        # exact-float32 dots are built from FMAs: with 4 warps and 2 stages ptxas spills 14-54 KB per thread
        # (a local-memory stack frame) in the dK/dV kernel at D = 32-128; 8 warps and 1 stage bring D <= 64
        # under 0.5 KB and halve D = 128 (scripts/compile_kernels.py machinery; not yet timed on the GPU)
        return dict(bm_dq=64, bn_dq=64, bm_kv=64, bn_kv=64, warps=8, stages=1)
    if D <= 128:  # H100, D=128, bf16, N=4k/16k: 0.82-0.89x FA2's backward (128x64 tiles, 8 warps: 0.96-1.0x)
        return dict(bm_dq=64, bn_dq=64, bm_kv=64, bn_kv=64, warps=4, stages=2)
    if dtype == torch.float32:
        # float32 operands double the tiles: 64-wide inner steps need 256-272 KiB of shared memory, over
        # the H100's 227 KiB; 32-wide steps need 192-200 KiB (scripts/compile_kernels.py reports both)
        return dict(bm_dq=64, bn_dq=32, bm_kv=32, bn_kv=64, warps=8, stages=1)
    return dict(bm_dq=64, bn_dq=64, bm_kv=64, bn_kv=64, warps=8, stages=1)


def attention_backward(q, k, v, grad_out, tau, tile_map, o2, s_sum, alpha, causal, scale,
                       window, seqlens_q, seqlens_k, *, alpha_requires_grad=False, blocks=None):
    """Gradients of alpha-entmax attention, visiting only the tiles the forward's tile map marks.

    Shapes and dtypes (any strides):
      q, grad_out       (B, Hq, Nq, D)  float16 / bfloat16 / float32
      k, v              (B, Hkv, Nk, D) q's dtype; Hq % Hkv == 0, query head h uses kv head h // (Hq // Hkv)
      tau               (B, Hq, Nq) float32 threshold in (alpha-1)*score units, +inf on fully masked rows
      tile_map          (B, Hq, ceil(Nq/64), ceil(Nk/64)) bool, a superset of the tiles holding p > 0
      o2                (B, Hq, Nq, D) float32, sum_j p_ij^(2-alpha) v_j
      s_sum             (B, Hq, Nq) float32, sum_j p_ij^(2-alpha) (0 on fully masked rows)
                        delta_i = dO_i . O2_i / S_i comes from o2 / s_sum; dalpha from six row sums the
                        dQ kernel forms at this tau (neither the output, rounded to the input dtype, nor
                        sums at an earlier tau are needed: the formula amplifies errors by 1/(alpha-1)^2)
      alpha             python float in (1, 2] or (Hq,) tensor; causal bool (bottom-right aligned);
                        scale python float (scores are scale * q.k); window None or (left, right) ints/None;
                        seqlens_q, seqlens_k None or (B,) int tensors (right padding); semantics as in
                        docs/ARCHITECTURE.md.
      blocks            optional dict overriding block sizes and launch options (see _pick_blocks).
    Returns (dq, dk, dv, dalpha): dq like q, dk/dv like k/v (input dtype, fp32 accumulation inside) and
    dalpha (Hq,) float32 when alpha_requires_grad else None. Fully masked rows contribute nothing.

    Deterministic: the dK/dV kernel sums the GQA group inside one program and dQ has its own kernel, so
    no atomics are used and every sum has a fixed order; results are bit-identical run to run.
    """
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention_backward: q must be float16, bfloat16 or float32, got {q.dtype}")
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"attention_backward: Hq={Hq} is not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    dev = q.device
    if q.numel() == 0 or k.numel() == 0:  # nothing to launch: no query, or no key to attend to
        dalpha = torch.zeros(Hq, dtype=torch.float32, device=dev) if alpha_requires_grad else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dalpha
    BD = max(16, next_power_of_2(D))
    cfg = _pick_blocks(D, q.dtype)
    if blocks:
        cfg.update(blocks)
        _check_blocks(cfg)
    alpha_t, mode = alpha_tensor(alpha, Hq, dev), alpha_mode(alpha)
    tau = tau.to(torch.float32)

    flags, wl_i, wr_i = mask_args(causal, window, seqlens_q, seqlens_k)
    common = dict(**flags, ALPHA_MODE=mode, **dot_args(q.dtype), num_warps=cfg["warps"], num_stages=cfg["stages"])
    tile_map = tile_map.to(dev)
    # the lists of marked tiles for both kernels, and delta_i = dO_i . O2_i / S_i, in one launch
    (cnt_q, idx_q, cnt_kv, idx_kv), delta = prepare_backward(tile_map, cfg["bm_dq"] // MAP_BLOCK,
                                                             cfg["bn_kv"] // MAP_BLOCK, grad_out, o2, s_sum)
    darow = torch.empty((B, Hq, Nq), dtype=torch.float32, device=dev) if alpha_requires_grad else delta
    # lengths as int32 on the device, or a placeholder pointer (never read) where absent
    sq, sk = (delta if lens is None else lens.to(device=dev, dtype=torch.int32).contiguous()
              for lens in (seqlens_q, seqlens_k))

    # tiles read through TMA descriptors where every row is valid (launch.tma_plan), in both kernels or neither;
    # a kernel that reads through them takes launch.TMA_MAXNREG at D <= 64, unless `blocks` names a cap
    tma = seqlens_q is None and tma_plan(q, BD, seqlens_k)

    def register_cap(reads_tma: bool) -> dict:
        cap = cfg.get("maxnreg") or (launch.TMA_MAXNREG if reads_tma and BD <= 64 else None)
        return {"maxnreg": cap} if cap else {}

    # dK, dV: one program per (batch, kv head, key block), over the map's columns
    bm, bn = cfg["bm_kv"], cfg["bn_kv"]
    n_kb, n_qb = idx_kv.shape[2], idx_kv.shape[3]
    dk = _alloc_like(k)
    dv = _alloc_like(v)
    (q_src, do_src), dkdv_tma = tile_sources((q, grad_out), lambda t: tma_tiles(t, bm, BD) if tma else None)
    _dkdv_kernel[(B * Hkv, n_kb)](
        q_src, k, v, do_src, tau, delta, alpha_t, dk, dv, cnt_kv, idx_kv,
        sq, sk,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *tau.stride(),
        *dk.stride(), *dv.stride(),
        Hq, Hkv, G, Nq, Nk, D, n_kb, n_qb, wl_i, wr_i, float(scale),
        QB=MAP_BLOCK, BM=bm, BN=bn, BD=BD, TMA=dkdv_tma, **common, **register_cap(dkdv_tma))

    # dQ: one program per (batch, query head, query block), over the map's rows
    bm, bn = cfg["bm_dq"], cfg["bn_dq"]
    n_qb, n_kb = idx_q.shape[2], idx_q.shape[3]
    dq = _alloc_like(q)
    (k_src, v_src), dq_tma = tile_sources((k, v), lambda t: tma_tiles(t, bn, BD) if tma else None)
    _dq_kernel[(B * Hq, n_qb)](
        q, k_src, v_src, grad_out, tau, delta, alpha_t, darow, dq, cnt_q, idx_q,
        sq, sk,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *tau.stride(), *dq.stride(),
        Hq, G, Nq, Nk, D, n_qb, n_kb, wl_i, wr_i, float(scale),
        KB=MAP_BLOCK, BM=bm, BN=bn, BD=BD, REVERSE=bool(causal), ALPHA_GRAD=alpha_requires_grad, TMA=dq_tma,
        **common, **register_cap(dq_tma))

    dalpha = None
    if alpha_requires_grad:
        dalpha = darow.sum(dim=(0, 2), dtype=torch.float64).to(torch.float32)
    return dq, dk, dv, dalpha
