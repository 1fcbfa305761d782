"""Shared @triton.jit helpers for the entmax attention kernels (forward and backward).

Conventions used by every kernel of this package:

* Scores live in "tau units": x_ij = (alpha_h - 1) * scale * q_i . k_j, so that
  p_ij = [x_ij - tau_i]_+ ** r with r = 1 / (alpha_h - 1), and tau is reported in the same units.
  u = [x - tau]_+ >= 0 is the "shifted score".
* Key tiles are BLOCK_N = 64 wide; query blocks are BLOCK_M = 64 or 128 rows. The per-tile (row-relative)
  max of the sweep and the tile map are kept at 64 x 64 granularity, so a BLOCK_M = 128 program owns SUB = BLOCK_M // 64
  rows of them ("sub-blocks").
* ALPHA_MODE (tl.constexpr) selects the power code: 1 -> alpha = 1.5 (p = u^2, s = u),
  2 -> alpha = 2 (p = u, s = 1[u > 0]), 0 -> any alpha in (1, 2] through exp2 and fast_log2 (the GPU's
  special-function unit when compiled; libdevice pow does not run in the Triton interpreter).
* A masked (invisible) score is -inf; a row with no visible key has row max -inf and tau = +inf.
"""
import triton
import triton.language as tl

from entflash.kernels.launch import interpreting

# ln 2 for jit code (log x = LN2 * log2 x); a kernel may only read globals declared tl.constexpr
LN2 = tl.constexpr(0.6931471805599453)
# 1.5 * 2^23: a float32 in [2^23, 2^24) has unit spacing, so v + MAGIC_ROUND rounds v (|v| < 2^22) to an
# integer that the low mantissa bits of the sum hold (histogram_words)
MAGIC_ROUND = tl.constexpr(12582912.0)


# log2_floored's stand-in for log2(0) (fast_log2 gives -inf there, which entmax_s needs: exp2(-inf * e) = 0 for
# every e > 0): finite, so that 0 * log2(0) is 0 and so that x^0 = exp2(log2(x) * 0) is 1, not NaN, at a subnormal x
# that the compiled log2 reads as 0
LOG2_FLOOR = tl.constexpr(-1.0e30)
# entmax_s's least exponent r - 1: alpha = 2 has r - 1 = 0, where u^0 must still be 0 at u = 0 (-inf * 0 would be
# NaN); u^(1e-20) is 1 in float32 for every normal u
EXPO_FLOOR = tl.constexpr(1.0e-20)


@triton.jit
def _log2_interpreted(x):
    # as lg2.approx.ftz.f32 reads its input: a subnormal x (below 2^-126) as 0
    return tl.where(x < 1.1754943508222875e-38, float("-inf"), tl.log2(x))


@triton.jit
def _log2_unit(x):
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


# log2 of float32 values x >= 0 for the per-score power code, -inf at x = 0. Compiled, tl.log2 becomes libdevice's
# exact log2f, about 20 instructions per score; lg2.approx.ftz.f32 is one instruction of the GPU's special-function
# unit (absolute error about 2^-22). The .ftz form reads a subnormal x as 0 (the form without it rescales
# subnormals: three more instructions per score), so a subnormal shifted score u counts as outside the support:
# p = u^r would be below float32's normal range anyway. No floor is taken here (up to 128a28a a max with
# LOG2_FLOOR was one more instruction per score in every general-alpha pass): entmax_s needs none, and callers that
# multiply by the log, or raise to a power that may be 0, take log2_floored. The interpreter runs no inline
# assembly, so it runs tl.log2 with subnormal inputs flushed to 0 as the compiled form does: the CPU tests then see
# the GPU's -inf at a subnormal p (at 78d7663 only the GPU suite found a NaN dalpha from it). Chosen once, at
# import (TRITON_INTERPRET must be set before entflash is imported).
fast_log2 = _log2_interpreted if interpreting() else _log2_unit


@triton.jit
def log2_floored(x):
    """fast_log2(x) with LOG2_FLOOR in place of -inf (x = 0, and compiled, subnormal x): for products p * log2(p)
    that must be 0 at p = 0 and finite at a subnormal p, and for powers x^e with e = 0 (then 1 for x > 0)."""
    return tl.maximum(fast_log2(x), LOG2_FLOOR)


