"""Exact row-wise alpha-entmax in PyTorch, with gradients w.r.t. the scores and alpha.

For scores z along one axis and alpha in (1, 2]:
    p_j = clamp((alpha - 1) * z_j - tau, min=0) ** (1 / (alpha - 1)),
with tau the unique number making the row sum to one. tau is reported in (alpha - 1) * z units.

How tau is found (every path works on the shifted, clipped row v = max((alpha-1) z - max, -1), since the
bracket (alpha-1) max - 1 <= tau <= (alpha-1) max - n**(1-alpha) makes every entry below the window zero):
  * only the window's candidates enter (per row, the k largest entries, k the largest count above -1);
  * alpha = 2 (sparsemax) and alpha = 1.5: sort-based closed forms, then one polishing Newton step;
  * any other alpha: Newton on the convex, decreasing g(tau) = ||[v - tau]_+||_beta - 1 (beta = 1/(alpha-1))
    from the left end of the bracket; where Newton slows down, a regula-falsi point from the right end or a
    bisection step also shrinks the bracket, down to rounding level.
Rows whose alpha is 2 or 1.5 take the closed forms even when other rows of the same call do not.

Masked scores (-inf) get p = 0; a row of only -inf entries gets tau = +inf and p = 0 everywhere (no NaN),
and zero gradients. Half and bfloat16 inputs are computed in float32.
"""
from __future__ import annotations

import torch

