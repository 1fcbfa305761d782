"""Fused row-wise alpha-entmax on the GPU (Triton): forward, backward (x and alpha), autograd glue.

Math (docs DESIGN.md section 1): for a row z of n scores and alpha in (1, 2],
p_j = [(alpha - 1) z_j - tau]_+ ** (1 / (alpha - 1)) with tau making sum_j p_j = 1.

How a row is solved (one program owns BLOCK_M whole rows):

1. row max zmax; every later step works on shifted scores x = (alpha - 1) * (z - zmax) <= 0, so the
   max sits at 0, the window that can be non-zero is [-1, 0], and large logits keep full precision;
2. a histogram of x over NBINS bins of that window (Triton's histogram, counts of any size) and a
   guaranteed lower bound of tau from the bin counts (``common.histogram_lower_tau``);
3. N_STEPS Newton steps on the r-norm of [x - tau]_+ (``common.newton_tau``): that function is convex
   and decreasing, so each iterate stays a lower bound of tau (no non-zero entry can be lost) and
   converges quadratically; two steps from the histogram bound reach float32 accuracy;
4. p written once, in the input dtype; tau reported in (alpha - 1) * z units as in the reference.

Rows of up to SINGLE_MAX_COLS columns stay in registers (one read of the input, one write of p).
Longer rows loop over column chunks of BLOCK_N (max, histogram, one sweep per Newton step, output).
All sums are float32 for float16 / bfloat16 / float32 inputs (float64 inputs are computed in float32).
A row whose scores are all -inf gives p = 0, tau = +inf and zero gradients.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from entflash.kernels.common import entmax_p, histogram_lower_tau, log2_floored, newton_tau, pow_row
from entflash.kernels.launch import ALPHA_2, ALPHA_15, ALPHA_GENERAL

# rows up to this length are solved in registers; longer ones in chunks (at 32768 columns on an H100 the
# chunked path ran the loss with its gradient faster in bf16 and float32, benchmarks/README.md)
SINGLE_MAX_COLS = 16384
CHUNK_COLS = 8192  # column chunk of the multi-sweep path
CHUNK_WARPS = 16
NBINS = 32  # histogram bins over the window [-1, 0] of shifted scores
HIST_ITERS = 4  # Newton steps on the histogram's lower-edge model
NEWTON_STEPS_SINGLE = 3  # Newton sweeps after the histogram bound: rows held in registers
NEWTON_STEPS_CHUNKED = 2  # ... rows swept in column chunks (each step is one more read of the row)
# Sparsemax (alpha = 2): Newton on the piecewise-linear F - 1 ends exactly once the support is right, but from the
# histogram bound a row of 128k columns still missed it after 2 steps now and then (H100, randn * 3: after 1 step
# 26 of 1024 rows were off by > 1e-4 in their sum, after 2 steps none of those 1024, yet one row in an earlier
# 1024-row draw was off by 5e-4): one more sweep for that mode.
NEWTON_STEPS_CHUNKED_SPARSEMAX = 3

AlphaLike = Union[float, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# jit helpers private to the row-wise kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _alpha_terms(ALPHA, alpha_value, pid, ALPHA_PER_ROW: tl.constexpr):
    """alpha of this program's rows (scalar fp32) and the derived am1 = alpha - 1,
    rm1 = (2 - alpha) / (alpha - 1), expo = 2 - alpha."""
    if ALPHA_PER_ROW:
        alpha = tl.load(ALPHA + pid).to(tl.float32)
    else:
        alpha = alpha_value * 1.0
    am1 = alpha - 1.0
    expo = 2.0 - alpha
    return alpha, am1, expo / am1, expo


@triton.jit
def _load_shifted(X, rows, cols, n_rows, n_cols, stride, zmax, am1):
    """(BLOCK_M, BLOCK_N) float32 shifted scores (alpha - 1) * (z - zmax); out of range -> -inf.
    rows: (BLOCK_M,) int64, cols: (BLOCK_N,) int32, zmax: (BLOCK_M,) finite row max (0 for empty rows)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    z = tl.load(X + rows[:, None] * stride + cols[None, :], mask=mask, other=float("-inf"))
    return (z.to(tl.float32) - zmax[:, None]) * am1


