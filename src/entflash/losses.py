"""Entmax (Fenchel-Young) losses: the sparse counterparts of cross-entropy.

For logits z of one sample, its class target and alpha in (1, 2]:
    loss = <p - y, z> + H(p) - H(y),   p = alpha-entmax(z),
    H(q) = (1 - sum_j q_j ** alpha) / (alpha (alpha - 1))   (Tsallis alpha-entropy),
    y = (1 - label_smoothing) one_hot(target) + label_smoothing / C.
The loss is non-negative, zero exactly when p = y, and its gradient w.r.t. z is p - y. Since p maximizes
<q, z> + H(q) over the simplex, the loss's derivative w.r.t. alpha is dH(p)/dalpha - dH(y)/dalpha at fixed p
(Danskin), so autograd runs through the formula with p held constant: no derivative of entmax is needed.
Layout and options follow torch.nn.functional.cross_entropy. Losses are computed and reduced by the first
entry of ``_LOSSES`` that accepts the input (the exact PyTorch path takes every input).
"""
from __future__ import annotations

import warnings

import torch

from entflash.checks import check_rows_input, describe, fail, is_integer, is_real_number
from entflash.reference.rowwise import compute_dtype
from entflash.rowwise import dispatch_entmax, normalize_alpha

_REDUCTIONS = ("none", "mean", "sum")