@triton.jit
def program_coords(Lq_ptr, Lk_ptr, Nq, Nk, H, group, NUM_M_BLOCKS,
                   HAS_LQ: tl.constexpr, HAS_LK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Coordinates of this program in a (NUM_M_BLOCKS, B * Hq) grid.

    Query blocks are scheduled longest-first (program 0 takes the last block, which sees the most
    keys under a causal mask). Returns (b, h, hk, start_m, len_q, len_k, offset), all int32 scalars:
    batch, query head, kv head (h // group), first query row, valid query/key lengths of batch b
    (from the optional int32 (B,) tensors Lq_ptr/Lk_ptr, else Nq/Nk) and the bottom-right offset
    len_k - len_q.
    """
    pid_m = NUM_M_BLOCKS - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // group
    start_m = pid_m * BLOCK_M
    len_q, len_k, offset = valid_lengths(Lq_ptr, Lk_ptr, b, Nq, Nk, HAS_LQ, HAS_LK)
    return b, h, hk, start_m, len_q, len_k, offset


@triton.jit
def valid_lengths(Lq_ptr, Lk_ptr, b, Nq, Nk, HAS_LQ: tl.constexpr, HAS_LK: tl.constexpr):
    """Valid query and key lengths of batch b and the bottom-right offset len_k - len_q (int32 scalars).

    The lengths come from the optional int32 (B,) tensors Lq_ptr/Lk_ptr (HAS_LQ/HAS_LK), else Nq/Nk."""
    len_q = Nq + 0 * b
    len_k = Nk + 0 * b
    if HAS_LQ:
        len_q = tl.load(Lq_ptr + b).to(tl.int32)
    if HAS_LK:
        len_k = tl.load(Lk_ptr + b).to(tl.int32)
    return len_q, len_k, len_k - len_q


@triton.jit
def key_range(start_m, len_q, len_k, offset, win_left, win_right,
              CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Half-open key range [lo, hi) that rows start_m .. start_m + BLOCK_M - 1 may see.

    lo is rounded down to a multiple of BLOCK_N; hi <= lo means the block sees nothing (all its
    rows are padding or fully masked). Scalars in, int32 scalars out.
    """
    last_row = tl.minimum(start_m + BLOCK_M, len_q) - 1
    lo = 0 * start_m
    if WIN_LEFT:
        lo = tl.maximum(start_m + offset - win_left, 0)
    hi = len_k + 0 * start_m
    if CAUSAL:
        hi = tl.minimum(hi, last_row + offset + 1)
    if WIN_RIGHT:
        hi = tl.minimum(hi, last_row + offset + win_right + 1)
    hi = tl.where(last_row < start_m, 0, hi)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def visible_mask(offs_m, offs_n, len_q, len_k, offset, win_left, win_right,
                 CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: may query row offs_m[i] see key offs_n[j]?

    offs_m (BLOCK_M,) and offs_n (BLOCK_N,) are int32 absolute positions. Query i sees key j iff
    i < len_q, j < len_k, and (CAUSAL) j <= i + offset, and (WIN_LEFT) j >= i + offset - win_left,
    and (WIN_RIGHT) j <= i + offset + win_right (bottom-right alignment, docs/ARCHITECTURE.md).
    """
    rows = offs_m[:, None]
    cols = offs_n[None, :]
    vis = (rows < len_q) & (cols < len_k)
    diag = rows + offset
    if CAUSAL:
        vis = vis & (cols <= diag)
    if WIN_LEFT:
        vis = vis & (cols >= diag - win_left)
    if WIN_RIGHT:
        vis = vis & (cols <= diag + win_right)
    return vis


@triton.jit
def tile_interior(m0, n0, BM: tl.constexpr, BN: tl.constexpr, len_q, len_k, offset, win_left, win_right,
                  CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr):
    """Does query i see key j for every i in [m0, m0+BM) and j in [n0, n0+BN)? (int32 scalars in, scalar bool out)

    True for the tiles away from every boundary (length, causal diagonal, window edges): those skip
    visible_mask, which costs several integer operations per score."""
    full = (m0 + BM <= len_q) & (n0 + BN <= len_k)
    if CAUSAL:
        full = full & (n0 + BN - 1 <= m0 + offset)
    if WIN_LEFT:
        full = full & (n0 >= m0 + BM - 1 + offset - win_left)
    if WIN_RIGHT:
        full = full & (n0 + BN - 1 <= m0 + offset + win_right)
    return full


@triton.jit
def load_rows(base, offs_r, offs_d, stride_r, stride_d, n_rows, D):
    """Load a (len(offs_r), BLOCK_D) tile of a row-major-ish (rows, D) slice; out-of-range -> 0."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation. UPCAST feeds float32 operands: Triton 3.6's interpreter
    gets bf16 products wrong, so launch.dot_args sets it for bf16 inputs under TRITON_INTERPRET=1."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def head_source(T, b, h, stride_b, stride_h, TMA: tl.constexpr):
    """What head_rows reads for batch b, head h of a (B, H, N, D) kernel argument T: with TMA, T itself (a tensor
    descriptor of the whole tensor), else a pointer at (b, h, row 0, dim 0)."""
    if TMA:
        src = T
    else:
        src = T + b * stride_b + h * stride_h
    return src


@triton.jit
def head_rows(src, b, h, start, offs_r, offs_d, stride_r, stride_d, n_rows, D,
              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """A (BLOCK_R, BLOCK_D) tile of rows offs_r = start + arange(BLOCK_R) of one (batch b, head h) of a
    (B, H, N, D) tensor: keys or values in the forward and dQ kernels, queries or output gradients in dK/dV.

    TMA: src is a tensor descriptor of the whole tensor with (1, 1, BLOCK_R, BLOCK_D) blocks (launch.tma_tiles):
    one bulk copy per tile, rows past N read as 0, no per-element address or mask arithmetic; the launch plans
    take it only where every row below N is valid (no length tensor for that side) and D = BLOCK_D. Otherwise
    src points at (row 0, dim 0) of this (batch, head) with strides (stride_r, stride_d), and rows at or past
    n_rows and dims at or past D read as 0 (padding or unused cache slots may hold anything, NaN included)."""
    if TMA:
        rows = tl.reshape(src.load([b, h, start, 0]), (BLOCK_R, BLOCK_D))
    else:
        rows = load_rows(src, offs_r, offs_d, stride_r, stride_d, n_rows, D)
    return rows


@triton.jit
def score_tile(q, k_src, start_m, start_n, offs_m, offs_d, stride_kn, stride_kd, D, qk_scale, shift,
               len_q, len_k, offset, win_left, win_right,
               CAUSAL: tl.constexpr, WIN_LEFT: tl.constexpr, WIN_RIGHT: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               KV_TMA: tl.constexpr, kv_b, kv_h):
    """Scores in tau units minus each row's shift, for one key tile: (BLOCK_M, BLOCK_N) float32, invisible -> -inf.

    q: (BLOCK_M, BLOCK_D) tile already loaded, rows offs_m = start_m + arange(BLOCK_M); keys
    start_n .. start_n + BLOCK_N - 1 are read from k_src: with KV_TMA a tensor descriptor (head_rows; batch kv_b,
    kv head kv_h), else a pointer with strides (stride_kn, stride_kd), keys at or past len_k not read (padding or
    unused cache slots may hold anything, NaN included). qk_scale = (alpha - 1) * scale (a scalar); shift
    (BLOCK_M,) float32, tau for the shifted scores x - tau of the later stages (one multiply-add per score, where
    scaling, masking and then subtracting took two instructions), zeros for the scores themselves.
    Returns (x - shift, offs_n).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if KV_TMA:
        kt = tl.trans(head_rows(k_src, kv_b, kv_h, start_n, offs_n, offs_d, stride_kn, stride_kd, len_k, D,
                                BLOCK_N, q.shape[1], True))
    else:
        kt = tl.load(k_src + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < len_k) & (offs_d[:, None] < D), other=0.0)
    x = mma(q, kt, tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32), DOT_PREC, UPCAST) * qk_scale - shift[:, None]
    if not tile_interior(start_m, start_n, q.shape[0], BLOCK_N, len_q, len_k, offset, win_left, win_right,
                         CAUSAL, WIN_LEFT, WIN_RIGHT):
        vis = visible_mask(offs_m, offs_n, len_q, len_k, offset, win_left, win_right,
                           CAUSAL, WIN_LEFT, WIN_RIGHT)
        x = tl.where(vis, x, float("-inf"))
    return x, offs_n


@triton.jit
def entmax_s(u, rm1, ALPHA_MODE: tl.constexpr):
    """s = p^(2 - alpha) = u^(r - 1) for shifted scores u >= 0 (any shape, float32).

    rm1 = r - 1 = (2 - alpha) / (alpha - 1) (scalar; unused for ALPHA_MODE 1 and 2). Zero where u = 0.
    The probability itself is p = u * s.
    """
    if ALPHA_MODE == 2:
        s = tl.where(u > 0, 1.0, 0.0)
    elif ALPHA_MODE == 1:
        s = u
    else:
        # zero at u = 0 without a select: fast_log2(0) * (r - 1) is -inf (r - 1 >= EXPO_FLOOR > 0)
        s = tl.exp2(fast_log2(u) * tl.maximum(rm1, EXPO_FLOOR))
    return s


@triton.jit
def entmax_p(x, tau, rm1, ALPHA_MODE: tl.constexpr):
    """p = [x - tau]_+^(1/(alpha-1)) and s = p^(2-alpha) for scores x (BLOCK_M, BLOCK_N) and
    tau (BLOCK_M,), both float32 in tau units. Returns (p, s, u) with u = [x - tau]_+."""
    return entmax_p_shifted(x - tau[:, None], rm1, ALPHA_MODE)


@triton.jit
def entmax_p_shifted(xs, rm1, ALPHA_MODE: tl.constexpr):
    """entmax_p for shifted scores xs = x - tau (any shape, float32): returns (p, s, u), u = [xs]_+."""
    u = tl.maximum(xs, 0.0)
    s = entmax_s(u, rm1, ALPHA_MODE)
    return u * s, s, u


@triton.jit
def pow_row(f, expo, ALPHA_MODE: tl.constexpr):
    """f^(2 - alpha) for row sums f > 0 (BLOCK_M,), expo = 2 - alpha (scalar). Zero-safe: f = 0 -> 0."""
    if ALPHA_MODE == 2:
        y = tl.where(f > 0, 1.0, 0.0)
    elif ALPHA_MODE == 1:
        y = tl.sqrt(f)
    else:
        y = tl.where(f > 0, tl.exp2(log2_floored(f) * expo), 0.0)
    return y


@triton.jit
def newton_tau(tau, f, s, expo, ALPHA_MODE: tl.constexpr):
    """One Newton step on g(tau) = F(tau)^(alpha-1) - 1, where F = sum p, S = sum p^(2-alpha).

    g is convex and decreasing (F^(alpha-1) is the r-norm of the convex [x - tau]_+), so a step from
    below the root stays below it: every iterate is a lower bound of the true tau. The step is exact
    when all non-zero p are equal. tau, f, s: (BLOCK_M,) float32; rows with s = 0 keep tau.
    """
    step = (f - pow_row(f, expo, ALPHA_MODE)) / tl.where(s > 0, s, 1.0)
    return tl.where(s > 0, tau + step, tau)


@triton.jit
def sub_block_max_rows(t, BLOCK_M: tl.constexpr):
    """Max of a (BLOCK_M,) row vector over each 64-row sub-block: (BLOCK_M // 64,)."""
    SUB: tl.constexpr = BLOCK_M // 64
    return tl.max(tl.reshape(t, (SUB, 64)), axis=1)


@triton.jit
def sub_block_min_rows(t, BLOCK_M: tl.constexpr):
    """Min of a (BLOCK_M,) row vector over each 64-row sub-block: (BLOCK_M // 64,)."""
    SUB: tl.constexpr = BLOCK_M // 64
    return tl.min(tl.reshape(t, (SUB, 64)), axis=1)


@triton.jit
def compact_candidates(tmax_row_ptr, stride_tm, thr_sub, n_sub_valid, kb_lo, kb_hi, list_ptr,
                       BLOCK_M: tl.constexpr, NK_CHUNK: tl.constexpr, FROM_HITS: tl.constexpr = False):
    """Write the key tiles kb in [kb_lo, kb_hi) (at most NK_CHUNK of them) that may hold a score above
    the rows' thresholds to list_ptr[0 : count], ascending; return count (int32 scalar).

    tmax_row_ptr points at the per-64x64-tile values of this program's first sub-block (row stride
    stride_tm): the sweep's row-relative maxima (sweep.py); thr_sub (BLOCK_M // 64,) is each sub-block's
    lowest row threshold in the same units, threshold_i - row_max_i (+inf for a sub-block without valid
    rows); n_sub_valid = number of this program's sub-blocks inside the tensor. A tile is
    a candidate when some sub-block's tile value exceeds that sub-block's threshold. With FROM_HITS,
    tmax_row_ptr points at an int8 map of the same layout instead (solve.py's hits) and a tile is a
    candidate when some sub-block's entry is non-zero (thr_sub is unused). The later loop
    `for i in range(count): kb = tl.load(list_ptr + i)` then touches candidate tiles only, instead of
    testing every tile serially. list_ptr is private to the program (NK_CHUNK int32 entries).
    """
    SUB: tl.constexpr = BLOCK_M // 64
    if FROM_HITS:
        count = compact_marked(tmax_row_ptr, stride_tm, 1, n_sub_valid, kb_lo, kb_hi, list_ptr, SUB, NK_CHUNK)
    else:
        sub = tl.arange(0, SUB)[:, None]
        kk = kb_lo + tl.arange(0, NK_CHUNK)
        in_range = (sub < n_sub_valid) & (kk[None, :] < kb_hi)
        tmax = tl.load(tmax_row_ptr + sub * stride_tm + kk[None, :], mask=in_range, other=float("-inf"))
        count = write_list(tl.max((tmax > thr_sub[:, None]).to(tl.int32), axis=0), kk, list_ptr)
    return count


@triton.jit
def compact_marked(map_ptr, stride_line, stride_entry, n_lines, lo, hi, list_ptr,
                   LINES: tl.constexpr, CHUNK: tl.constexpr):
    """Write the entries e in [lo, hi) (at most CHUNK of them) that any of LINES lines of an int8/bool map
    marks (non-zero) to list_ptr[0 : count], ascending; return count (int32 scalar).

    map_ptr points at entry 0 of the first line; line l, entry e is at map_ptr + l * stride_line +
    e * stride_entry; lines at or past n_lines are not read. The backward's _prepare_kernel lists the
    forward's 64x64 tile map with it: rows (entries = key tiles) for the dQ programs, columns (entries = query
    tiles) for the dK/dV programs; LINES > 1 when such a program covers several 64-wide map lines. The output
    pass lists the solve's hits with it (compact_candidates' FROM_HITS). list_ptr points at CHUNK int32
    entries no other program writes."""
    line = tl.arange(0, LINES)[:, None]
    entries = lo + tl.arange(0, CHUNK)
    in_range = (line < n_lines) & (entries[None, :] < hi)
    marked = tl.load(map_ptr + line * stride_line + entries[None, :] * stride_entry, mask=in_range, other=0) != 0
    return write_list(tl.max(marked.to(tl.int32), axis=0), entries, list_ptr)


@triton.jit
def write_list(keep, entries, list_ptr):
    """Store the entries (CHUNK,) where keep (CHUNK,) int32 is 1 to list_ptr[0 : count] in order; return count.
    Barriers on both sides: earlier readers of the list are done, and the list is visible to every thread."""
    pos = tl.cumsum(keep, axis=0) - 1
    tl.debug_barrier()
    tl.store(list_ptr + pos, entries, mask=keep > 0)
    tl.debug_barrier()
    return tl.sum(keep, axis=0)


@triton.jit
def _bin_of(x, top):
    """The histogram bin of scores x under bin tops top (same shape, or broadcast by the caller): returns
    (inwin, b), inwin true where x lies in the 16 bins below top / 16 (false for -inf scores and for rows
    with top = -inf, whose value is NaN), b an int32 whose low 4 bits are the bin there.

    The bin is floor(t), t = top - 16 x >= 0 (exact in real numbers since 16 x <= 16 m <= top). Adding
    1.5 * 2^23 to t - 1/2 rounds it to an integer held in the low mantissa bits: floor(t) except at ties,
    where an exact bin edge may land in the bin above, whose lower edge then equals the score (still a
    valid lower edge). This replaces a float-to-int conversion per score, a quarter-rate instruction."""
    shifted = ((top - 0.5) - x * 16.0) + MAGIC_ROUND
    return shifted <= MAGIC_ROUND + 15.0, shifted.to(tl.int32, bitcast=True)


@triton.jit
def histogram_words(x, top):
    """Per-row counts of the scores x (BLOCK_M, BLOCK_N <= 255) in 16 bins of width 1/16 below top / 16,
    where top (BLOCK_M,) float32 is an integer in bin units at or above 16 * (row max): bin b holds
    top/16 - (b+1)/16 < x <= top/16 - b/16 (bin 0 also takes rounding above top/16). Scores at or below
    top/16 - 1 and rows with top = -inf (nothing visible yet) are not counted.

    Returns four (BLOCK_M,) int64 words, word w holding bins 4w..4w+3 in 16-bit lanes (bin b at bits
    16 * (b & 3) of word b >> 2), to be summed over tiles. Four bins share one int32 during the row sums
    (8-bit lanes), so a score costs 4 selects and 4 row sums rather than 16. Everything stays in the
    scores' row layout: no per-tile data movement between threads beyond the row sums.
    """
    val, word = _lane_values(x, top)
    return (_widen_lanes(tl.sum(_in_word(val, word, 0), axis=1)), _widen_lanes(tl.sum(_in_word(val, word, 4), axis=1)),
            _widen_lanes(tl.sum(_in_word(val, word, 8), axis=1)), _widen_lanes(tl.sum(_in_word(val, word, 12), axis=1)))


@triton.jit
def histogram_words_pair(x, y, top):
    """histogram_words of the scores of two tiles of the same rows in the same layout, x and y (BLOCK_M, n),
    2 n <= 255, summed: each lane value of x is added to y's before the row sums, so that the pair costs what
    one tile of 2 n scores would (summing the two tiles' words separately cost 231 more instructions per
    pair of 64 x 32 tiles in the sweep at D = 64 on sm_90)."""
    val_x, word_x = _lane_values(x, top)
    val_y, word_y = _lane_values(y, top)
    return (_widen_lanes(tl.sum(_in_word(val_x, word_x, 0) + _in_word(val_y, word_y, 0), axis=1)),
            _widen_lanes(tl.sum(_in_word(val_x, word_x, 4) + _in_word(val_y, word_y, 4), axis=1)),
            _widen_lanes(tl.sum(_in_word(val_x, word_x, 8) + _in_word(val_y, word_y, 8), axis=1)),
            _widen_lanes(tl.sum(_in_word(val_x, word_x, 12) + _in_word(val_y, word_y, 12), axis=1)))


@triton.jit
def _lane_values(x, top):
    """Per score of x (BLOCK_M, n): its count in its bin's 8-bit lane (0 outside the window) and the offset of
    its bin's word, 4 * (bin >> 2)."""
    inwin, b = _bin_of(x, top[:, None])
    return tl.where(inwin, 1 << ((b & 3) << 3), 0), b & 12


@triton.jit
def _in_word(val, word, w):
    """The lane values of the scores whose bin lies in the word at offset w, 0 for the others."""
    return tl.where(word == w, val, 0)


@triton.jit
def histogram_words_of_rows(v, top):
    """histogram_words for one score per row: v (BLOCK_M,) float32 and top (BLOCK_M,) as there. Returns four
    (BLOCK_M,) int64 words holding a count of 1 in v's bin (16-bit lanes, the layout of histogram_words), or
    nothing where v is at or below the window's floor, -inf, or the row's top is -inf. A row vector costs a
    few instructions per row, not per score."""
    inwin, b = _bin_of(v, top)
    one = tl.where(inwin, tl.full(v.shape, 1, tl.int64) << ((b & 3) << 4).to(tl.int64), 0)
    word = b & 12
    return (tl.where(word == 0, one, 0), tl.where(word == 4, one, 0), tl.where(word == 8, one, 0),
            tl.where(word == 12, one, 0))


@triton.jit
def _widen_lanes(p):
    """int32 with four 8-bit lanes -> int64 with the same four lanes 16 bits wide."""
    p = p.to(tl.int64)
    return (p & 0xFF) | ((p & 0xFF00) << 8) | ((p & 0xFF0000) << 16) | ((p & 0xFF000000) << 24)


@triton.jit
def _word_at(j, w0, w1, w2, w3):
    """Per row, word j (BLOCK_M,) int64 of the four histogram words, 0 where j is outside 0..3."""
    return tl.where(j == 0, w0, tl.where(j == 1, w1, tl.where(j == 2, w2, tl.where(j == 3, w3, 0))))


@triton.jit
def shift_words(w0, w1, w2, w3, shift):
    """Move each row's 16 bin counts (histogram_words' four int64 words) down by shift (BLOCK_M,) int32
    bins, 0..16 (bin b to b + shift; counts pushed past bin 15 are dropped): the histogram after its top
    rose by `shift` bins. Every count keeps a lower edge at or below its score, so bounds stay valid.
    The 16 lanes form one 256-bit number per row, shifted left by 16 * shift bits, word by word."""
    words = shift >> 2
    bits = ((shift & 3) * 16).to(tl.int64)
    low_mask = (tl.full(bits.shape, 1, tl.int64) << bits) - 1
    carry_shift = tl.where(bits > 0, 64 - bits, 0)
    n0 = _shifted_word(0 - words, bits, low_mask, carry_shift, w0, w1, w2, w3)
    n1 = _shifted_word(1 - words, bits, low_mask, carry_shift, w0, w1, w2, w3)
    n2 = _shifted_word(2 - words, bits, low_mask, carry_shift, w0, w1, w2, w3)
    n3 = _shifted_word(3 - words, bits, low_mask, carry_shift, w0, w1, w2, w3)
    return n0, n1, n2, n3


@triton.jit
def _shifted_word(src, bits, low_mask, carry_shift, w0, w1, w2, w3):
    """One word of shift_words: word src shifted up by `bits`, with the top bits of word src - 1 carried in."""
    main = _word_at(src, w0, w1, w2, w3) << bits
    carry = (_word_at(src - 1, w0, w1, w2, w3) >> carry_shift) & low_mask
    return main | tl.where(bits > 0, carry, 0)


@triton.jit
def unpack_words(w0, w1, w2, w3):
    """Four (BLOCK_M,) int64 words of 16-bit lanes (histogram_words) -> (BLOCK_M, 16) int32 counts."""
    bins = tl.arange(0, 16)[None, :]
    w = _word_at(bins >> 2, w0[:, None], w1[:, None], w2[:, None], w3[:, None])
    return ((w >> ((bins & 3) * 16).to(tl.int64)) & 0xFFFF).to(tl.int32)


@triton.jit
def histogram_lower_tau(counts, m, top, rm1, expo, ALPHA_MODE: tl.constexpr, NBINS: tl.constexpr,
                        ITERS: tl.constexpr):
    """Guaranteed lower bound of tau from per-row bin counts (BLOCK_M, NBINS), the row max m (BLOCK_M,)
    and the bins' top (BLOCK_M,) (>= m, bin b's lower edge is top - (b+1)/NBINS), all in tau units.

    Every counted score is moved down to its bin's lower edge, except one count of the lowest non-empty
    bin, which stands for the row max and stays at m (the max's own bin is at or above it in index, so
    the count replaced is of a score >= the max's lower edge). The resulting F_lo(tau) <= F(tau)
    everywhere, so its root is <= the true tau; Newton steps on F_lo^(alpha-1) - 1 from m - 1 (<= that
    root) stay below it. Rows with m = -inf get +inf.
    """
    valid = m > float("-inf")
    mm = tl.where(valid, m, 0.0)
    tt = tl.where(valid, top, 0.0)
    bins = tl.arange(0, NBINS)
    first = tl.min(tl.where(counts > 0, bins[None, :], NBINS), axis=1)
    c = counts - tl.where(bins[None, :] == first[:, None], 1, 0)
    c = c.to(tl.float32)
    edge = tt[:, None] - (bins[None, :] + 1).to(tl.float32) / NBINS
    tau = mm - 1.0
    for _ in tl.static_range(ITERS):
        ub = tl.maximum(edge - tau[:, None], 0.0)
        sb = entmax_s(ub, rm1, ALPHA_MODE)
        u0 = tl.maximum(mm - tau, 0.0)
        s0 = entmax_s(u0, rm1, ALPHA_MODE)
        f = tl.sum(c * ub * sb, axis=1) + u0 * s0
        s = tl.sum(c * sb, axis=1) + s0
        tau = tl.maximum(newton_tau(tau, f, s, expo, ALPHA_MODE), mm - 1.0)
    return tl.where(valid, tau, float("inf"))