@triton.jit
def _bin_counts(x, m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """Per-row histogram (BLOCK_M, NB) int32 of shifted scores x (BLOCK_M, BLOCK_N) below the row max
    m (BLOCK_M,), in the bins of common.histogram_lower_tau: bin b holds m - (b+1)/NB < x <= m - b/NB;
    scores at or below m - 1 are not counted.

    Long rows put up to n (256k and more) scores in one bin, beyond the 8/16-bit lanes of the
    attention kernels' packed counters, so rows use Triton's histogram with one NB-bin block per row.
    """
    t = (m[:, None] - x) * NB
    inwin = (t < NB) & (x > float("-inf"))
    b = tl.minimum(tl.maximum(tl.where(inwin, t, 0.0).to(tl.int32), 0), NB - 1)
    idx = b + (tl.arange(0, BLOCK_M) * NB)[:, None]
    h = tl.histogram(tl.reshape(idx, (BLOCK_M * BLOCK_N,)), BLOCK_M * NB,
                     mask=tl.reshape(inwin, (BLOCK_M * BLOCK_N,)))
    return tl.reshape(h, (BLOCK_M, NB)).to(tl.int32)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _entmax_rows_fwd_kernel(
    X, P, TAU, ALPHA, alpha_value, n_rows, n_cols, stride_x, stride_p,
    TGT, LOSS, DX, ignore_index, eps, h_target, stride_dx,
    ALPHA_PER_ROW: tl.constexpr, ALPHA_MODE: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
    HIST_IT: tl.constexpr, N_STEPS: tl.constexpr, IS_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """One program solves BLOCK_M rows.

    IS_LOSS = False: writes p (rows, n_cols) in P's dtype and tau (rows,) fp32 ((alpha-1)*x units).
    IS_LOSS = True: p is never written; writes the entmax (Fenchel-Young) loss per row to LOSS
    (0 where TGT == ignore_index; target distribution (1 - eps) one-hot + eps / n, whose Tsallis
    entropy is h_target); with WRITE_GRAD also the loss's gradient per row, p - y (zeros on ignored rows),
    to DX in DX's dtype (the backward only scales it).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    alpha, am1, rm1, expo = _alpha_terms(ALPHA, alpha_value, pid, ALPHA_PER_ROW)
    row_ok = rows < n_rows

    # 1. row max of the raw scores
    if SINGLE:
        z = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                    mask=row_ok[:, None] & (cols[None, :] < n_cols), other=float("-inf"))
        zmax = tl.max(z.to(tl.float32), axis=1)
    else:
        mx = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            zc = tl.load(X + rows[:, None] * stride_x + c[None, :],
                         mask=row_ok[:, None] & (c[None, :] < n_cols), other=float("-inf"))
            mx = tl.maximum(mx, zc.to(tl.float32))
        zmax = tl.max(mx, axis=1)
    valid = zmax > float("-inf")
    zsafe = tl.where(valid, zmax, 0.0)
    m = tl.where(valid, 0.0, float("-inf"))  # max of the shifted scores

    # 2. histogram of the window [-1, 0] -> guaranteed lower bound of tau
    if SINGLE:
        x = (z.to(tl.float32) - zsafe[:, None]) * am1
        counts = _bin_counts(x, m, BLOCK_M, BLOCK_N, NB)
    else:
        counts = tl.zeros((BLOCK_M, NB), dtype=tl.int32)
        for start in range(0, n_cols, BLOCK_N):
            xc = _load_shifted(X, rows, start + cols, n_rows, n_cols, stride_x, zsafe, am1)
            counts += _bin_counts(xc, m, BLOCK_M, BLOCK_N, NB)
    tau = histogram_lower_tau(counts, m, m, rm1, expo, ALPHA_MODE, NB, HIST_IT)

    # 3. Newton steps on the r-norm (iterates stay below the true tau)
    for _ in tl.static_range(N_STEPS):
        if SINGLE:
            p, s, u = entmax_p(x, tau, rm1, ALPHA_MODE)
            f = tl.sum(p, axis=1)
            g = tl.sum(s, axis=1)
        else:
            f_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            g_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                xc = _load_shifted(X, rows, start + cols, n_rows, n_cols, stride_x, zsafe, am1)
                p, s, u = entmax_p(xc, tau, rm1, ALPHA_MODE)
                f_acc += p
                g_acc += s
            f = tl.sum(f_acc, axis=1)
            g = tl.sum(g_acc, axis=1)
        tau = newton_tau(tau, f, g, expo, ALPHA_MODE)

    # 4. output: p, or the loss terms sum p^alpha = sum p u, sum p x, sum x (for mean z)
    if IS_LOSS:
        tgt = tl.load(TGT + rows, mask=row_ok, other=ignore_index)
        keep = row_ok & (tgt != ignore_index)
        # a target outside [0, n_cols) (and not ignore_index) makes its row's loss and gradient NaN rather than
        # read a wrong logit (the public entmax_loss raises before calling this; fused_entmax_loss does not check)
        bad_target = keep & ((tgt < 0) | (tgt >= n_cols))
        if SINGLE:
            p, s, u = entmax_p(x, tau, rm1, ALPHA_MODE)
            if WRITE_GRAD:
                _store_loss_grad(DX, p, rows, cols, tgt, keep, bad_target, row_ok, n_cols, stride_dx, eps)
            spu = tl.sum(p * u, axis=1)
            spx = tl.sum(tl.where(p > 0, p * x, 0.0), axis=1)
            sp = tl.sum(p, axis=1)
            sx = tl.sum(tl.where(cols[None, :] < n_cols, x, 0.0), axis=1)  # from x: z need not stay live
        else:
            spu_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            spx_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            sp_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            sx_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                xc = _load_shifted(X, rows, c, n_rows, n_cols, stride_x, zsafe, am1)
                p, s, u = entmax_p(xc, tau, rm1, ALPHA_MODE)
                if WRITE_GRAD:
                    _store_loss_grad(DX, p, rows, c, tgt, keep, bad_target, row_ok, n_cols, stride_dx, eps)
                spu_acc += p * u
                spx_acc += tl.where(p > 0, p * xc, 0.0)
                sp_acc += p
                if eps > 0:
                    sx_acc += tl.where(c[None, :] < n_cols, xc, 0.0)
            spu = tl.sum(spu_acc, axis=1)
            spx = tl.sum(spx_acc, axis=1)
            sp = tl.sum(sp_acc, axis=1)
            sx = tl.sum(sx_acc, axis=1)
        z_t = tl.load(X + rows * stride_x + tgt, mask=keep & ~bad_target, other=0.0)
        # <p, z> + H(p) - <y, z> - H(y), H(p) = (1 - sum p^alpha) / (alpha (alpha - 1))
        loss = ((1.0 - spu) / (alpha * am1) + zsafe * sp + spx / am1
                - (1.0 - eps) * z_t.to(tl.float32) - h_target)
        if eps > 0:
            loss -= eps * (sx / (am1 * n_cols) + zsafe)  # eps * mean(z)
        tl.store(LOSS + rows, tl.where(keep, tl.where(bad_target, float("nan"), loss), 0.0), mask=row_ok)
    else:
        if SINGLE:
            p, s, u = entmax_p(x, tau, rm1, ALPHA_MODE)
            tl.store(P + rows[:, None] * stride_p + cols[None, :], p.to(P.dtype.element_ty),
                     mask=row_ok[:, None] & (cols[None, :] < n_cols))
        else:
            for start in range(0, n_cols, BLOCK_N):
                c = start + cols
                xc = _load_shifted(X, rows, c, n_rows, n_cols, stride_x, zsafe, am1)
                p, s, u = entmax_p(xc, tau, rm1, ALPHA_MODE)
                tl.store(P + rows[:, None] * stride_p + c[None, :], p.to(P.dtype.element_ty),
                         mask=row_ok[:, None] & (c[None, :] < n_cols))
        tau_out = tl.where(valid, am1 * zsafe + tau, float("inf"))
        tl.store(TAU + rows, tau_out, mask=row_ok)


@triton.jit
def _store_loss_grad(DX, p, rows, c, tgt, keep, bad_target, row_ok, n_cols, stride_dx, eps):
    """Store the entmax loss's gradient p - y for the columns c (BLOCK_N,) of rows (BLOCK_M,):
    y = (1 - eps) one-hot(tgt) + eps / n_cols, zeros on rows that are not kept (ignore_index), NaN on rows
    whose target is out of range (bad_target)."""
    y = tl.where(c[None, :] == tgt[:, None], 1.0 - eps, 0.0) + eps / n_cols
    grad = tl.where(keep[:, None], tl.where(bad_target[:, None], float("nan"), p - y), 0.0)
    tl.store(DX + rows[:, None] * stride_dx + c[None, :], grad.to(DX.dtype.element_ty),
             mask=row_ok[:, None] & (c[None, :] < n_cols))


@triton.jit
def _bwd_tile_terms(P, G, rows, c, n_rows, n_cols, stride_p, stride_g, expo,
                    ALPHA_MODE: tl.constexpr):
    """Loads p and g (BLOCK_M, BLOCK_N) as float32 (0 out of range) and s = p^(2 - alpha)."""
    mask = (rows[:, None] < n_rows) & (c[None, :] < n_cols)
    p = tl.load(P + rows[:, None] * stride_p + c[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + c[None, :], mask=mask, other=0.0).to(tl.float32)
    s = pow_row(p, expo, ALPHA_MODE)
    return p, g, s, mask


@triton.jit
def _plogp(p):
    """p * ln(p), 0 where p = 0 (float32, any shape)."""
    return tl.where(p > 0, p * log2_floored(p) * 0.6931471805599453, 0.0)


@triton.jit
def _entmax_rows_bwd_kernel(
    P, G, DX, ALPHA, DALPHA, alpha_value, n_rows, n_cols, stride_p, stride_g, stride_dx,
    ALPHA_PER_ROW: tl.constexpr, ALPHA_MODE: tl.constexpr, NEED_DALPHA: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx = s * (g - sum(s g) / sum(s)) with s = p^(2-alpha); optionally dalpha per row (DESIGN 1)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    alpha, am1, rm1, expo = _alpha_terms(ALPHA, alpha_value, pid, ALPHA_PER_ROW)

    if SINGLE:
        p, g, s, mask = _bwd_tile_terms(P, G, rows, cols, n_rows, n_cols, stride_p, stride_g,
                                        expo, ALPHA_MODE)
        ss = tl.sum(s, axis=1)
        ssg = tl.sum(s * g, axis=1)
        if NEED_DALPHA:
            plp = _plogp(p)
            sgp = tl.sum(g * p, axis=1)
            sgplp = tl.sum(g * plp, axis=1)
            ent = tl.sum(plp, axis=1)
    else:
        ss_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ssg_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sgp_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sgplp_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ent_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            pc, gc, sc, mc = _bwd_tile_terms(P, G, rows, start + cols, n_rows, n_cols, stride_p,
                                             stride_g, expo, ALPHA_MODE)
            ss_acc += sc
            ssg_acc += sc * gc
            if NEED_DALPHA:
                plp = _plogp(pc)
                sgp_acc += gc * pc
                sgplp_acc += gc * plp
                ent_acc += plp
        ss = tl.sum(ss_acc, axis=1)
        ssg = tl.sum(ssg_acc, axis=1)
        if NEED_DALPHA:
            sgp = tl.sum(sgp_acc, axis=1)
            sgplp = tl.sum(sgplp_acc, axis=1)
            ent = tl.sum(ent_acc, axis=1)

    delta = tl.where(ss > 0, ssg / tl.where(ss > 0, ss, 1.0), 0.0)
    if SINGLE:
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :],
                 (s * (g - delta[:, None])).to(DX.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            pc, gc, sc, mc = _bwd_tile_terms(P, G, rows, c, n_rows, n_cols, stride_p, stride_g,
                                             expo, ALPHA_MODE)
            tl.store(DX + rows[:, None] * stride_dx + c[None, :],
                     (sc * (gc - delta[:, None])).to(DX.dtype.element_ty), mask=mc)
    if NEED_DALPHA:
        da = (sgp - delta) / (am1 * am1) - (sgplp - delta * ent) / am1
        tl.store(DALPHA + rows, tl.where(ss > 0, da, 0.0), mask=rows < n_rows)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------

def _alpha_mode(alpha_rows: AlphaLike) -> Tuple[bool, int, float]:
    """(per_row, ALPHA_MODE, alpha_value) for a float alpha or an (R,) tensor of alphas."""
    if isinstance(alpha_rows, torch.Tensor):
        return True, ALPHA_GENERAL, 0.0
    a = float(alpha_rows)
    if not 1.0 < a <= 2.0:
        raise ValueError(f"entmax kernels: `alpha` must lie in (1, 2], got {a!r}")
    return False, {1.5: ALPHA_15, 2.0: ALPHA_2}.get(a, ALPHA_GENERAL), a


def _newton_steps(single: bool, mode: int) -> int:
    """N_STEPS of the forward kernel: Newton sweeps after the histogram bound (see the constants above)."""
    if single:
        return NEWTON_STEPS_SINGLE
    return NEWTON_STEPS_CHUNKED_SPARSEMAX if mode == ALPHA_2 else NEWTON_STEPS_CHUNKED


def _next_pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python: triton's helpers cost ~10 us per host call)."""
    return 1 << (n - 1).bit_length()


def _tile_config(n_cols: int, per_row: bool, block_n: Optional[int], num_warps: Optional[int]):
    """(SINGLE, BLOCK_M, BLOCK_N, num_warps) for rows of n_cols columns."""
    if block_n is None:
        single = n_cols <= SINGLE_MAX_COLS
        block_n = _next_pow2(max(n_cols, 16)) if single else CHUNK_COLS
    else:
        block_n = _next_pow2(max(block_n, 16))
        single = n_cols <= block_n
    # Rows held in registers: from 1024 columns on, one row per program and one warp per 1024 columns, so the
    # row reductions (max, histogram, Newton sums) stay inside warps; shorter rows share a 4-warp program.
    # (benchmarks/rowwise.py on an H100, 32768 x 1024 bf16 loss fwd+bwd: 0.549 ms with 2 rows / 4 warps at 0c9801a,
    # 0.306 ms at 2fccf61; results/rowwise-*-{0c9801a-r2,2fccf61}.json)
    block_m = 1 if (per_row or not single or block_n >= 1024) else min(16, 2048 // block_n)
    if num_warps is None:
        num_warps = CHUNK_WARPS if not single else min(32, max(4 if block_n < 1024 else 1, block_m * block_n // 1024))
    return single, block_m, block_n, num_warps


def _alpha_args(alpha_rows: AlphaLike, n_rows: int, placeholder: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """(ALPHA pointer tensor, alpha_value) kernel arguments. A float alpha travels as alpha_value and the
    pointer is `placeholder` (any tensor on the device; never read), so no allocation is made per call."""
    if isinstance(alpha_rows, torch.Tensor):
        if alpha_rows.shape != (n_rows,):
            raise ValueError(f"entmax kernels: `alpha_rows` must have shape ({n_rows},), "
                             f"got {tuple(alpha_rows.shape)}")
        return alpha_rows.detach().to(device=placeholder.device, dtype=torch.float32).contiguous(), 0.0
    return placeholder, float(alpha_rows)


def _launch_forward(x2d: torch.Tensor, alpha_rows: AlphaLike, block_n: Optional[int],
                    num_warps: Optional[int], loss_args=None):
    """Runs the forward kernel. Returns (p, tau); in the loss mode, loss_args = (target (R,) int64,
    ignore_index, eps, h_target, write_grad), it returns (loss (R,) float32, grad (R, C) like x2d: p - y,
    or None without write_grad)."""
    n_rows, n_cols = x2d.shape
    per_row, mode, alpha_value = _alpha_mode(alpha_rows)
    single, block_m, bn, warps = _tile_config(n_cols, per_row, block_n, num_warps)
    tau = torch.empty(n_rows, device=x2d.device, dtype=torch.float32)
    alpha_t, alpha_value = _alpha_args(alpha_rows, n_rows, tau)
    if loss_args is None:
        p = torch.empty((n_rows, n_cols), device=x2d.device, dtype=x2d.dtype)
        tgt, loss, grad, ignore_index, eps, h_target, write_grad = tau, tau, tau, 0, 0.0, 0.0, False
    else:
        tgt, ignore_index, eps, h_target, write_grad = loss_args
        p = tau
        loss = torch.empty(n_rows, device=x2d.device, dtype=torch.float32)
        grad = torch.empty_like(x2d) if write_grad else tau
    if n_rows == 0 or n_cols == 0:
        tau.fill_(float("inf"))
        return (p, tau) if loss_args is None else (loss.zero_(), grad.zero_() if write_grad else None)
    grid = (-(-n_rows // block_m),)
    _entmax_rows_fwd_kernel[grid](
        x2d, p, tau, alpha_t, alpha_value, n_rows, n_cols, x2d.stride(0), p.stride(0),
        tgt, loss, grad, ignore_index, eps, h_target, grad.stride(0),
        ALPHA_PER_ROW=per_row, ALPHA_MODE=mode, SINGLE=single, BLOCK_M=block_m, BLOCK_N=bn,
        NB=NBINS, HIST_IT=HIST_ITERS, N_STEPS=_newton_steps(single, mode),
        IS_LOSS=loss_args is not None, WRITE_GRAD=bool(write_grad), num_warps=warps,
    )
    return (p, tau) if loss_args is None else (loss, grad if write_grad else None)


def entmax_rows_forward(x2d: torch.Tensor, alpha_rows: AlphaLike, *, block_n: Optional[int] = None,
                        num_warps: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """alpha-entmax of every row of a 2-D tensor, in one fused kernel.

    x2d: (R, n) float16 / bfloat16 / float32 (float64 is computed in float32) on a CUDA device (or a
        CPU tensor under TRITON_INTERPRET=1), last dimension contiguous (any row stride).
    alpha_rows: a python float in (1, 2] for every row (1.5 and 2.0 take exact fast paths), or an (R,)
        tensor with one alpha per row (computed through exp2/log2).
    block_n, num_warps: tuning overrides; block_n < n forces the chunked multi-sweep path.
    Returns p (R, n) in x2d's dtype (rows sum to 1; an all -inf row gives zeros) and tau (R,) float32
    in (alpha - 1) * x units, p = [(alpha - 1) x - tau]_+ ** (1 / (alpha - 1)); +inf for all -inf rows.
    """
    if x2d.dim() != 2:
        raise ValueError(f"entmax_rows_forward: `x2d` must be 2-D, got shape {tuple(x2d.shape)}")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    return _launch_forward(x2d, alpha_rows, block_n, num_warps)


def entmax_rows_backward(p: torch.Tensor, grad_p: torch.Tensor, alpha_rows: AlphaLike,
                         need_alpha_grad: bool, *, block_n: Optional[int] = None,
                         num_warps: Optional[int] = None
                         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of alpha-entmax rows from the forward's output (DESIGN.md section 1 closed forms).

    p: (R, n) probabilities from entmax_rows_forward; grad_p: (R, n) dL/dp (any float dtype/strides).
    alpha_rows: the float or (R,) tensor given to the forward. With s = p^(2 - alpha):
      grad_x = s * (grad_p - sum(s grad_p) / sum(s))   (R, n), p's dtype; zeros on all -inf rows;
      grad_alpha (R,) float32 per row when need_alpha_grad (requires an (R,) tensor alpha), else None:
      sum_j g_j [(p_j - s^_j) / (alpha - 1)^2 - (p_j log p_j - s^_j H) / (alpha - 1)],
      s^ = s / sum(s), H = sum_j p_j log p_j (natural log).
    """
    if p.stride(1) != 1:
        p = p.contiguous()
    if grad_p.stride(-1) != 1 or grad_p.shape != p.shape:
        grad_p = grad_p.expand(p.shape).contiguous()
    n_rows, n_cols = p.shape
    per_row, mode, alpha_value = _alpha_mode(alpha_rows)
    if need_alpha_grad and not per_row:
        raise ValueError("entmax_rows_backward: an alpha gradient needs `alpha_rows` as an (R,) tensor")
    dx = torch.empty_like(p)
    dalpha = torch.empty(n_rows, device=p.device, dtype=torch.float32) if need_alpha_grad else None
    if n_rows == 0 or n_cols == 0:
        return dx, (dalpha.zero_() if need_alpha_grad else None)
    alpha_t, alpha_value = _alpha_args(alpha_rows, n_rows, dx)
    single, block_m, bn, warps = _tile_config(n_cols, per_row, block_n, num_warps)
    grid = (-(-n_rows // block_m),)
    _entmax_rows_bwd_kernel[grid](
        p, grad_p, dx, alpha_t, dalpha if need_alpha_grad else alpha_t, alpha_value,
        n_rows, n_cols, p.stride(0), grad_p.stride(0), dx.stride(0),
        ALPHA_PER_ROW=per_row, ALPHA_MODE=mode, NEED_DALPHA=need_alpha_grad, SINGLE=single,
        BLOCK_M=block_m, BLOCK_N=bn, num_warps=warps,
    )
    return dx, dalpha


class FusedEntmaxRows(torch.autograd.Function):
    """Autograd Function over rows: apply(x2d (R, n), alpha_rows float | (R,) tensor) -> p (R, n)."""

    @staticmethod
    def forward(ctx, x2d, alpha_rows):
        p, _ = entmax_rows_forward(x2d, alpha_rows)
        ctx.alpha_value = None if isinstance(alpha_rows, torch.Tensor) else alpha_rows
        ctx.save_for_backward(p, *([alpha_rows] if isinstance(alpha_rows, torch.Tensor) else []))
        return p

    @staticmethod
    def backward(ctx, grad_p):
        p, *rest = ctx.saved_tensors
        alpha = rest[0] if rest else ctx.alpha_value
        need_alpha = bool(rest) and ctx.needs_input_grad[1]
        dx, dalpha = entmax_rows_backward(p, grad_p, alpha, need_alpha)
        if dalpha is not None:
            dalpha = dalpha.to(rest[0].dtype)
        return dx, dalpha


def _alpha_to_rows(alpha: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """(R,) float32 view of a tensor alpha broadcast to x with `dim` of size 1, rows ordered as
    x.movedim(dim, -1); differentiable, so autograd sums the row gradients back to alpha's shape."""
    target = list(x.shape)
    target[dim] = 1
    try:
        a = alpha.to(torch.float32).expand(target)
    except RuntimeError as err:
        raise ValueError(f"fused_entmax: `alpha` of shape {tuple(alpha.shape)} does not broadcast to "
                         f"{tuple(target)} (x's shape with dim {dim} of size 1)") from err
    return a.movedim(dim, -1).reshape(-1)


def fused_entmax(x: torch.Tensor, alpha: AlphaLike = 1.5, dim: int = -1) -> torch.Tensor:
    """alpha-entmax of x along `dim` with the fused kernels; differentiable w.r.t. x and alpha.

    x: any shape (at least 1-D), float16 / bfloat16 / float32 (float64 computed in float32), on CUDA
        (or CPU under TRITON_INTERPRET=1). `dim` is moved last; no copy is made when x is contiguous
        along it already (dim = -1 on a row-contiguous tensor), otherwise one copy.
    alpha: python float in (1, 2] (1.5 and 2.0 take exact fast paths) or a tensor broadcastable to x
        with `dim` kept as size 1; its gradient comes back in alpha's own shape.
    Returns p with x's shape and dtype: non-negative, summing to 1 along dim (0 for all -inf slices).
    """
    if x.dim() == 0:
        raise ValueError("fused_entmax: `x` must have at least one dimension, got a 0-d tensor")
    dim = dim % x.dim()
    xt = x.movedim(dim, -1)
    n = xt.shape[-1]
    x2d = xt.reshape(math.prod(xt.shape[:-1]), n)
    if isinstance(alpha, torch.Tensor):
        alpha_rows = _alpha_to_rows(alpha, x, dim)
    elif isinstance(alpha, numbers.Real):
        alpha_rows = float(alpha)
    else:
        raise TypeError(f"fused_entmax: `alpha` must be a float or a tensor, got {type(alpha).__name__}")
    p2d = FusedEntmaxRows.apply(x2d, alpha_rows)
    return p2d.reshape(xt.shape).movedim(-1, dim)


# ----------------------------------------------------------------------------------------------
# entmax (Fenchel-Young) loss
# ----------------------------------------------------------------------------------------------

def _target_tsallis_entropy(alpha: float, eps: float, n: int) -> float:
    """Tsallis alpha-entropy (1 - sum y^alpha) / (alpha (alpha - 1)) of y = (1 - eps) one-hot + eps / n."""
    if eps == 0.0:
        return 0.0
    top, rest = 1.0 - eps + eps / n, eps / n
    return (1.0 - top ** alpha - (n - 1) * rest ** alpha) / (alpha * (alpha - 1.0))


class FusedEntmaxLossRows(torch.autograd.Function):
    """apply(logits2d (R, C), target (R,) int64, alpha float, ignore_index int, eps float, reduction str)
    -> float32 losses: (R,) for reduction "none", else a 0-d sum or mean over the non-ignored rows.

    When the logits need a gradient, the forward kernel also writes it unscaled, p - y, in the logits' dtype
    (the memory cross_entropy keeps for its log-probabilities), so the backward is one multiplication and
    p itself is never stored. The reduction happens here rather than in autograd ops after it: fewer
    launches per step, which is what a loss over a small batch waits on."""

    @staticmethod
    def forward(ctx, logits2d, target, alpha, ignore_index, eps, reduction):
        h = _target_tsallis_entropy(alpha, eps, logits2d.shape[1])
        write_grad = ctx.needs_input_grad[0]
        loss, grad = _launch_forward(logits2d, alpha, None, None, (target, ignore_index, eps, h, write_grad))
        kept_rows = (target != ignore_index).sum() if reduction == "mean" else None
        if write_grad:
            ctx.save_for_backward(grad, *(() if kept_rows is None else (kept_rows,)))
        ctx.reduction = reduction
        if reduction == "none":
            return loss
        return loss.sum() if kept_rows is None else loss.sum() / kept_rows

    @staticmethod
    def backward(ctx, grad_out):
        grad, *kept_rows = ctx.saved_tensors
        if ctx.reduction == "none":
            dx = grad * grad_out.to(grad.dtype)[:, None]
        else:  # a 0-d float32 factor keeps the product in the logits' dtype
            dx = grad * (grad_out / kept_rows[0] if kept_rows else grad_out)
        return dx, None, None, None, None, None


def fused_entmax_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.5,
                      ignore_index: int = -100, label_smoothing: float = 0.0,
                      reduction: str = "mean") -> torch.Tensor:
    """Entmax (Fenchel-Young) loss with fused kernels; the sparse counterpart of cross-entropy.

    loss_i = <p_i - y_i, z_i> + H(p_i) - H(y_i), p_i = entmax_alpha(z_i), H the Tsallis alpha-entropy
    (1 - sum p^alpha) / (alpha (alpha - 1)), y_i = (1 - label_smoothing) one-hot(target_i) +
    label_smoothing / C. Its gradient w.r.t. z_i is p_i - y_i (written by the forward kernel when the logits need
    it, in their dtype; p itself is never stored).
    logits: (..., C) float16 / bfloat16 / float32 (classes LAST), CUDA or interpreter; target: (...) int
    class indices in [0, C) or ignore_index (those rows give loss 0 and zero gradient). The kernel checks the
    range (no host sync): a row whose target is neither gives a NaN loss and a NaN gradient.
    alpha: python float in (1, 2] (2 = sparsemax loss). reduction: "none" -> (...) float32 losses,
    "sum", or "mean" (over non-ignored rows, as torch.nn.functional.cross_entropy).
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"fused_entmax_loss: `reduction` must be 'none', 'sum' or 'mean', got {reduction!r}")
    if isinstance(alpha, torch.Tensor) or not isinstance(alpha, numbers.Real):
        raise TypeError("fused_entmax_loss: `alpha` must be a python float in (1, 2]")
    if logits.dim() < 1 or tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"fused_entmax_loss: `target` must have shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"fused_entmax_loss: `label_smoothing` must lie in [0, 1], got {label_smoothing!r}")
    n = logits.shape[-1]
    x2d = logits.reshape(math.prod(logits.shape[:-1]), n)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    tgt = target.reshape(-1).to(torch.int64).contiguous()
    losses = FusedEntmaxLossRows.apply(x2d, tgt, float(alpha), int(ignore_index), float(label_smoothing), reduction)
    return losses.reshape(target.shape) if reduction == "none" else losses
