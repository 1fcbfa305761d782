"""The "triton" backend of docs/ARCHITECTURE.md: the fused Triton kernels as torch custom ops.

Two plain functions do the work and two custom ops wrap them (argument encoding: entflash.custom_ops):

* fused_forward runs entflash.kernels.forward.entmax_forward and returns the outputs plus what the backward
  needs: tau, the 64x64 tile map, O2 = sum p^(2-alpha) v and S = sum p^(2-alpha) (docs/ARCHITECTURE.md);
  dalpha needs nothing more, the backward's dQ kernel forms it from row sums at the saved tau.
* fused_backward runs the block-sparse kernels of entflash.kernels.backward; for float64 inputs (silently) and
  where that module cannot be imported (warning once) it recomputes the gradients with the exact chunked
  reference (entflash.reference.attention).

"entflash::triton_attention_forward" / "entflash::triton_attention_backward" register them with fake
implementations and autograd, so torch.compile sees one opaque op per direction (the kernels' host-side logic
stays inside) and traces entflash without graph breaks. Eager calls skip the ops' dispatch: EagerTritonAttention
is a plain autograd.Function over the same two functions, with the same saved tensors and gradients.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from entflash.custom_ops import (alpha_gradient, decode_alpha, decode_window, empty_gradient, encode_alpha,
                                 encode_window, input_gradient, needs_autograd)
from entflash.kernels.forward import default_newton_plan, entmax_forward
from entflash.reference import attention as reference

MAP_BLOCK = 64  # granularity of the tile map (docs/ARCHITECTURE.md)

_warned_fallback = False


def _fused_backward():
    """entflash.kernels.backward.attention_backward, or None when it cannot be imported."""
    try:
        from entflash.kernels.backward import attention_backward
    except ImportError:
        return None
    return attention_backward


def _like(gradient: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """gradient copied into a tensor laid out as torch.empty_like(like) (the fused kernels' layout); None stays."""
    if gradient is None:
        return None
    return torch.empty_like(like).copy_(gradient)


def _reference_backward(grad_out, q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, needs):
    """Exact gradients by the chunked reference (recomputes its own forward for tau in the compute dtype).

    Used for float64 inputs (silently) and when the fused backward cannot be imported (warns once).
    Returns (dq, dk, dv, dalpha) as fused_backward.
    """
    global _warned_fallback
    if not _warned_fallback and q.dtype != torch.float64:
        warnings.warn("entflash: the fused Triton backward is not available; gradients are recomputed "
                      "through the exact PyTorch reference (slow, O(chunk x N) memory)", stacklevel=3)
        _warned_fallback = True
    _, tau, _ = reference.attention_forward(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k)
    dq, dk, dv, dalpha = reference.attention_backward(grad_out, q, k, v, tau, alpha, causal, scale, window,
                                                      seqlens_q, seqlens_k, needs)
    return _like(dq, q), _like(dk, k), _like(dv, v), dalpha


def newton_plan(dtype: torch.dtype, alpha, keep_for_backward: bool, exact_aux: bool) -> Tuple[int, float]:
    """(newton_iters, all_passes_from_alpha) of fused_forward's solve stage after the sweep's histogram bound
    (arguments as there; dtype q's; kernels.forward.entmax_forward says what the two mean).

    O2 and S are taken at the solver's tau, before the output pass's closing correction; for float32 training
    three passes make that correction negligible, so the gradients reach float32 accuracy (~1e-6 relative).
    Two were not always enough: for 1.5 < alpha < 2, F'' is unbounded at the support's edge, and on dense,
    near-uniform rows at alpha = 1.75 the second pass's tau was still 2e-4 short, S and O2 2e-4 and 5e-4 off,
    and dq 2e-4 (test_float32_training_solve_is_exact_enough_for_the_gradients). 16-bit inference without
    exact_aux runs none (the closing correction is the one step). Otherwise, 16-bit training included (its
    rounding dominates), the default plan: one pass, two for heads with alpha near 2
    (kernels.forward.default_newton_plan)."""
    if keep_for_backward and dtype == torch.float32:
        return 3, 1.0
    if not keep_for_backward and not exact_aux and dtype in (torch.float16, torch.bfloat16):
        return 0, 1.0
    return default_newton_plan(alpha)


def forms_tile_map(keep_for_backward: bool, exact_aux: bool) -> bool:
    """Does fused_forward return the tile map (else an empty (0,) tensor)? The backward reads it, and exact
    aux outputs hand it to the user; the fake op of torch.compile follows the same rule."""
    return keep_for_backward or exact_aux


def fused_forward(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, keep_for_backward, exact_aux=True):
    """The fused forward as a plain function (no autograd); arguments as triton_attention.

    keep_for_backward: also return O2 and S (else they are empty (0,) tensors).
    exact_aux: tau and support must be exact (the caller hands them to the user); when False, 16-bit
    inference (no keep_for_backward) skips the Newton pass of the solve stage: the output pass's closing
    correction is then the one solver step after the histogram bound, the output stays at 16-bit accuracy
    (measured ~5e-3 relative for bf16, as with the pass) and tau is that step's (~1e-2 off); support is
    not counted at all (-1) without exact_aux, and the tile map is not formed (an empty (0,) tensor) when
    neither flag is set.
    Returns (out, tau, support, tile_map, o2, s): out (B, Hq, Nq, D) in q's dtype laid out like
    torch.empty_like(q); tau (B, Hq, Nq) float32; support (B, Hq, Nq) int32; tile_map
    (B, Hq, ceil(Nq/64), ceil(Nk/64)) bool; o2 (B, Hq, Nq, D) and s (B, Hq, Nq) float32.
    """
    need_map = forms_tile_map(keep_for_backward, exact_aux)
    passes, all_passes_from_alpha = newton_plan(q.dtype, alpha, keep_for_backward, exact_aux)
    res = entmax_forward(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, save_bwd=keep_for_backward,
                         newton_iters=passes, all_passes_from_alpha=all_passes_from_alpha,
                         count_support=exact_aux, need_map=need_map)
    kept = [res[name] if keep_for_backward else res["tau"].new_empty(0) for name in ("o2", "s")]
    tile_map = res["tile_map"] if need_map else q.new_empty(0, dtype=torch.bool)
    return (res["out"], res["tau"], res["support"], tile_map, *kept)


def fused_backward(grad_out, q, k, v, tau, tile_map, o2, s, alpha, causal, scale, window, seqlens_q, seqlens_k,
                   needs: Tuple[bool, bool, bool, bool]):
    """The fused backward as a plain function: grad_out (B, Hq, Nq, D) and fused_forward's saved tensors.

    needs: which of (q, k, v, alpha) need a gradient.
    Returns (dq, dk, dv, dalpha): dq, dk, dv laid out like torch.empty_like of q, k, v in their dtypes, and dalpha
    (Hq,) in the compute dtype (float64 for float64 inputs, else float32); None where `needs` is False.
    """
    fused = _fused_backward() if q.dtype != torch.float64 else None
    if fused is None:
        return _reference_backward(grad_out, q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, needs)
    dq, dk, dv, dalpha = fused(q, k, v, grad_out, tau, tile_map, o2, s, alpha, causal, scale, window,
                               seqlens_q, seqlens_k, alpha_requires_grad=needs[3])
    return tuple(grad if needed else None for grad, needed in zip((dq, dk, dv, dalpha), needs))


@torch.library.custom_op("entflash::triton_attention_forward", mutates_args=())
def triton_attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                alpha_heads: Optional[torch.Tensor], alpha_value: float, causal: bool, scale: float,
                                window_left: int, window_right: int, seqlens_q: Optional[torch.Tensor],
                                seqlens_k: Optional[torch.Tensor], keep_for_backward: bool,
                                exact_aux: bool = True
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    """fused_forward on encoded arguments: (out, tau, support, tile_map, o2, s)."""
    return fused_forward(q, k, v, decode_alpha(alpha_heads, alpha_value), causal, scale,
                         decode_window(window_left, window_right), seqlens_q, seqlens_k, keep_for_backward,
                         exact_aux)


@triton_attention_forward_op.register_fake
def _triton_attention_forward_fake(q, k, v, alpha_heads, alpha_value, causal, scale, window_left, window_right,
                                   seqlens_q, seqlens_k, keep_for_backward, exact_aux=True):
    batch, heads, num_queries, _ = q.shape
    rows = (batch, heads, num_queries)
    tile_rows, tile_columns = (num_queries + MAP_BLOCK - 1) // MAP_BLOCK, (k.shape[2] + MAP_BLOCK - 1) // MAP_BLOCK
    tiles = (batch, heads, tile_rows, tile_columns)
    return (torch.empty_like(q), q.new_empty(rows, dtype=torch.float32), q.new_empty(rows, dtype=torch.int32),
            q.new_empty(tiles if forms_tile_map(keep_for_backward, exact_aux) else (0,), dtype=torch.bool),
            q.new_empty(q.shape if keep_for_backward else (0,), dtype=torch.float32),
            q.new_empty(rows if keep_for_backward else (0,), dtype=torch.float32))


@torch.library.custom_op("entflash::triton_attention_backward", mutates_args=())
def triton_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 tau: torch.Tensor, tile_map: torch.Tensor, o2: torch.Tensor, s: torch.Tensor,
                                 alpha_heads: Optional[torch.Tensor], alpha_value: float, causal: bool, scale: float,
                                 window_left: int, window_right: int, seqlens_q: Optional[torch.Tensor],
                                 seqlens_k: Optional[torch.Tensor], need_q: bool, need_k: bool, need_v: bool,
                                 need_alpha: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_backward on encoded arguments: (dq, dk, dv, dalpha), an empty tensor where not needed."""
    grads = fused_backward(grad_out, q, k, v, tau, tile_map, o2, s, decode_alpha(alpha_heads, alpha_value), causal,
                           scale, decode_window(window_left, window_right), seqlens_q, seqlens_k,
                           (need_q, need_k, need_v, need_alpha))
    likes = (q, k, v, q.new_empty(0, dtype=reference.compute_dtype_for(q.dtype)))
    return tuple(grad if grad is not None else empty_gradient(like) for grad, like in zip(grads, likes))


@triton_attention_backward_op.register_fake
def _triton_attention_backward_fake(grad_out, q, k, v, tau, tile_map, o2, s, alpha_heads, alpha_value, causal, scale,
                                    window_left, window_right, seqlens_q, seqlens_k, need_q, need_k, need_v,
                                    need_alpha):
    grads = tuple(torch.empty_like(like) if needed else like.new_empty(0)
                  for like, needed in ((q, need_q), (k, need_k), (v, need_v)))
    dalpha_dtype = reference.compute_dtype_for(q.dtype)
    return (*grads, q.new_empty((q.shape[1],) if need_alpha else (0,), dtype=dalpha_dtype))


def _triton_attention_setup_context(ctx, inputs, output):
    q, k, v, alpha_heads, alpha_value, causal, scale, window_left, window_right, seqlens_q, seqlens_k = inputs[:11]
    _, tau, support, tile_map, o2, s = output
    ctx.save_for_backward(q, k, v, tau, tile_map, o2, s, alpha_heads, seqlens_q, seqlens_k)
    ctx.options = (alpha_value, causal, scale, window_left, window_right)
    # only out carries a gradient: autograd then passes None for the others instead of zero-filling O2 and
    # S (a (B, Hq, Nq, D) float32 memset per backward)
    ctx.mark_non_differentiable(tau, support, tile_map, o2, s)
    ctx.set_materialize_grads(False)


def _triton_attention_gradients(ctx, grad_out, run_backward) -> tuple:
    """The 13 input gradients of the forward op from ctx (set up by _triton_attention_setup_context).

    run_backward(grad_out, q, k, v, tau, tile_map, o2, s, alpha_heads, seqlens_q, seqlens_k, options, needs)
    returns (dq, dk, dv, dalpha) with None where not needed; options = ctx.options, needs = which of
    (q, k, v, alpha) need a gradient."""
    q, k, v, tau, tile_map, o2, s, alpha_heads, seqlens_q, seqlens_k = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:4])
    if grad_out is None or not any(needs):
        return (None,) * 13
    dq, dk, dv, dalpha = run_backward(grad_out, q, k, v, tau, tile_map, o2, s, alpha_heads, seqlens_q, seqlens_k,
                                      ctx.options, needs)
    return (dq, dk, dv, alpha_gradient(dalpha, alpha_heads, needs[3])) + (None,) * 9


def _backward_through_op(grad_out, q, k, v, tau, tile_map, o2, s, alpha_heads, seqlens_q, seqlens_k, options,
                         needs):
    """run_backward of _triton_attention_gradients through the custom backward op (traceable)."""
    grads = triton_attention_backward_op(grad_out, q, k, v, tau, tile_map, o2, s, alpha_heads, *options,
                                         seqlens_q, seqlens_k, *needs)
    return tuple(input_gradient(grad, needed) for grad, needed in zip(grads, needs))


def _backward_direct(grad_out, q, k, v, tau, tile_map, o2, s, alpha_heads, seqlens_q, seqlens_k, options, needs):
    """run_backward of _triton_attention_gradients calling fused_backward itself (eager mode)."""
    alpha_value, causal, scale, window_left, window_right = options
    return fused_backward(grad_out, q, k, v, tau, tile_map, o2, s, decode_alpha(alpha_heads, alpha_value), causal,
                          scale, decode_window(window_left, window_right), seqlens_q, seqlens_k, needs)


def _triton_attention_autograd(ctx, grad_out, *_grads_of_other_outputs):
    return _triton_attention_gradients(ctx, grad_out, _backward_through_op)


triton_attention_forward_op.register_autograd(_triton_attention_autograd,
                                              setup_context=_triton_attention_setup_context)


class EagerTritonAttention(torch.autograd.Function):
    """The forward op's computation and autograd without the custom-op dispatch, for eager calls.

    torch.library.custom_op runs each call through the dispatcher, a generated autograd.Function and its own
    Python wrapper: on the H100 machine a forward+backward at a tiny shape took 2.17 ms of host time through the
    ops and 0.84 ms through this class with the other host cuts of 93cc031, 1.7 ms of the former in the ops'
    wrapper under cProfile (benchmarks/results/host_overhead-*.txt), which is most of a small problem's wall
    time once the GPU outruns the host. Under torch.compile triton_attention takes the op (opaque to the
    compiler); otherwise this class, with the same arguments, setup and gradients."""

    @staticmethod
    def forward(ctx, q, k, v, alpha_heads, alpha_value, causal, scale, window_left, window_right, seqlens_q,
                seqlens_k, keep_for_backward, exact_aux):
        output = fused_forward(q, k, v, decode_alpha(alpha_heads, alpha_value), causal, scale,
                               decode_window(window_left, window_right), seqlens_q, seqlens_k, keep_for_backward,
                               exact_aux)
        _triton_attention_setup_context(ctx, (q, k, v, alpha_heads, alpha_value, causal, scale, window_left,
                                              window_right, seqlens_q, seqlens_k), output)
        return output

    @staticmethod
    def backward(ctx, grad_out, *_grads_of_other_outputs):
        grads = _triton_attention_gradients(ctx, grad_out, _backward_direct)
        if torch.is_grad_enabled():  # create_graph=True: as through the op, a second derivative raises
            grads = _NoSecondDerivative.apply(len(grads), *grads, *ctx.saved_tensors[:3])
        return grads


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on first-order gradients that raises when differentiated: the fused backward is not itself
    differentiable, and a gradient taken with create_graph=True must not silently act as a constant.
    Arguments: the number of gradients, the gradients (None allowed), then tensors that require grad (anchors,
    so that the outputs are part of the graph)."""

    @staticmethod
    def forward(ctx, n_grads, *tensors):
        return tuple(None if grad is None else grad.clone() for grad in tensors[:n_grads])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("entflash: the fused Triton backward has no derivative of its own (no double backward)")


def triton_attention(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, return_aux):
    """Fused alpha-entmax attention: the backend contract of docs/ARCHITECTURE.md.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); fp16/bf16/fp32 (fp64 is computed in fp32 and returned as
    fp64), any strides, CUDA or CPU under TRITON_INTERPRET=1. alpha: float in (1, 2] or (Hq,) tensor (may
    require grad); causal: bool, bottom-right aligned; scale: float; window: None or (left, right);
    seqlens_q, seqlens_k: None or int (B,) tensors.
    Returns out (B, Hq, Nq, D) in q's dtype, and with return_aux a dict: "tau" (B, Hq, Nq) float32,
    "support" (B, Hq, Nq) int32, "tile_map" (B, Hq, ceil(Nq/64), ceil(Nk/64)) bool.
    Differentiable in q, k, v and alpha (tensor): through the custom op entflash::triton_attention_forward
    under torch.compile, through EagerTritonAttention (the same work, less host time) otherwise.
    """
    alpha_heads, alpha_value = encode_alpha(alpha)
    keep_for_backward = needs_autograd(q, k, v, alpha_heads)
    forward = triton_attention_forward_op if torch.compiler.is_compiling() else EagerTritonAttention.apply
    out, tau, support, tile_map, _, _ = forward(
        q, k, v, alpha_heads, alpha_value, causal, scale, *encode_window(window), seqlens_q, seqlens_k,
        keep_for_backward, bool(return_aux))
    if return_aux:
        return out, {"tau": tau.detach(), "support": support, "tile_map": tile_map}
    return out