def _tsallis_entropy(probs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(1 - sum_j probs_j ** alpha) / (alpha (alpha - 1)) over the last axis; probs (R, C), alpha (R, 1).

    Zero entries add nothing (and give no NaN in alpha's gradient). Returns (R,)."""
    positive = probs > 0
    powered = torch.where(positive, torch.where(positive, probs, torch.ones_like(probs)).pow(alpha),
                          torch.zeros_like(probs))
    return ((1 - powered.sum(dim=-1, keepdim=True)) / (alpha * (alpha - 1))).squeeze(-1)


def _smoothed_target_entropy(alpha: torch.Tensor, label_smoothing: float, num_classes: int) -> torch.Tensor:
    """H of y = (1 - eps) one-hot + eps / C for each row's alpha (R, 1); (R,), zero when eps = 0."""
    if label_smoothing == 0.0:
        return torch.zeros_like(alpha.squeeze(-1))
    rest = label_smoothing / num_classes
    top = 1.0 - label_smoothing + rest
    powered = top ** alpha + (num_classes - 1) * rest ** alpha
    return ((1 - powered) / (alpha * (alpha - 1))).squeeze(-1)


def _reference_row_losses(rows: torch.Tensor, target: torch.Tensor, alpha, ignore_index: int,
                          label_smoothing: float) -> torch.Tensor:
    """Fenchel-Young loss of each row, exact PyTorch.

    rows (R, C) float logits (differentiable); target (R,) int64 in [0, C) or ignore_index; alpha a python
    float or an (R, 1) float tensor (may require grad). Returns (R,) losses in the compute dtype (float32 for
    16-bit logits), 0 on ignored rows; d/drows = p - y.
    """
    dtype = compute_dtype(rows.dtype)
    num_classes = rows.shape[-1]
    with torch.no_grad():
        probs = dispatch_entmax(rows.detach(), alpha.detach() if isinstance(alpha, torch.Tensor) else alpha, -1)
    logits, probs = rows.to(dtype), probs.to(dtype)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(dtype)
    else:
        alpha = torch.full((rows.shape[0], 1), alpha, dtype=dtype, device=rows.device)
    kept = target != ignore_index
    # p * z only where p > 0: masked (-inf) logits carry no probability and must not give 0 * -inf
    expected_score = torch.where(probs > 0, probs * logits, torch.zeros_like(logits)).sum(dim=-1)
    target_score = logits.gather(-1, torch.where(kept, target, 0).unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        target_score = (1 - label_smoothing) * target_score + label_smoothing / num_classes * logits.sum(dim=-1)
    losses = (expected_score - target_score + _tsallis_entropy(probs, alpha)
              - _smoothed_target_entropy(alpha, label_smoothing, num_classes))
    return torch.where(kept, losses, torch.zeros_like(losses))


def _reduced(losses: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """(R,) row losses -> `reduction` of them ("mean": over the rows whose target is not ignore_index)."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum()


def _reference_losses(rows, target, alpha, ignore_index: int, label_smoothing: float, reduction: str):
    """Exact PyTorch losses, reduced: (R,) or a 0-d tensor in the compute dtype."""
    return _reduced(_reference_row_losses(rows, target, alpha, ignore_index, label_smoothing), target, ignore_index,
                    reduction)


def _fused_losses(rows: torch.Tensor, target: torch.Tensor, alpha: float, ignore_index: int,
                  label_smoothing: float, reduction: str) -> torch.Tensor:
    """Fenchel-Young losses with the fused Triton kernel (p never stored), reduced inside it; float32."""
    from entflash.kernels.rowwise import fused_entmax_loss
    return fused_entmax_loss(rows, target, alpha, ignore_index, label_smoothing, reduction)


# (accepts(rows, alpha) -> bool, losses(rows, target, alpha, ignore_index, label_smoothing, reduction)):
# the first entry whose predicate accepts the (R, C) logits and alpha (float or (R, 1) tensor) runs.
_LOSSES = (
    # CUDA 16/32-bit logits with a python-float alpha: fused kernel (it has no alpha gradient); else exact
    (lambda rows, alpha: rows.is_cuda and rows.dtype != torch.float64 and not isinstance(alpha, torch.Tensor),
     _fused_losses),
    (lambda rows, alpha: True, _reference_losses),
)


def _check_target(target, logits: torch.Tensor, class_dim: int, ignore_index: int, caller: str) -> None:
    """target: integer tensor of logits' shape without the class axis, on logits' device, with values in
    [0, C) or equal to ignore_index."""
    if not isinstance(target, torch.Tensor):
        fail(TypeError, caller, "target", "be a torch.Tensor of class indices", type(target).__name__)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        fail(TypeError, caller, "target", "hold integer class indices (class probabilities are not supported)",
             str(target.dtype))
    expected_shape = logits.shape[:class_dim] + logits.shape[class_dim + 1:]
    if target.shape != expected_shape:
        fail(ValueError, caller, "target", f"have shape {tuple(expected_shape)} (`logits` without its class axis)",
             f"shape {tuple(target.shape)}")
    if target.device != logits.device:
        fail(ValueError, caller, "target", f"be on the device of `logits` ({logits.device})", str(target.device))
    num_classes = logits.shape[class_dim]
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        fail(ValueError, caller, "target", f"lie in [0, {num_classes}) or equal ignore_index={ignore_index}",
             f"values such as {target[bad].reshape(-1)[:4].tolist()}")


_warned_reference_loss = False


def _warn_reference_loss_once() -> None:
    """The fused loss kernel takes a python-float alpha; a tensor alpha on CUDA runs the PyTorch loss (the fused
    entmax for p, then elementwise ops that keep p in memory). Says so once per process."""
    global _warned_reference_loss
    if not _warned_reference_loss and not torch.compiler.is_compiling():
        _warned_reference_loss = True
        warnings.warn("entflash.entmax_loss: a tensor alpha runs the PyTorch loss (p kept in memory for the "
                      "backward), not the fused loss kernel, which takes a python-float alpha", stacklevel=4)


def _check_options(ignore_index, reduction, label_smoothing, caller: str) -> None:
    if not is_integer(ignore_index):
        fail(TypeError, caller, "ignore_index", "be an int", describe(ignore_index))
    if reduction not in _REDUCTIONS:
        fail(ValueError, caller, "reduction", f"be one of {_REDUCTIONS}", repr(reduction))
    if not is_real_number(label_smoothing):
        fail(TypeError, caller, "label_smoothing", "be a float in [0, 1]", describe(label_smoothing))
    if not 0.0 <= float(label_smoothing) <= 1.0:
        fail(ValueError, caller, "label_smoothing", "lie in [0, 1]", repr(label_smoothing))


def _entmax_loss(logits, target, alpha, ignore_index, reduction, label_smoothing, caller: str) -> torch.Tensor:
    """Validate, compute the row losses, reduce; see :func:`entmax_loss`."""
    class_dim = 0 if isinstance(logits, torch.Tensor) and logits.dim() == 1 else 1
    check_rows_input(logits, class_dim, caller, argument="logits")
    _check_options(ignore_index, reduction, label_smoothing, caller)
    _check_target(target, logits, class_dim, ignore_index, caller)
    alpha = normalize_alpha(alpha, logits, class_dim, caller, argument="logits")
    num_classes = logits.shape[class_dim]
    rows = logits.movedim(class_dim, -1).reshape(-1, num_classes)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.movedim(class_dim, -1).broadcast_to(target.shape + (1,)).reshape(-1, 1)
    flat_target = target.reshape(-1).to(torch.int64)
    impl = next(impl for accepts, impl in _LOSSES if accepts(rows, alpha))
    if impl is not _fused_losses and rows.is_cuda and rows.dtype != torch.float64:
        _warn_reference_loss_once()
    losses = impl(rows, flat_target, alpha, int(ignore_index), float(label_smoothing), reduction)
    if reduction == "none":
        losses = losses.reshape(target.shape)
    return losses.to(logits.dtype)


def entmax_loss(logits: torch.Tensor, target: torch.Tensor, alpha=1.5, *, ignore_index: int = -100,
                reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha-entmax (Fenchel-Young) loss, laid out like torch.nn.functional.cross_entropy.

    logits: float16 / bfloat16 / float32 / float64, shape (C,), (N, C) or (N, C, d1, ...) (classes on axis 1;
        16-bit inputs are computed in float32). -inf logits are masked classes (a -inf target logit gives +inf,
        as does label_smoothing > 0, which puts target mass on every class).
    target: integer class indices, shape (), (N,) or (N, d1, ...), values in [0, C) or ``ignore_index`` (other
        values raise ValueError; reading them waits for the device once per call).
    alpha: float in (1, 2] (default 1.5), or a floating tensor of values in (1, 2] broadcastable to target's
        shape (one alpha per sample); differentiable.
    ignore_index: target value whose samples give loss 0 and no gradient, and do not count in the mean.
    reduction: "none" (losses of target's shape), "sum", or "mean" (over the samples not ignored; NaN when
        every sample is ignored, as cross_entropy).
    label_smoothing: eps in [0, 1]: the target distribution is (1 - eps) one-hot + eps / C.
    Returns the loss in logits' dtype. Gradient w.r.t. logits: p - y per sample (times the reduction's weight).
    """
    return _entmax_loss(logits, target, alpha, ignore_index, reduction, label_smoothing, "entmax_loss")


def sparsemax_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                   reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """sparsemax loss: :func:`entmax_loss` with alpha = 2 (shapes, options and gradients as there)."""
    return _entmax_loss(logits, target, 2.0, ignore_index, reduction, label_smoothing, "sparsemax_loss")
