"""The one dense sweep of the forward: per-64x64-tile maxima relative to each row's reference, and the histogram
start of tau.

Tile values. Each query block first scores NEAR_TILES key tiles, the one holding its last diagonal position and
the one before it, where local attention has its largest scores, and bins every score of them; the histogram's
lower bound of tau from those scores alone is then each row's reference ref_i, a lower bound of its final tau
(adding keys only raises tau). For the 64 rows i of a sub-block and the keys j of a tile, the tile value is
max_ij (x_ij - ref_i) (the near tiles' values are stored once the references exist). Later stages (solve.py,
output.py) visit a tile only if its value exceeds the lowest (threshold_i - ref_i) of the sub-block's rows: a
row with a score above its threshold in the tile makes the value exceed it, whatever the references. With
references close to each row's tau the test is close to the per-row one; with the rows' maxima as references (up
to 0b24c45) it was loose wherever rows differ in how far below their max tau lies: on the benchmark's inputs at
~60% block sparsity it passed 65-79% of the visible tiles where 41% hold a non-zero (N = 1024-2048, causal and
not), against 42-46% with the references (interpreter counts, tile values stored by the kernels). A tile whose
scores all lie at or below their rows' references holds no non-zero and is not binned either. A row that sees
no key in the near tiles has reference -inf: the tiles it sees get value +inf, always candidates.

Histogram. Each row also counts its scores in 16 bins of width 1/16 below a top that is the running
max rounded up to the bin grid (top = ceil(16 m) / 16). When the max rises, the top rises by whole bins
and the counts move down by as many bins (common.shift_words): no count ever sits in a bin whose lower
edge is above its score, so the in-register solve at the end (common.histogram_lower_tau) gives a
guaranteed lower bound of tau, within about one bin of it. Scores at or below top - 1 are not counted
(tau >= m - 1 >= top - 1 - 1/16 makes them zero or nearly so; dropping scores only lowers the bound), and
a tile with no score above its rows' references is not binned at all, so under local attention the histogram
costs little beyond the tiles near the diagonal. Under dense attention most tiles do reach the references;
there (FAR_TILE_SCORES = 2) only the key tiles within one tile of the query block's diagonal, and the first
tile (where attention sinks sit), bin every score: the others bin two scores per row, its largest among the
tile's even columns and its largest among the odd ones (one of them the row's max), a few instructions per row
instead of about twenty per score. That too only drops scores, so the bound stays valid; it loosens where a far
tile holds more of a row's top scores than it bins: its two largest when they share a column parity, or more
than two (FAR_TILE_SCORES = 1 bins the max alone).
The counts live in 16-bit lanes of four int64 words per row (common.histogram_words); a bin holding more
than 65535 scores wraps, which loses counts (and may add one to the next lower bin of the same word): the
bound stays valid, only looser.

Every later stage only visits candidate tiles, so this is the only pass whose cost grows with every
visible key.
"""
import torch
import triton
import triton.language as tl

from entflash.kernels.common import (head_source, histogram_lower_tau, histogram_words, histogram_words_of_rows,
                                     histogram_words_pair, key_range, load_rows, program_coords, score_tile,
                                     shift_words, sub_block_max_rows, unpack_words)
from entflash.kernels.launch import cdiv, tile_source

HIST_ITERS = 8  # Newton steps of the in-register solve over the bin counts
# key tiles each query block scores before its rows' references are set (module docstring): the tile holding the
# block's last diagonal position and the one before it
NEAR_TILES = tl.constexpr(2)
# how many of each row's scores a far key tile bins (module docstring): 2 (the largest of each column parity) or
# 1 (the largest), or 0 to bin every score of every tile; dense_sweep's default. Up to a4b17d8, 2 binned the two
# largest, found by a second pass over the tile (three instructions per score more).
FAR_TILE_SCORES = 2
# the same when a Newton pass follows the sweep on 16-bit inputs (kernels/forward.py): the pass absorbs the looser
# start. On the H100 at N = 16k, D = 64, bf16, one score per far tile ran the sweep 26-29% faster than two, dense
# and ~60% block sparse, with the bound's mean gap 0.50 and 0.29 bins instead of 0.41 and 0.27; without a Newton
# pass (inference) the output error rose from 0.008 to 0.014 at dense (benchmarks/results/kernel_dev-0c91a5c.json,
# whose sweep also scaled the row maxima after the reductions, _sweep_tile's docstring)
FAR_TILE_SCORES_BEFORE_NEWTON = 1


