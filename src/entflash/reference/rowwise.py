"""Exact row-wise alpha-entmax (PROVISIONAL core: bisection only; to be extended).

Contract used by the rest of the package:
  entmax_threshold(z, alpha, dim=-1) -> tau, same shape as z with `dim` of size 1,
      such that p = clamp((alpha-1)*z - tau, min=0) ** (1/(alpha-1)) sums to 1 along dim.
  alpha: float or tensor broadcastable to z once `dim` is kept as size 1.
"""
from __future__ import annotations

import torch


def entmax_threshold(z: torch.Tensor, alpha, dim: int = -1, n_iter: int = 80) -> torch.Tensor:
    z = z.transpose(dim, -1)
    alpha = torch.as_tensor(alpha, dtype=z.dtype, device=z.device)
    if alpha.dim() > 0:
        alpha = alpha.transpose(dim, -1) if alpha.dim() == z.dim() else alpha
    am1 = alpha - 1
    x = z * am1
    n = z.shape[-1]
    m = x.max(dim=-1, keepdim=True).values
    lo = m - 1
    hi = m - torch.as_tensor(float(n), dtype=z.dtype, device=z.device) ** (-am1)
    inv = 1 / am1
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        f = torch.clamp(x - mid, min=0).pow(inv).sum(-1, keepdim=True) - 1
        lo = torch.where(f >= 0, mid, lo)
        hi = torch.where(f >= 0, hi, mid)
    return ((lo + hi) / 2).transpose(dim, -1)
