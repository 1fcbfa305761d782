"""Autograd glue for the fused Triton kernels (the "triton" backend of docs/ARCHITECTURE.md).

The forward runs entflash.kernels.forward.entmax_forward and saves what the backward needs: tau, the
64x64 tile map, O2 = sum p^(2-alpha) v and S = sum p^(2-alpha) (docs/ARCHITECTURE.md); dalpha needs
nothing more, the backward's dQ kernel forms it from row sums at the saved tau.
The backward runs the fused block-sparse kernels of entflash.kernels.backward; where that module cannot
be imported it recomputes the gradients through the exact chunked reference
(entflash.reference.attention.torch_attention) and warns once.
"""
from __future__ import annotations

import warnings

import torch

from entflash.kernels.forward import entmax_forward

_warned_fallback = False


def _fused_backward():
    """entflash.kernels.backward.attention_backward, or None when it cannot be imported."""
    try:
        from entflash.kernels.backward import attention_backward
    except ImportError:
        return None
    return attention_backward


def _reference_backward(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, grad_out, needs):
    """Exact gradients by autograd through the reference (recomputes the forward in chunks).

    Used for float64 inputs (silently) and when the fused backward cannot be imported (warns once).
    """
    global _warned_fallback
    if not _warned_fallback and q.dtype != torch.float64:
        warnings.warn("entflash: the fused Triton backward is not available; gradients are recomputed "
                      "through the exact PyTorch reference (slow, O(chunk x N) memory)", stacklevel=3)
        _warned_fallback = True
    from entflash.reference.attention import torch_attention

    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs[:3])]
        a = alpha.detach().requires_grad_(needs[3]) if isinstance(alpha, torch.Tensor) else alpha
        out = torch_attention(*leaves, a, causal, scale, window, seqlens_q, seqlens_k, False)
        inputs = [t for t, n in zip(leaves, needs[:3]) if n] + ([a] if needs[3] else [])
        grads = iter(torch.autograd.grad(out, inputs, grad_out))
    return tuple(next(grads) if n else None for n in needs)


class TritonEntmaxAttention(torch.autograd.Function):
    """out = entmax attention(q, k, v) by the fused kernels; differentiable in q, k, v and alpha (tensor).

    forward(ctx, q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k) returns
    (out, tau, support, tile_map); only out is differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k):
        save_bwd = any(ctx.needs_input_grad[:4])
        res = entmax_forward(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, save_bwd=save_bwd)
        ctx.args = (alpha if not isinstance(alpha, torch.Tensor) else None, causal, scale, window)
        ctx.alpha_is_tensor = isinstance(alpha, torch.Tensor)
        alpha_saved = alpha.detach() if ctx.alpha_is_tensor else torch.empty(0)
        ctx.save_for_backward(q, k, v, res["tau"], res["tile_map"], res["o2"], res["s"], alpha_saved,
                              seqlens_q if seqlens_q is not None else torch.empty(0),
                              seqlens_k if seqlens_k is not None else torch.empty(0))
        ctx.has_seqlens = (seqlens_q is not None, seqlens_k is not None)
        ctx.mark_non_differentiable(res["tau"], res["support"], res["tile_map"])
        return res["out"], res["tau"], res["support"], res["tile_map"]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _g_tau, _g_support, _g_map):
        q, k, v, tau, tile_map, o2, s, alpha_saved, sq, sk = ctx.saved_tensors
        alpha_f, causal, scale, window = ctx.args
        alpha = alpha_saved if ctx.alpha_is_tensor else alpha_f
        sq = sq if ctx.has_seqlens[0] else None
        sk = sk if ctx.has_seqlens[1] else None
        needs = tuple(ctx.needs_input_grad[:4])
        fused = _fused_backward() if q.dtype != torch.float64 else None
        if fused is None:
            dq, dk, dv, dalpha = _reference_backward(q, k, v, alpha, causal, scale, window, sq, sk,
                                                     grad_out, needs)
        else:
            dq, dk, dv, dalpha = fused(q, k, v, grad_out, tau, tile_map, o2, s, alpha, causal, scale, window,
                                       sq, sk, alpha_requires_grad=bool(needs[3]))
        if dalpha is not None and ctx.alpha_is_tensor:
            dalpha = dalpha.to(alpha_saved.dtype).reshape(alpha_saved.shape)
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dalpha if needs[3] else None, None, None, None, None, None)


def triton_attention(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, return_aux):
    """Fused alpha-entmax attention: the backend contract of docs/ARCHITECTURE.md.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); fp16/bf16/fp32 (fp64 is computed in fp32 and returned as
    fp64), any strides, CUDA or CPU under TRITON_INTERPRET=1. alpha: float in (1, 2] or (Hq,) tensor (may
    require grad); causal: bool, bottom-right aligned; scale: float; window: None or (left, right);
    seqlens_q, seqlens_k: None or int (B,) tensors.
    Returns out (B, Hq, Nq, D) in q's dtype, and with return_aux a dict: "tau" (B, Hq, Nq) float32,
    "support" (B, Hq, Nq) int32, "tile_map" (B, Hq, ceil(Nq/64), ceil(Nk/64)) bool.
    """
    out, tau, support, tile_map = TritonEntmaxAttention.apply(q, k, v, alpha, causal, scale, window,
                                                              seqlens_q, seqlens_k)
    if return_aux:
        return out, {"tau": tau, "support": support, "tile_map": tile_map}
    return out