@triton.jit
def _sweep_tile(q, k_src, start_m, start_n, m_i, top, w0, w1, w2, w3, ref, tmax_ptr, sub_rows, offs_m, offs_d,
                stride_kn, stride_kd, stride_tm, D, qk_scale, len_q, len_k, offset, win_left, win_right,
                N_SUB_ROWS, all_scores, kv_b, kv_h, CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr,
                WIN_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                UPCAST: tl.constexpr, FAR_SCORES: tl.constexpr, KV_TMA: tl.constexpr):
    """Score the key tile at start_n and fold it into the running state: row max m_i (BLOCK_M,), bin top
    (BLOCK_M,) float32 (16 * top is an integer; -inf before the row's first visible key) and the bin
    counts as four (BLOCK_M,) int64 words (common.histogram_words). Stores the tile's value for each 64-row
    sub-block: the max over its rows of (the row's max in this tile minus its reference ref (BLOCK_M,)), -inf
    where no row sees a key of the tile, +inf where the tile raises some row's bin top (that row's max is in
    the tile) or holds a key of a row whose reference is -inf. all_scores (scalar bool): bin every score of
    the tile, else per row its largest (FAR_SCORES = 1) or its largest of each column parity (2); a tile is
    binned only when its value is above 0 (some row holds a score above its reference, a lower bound of tau).
    Returns the updated (m_i, top, w0, w1, w2, w3) and the tile's row maxima (BLOCK_M,) in tau units (-inf for
    rows without a visible key in it).

    Whether the counts shift depends on the rows' tops alone, never on a tile value being exactly 0. The row
    maxima are scaled to tau units after the reduction, which saves a multiply per score in the far tiles. Compiled,
    the scaled max minus the reference may fuse into one multiply-add (about an ulp off the two rounded steps): the
    stored values are bounds up to such rounding, which the later stages' margin covers. (At 0c91a5c the shift was
    taken only for a relative value of exactly 0, and that rounding skipped shifts and broke the bound wherever
    qk_scale * 16 != 1; 1d7fbb0 scaled every score first.)"""
    # unscaled q . k (masked: -inf); qk_scale > 0 and rounding is monotonic, so the scaled row max is the max
    # of the scaled scores exactly, and only the tiles that bin every score scale every score
    raw, offs_n = score_tile(q, k_src, start_m, start_n, offs_m, offs_d, stride_kn, stride_kd, D,
                             1.0, tl.zeros_like(m_i), len_q, len_k, offset, win_left, win_right,
                             CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_N, DOT_PREC, UPCAST, KV_TMA, kv_b, kv_h)
    if FAR_SCORES == 2:
        # the largest score among the tile's even columns and among its odd ones (each thread holds pairs of
        # adjacent columns, so the split moves no data): the row max and a second score to bin, for two
        # half-width reductions instead of a full-width one and a second pass over the tile
        even, odd = tl.split(tl.reshape(raw, (BLOCK_M, BLOCK_N // 2, 2)))
        even_max = tl.max(even, axis=1)
        odd_max = tl.max(odd, axis=1)
        raw_max = tl.maximum(even_max, odd_max)
    else:
        raw_max = tl.max(raw, axis=1)
    tile_row_max = tl.where(raw_max > float("-inf"), raw_max * qk_scale, float("-inf"))
    m_i = tl.maximum(m_i, tile_row_max)
    seen = m_i > float("-inf")
    # The top follows the max up the bin grid and the counts move down by as many bins (`rise`, 0..16).
    new_top = tl.where(seen, tl.ceil(tl.where(seen, m_i, 0.0) * 16.0), float("-inf"))
    had = top > float("-inf")
    rise = tl.where(had, tl.minimum(new_top - tl.where(had, top, 0.0), 16.0), 0.0)
    # One cross-row reduction serves the store and both branches below: a row whose top rose is flagged +inf
    # (its max is in this tile, above its reference: the tile is a candidate anyway), which lifts the block's
    # largest flag to +inf exactly when some row may have to shift (a row whose reference is -inf gives +inf too:
    # a shift by 0 bins, which changes nothing).
    value = tl.where(tile_row_max > float("-inf"), tile_row_max - ref, float("-inf"))
    tile_flags = sub_block_max_rows(tl.where(rise > 0.0, float("inf"), value), BLOCK_M)
    tl.store(tmax_ptr + sub_rows * stride_tm + start_n // BLOCK_N, tile_flags, mask=sub_rows < N_SUB_ROWS)
    largest_flag = tl.max(tile_flags, axis=0)
    # Most tiles raise no row's top (a rise needs a new max that crosses a bin edge): they skip the shift,
    # which would move every count by 0 bins.
    if largest_flag == float("inf"):
        w0, w1, w2, w3 = shift_words(w0, w1, w2, w3, rise.to(tl.int32))
    # bin the tile only if some row may have a score above its reference: scores at or below a lower bound of
    # tau are never in the support, and dropping them leaves the histogram's bound a lower bound
    if largest_flag > 0.0:
        if all_scores:
            if FAR_SCORES == 2:
                # both halves in the layout of the split above (binning raw itself would move the row
                # vectors between layouts: 144 more shuffles per tile at D = 64 on sm_90)
                h0, h1, h2, h3 = histogram_words_pair(even * qk_scale, odd * qk_scale, new_top)
            else:
                h0, h1, h2, h3 = histogram_words(raw * qk_scale, new_top)
        else:
            h0, h1, h2, h3 = histogram_words_of_rows(tile_row_max, new_top)
            if FAR_SCORES == 2:
                # the other column parity's largest score: another of the row's scores (the second largest
                # when the two largest sit in columns of different parity, as adjacent keys do)
                second = tl.minimum(even_max, odd_max) * qk_scale
                g0, g1, g2, g3 = histogram_words_of_rows(second, new_top)
                h0 += g0
                h1 += g1
                h2 += g2
                h3 += g3
        w0 += h0
        w1 += h1
        w2 += h2
        w3 += h3
    return m_i, new_top, w0, w1, w2, w3, tile_row_max


@triton.jit
def _sweep_kernel(Q, K, Alpha, Lq, Lk, RowRef, TileMax, TauHist,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_tb, stride_th, stride_tm,
                  H, Nq, Nk, D, group, scale, win_left, win_right, NUM_M_BLOCKS, N_SUB_ROWS,
                  HAS_LQ: tl.constexpr, HAS_LK: tl.constexpr, CAUSAL: tl.constexpr,
                  WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                  ALPHA_MODE: tl.constexpr, HIST_ITERS: tl.constexpr, FAR_SCORES: tl.constexpr,
                  KV_TMA: tl.constexpr):
    b, h, hk, start_m, len_q, len_k, offset = program_coords(
        Lq, Lk, Nq, Nk, H, group, NUM_M_BLOCKS, HAS_LQ, HAS_LK, BLOCK_M)
    alpha = tl.load(Alpha + h).to(tl.float32)
    qk_scale = (alpha - 1.0) * scale
    rm1 = (2.0 - alpha) / (alpha - 1.0)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Nq, D)
    k_src = head_source(K, b, hk, stride_kb, stride_kh, KV_TMA)
    tmax_ptr = TileMax + b * stride_tb + h * stride_th
    sub_rows = start_m // 64 + tl.arange(0, BLOCK_M // 64)
    lo, hi = key_range(start_m, len_q, len_k, offset, win_left, win_right,
                       CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    w0 = tl.zeros((BLOCK_M,), dtype=tl.int64)
    w1 = tl.zeros((BLOCK_M,), dtype=tl.int64)
    w2 = tl.zeros((BLOCK_M,), dtype=tl.int64)
    w3 = tl.zeros((BLOCK_M,), dtype=tl.int64)
    # key tiles in descending rotated order, from the tile of the block's last diagonal position (query
    # start_m + BLOCK_M - 1 sees key start_m + BLOCK_M - 1 + offset; clamped into [lo, hi)): [lo, first] downwards,
    # then (first, hi) downwards. The first NEAR_TILES of them, where local attention has its largest scores,
    # bin every score against no reference (-inf); the bound of tau they give is then each row's reference, for
    # their own values (stored again) and for the tiles after them.
    n_tiles = (hi - lo + BLOCK_N - 1) // BLOCK_N
    first = (tl.minimum(tl.maximum(start_m + BLOCK_M - 1 + offset, lo), tl.maximum(hi - 1, lo)) - lo) // BLOCK_N
    ref = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    near_max0 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    near_max1 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for t in range(0, tl.minimum(n_tiles, NEAR_TILES)):
        m_i, top, w0, w1, w2, w3, tile_row_max = _sweep_tile(
            q, k_src, start_m, _nth_tile(t, first, n_tiles, lo, BLOCK_N), m_i, top, w0, w1, w2, w3, ref, tmax_ptr,
            sub_rows, offs_m, offs_d, stride_kn, stride_kd, stride_tm, D, qk_scale, len_q, len_k, offset, win_left,
            win_right, N_SUB_ROWS, True, b, hk, CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N, DOT_PREC, UPCAST,
            FAR_SCORES, KV_TMA)
        near_max0 = tl.where(t == 0, tile_row_max, near_max0)
        near_max1 = tl.where(t == 1, tile_row_max, near_max1)
    ref = _reference(w0, w1, w2, w3, m_i, top, rm1, 2.0 - alpha, ALPHA_MODE, HIST_ITERS)
    # the near tiles' values against the references (stored +inf above, against none)
    for t in tl.static_range(NEAR_TILES):
        near_max = near_max0
        if t == 1:
            near_max = near_max1
        value = sub_block_max_rows(tl.where(near_max > float("-inf"), near_max - ref, float("-inf")), BLOCK_M)
        kb = _nth_tile(t, first, n_tiles, lo, BLOCK_N) // BLOCK_N
        tl.store(tmax_ptr + sub_rows * stride_tm + kb, value, mask=(sub_rows < N_SUB_ROWS) & (t < n_tiles))
    for t in range(NEAR_TILES, n_tiles):
        start_n = _nth_tile(t, first, n_tiles, lo, BLOCK_N)
        near = (start_n + 2 * BLOCK_N > start_m + offset) & (start_n < start_m + offset + BLOCK_M + BLOCK_N)
        all_scores = near | (start_n == 0) | (FAR_SCORES == 0)
        m_i, top, w0, w1, w2, w3, _ = _sweep_tile(
            q, k_src, start_m, start_n, m_i, top, w0, w1, w2, w3, ref, tmax_ptr, sub_rows, offs_m, offs_d,
            stride_kn, stride_kd, stride_tm, D, qk_scale, len_q, len_k, offset, win_left, win_right, N_SUB_ROWS,
            all_scores, b, hk, CAUSAL, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N, DOT_PREC, UPCAST, FAR_SCORES, KV_TMA)
    tau = histogram_lower_tau(unpack_words(w0, w1, w2, w3), m_i, top / 16.0, rm1, 2.0 - alpha,
                              ALPHA_MODE, 16, HIST_ITERS)
    # both are lower bounds of tau (the reference's from fewer keys, each key only raising tau): keep the larger
    tau = tl.where(ref > float("-inf"), tl.maximum(tau, ref), tau)
    in_rows = offs_m < Nq
    tl.store(RowRef + (b * H + h) * Nq + offs_m, ref, mask=in_rows)
    tl.store(TauHist + (b * H + h) * Nq + offs_m, tau, mask=in_rows)


@triton.jit
def _reference(w0, w1, w2, w3, m_i, top, rm1, expo, ALPHA_MODE: tl.constexpr, HIST_ITERS: tl.constexpr):
    """Each row's reference for the tile values (BLOCK_M,): the histogram's lower bound of tau from the scores
    binned so far (a lower bound of the final tau: adding keys only raises it), -inf for rows without a visible
    key yet."""
    bound = histogram_lower_tau(unpack_words(w0, w1, w2, w3), m_i, top / 16.0, rm1, expo, ALPHA_MODE, 16,
                                HIST_ITERS)
    return tl.where(m_i > float("-inf"), bound, float("-inf"))


@triton.jit
def _nth_tile(t, first, n_tiles, lo, BLOCK_N: tl.constexpr):
    """First key of the t-th key tile of the sweep's order over the n_tiles tiles from lo: first, first - 1, ..., 0,
    then n_tiles - 1, ..., first + 1 (tile indices from lo)."""
    tile = first - t
    return lo + tl.where(tile >= 0, tile, tile + n_tiles) * BLOCK_N


def dense_sweep(q, k, alpha_t, scale, spec, far_scores=None):
    """Row references, per-tile maxima relative to them and the histogram's lower bound of tau, for
    x = (alpha - 1) * scale * q k^T under the visibility mask.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D) (fp16/bf16/fp32, any strides); alpha_t: (Hq,) float32;
    scale: python float; spec: the launch.StageSpec shared by the forward stages.
    Returns row_ref (B, Hq, Nq) float32, each row's reference: a lower bound of its tau (-inf for rows without
    a visible key in the first NEAR_TILES key tiles of the sweep's order), tile_max (B, Hq, ceil(Nq/64),
    ceil(Nk/64)) float32 and tau_hist (B, Hq, Nq) float32, all in tau units: tile_max is an upper bound of max
    over the 64 rows i and 64 keys j of the tile of (x_ij - row_ref_i) up to rounding (-inf for tiles never
    visited or without a visible score, +inf for a tile that holds a key of a row whose reference is -inf or
    raised some row's running max across a bin edge); tau_hist is a guaranteed lower bound of each row's tau up to
    rounding, >= row_ref (+inf for rows without a visible key), at most about one bin (1/16) below tau when every
    score is binned (far_scores=0),
    looser where a far key tile holds more of a row's top scores than it bins (far_scores 1: the largest; 2: the
    largest of each column parity; default FAR_TILE_SCORES; module docstring).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    n_sub, n_kt = cdiv(Nq, 64), cdiv(Nk, 64)
    n_mb = cdiv(Nq, spec.sweep_block_m)
    row_ref = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    tau_hist = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    tile_max = torch.full((B, H, n_sub, n_kt), float("-inf"), device=q.device, dtype=torch.float32)
    k_src, k_tma = tile_source(k, spec)
    _sweep_kernel[(n_mb, B * H)](
        q, k_src, alpha_t, spec.lq, spec.lk, row_ref, tile_max, tau_hist,
        *q.stride(), *k.stride(), *tile_max.stride()[:3],
        H, Nq, Nk, D, spec.group, float(scale), spec.win_left, spec.win_right,
        n_mb, n_sub, **spec.flags, **dict(spec.tiles, BLOCK_M=spec.sweep_block_m),
        ALPHA_MODE=spec.alpha_mode, HIST_ITERS=HIST_ITERS,
        FAR_SCORES=_far_scores(far_scores), KV_TMA=k_tma, **spec.sweep_launch)
    return row_ref, tile_max, tau_hist


def _far_scores(far_scores):
    """The FAR_SCORES constexpr for dense_sweep's far_scores argument (None: FAR_TILE_SCORES)."""
    value = FAR_TILE_SCORES if far_scores is None else far_scores
    if value not in (0, 1, 2):
        raise ValueError(f"far_scores: expected 0, 1 or 2 (scores binned per row of a far key tile), got {value!r}")
    return int(value)
