"""The fused forward pipeline: dense sweep (max, tile maxima, histogram) -> Newton solve over candidate tiles
-> sparse output sweep."""
from __future__ import annotations

import torch

from entflash.kernels.launch import head_constant, make_spec
from entflash.kernels.output import sparse_output
from entflash.kernels.solve import solve_tau
from entflash.kernels.sweep import FAR_TILE_SCORES_BEFORE_NEWTON, dense_sweep


def alpha_tensor(alpha, n_heads: int, device) -> torch.Tensor:
    """alpha (python float or (Hq,) tensor) as a contiguous (Hq,) float32 tensor on `device`."""
    if isinstance(alpha, torch.Tensor):
        a = alpha.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if a.numel() == 1:
            a = a.expand(n_heads)
        if a.numel() != n_heads:
            raise ValueError(f"alpha: expected a float or a tensor of shape ({n_heads},), got {tuple(alpha.shape)}")
        return a.contiguous()
    return head_constant(float(alpha), n_heads, device)


# Heads at or above this alpha get a second Newton pass by default. For 1.5 < alpha < 2 the backward's weights
# s = p^(2-alpha) = u^((2-alpha)/(alpha-1)) rise steeply from the support's edge, so a key that one pass, a little
# short, leaves just inside the support carries a visible s into the saved O2 and S. Measured under the
# interpreter on 16-bit training (fp16, N = 130, dense rows, 8 seeds): the worst row's dq error with one pass is
# 1.1e-2 at alpha = 1.5, 1.5e-2 at 1.55, 3.2e-2 at 1.6, 6.3e-2 at 1.7 and 2.7e-1 at 1.75 (the CPU fuzz found a
# whole fp16 dq 3.1e-2 off at 1.75); with two passes 0.7-2.1e-3 throughout. Near alpha = 2, F is close to piecewise
# linear and one pass after a change of the support leaves tau 1e-4 to 1e-3 short (bf16 dq 3-4e-2 off at 1.95).
SECOND_PASS_ALPHA = 1.55


def default_newton_plan(alpha) -> tuple[int, float]:
    """(newton_iters, all_passes_from_alpha) of the solve stage after the histogram bound when the caller names
    none: one pass, and a second for the heads at or above SECOND_PASS_ALPHA. A float alpha decides on the host;
    a per-head tensor gets two passes, which the solve kernel runs per head (alpha is not read on the host)."""
    if isinstance(alpha, torch.Tensor):
        return 2, SECOND_PASS_ALPHA
    return (2, 1.0) if float(alpha) >= SECOND_PASS_ALPHA else (1, 1.0)


def sweep_far_scores(newton_iters: int, q: torch.Tensor):
    """dense_sweep's far_scores for a forward with newton_iters Newton passes on q's dtype: on 16-bit inputs a
    Newton pass tolerates the looser histogram start of a cheaper sweep (sweep.FAR_TILE_SCORES_BEFORE_NEWTON);
    otherwise None (the sweep's default)."""
    return FAR_TILE_SCORES_BEFORE_NEWTON if newton_iters > 0 and q.element_size() == 2 else None


def entmax_forward(q, k, v, alpha, causal=False, scale=None, window=None, seqlens_q=None, seqlens_k=None,
                   *, newton_iters=None, all_passes_from_alpha=1.0, out=None, save_bwd=True, fold=True,
                   count_support=True, need_map=True):
    """Fused alpha-entmax attention forward.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); float16, bfloat16 or float32 (float32 products use
    exact-float32 dots), any strides. float64 inputs are computed in float32 (the kernels' precision)
    and returned as float64. alpha: python float in (1, 2] or (Hq,) tensor; scale: python float
    (default 1/sqrt(D)); window: None or (left, right) with None for an unlimited side;
    seqlens_q/seqlens_k: None or int (B,) tensors of valid lengths. Semantics: docs/ARCHITECTURE.md.

    Returns a dict with out (B, Hq, Nq, D) in q's dtype; tau (B, Hq, Nq) float32 (tau units,
    (alpha-1) * score, +inf for rows without a visible key); support (B, Hq, Nq) int32; tile_map
    (B, Hq, ceil(Nq/64), ceil(Nk/64)) bool (a superset of the tiles holding non-zeros); o2 (B, Hq, Nq, D)
    and s (B, Hq, Nq) float32 for the backward.
    newton_iters: Newton passes of the solve stage after the sweep's histogram bound (default: default_newton_plan,
    which also sets all_passes_from_alpha; 0 leaves the output pass's closing correction as the only step, enough
    for 16-bit outputs: autograd.newton_plan); all_passes_from_alpha: heads whose alpha is below it stop after the
    first pass (1.0: every head runs newton_iters);
    out: optional preallocated output (q's dtype and shape, not for float64 inputs); save_bwd=False
    (inference) returns o2/s as None; fold=False (with save_bwd=False) skips O2 and normalizes instead
    (output.sparse_output); count_support=False leaves support uncounted (-1); need_map=False lets tile_map
    come back None when newton_iters = 0 (the map then costs a reduction per visited tile).
    """
    out_dtype = q.dtype
    if q.dtype == torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    B, H, Nq, D = q.shape
    if scale is None:
        scale = D ** -0.5
    alpha_t = alpha_tensor(alpha, H, q.device)
    sq = seqlens_q.to(device=q.device, dtype=torch.int32).contiguous() if seqlens_q is not None else None
    sk = seqlens_k.to(device=q.device, dtype=torch.int32).contiguous() if seqlens_k is not None else None
    spec = make_spec(q, k, alpha, alpha_t, causal, window, sq, sk)
    if newton_iters is None:
        newton_iters, all_passes_from_alpha = default_newton_plan(alpha)
    row_ref, tile_max, tau_hist = dense_sweep(q, k, alpha_t, scale, spec, sweep_far_scores(newton_iters, q))
    tau, tau_low, hits = solve_tau(q, k, alpha_t, scale, spec, row_ref, tile_max, tau_hist, newton_iters,
                                   all_passes_from_alpha)
    res = sparse_output(q, k, v, alpha_t, scale, spec, row_ref, tile_max, tau, tau_low, hits, out=out,
                        save_bwd=save_bwd, fold=fold, count_support=count_support, need_map=need_map)
    if out_dtype != res["out"].dtype:
        res["out"] = res["out"].to(out_dtype)
    return res
