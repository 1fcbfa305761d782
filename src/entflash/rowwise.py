"""Public row-wise alpha-entmax ops: validate the arguments, then run the first implementation that accepts x.

``entmax(x, alpha, dim)``, ``sparsemax(x, dim)`` and ``entmax15(x, dim)`` work on any floating tensor along any
axis, with gradients w.r.t. x and (tensor) alpha. Implementations share one signature,
``impl(x, alpha, dim) -> p``, where alpha is a python float or a tensor with x's number of dimensions and
size 1 along ``dim`` (``normalize_alpha`` gives that form); ``_IMPLEMENTATIONS`` lists them with the
predicate that says which inputs each takes, fastest first. The exact PyTorch reference takes every input.
"""
from __future__ import annotations

import torch

from entflash.checks import check_alpha_number, check_rows_input, fail
from entflash.reference import rowwise as reference


def _fused_entmax(x: torch.Tensor, alpha, dim: int) -> torch.Tensor:
    """The fused Triton kernels (imported on first use, so CPU-only installs never load Triton)."""
    from entflash.kernels.rowwise import fused_entmax
    return fused_entmax(x, alpha, dim)


# (accepts(x, alpha) -> bool, impl(x, alpha, dim) -> p): the first entry whose predicate accepts runs.
_IMPLEMENTATIONS = (
    # CUDA tensors of 16/32-bit floats: fused kernels; float64 and every other device: the exact reference
    (lambda x, alpha: x.is_cuda and x.dtype != torch.float64, _fused_entmax),
    (lambda x, alpha: True, reference.entmax),
)


def normalize_alpha(alpha, x: torch.Tensor, dim: int, caller: str, argument: str = "x"):
    """Validate alpha for rows of ``x`` along ``dim`` (non-negative) and bring it to one form.

    alpha: a real number in (1, 2], or a floating tensor on x's device, all values in (1, 2], broadcastable
    to x.shape with ``dim`` removed (a tensor with x.dim() dimensions is read with ``dim`` kept, size 1 there).
    Returns a python float, or a tensor of x.dim() dimensions with size 1 along ``dim`` that broadcasts to x
    (a differentiable view of alpha: gradients reach the caller's tensor in its own shape).
    """
    if not isinstance(alpha, torch.Tensor):
        return check_alpha_number(alpha, caller, "be a float in (1, 2] or a floating tensor")
    if not alpha.is_floating_point():
        fail(TypeError, caller, "alpha", "be a floating tensor", str(alpha.dtype))
    if alpha.device != x.device:
        fail(ValueError, caller, "alpha", f"be on the device of `{argument}` ({x.device})", str(alpha.device))
    row_shape = x.shape[:dim] + x.shape[dim + 1:]
    kept = alpha.dim() == x.dim()
    if kept and alpha.shape[dim] != 1:
        fail(ValueError, caller, "alpha", f"have size 1 along dim={dim} when it has {x.dim()} dims like "
             f"`{argument}`", f"shape {tuple(alpha.shape)}")
    try:
        per_row = (alpha.squeeze(dim) if kept else alpha).broadcast_to(row_shape)
    except RuntimeError:
        fail(ValueError, caller, "alpha", f"broadcast to `{argument}`'s shape without dim={dim}, "
             f"{tuple(row_shape)}", f"shape {tuple(alpha.shape)}")
    values = alpha.detach()
    inside = (values > 1) & (values <= 2)
    if not bool(inside.all()):
        fail(ValueError, caller, "alpha", "lie in (1, 2] everywhere",
             f"values such as {values[~inside].reshape(-1)[:4].tolist()}")
    return alpha if kept else per_row.unsqueeze(dim)


def dispatch_entmax(x: torch.Tensor, alpha, dim: int) -> torch.Tensor:
    """Run the first implementation accepting ``x``; arguments already validated and normalized
    (``check_rows_input``, ``normalize_alpha``). Returns p with x's shape and dtype."""
    for accepts, implementation in _IMPLEMENTATIONS:
        if accepts(x, alpha):
            return implementation(x, alpha, dim)
    raise RuntimeError("entflash.rowwise: no implementation accepted the input")  # the reference accepts all


def entmax(x: torch.Tensor, alpha=1.5, dim: int = -1) -> torch.Tensor:
    """alpha-entmax of ``x`` along ``dim``: p_j = [(alpha-1) x_j - tau]_+ ** (1/(alpha-1)), each row summing to 1.

    x: float16 / bfloat16 / float32 / float64 tensor of any shape (16-bit inputs are computed in float32);
        -inf entries are masked (p = 0 there), a row of only -inf gives zeros, never NaN (a row holding
        +inf or NaN gives NaN, as softmax does).
    alpha: float in (1, 2] (1.5 default; 2 is sparsemax; near 1 approaches softmax), or a floating tensor of
        values in (1, 2] broadcastable to x.shape with ``dim`` removed (e.g. (H, 1) or (B, H, N) for x of shape
        (B, H, N, n)); a tensor with x.dim() dimensions is read with ``dim`` kept as size 1.
    dim: the axis holding each row.
    Returns p with x's shape and dtype. Differentiable w.r.t. x and alpha (alpha's gradient comes back in its
    own shape). Bad arguments raise TypeError / ValueError naming the argument.
    """
    dim = check_rows_input(x, dim, "entmax")
    return dispatch_entmax(x, normalize_alpha(alpha, x, dim, "entmax"), dim)


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """sparsemax (alpha = 2: the Euclidean projection onto the simplex) of ``x`` along ``dim``; as :func:`entmax`."""
    return dispatch_entmax(x, 2.0, check_rows_input(x, dim, "sparsemax"))


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax of ``x`` along ``dim``; as :func:`entmax` with alpha = 1.5."""
    return dispatch_entmax(x, 1.5, check_rows_input(x, dim, "entmax15"))
