"""Argument encoding shared by the attention backends' torch custom ops.

Each backend (reference/attention.py, autograd.py) registers two ops in the "entflash" namespace with
`torch.library.custom_op`: "entflash::<backend>_attention_forward" and "entflash::<backend>_attention_backward",
each with a fake (shape-only) implementation, and ties them together with `register_autograd`. To the compiler
the ops are opaque, so `torch.compile(..., fullgraph=True)` traces through entflash without graph breaks while
the kernels keep their host-side logic (chunk loops, block lists).

Op schemas take tensors, optional tensors, ints, floats and bools only, so the backend contract's python-level
options are encoded here, once for both backends:

  alpha   -> (alpha_heads, alpha_value): alpha_heads is the (Hq,) float tensor of a per-head alpha, or None for a
             python float alpha held in alpha_value (the fast path: no tensor, specialised kernels).
  window  -> (window_left, window_right): ints >= 0, UNLIMITED (-1) for an unlimited side; no window at all is
             (UNLIMITED, UNLIMITED).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

UNLIMITED = -1
# alpha_value passed alongside a per-head alpha tensor; never read by the backends.
UNUSED_ALPHA_VALUE = 0.0

AlphaLike = Union[float, torch.Tensor]
Window = Optional[Tuple[Optional[int], Optional[int]]]


def encode_alpha(alpha: AlphaLike) -> Tuple[Optional[torch.Tensor], float]:
    """alpha (python float in (1, 2], or a (Hq,) float tensor) -> (alpha_heads, alpha_value) for an op schema."""
    if isinstance(alpha, torch.Tensor):
        return alpha, UNUSED_ALPHA_VALUE
    return None, float(alpha)


def decode_alpha(alpha_heads: Optional[torch.Tensor], alpha_value: float) -> AlphaLike:
    """Inverse of encode_alpha: the (Hq,) tensor when given, else the python float alpha_value."""
    return alpha_heads if alpha_heads is not None else alpha_value


def encode_window(window: Window) -> Tuple[int, int]:
    """window (None, or (left, right) of ints >= 0 or None) -> (window_left, window_right), UNLIMITED for None."""
    left, right = window if window is not None else (None, None)
    return (UNLIMITED if left is None else int(left)), (UNLIMITED if right is None else int(right))


def decode_window(window_left: int, window_right: int) -> Window:
    """Inverse of encode_window: None when both sides are unlimited, else (left, right) with None = unlimited."""
    if window_left == UNLIMITED and window_right == UNLIMITED:
        return None
    return (None if window_left == UNLIMITED else window_left), (None if window_right == UNLIMITED else window_right)


def needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """True when grad mode is on and any of `tensors` (None entries ignored) requires grad: the forward must
    then keep what its backward reads."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def empty_gradient(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a backward op returns for a gradient nobody asked for: an empty tensor of like's dtype and
    device (op schemas cannot return None). See input_gradient."""
    return like.new_empty(0)


def input_gradient(gradient: torch.Tensor, needed: bool) -> Optional[torch.Tensor]:
    """A backward op's output as autograd wants it: the gradient when `needed`, else None."""
    return gradient if needed else None


def alpha_gradient(dalpha: torch.Tensor, alpha_heads: Optional[torch.Tensor], needed: bool) -> Optional[torch.Tensor]:
    """dL/dalpha (Hq,) from a backward op, cast to the dtype and shape of alpha_heads; None unless `needed`."""
    if not needed or alpha_heads is None:
        return None
    return dalpha.to(alpha_heads.dtype).reshape(alpha_heads.shape)