# Rounds of the general-alpha solver before it gives up refining (each round is two passes over the
# row). Newton plus the bisection safeguard reach rounding level in far fewer on every input we know.
_MAX_SOLVER_ROUNDS = 100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the 16-bit float dtypes (our arithmetic precision), otherwise ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _alpha_per_row(alpha, x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """alpha as a (R, 1) tensor of ``dtype``, one value per row of ``x`` along ``dim`` (R = x.numel() / n).

    ``alpha`` is a python number, or a tensor broadcastable to x.shape with ``dim`` removed; a tensor with
    as many dimensions as ``x`` is read with ``dim`` kept (size 1 there). The broadcast is differentiable,
    so autograd reduces a gradient back to alpha's own shape.
    """
    dim = dim % x.dim()
    row_shape = x.shape[:dim] + x.shape[dim + 1:]
    if not isinstance(alpha, torch.Tensor):
        return torch.full((row_shape.numel(), 1), float(alpha), dtype=dtype, device=x.device)
    if alpha.dim() == x.dim() and alpha.dim() > 0:
        if alpha.shape[dim] != 1:
            raise ValueError(
                f"alpha: a tensor with as many dimensions as x must have size 1 along dim={dim}, "
                f"got shape {tuple(alpha.shape)} for x of shape {tuple(x.shape)}")
        alpha = alpha.squeeze(dim)
    try:
        alpha = alpha.broadcast_to(row_shape)
    except RuntimeError:
        raise ValueError(
            f"alpha: expected a tensor broadcastable to x's shape without dim={dim}, i.e. {tuple(row_shape)}, "
            f"got shape {tuple(alpha.shape)}") from None
    return alpha.to(dtype).reshape(-1, 1)


def _as_rows(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """x with ``dim`` moved last and flattened to (R, n) rows, in ``dtype`` (differentiable)."""
    return x.movedim(dim, -1).to(dtype).reshape(-1, x.shape[dim])


def _from_rows(rows: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`_as_rows` for an (R, m) tensor: shape of x with ``dim`` of size m."""
    moved_shape = x.movedim(dim, -1).shape[:-1] + (rows.shape[-1],)
    return rows.reshape(moved_shape).movedim(-1, dim)


def _shift_rows(rows: torch.Tensor, alpha_rows: torch.Tensor):
    """Scale rows to (alpha-1) z units and shift each by its max; clip below the window at -1.

    rows (R, n) and alpha_rows (R, 1) in the compute dtype. Returns (shifted (R, n) in [-1, 0],
    row_max (R, 1) in scaled units, empty (R, 1) bool: rows without any finite-or-+inf score).
    Empty rows are replaced by zeros so the solvers stay finite on them.
    """
    scaled = rows * (alpha_rows - 1)
    row_max = scaled.amax(dim=-1, keepdim=True)
    empty = row_max == float("-inf")
    safe_max = torch.where(empty, torch.zeros_like(row_max), row_max)
    shifted = (scaled - safe_max).clamp(min=-1.0)
    shifted = torch.where(empty, torch.zeros_like(shifted), shifted)
    return shifted, row_max, empty


def _row_sums(shifted: torch.Tensor, tau: torch.Tensor, beta: torch.Tensor):
    """Sums over each row of p = [v - tau]_+ ** beta and s = p / [v - tau]_+ (= p ** (2 - alpha) on the support).

    shifted (R, n), tau (R, 1), beta = 1 / (alpha - 1) (R, 1). Returns (sum_p, sum_s), each (R, 1).
    """
    gap = (shifted - tau).clamp_(min=0)
    p = gap.pow(beta)
    s = p / gap.clamp_(min=torch.finfo(gap.dtype).tiny)  # 0 where gap = 0, since p = 0 there too
    return p.sum(dim=-1, keepdim=True), s.sum(dim=-1, keepdim=True)


def _newton_step(sum_p: torch.Tensor, sum_s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Newton step on g(tau) = sum_p ** (alpha - 1) - 1, from the sums at tau: (sum_p - sum_p**(2-alpha)) / sum_s.

    All (R, 1). g is convex and decreasing, so the step lands at or left of the root from either side.
    """
    safe_s = torch.where(sum_s > 0, sum_s, torch.ones_like(sum_s))
    return (sum_p - sum_p.pow(2 - alpha)) / safe_s


def _window_candidates(shifted: torch.Tensor, ranked: bool) -> torch.Tensor:
    """The k largest entries of each shifted row (R, n), k the largest count of entries above -1 in any row.

    Every entry left out is <= -1 <= tau, so it holds p = 0 and adds nothing to any sum the solvers take.
    Returns (R, k), sorted in descending order when ``ranked`` (else in any order); the whole row when the
    window holds more than half of it.
    """
    n = shifted.shape[-1]
    k = max(int((shifted > -1).sum(dim=-1).max()), 1) if shifted.shape[0] else n
    if 2 * k <= n:
        return shifted.topk(k, dim=-1, sorted=ranked).values
    return shifted.sort(dim=-1, descending=True).values if ranked else shifted


def _sparsemax_threshold(ranked: torch.Tensor) -> torch.Tensor:
    """Sort-based threshold for alpha = 2 on shifted rows (R, k) in [-1, 0] with max 0, ranked in descending
    order (the window candidates). Returns (R, 1)."""
    partial = ranked.cumsum(dim=-1)
    k = torch.arange(1, ranked.shape[-1] + 1, dtype=ranked.dtype, device=ranked.device)
    in_support = (1 + k * ranked > partial) & (ranked > -1)
    support = in_support.sum(dim=-1, keepdim=True).clamp(min=1)
    return (partial.gather(-1, support - 1) - 1) / support.to(ranked.dtype)


def _entmax15_threshold(ranked: torch.Tensor) -> torch.Tensor:
    """Sort-based threshold for alpha = 1.5 (p = [v - tau]_+ ** 2) on shifted rows (R, k) ranked in descending
    order (the window candidates). Returns (R, 1).

    For the k largest entries, the tau solving sum_{i<=k} (v_i - tau)**2 = 1 is mean_k - sqrt(delta_k) with
    delta_k = (1 - k * var_k) / k; the support is the largest k whose tau_k stays below its k-th entry.
    """
    k = torch.arange(1, ranked.shape[-1] + 1, dtype=ranked.dtype, device=ranked.device)
    mean = ranked.cumsum(dim=-1) / k
    mean_sq = (ranked * ranked).cumsum(dim=-1) / k
    delta = (1 - k * (mean_sq - mean * mean)) / k
    tau_k = mean - delta.clamp(min=0).sqrt()
    in_support = (tau_k <= ranked) & (ranked > -1)
    support = in_support.sum(dim=-1, keepdim=True).clamp(min=1)
    return tau_k.gather(-1, support - 1)


def _polish(shifted: torch.Tensor, tau: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """One Newton step on g from a closed-form tau (R, 1): removes the cumulative-sum rounding error."""
    sum_p, sum_s = _row_sums(shifted, tau, 1 / (alpha - 1))
    return tau + _newton_step(sum_p, sum_s, alpha)


def _general_threshold(shifted: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Threshold for any alpha in (1, 2] per row: safeguarded Newton on g.

    shifted (R, n) in [-1, 0] with row max 0; alpha (R, 1). Returns tau (R, 1). Newton runs from the left end
    lo of the bracket [lo, hi] (g convex and decreasing: it never passes the root). Rows whose Newton step
    shrinks by less than half also evaluate a point from the right: the regula-falsi point (right of the
    root by convexity), or the midpoint when the bracket did not halve in the previous round. A row is done
    when its Newton step or bracket is below rounding level of tau, or sum p is within rounding noise of one
    at an end of the bracket; that end is returned.
    """
    beta = 1 / (alpha - 1)
    n = shifted.shape[-1]
    eps = torch.finfo(shifted.dtype).eps
    lo = torch.full_like(alpha, -1.0)
    hi = -torch.as_tensor(float(n), dtype=shifted.dtype, device=shifted.device).pow(1 - alpha)
    sum_p_lo, sum_s_lo = _row_sums(shifted, lo, beta)
    g_lo = sum_p_lo.pow(alpha - 1) - 1
    g_hi = _row_sums(shifted, hi, beta)[0].pow(alpha - 1) - 1
    previous_step = torch.full_like(lo, float("inf"))
    previous_width = torch.full_like(lo, float("inf"))

    def evaluate(trial):
        nonlocal lo, hi, sum_p_lo, sum_s_lo, g_lo, g_hi
        sum_p, sum_s = _row_sums(shifted, trial, beta)
        g = sum_p.pow(alpha - 1) - 1
        left_of_root = g >= 0
        lo, sum_p_lo, sum_s_lo, g_lo = (torch.where(left_of_root, new, old) for new, old in
                                        ((trial, lo), (sum_p, sum_p_lo), (sum_s, sum_s_lo), (g, g_lo)))
        hi, g_hi = (torch.where(left_of_root, old, new) for new, old in ((trial, hi), (g, g_hi)))

    for _ in range(_MAX_SOLVER_ROUNDS):
        step = _newton_step(sum_p_lo, sum_s_lo, alpha)
        width = hi - lo
        closest = torch.minimum(g_lo, -g_hi) * beta  # ~ |sum p - 1| at the better bracket end
        # rounding each gap v - tau by eps moves sum p by about beta * sum_s * eps: below that, tau is exact
        noise = 4 * eps * (1 + beta * sum_s_lo)
        active = (step > 2 * eps * lo.abs()) & (width > 2 * eps * lo.abs()) & (closest > noise)
        if not bool(active.any()):
            break
        slow = active & (step > previous_step / 2)
        evaluate(torch.minimum(lo + step, hi))
        if bool(slow.any()):
            width = hi - lo
            gap = g_lo - g_hi
            chord = lo + g_lo * width / torch.where(gap > 0, gap, torch.ones_like(gap))
            from_right = torch.where(width > previous_width / 2, (lo + hi) / 2, chord).clamp(min=lo, max=hi)
            evaluate(torch.where(slow, from_right, lo))
        previous_step, previous_width = step, hi - lo
    return torch.where(-g_hi < g_lo, hi, lo)


def _solve(shifted: torch.Tensor, alpha: torch.Tensor, closed_form) -> torch.Tensor:
    """tau (R, 1) of shifted rows (R, n) with alpha (R, 1): ``closed_form`` (a sort-based solver) plus one
    polishing Newton step, or the general solver when ``closed_form`` is None; both on the window candidates."""
    candidates = _window_candidates(shifted, ranked=closed_form is not None)
    if closed_form is None:
        return _general_threshold(candidates, alpha)
    return _polish(candidates, closed_form(candidates), alpha)


def _shifted_threshold(shifted: torch.Tensor, alpha: torch.Tensor, alpha_value) -> torch.Tensor:
    """tau (R, 1) for shifted rows (R, n) and alpha (R, 1); ``alpha_value`` is the python float when all rows
    share it (skips the per-row grouping), else None. Rows with alpha exactly 2 or 1.5 use closed forms."""
    closed_forms = {2.0: _sparsemax_threshold, 1.5: _entmax15_threshold}
    if alpha_value is not None:
        return _solve(shifted, alpha, closed_forms.get(alpha_value))
    tau = torch.empty_like(alpha)
    remaining = torch.ones(alpha.shape[0], dtype=torch.bool, device=alpha.device)
    for value, closed_form in list(closed_forms.items()) + [(None, None)]:
        chosen = remaining if value is None else remaining & (alpha[:, 0] == value)
        if not bool(chosen.any()):
            continue
        rows = chosen.nonzero()[:, 0]
        tau[rows] = _solve(shifted[rows], alpha[rows], closed_form)
        remaining &= ~chosen
    return tau


def _resolve_alpha(alpha, x: torch.Tensor, dim: int, dtype: torch.dtype):
    """(alpha per row (R, 1) in dtype, python float if alpha is a single number else None)."""
    alpha_value = None if isinstance(alpha, torch.Tensor) else float(alpha)
    return _alpha_per_row(alpha, x, dim, dtype), alpha_value


def entmax_threshold(z: torch.Tensor, alpha, dim: int = -1) -> torch.Tensor:
    """The alpha-entmax threshold tau of every row of ``z`` along ``dim`` (not differentiable).

    z: float tensor of any shape (16-bit floats are computed in float32); -inf entries are masked scores.
    alpha: python float in (1, 2], or a tensor broadcastable to z.shape with ``dim`` removed (a tensor
        with z.dim() dimensions is read with ``dim`` kept, size 1 there); values in (1, 2].
    Returns tau with z's shape except size 1 along ``dim``, in (alpha - 1) * z units, dtype float32 for 16-bit
    inputs and z's dtype otherwise, such that clamp((alpha - 1) * z - tau, min=0) ** (1 / (alpha - 1)) sums
    to 1 along ``dim`` (to ~1e-15 in float64, ~1e-6 in float32). Rows of only -inf give tau = +inf.
    """
    dtype = compute_dtype(z.dtype)
    with torch.no_grad():
        alpha_rows, alpha_value = _resolve_alpha(alpha, z, dim, dtype)
        shifted, row_max, empty = _shift_rows(_as_rows(z, dim, dtype), alpha_rows)
        tau = _shifted_threshold(shifted, alpha_rows, alpha_value) + row_max
        tau = torch.where(empty, torch.full_like(tau, float("inf")), tau)
    return _from_rows(tau, z, dim)


def _probabilities(rows: torch.Tensor, alpha_rows: torch.Tensor, alpha_value) -> torch.Tensor:
    """alpha-entmax of rows (R, n) with alpha (R, 1), both in the compute dtype; empty rows give zeros."""
    shifted, _, empty = _shift_rows(rows, alpha_rows)
    tau = _shifted_threshold(shifted, alpha_rows, alpha_value)
    p = (shifted - tau).clamp(min=0).pow(1 / (alpha_rows - 1))
    total = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(empty, torch.zeros_like(p), p)


class _EntmaxFunction(torch.autograd.Function):
    """p = alpha-entmax(rows) with the closed-form gradients w.r.t. rows and alpha (DESIGN.md section 1).

    rows (R, n) and alpha_rows (R, 1) in one float dtype; alpha_value is the shared python float or None.
    """

    @staticmethod
    def forward(ctx, rows, alpha_rows, alpha_value):
        p = _probabilities(rows, alpha_rows, alpha_value)
        ctx.save_for_backward(p, alpha_rows)
        return p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_p):
        p, alpha_rows = ctx.saved_tensors
        on_support = p > 0
        p_safe = torch.where(on_support, p, torch.ones_like(p))
        s = torch.where(on_support, p_safe.pow(2 - alpha_rows), torch.zeros_like(p))
        s_total = s.sum(dim=-1, keepdim=True)
        s_hat = s / torch.where(s_total > 0, s_total, torch.ones_like(s_total))
        grad_rows = s * (grad_p - (s_hat * grad_p).sum(dim=-1, keepdim=True))
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            p_log_p = torch.where(on_support, p * p_safe.log(), torch.zeros_like(p))
            entropy_term = p_log_p.sum(dim=-1, keepdim=True)
            am1 = alpha_rows - 1
            direction = (p - s_hat) / (am1 * am1) - (p_log_p - s_hat * entropy_term) / am1
            grad_alpha = (grad_p * direction).sum(dim=-1, keepdim=True)
        return grad_rows, grad_alpha, None


def entmax(x: torch.Tensor, alpha=1.5, dim: int = -1) -> torch.Tensor:
    """Exact alpha-entmax of ``x`` along ``dim``, differentiable w.r.t. x and (tensor) alpha.

    x: float tensor of any shape; -inf entries are masked (p = 0 there; a row of only -inf gives zeros).
    alpha: python float in (1, 2] (default 1.5), or a tensor broadcastable to x.shape with ``dim`` removed
        (a tensor with x.dim() dimensions is read with ``dim`` kept, size 1 there); its gradient is reduced
        to alpha's own shape. Values are not validated here (see ``entflash.entmax``).
    Returns probabilities with x's shape and dtype (16-bit inputs are computed in float32), each row
    along ``dim`` non-negative and summing to 1.
    """
    dtype = compute_dtype(x.dtype)
    alpha_rows, alpha_value = _resolve_alpha(alpha, x, dim, dtype)
    p = _EntmaxFunction.apply(_as_rows(x, dim, dtype), alpha_rows, alpha_value)
    return _from_rows(p, x, dim).to(x.dtype)


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exact sparsemax (alpha = 2) of ``x`` along ``dim``: shapes and dtypes as :func:`entmax`."""
    return entmax(x, 2.0, dim)


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exact 1.5-entmax of ``x`` along ``dim``: shapes and dtypes as :func:`entmax`."""
    return entmax(x, 1.5, dim)
