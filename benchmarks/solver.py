"""How the fused forward's tau solver did on one case's inputs, recorded next to its timings.

The forward issue asks the harness for the solver iterations used and for how often the histogram bracket held.
The solver's steps are fixed by the call, not by the data: the dense sweep's in-register solve over its 16 bin
counts (kernels.sweep.HIST_ITERS steps) gives a lower bound of tau, then `newton_passes` Newton passes over the
candidate tiles, then the output sweep's closing correction. So the record names the passes the library runs
and measures, on a slice of heads (batch 0, the first `heads` query heads), row by row against the exact tau
(benchmarks.sparsity.row_thresholds on float32 scores):

  hist_bound_held   fraction of rows whose histogram start (tau_hist) is at or below the exact tau, up to
                    1e-4 tau units of rounding: the bracket the Newton passes start from
  hist_gap_bins     mean (exact tau - tau_hist) in bins of 1/16 tau unit (at most about 1 when the bound is
                    as tight as its bins allow)
                    (both for the start inference uses, sweep.FAR_TILE_SCORES; 16-bit training starts from a
                    looser one, sweep.FAR_TILE_SCORES_BEFORE_NEWTON:)
  hist_bound_held_training, hist_gap_bins_training   the same for the start the training solve uses
  tau_err_max       max |tau - exact tau| (tau units) after the training solve: Newton passes and the
                    closing correction, as entflash.autograd.fused_forward runs them for training
  newton_passes     {"training": n, "inference": n} Newton passes after the histogram start for this dtype and
                    alpha (16-bit inference without return_aux runs none)

Tau units are (alpha - 1) * scale * q.k, the kernels' and the reference's.
"""
from __future__ import annotations

from typing import Optional

import torch

from benchmarks.sparsity import row_thresholds

HELD_TOLERANCE = 1e-4  # tau units: float32 scores of the kernel and of the reference differ by rounding
ROWS_PER_CHUNK = 1024


def exact_tau(q: torch.Tensor, k: torch.Tensor, alpha: float, causal: bool, scale: float) -> torch.Tensor:
    """Exact tau (H, Nq) in tau units for q (H, Nq, D), k (H, Nk, D) (one batch entry, heads already matched),
    bottom-right causal when `causal`; scores in float32, solved chunk by chunk over query rows."""
    heads, num_queries, _ = q.shape
    num_keys = k.shape[1]
    alpha_heads = torch.full((heads, 1, 1), float(alpha), device=q.device)
    keys = torch.arange(num_keys, device=q.device)
    taus = []
    for start in range(0, num_queries, ROWS_PER_CHUNK):
        rows = torch.arange(start, min(num_queries, start + ROWS_PER_CHUNK), device=q.device)
        scores = torch.matmul(q[:, rows].float(), k.float().transpose(1, 2)).mul_(scale)
        if causal:
            scores.masked_fill_(keys.view(1, -1) > (rows + num_keys - num_queries).view(-1, 1), float("-inf"))
        taus.append(row_thresholds(scores, alpha_heads).squeeze(-1))
    return torch.cat(taus, dim=1)


def solver_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: float, causal: bool, scale: float,
                 heads: int = 2) -> Optional[dict]:
    """The fields of the module docstring for q (B, Hq, N, D), k/v (B, Hkv, N, D); None where the Triton kernels
    cannot run (no CUDA and no interpreter)."""
    from entflash.autograd import newton_plan
    from entflash.kernels.forward import alpha_tensor, entmax_forward, sweep_far_scores
    from entflash.kernels.launch import interpreting, make_spec
    from entflash.kernels.sweep import dense_sweep

    if not (q.is_cuda or interpreting()):
        return None
    heads = min(heads, q.shape[1])
    kv_heads = [head // (q.shape[1] // k.shape[1]) for head in range(heads)]  # GQA: each query head's kv head
    q_part, k_part, v_part = q[:1, :heads], k[:1, kv_heads], v[:1, kv_heads]
    alpha_t = alpha_tensor(alpha, heads, q.device)
    spec = make_spec(q_part, k_part, alpha, alpha_t, causal, None, None, None)
    _, _, tau_hist = dense_sweep(q_part, k_part, alpha_t, scale, spec)
    training, training_from_alpha = newton_plan(q.dtype, alpha, True, False)
    inference = newton_plan(q.dtype, alpha, False, False)[0]
    # the start the training forward takes (kernels/forward.py), the inference one where they agree
    training_far = sweep_far_scores(training, q)
    tau_hist_training = (tau_hist if training_far is None
                         else dense_sweep(q_part, k_part, alpha_t, scale, spec, training_far)[2])
    tau = entmax_forward(q_part, k_part, v_part, alpha, causal, scale, newton_iters=training,
                         all_passes_from_alpha=training_from_alpha)["tau"]
    exact = exact_tau(q_part[0], k_part[0], alpha, causal, scale)
    gap = exact - tau_hist[0]
    gap_training = exact - tau_hist_training[0]
    return {
        "heads_checked": heads,
        "hist_bound_held": (gap >= -HELD_TOLERANCE).float().mean().item(),
        "hist_gap_bins": (gap * 16).mean().item(),
        "hist_bound_held_training": (gap_training >= -HELD_TOLERANCE).float().mean().item(),
        "hist_gap_bins_training": (gap_training * 16).mean().item(),
        "tau_err_max": (tau[0] - exact).abs().max().item(),
        "newton_passes": {"training": training, "inference": inference},
    }
