"""Exact alpha-entmax attention in PyTorch, chunked over queries (the "torch" backend; any device).

Memory stays O(chunk x Nk): the forward keeps only the output and the per-row thresholds tau; the backward
recomputes each chunk's scores and probabilities from tau (the N x N probabilities are never stored).
Half inputs are computed in float32, float64 inputs in float64.

Gradients follow DESIGN.md section 1. With u = [(alpha-1) z - tau]_+, p = u^(1/(alpha-1)) and
s = p^(2-alpha) = u^((2-alpha)/(alpha-1)) on the support:
    dz = s * (g - sum(s g) / sum(s)),            g = dO . v
    dalpha (per row) = sum_j g_j [(p_j - s^_j) / (alpha-1)^2 - (p_j log p_j - s^_j H) / (alpha-1)],
    s^ = s / sum(s),  H = sum_j p_j log p_j.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from entflash.custom_ops import (alpha_gradient, decode_alpha, decode_window, empty_gradient, encode_alpha,
                                 encode_window, input_gradient)
from entflash.reference.rowwise import entmax_threshold

# Bytes the chunk loop may spend on (chunk x Nk) temporaries, across all batch entries and heads.
CHUNK_MEMORY_BUDGET_BYTES = 256 * 2**20
# Number of live (chunk x Nk) tensors in the backward, the heavier of the two passes.
_LIVE_SCORE_TENSORS = 8
# With causal or windowed masks, chunks are at least this many rows and at most 1/8 of the queries.
_MIN_BOUNDED_CHUNK_ROWS = 64


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def query_chunk_rows(batch: int, num_q_heads: int, num_keys: int, dtype: torch.dtype,
                     budget_bytes: int = CHUNK_MEMORY_BUDGET_BYTES) -> int:
    """Query rows per chunk so that the chunk's (batch, heads, rows, num_keys) temporaries fit `budget_bytes`.

    dtype: the compute dtype (its element size counts). Returns an int >= 1.
    """
    bytes_per_row = batch * num_q_heads * max(num_keys, 1) * torch.finfo(dtype).bits // 8 * _LIVE_SCORE_TENSORS
    return max(1, budget_bytes // max(bytes_per_row, 1))


def visibility_mask(query_start: int, query_stop: int, num_queries: int, num_keys: int, causal: bool,
                    window: Optional[Tuple[Optional[int], Optional[int]]],
                    seqlens_q: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor],
                    device: torch.device, key_start: int = 0, key_stop: Optional[int] = None) -> torch.Tensor:
    """Which keys of [key_start, key_stop) (default: all) each query of rows [query_start, query_stop) may see,
    following the docs/ARCHITECTURE.md semantics.

    With Lq = seqlens_q[b] (else num_queries), Lk = seqlens_k[b] (else num_keys) and offset = Lk - Lq,
    query i sees key j iff i < Lq, j < Lk, (causal) j <= i + offset, and (window (l, r))
    i + offset - l <= j <= i + offset + r, a None side being unlimited.

    Returns a bool tensor (B, rows, keys) when any seqlens is given, else (1, rows, keys).
    """
    def lengths(seqlens, default):
        if seqlens is None:
            return torch.full((1, 1, 1), default, dtype=torch.int64, device=device)
        return seqlens.to(device=device, dtype=torch.int64).view(-1, 1, 1)

    length_q = lengths(seqlens_q, num_queries)
    length_k = lengths(seqlens_k, num_keys)
    query = torch.arange(query_start, query_stop, device=device).view(1, -1, 1)
    key = torch.arange(key_start, num_keys if key_stop is None else key_stop, device=device).view(1, 1, -1)
    own_key = query + (length_k - length_q)
    return within_reach(key, own_key, causal, window, (query < length_q) & (key < length_k))


def within_reach(key: torch.Tensor, own_key: torch.Tensor, causal: bool,
                 window: Optional[Tuple[Optional[int], Optional[int]]], visible: torch.Tensor) -> torch.Tensor:
    """visible restricted by the causal and window rules: a query whose own key position is own_key sees key
    position key iff (causal) key <= own_key and (window (l, r)) own_key - l <= key <= own_key + r, a None side
    being unlimited. key, own_key: int tensors; visible: bool; all broadcast together."""
    if causal:
        visible = visible & (key <= own_key)
    if window is not None:
        left, right = window
        if left is not None:
            visible = visible & (key >= own_key - left)
        if right is not None:
            visible = visible & (key <= own_key + right)
    return visible


class _Problem:
    """The fixed parts of one attention call, in the grouped layout used internally.

    Queries are viewed as (B, Hkv, G, Nq, D) with G = Hq // Hkv; a chunk of rows [start, stop) is flattened to
    (B, Hkv, G * rows, D) so that one matmul against k or v of shape (B, Hkv, Nk, D) serves the whole group.
    """

    def __init__(self, q, k, alpha, causal, scale, window, seqlens_q, seqlens_k, chunk_rows):
        self.batch, self.num_q_heads, self.num_queries, self.head_dim = q.shape
        self.num_kv_heads, self.num_keys = k.shape[1], k.shape[2]
        self.group = self.num_q_heads // self.num_kv_heads
        self.dtype = compute_dtype_for(q.dtype)
        self.device = q.device
        self.causal, self.scale, self.window = causal, scale, window
        self.seqlens_q, self.seqlens_k = seqlens_q, seqlens_k
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.detach().to(self.dtype).view(1, self.num_kv_heads, self.group, 1, 1)
        self.alpha = alpha
        self.keys_bounded = seqlens_q is None and seqlens_k is None and (
            causal or (window is not None and window != (None, None)))
        if chunk_rows is None:
            chunk_rows = query_chunk_rows(self.batch, self.num_q_heads, self.num_keys, self.dtype)
            if self.keys_bounded:  # smaller chunks skip more keys that no row of the chunk can see
                chunk_rows = min(chunk_rows, max(_MIN_BOUNDED_CHUNK_ROWS, -(-self.num_queries // 8)))
        self.chunk_rows = max(1, int(chunk_rows))

    def valid_rows(self, x: torch.Tensor, seqlens: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, H, N, D) in the compute dtype with rows at or past seqlens[b] set to zero: padding and unused
        cache slots may hold anything (NaN included), and a zero weight times NaN would still be NaN."""
        x = x.to(self.dtype)
        if seqlens is None:
            return x
        past_end = torch.arange(x.shape[2], device=x.device) >= seqlens.to(x.device)[:, None]
        return x.masked_fill(past_end[:, None, :, None], 0.0)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hq, N, ...) -> (B, Hkv, G, N, ...) view."""
        return x.unflatten(1, (self.num_kv_heads, self.group))

    def chunks(self):
        """Row ranges [start, stop) covering the queries, each with the key range [key_start, key_stop) outside
        of which no row of the chunk sees a key (all keys when sequence lengths vary per batch entry)."""
        for start in range(0, self.num_queries, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.num_queries)
            key_start, key_stop = 0, self.num_keys
            if self.keys_bounded:
                offset = self.num_keys - self.num_queries
                left, right = self.window if self.window is not None else (None, None)
                if left is not None:
                    key_start = min(max(start + offset - left, 0), self.num_keys)
                if self.causal or right is not None:
                    last_visible = stop - 1 + offset + (0 if self.causal else right)
                    key_stop = min(max(last_visible + 1, 0), self.num_keys)
            yield start, stop, key_start, max(key_start, key_stop)

    def flat_rows(self, x_chunk: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, G, rows, X) chunk -> (B, Hkv, G * rows, X) in the compute dtype."""
        return x_chunk.to(self.dtype).flatten(2, 3)

    def scores(self, q_rows: torch.Tensor, k: torch.Tensor, start: int, stop: int, key_start: int, key_stop: int):
        """Masked scores of one chunk against keys [key_start, key_stop): (B, Hkv, G, rows, keys), -inf where a
        key is not visible, and the (B or 1, 1, 1, rows, 1) bool marking rows that see at least one key."""
        visible = visibility_mask(start, stop, self.num_queries, self.num_keys, self.causal, self.window,
                                  self.seqlens_q, self.seqlens_k, self.device, key_start, key_stop)[:, None, None]
        keys = k[:, :, key_start:key_stop]
        scores = (q_rows @ keys.transpose(-1, -2)).unflatten(2, (self.group, stop - start)) * self.scale
        return scores.masked_fill(~visible, -math.inf), visible.any(dim=-1, keepdim=True)

    def shifted(self, scores: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """u = [(alpha-1) z - tau]_+ for tau of shape (..., rows, 1); zero on masked keys and empty rows."""
        return torch.clamp((self.alpha - 1) * scores - tau, min=0)

    def probabilities(self, shifted: torch.Tensor) -> torch.Tensor:
        """p = u^(1/(alpha-1))."""
        return shifted.pow(1 / (self.alpha - 1))

    def slopes(self, shifted: torch.Tensor) -> torch.Tensor:
        """s = p^(2-alpha) = u^((2-alpha)/(alpha-1)) on the support, 0 elsewhere."""
        on_support = shifted > 0
        exponent = (2 - self.alpha) / (self.alpha - 1)
        return torch.where(on_support, shifted.pow(exponent), torch.zeros((), dtype=shifted.dtype,
                                                                           device=shifted.device))


def _forward(problem: _Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Chunked forward. Returns out (B, Hq, Nq, D) in q's dtype, tau (B, Hkv, G, Nq) in the compute dtype
    (+inf on rows without visible keys) and support (B, Hq, Nq) int32."""
    p_ = problem
    q5 = p_.grouped(p_.valid_rows(q, p_.seqlens_q))
    k_c, v_c = p_.valid_rows(k, p_.seqlens_k), p_.valid_rows(v, p_.seqlens_k)
    out = torch.empty(p_.batch, p_.num_kv_heads, p_.group, p_.num_queries, p_.head_dim, dtype=p_.dtype,
                      device=p_.device)
    tau = torch.empty(p_.batch, p_.num_kv_heads, p_.group, p_.num_queries, dtype=p_.dtype, device=p_.device)
    support = torch.empty(p_.batch, p_.num_kv_heads, p_.group, p_.num_queries, dtype=torch.int32,
                          device=p_.device)
    for start, stop, key_start, key_stop in p_.chunks():
        if key_start == key_stop:  # no row of the chunk sees a key
            out[:, :, :, start:stop], tau[:, :, :, start:stop], support[:, :, :, start:stop] = 0, math.inf, 0
            continue
        scores, row_has_key = p_.scores(p_.flat_rows(q5[:, :, :, start:stop]), k_c, start, stop, key_start,
                                        key_stop)
        all_rows_see_keys = bool(row_has_key.all())
        solvable = scores if all_rows_see_keys else scores.masked_fill(~row_has_key, 0.0)
        tau_chunk = entmax_threshold(solvable, p_.alpha, dim=-1)
        if not all_rows_see_keys:
            tau_chunk = tau_chunk.masked_fill(~row_has_key, math.inf)
        shifted = p_.shifted(scores, tau_chunk)
        probs = p_.probabilities(shifted)
        out_rows = probs.flatten(2, 3) @ v_c[:, :, key_start:key_stop]
        out[:, :, :, start:stop] = out_rows.unflatten(2, (p_.group, stop - start))
        tau[:, :, :, start:stop] = tau_chunk.squeeze(-1)
        support[:, :, :, start:stop] = (shifted > 0).sum(-1, dtype=torch.int32)
    return out.flatten(1, 2).to(q.dtype), tau, support.flatten(1, 2)


def _backward(problem: _Problem, q, k, v, tau, grad_out, need_q, need_k, need_v, need_alpha):
    """Chunked backward recomputing each chunk's probabilities from the saved tau.

    Returns dq (B, Hq, Nq, D), dk, dv (B, Hkv, Nk, D) in the compute dtype (None where not needed) and
    dalpha (Hq,) in the compute dtype (None unless need_alpha).
    """
    p_ = problem
    q5 = p_.grouped(p_.valid_rows(q, p_.seqlens_q))
    grad_out5 = p_.grouped(p_.valid_rows(grad_out, p_.seqlens_q))
    k_c, v_c = p_.valid_rows(k, p_.seqlens_k), p_.valid_rows(v, p_.seqlens_k)
    dq = torch.zeros(q5.shape, dtype=p_.dtype, device=p_.device) if need_q else None
    dk = torch.zeros(k.shape, dtype=p_.dtype, device=p_.device) if need_k else None
    dv = torch.zeros(v.shape, dtype=p_.dtype, device=p_.device) if need_v else None
    dalpha = torch.zeros(p_.num_kv_heads, p_.group, dtype=p_.dtype, device=p_.device) if need_alpha else None
    for start, stop, key_start, key_stop in p_.chunks():
        if key_start == key_stop:  # no row of the chunk sees a key: zero gradients
            continue
        rows, keys = stop - start, slice(key_start, key_stop)
        q_rows = p_.flat_rows(q5[:, :, :, start:stop])
        grad_rows = p_.flat_rows(grad_out5[:, :, :, start:stop])
        scores, _ = p_.scores(q_rows, k_c, start, stop, key_start, key_stop)
        shifted = p_.shifted(scores, tau[:, :, :, start:stop, None])
        probs = p_.probabilities(shifted)
        if need_v:
            dv[:, :, keys] += probs.flatten(2, 3).transpose(-1, -2) @ grad_rows
        if not (need_q or need_k or need_alpha):
            continue
        grad_probs = (grad_rows @ v_c[:, :, keys].transpose(-1, -2)).unflatten(2, (p_.group, rows))
        slopes = p_.slopes(shifted)
        slope_sum = slopes.sum(-1, keepdim=True)
        safe_sum = torch.where(slope_sum > 0, slope_sum, torch.ones_like(slope_sum))
        normalized_slopes = slopes / safe_sum
        if need_q or need_k:
            grad_scores = slopes * (grad_probs - (normalized_slopes * grad_probs).sum(-1, keepdim=True))
            grad_scores = grad_scores.flatten(2, 3) * p_.scale
            if need_q:
                dq[:, :, :, start:stop] = (grad_scores @ k_c[:, :, keys]).unflatten(2, (p_.group, rows))
            if need_k:
                dk[:, :, keys] += grad_scores.transpose(-1, -2) @ q_rows
        if need_alpha:
            dalpha += _alpha_gradient_rows(p_, shifted, probs, normalized_slopes, grad_probs).sum(dim=(0, 3))
    dq = dq.flatten(1, 2) if need_q else None
    return dq, dk, dv, (dalpha.flatten() if need_alpha else None)


def _alpha_gradient_rows(problem: _Problem, shifted, probs, normalized_slopes, grad_probs) -> torch.Tensor:
    """Per-row dL/dalpha (B, Hkv, G, rows) from DESIGN.md section 1's closed form."""
    am1 = problem.alpha - 1
    on_support = shifted > 0
    log_shifted = torch.log(torch.where(on_support, shifted, torch.ones_like(shifted)))
    p_log_p = probs * log_shifted / am1
    entropy_term = p_log_p.sum(-1, keepdim=True)
    weighted = ((probs - normalized_slopes) / am1**2 - (p_log_p - normalized_slopes * entropy_term) / am1)
    return (grad_probs * weighted).sum(-1)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha, causal: bool, scale: float, window,
                      seqlens_q: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor],
                      chunk_rows: Optional[int] = None):
    """The reference forward as a plain function (no autograd): arguments as torch_attention.

    Returns out (B, Hq, Nq, D) in q's dtype (contiguous), tau (B, Hq, Nq) in the compute dtype (float64 for
    float64 inputs, else float32; (alpha-1) * score units, +inf on rows that see no key) and support (B, Hq, Nq)
    int32. tau is what attention_backward needs.
    """
    problem = _Problem(q, k, alpha, causal, scale, window, seqlens_q, seqlens_k, chunk_rows)
    out, tau, support = _forward(problem, q, k, v)
    return out.contiguous(), tau.flatten(1, 2), support


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau: torch.Tensor,
                       alpha, causal: bool, scale: float, window, seqlens_q: Optional[torch.Tensor],
                       seqlens_k: Optional[torch.Tensor], needs: Tuple[bool, bool, bool, bool],
                       chunk_rows: Optional[int] = None):
    """The reference backward as a plain function: recomputes each chunk's probabilities from the saved tau.

    grad_out: (B, Hq, Nq, D) dL/dout; tau: (B, Hq, Nq) from attention_forward; other arguments as torch_attention.
    needs: which of (q, k, v, alpha) need a gradient.
    Returns (dq, dk, dv, dalpha): dq (B, Hq, Nq, D) in q's dtype, dk and dv (B, Hkv, Nk, D) in k's / v's dtype,
    all contiguous, and dalpha (Hq,) in the compute dtype; None where `needs` is False.
    """
    problem = _Problem(q, k, alpha, causal, scale, window, seqlens_q, seqlens_k, chunk_rows)
    need_q, need_k, need_v, need_alpha = needs
    dq, dk, dv, dalpha = _backward(problem, q, k, v, problem.grouped(tau), grad_out, need_q, need_k, need_v,
                                   need_alpha)
    return (dq.to(q.dtype).contiguous() if need_q else None, dk.to(k.dtype) if need_k else None,
            dv.to(v.dtype) if need_v else None, dalpha)


# The "torch" backend as torch custom ops (argument encoding: entflash.custom_ops). chunk_rows 0 = automatic.

@torch.library.custom_op("entflash::torch_attention_forward", mutates_args=())
def torch_attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha_heads: Optional[torch.Tensor],
                               alpha_value: float, causal: bool, scale: float, window_left: int, window_right: int,
                               seqlens_q: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor],
                               chunk_rows: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_forward on encoded arguments: returns (out, tau, support) as attention_forward."""
    return attention_forward(q, k, v, decode_alpha(alpha_heads, alpha_value), causal, scale,
                             decode_window(window_left, window_right), seqlens_q, seqlens_k, chunk_rows or None)


@torch_attention_forward_op.register_fake
def _torch_attention_forward_fake(q, k, v, alpha_heads, alpha_value, causal, scale, window_left, window_right,
                                  seqlens_q, seqlens_k, chunk_rows):
    rows = q.shape[:3]
    return (q.new_empty(q.shape), q.new_empty(rows, dtype=compute_dtype_for(q.dtype)),
            q.new_empty(rows, dtype=torch.int32))


@torch.library.custom_op("entflash::torch_attention_backward", mutates_args=())
def torch_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                tau: torch.Tensor, alpha_heads: Optional[torch.Tensor], alpha_value: float,
                                causal: bool, scale: float, window_left: int, window_right: int,
                                seqlens_q: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor], chunk_rows: int,
                                need_q: bool, need_k: bool, need_v: bool,
                                need_alpha: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_backward on encoded arguments: (dq, dk, dv, dalpha), an empty tensor where not needed."""
    needs = (need_q, need_k, need_v, need_alpha)
    grads = attention_backward(grad_out, q, k, v, tau, decode_alpha(alpha_heads, alpha_value), causal, scale,
                               decode_window(window_left, window_right), seqlens_q, seqlens_k, needs,
                               chunk_rows or None)
    return tuple(grad if grad is not None else empty_gradient(like) for grad, like in zip(grads, (q, k, v, tau)))


@torch_attention_backward_op.register_fake
def _torch_attention_backward_fake(grad_out, q, k, v, tau, alpha_heads, alpha_value, causal, scale, window_left,
                                   window_right, seqlens_q, seqlens_k, chunk_rows, need_q, need_k, need_v, need_alpha):
    shapes = (q.shape, k.shape, v.shape, (q.shape[1],))
    likes = (q, k, v, tau)
    return tuple(like.new_empty(shape if needed else (0,))
                 for like, shape, needed in zip(likes, shapes, (need_q, need_k, need_v, need_alpha)))


def _torch_attention_setup_context(ctx, inputs, output):
    q, k, v, alpha_heads, alpha_value, causal, scale, window_left, window_right, seqlens_q, seqlens_k, chunk_rows = \
        inputs
    ctx.save_for_backward(q, k, v, output[1], alpha_heads, seqlens_q, seqlens_k)
    ctx.options = (alpha_value, causal, scale, window_left, window_right)
    ctx.chunk_rows = chunk_rows


def _torch_attention_autograd(ctx, grad_out, _grad_tau, _grad_support):
    q, k, v, tau, alpha_heads, seqlens_q, seqlens_k = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:4])
    dq, dk, dv, dalpha = torch_attention_backward_op(grad_out, q, k, v, tau, alpha_heads, *ctx.options, seqlens_q,
                                                     seqlens_k, ctx.chunk_rows, *needs)
    return (input_gradient(dq, needs[0]), input_gradient(dk, needs[1]), input_gradient(dv, needs[2]),
            alpha_gradient(dalpha, alpha_heads, needs[3])) + (None,) * 8


torch_attention_forward_op.register_autograd(_torch_attention_autograd, setup_context=_torch_attention_setup_context)


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha, causal: bool, scale: float,
                    window, seqlens_q: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor],
                    return_aux: bool, *, chunk_rows: Optional[int] = None):
    """Exact alpha-entmax attention, chunked over queries (the backend contract of docs/ARCHITECTURE.md).

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); float16/bfloat16/float32/float64, one dtype and device, any strides;
    Hq % Hkv == 0. alpha: float in (1, 2] or a float tensor (Hq,) (may require grad). causal: bottom-right aligned.
    scale: float multiplying q . k. window: None or (left, right) ints >= 0 or None. seqlens_q, seqlens_k: None
    or int32 (B,) valid lengths. Arguments are assumed validated (entflash.checks).
    chunk_rows: query rows per chunk (default: from CHUNK_MEMORY_BUDGET_BYTES).

    Returns out (B, Hq, Nq, D) in q's dtype; with return_aux also a dict with "tau" (B, Hq, Nq) float32 in
    (alpha-1) * score units (+inf on rows that see no key) and "support" (B, Hq, Nq) int32 (non-zeros per row).
    Differentiable in q, k, v and alpha (when alpha is a tensor) through the custom op
    entflash::torch_attention_forward, so torch.compile traces it without graph breaks.
    """
    alpha_heads, alpha_value = encode_alpha(alpha)
    out, tau, support = torch_attention_forward_op(q, k, v, alpha_heads, alpha_value, causal, scale,
                                                   *encode_window(window), seqlens_q, seqlens_k, chunk_rows or 0)
    if return_aux:
        return out, {"tau": tau.detach().to(torch.float32), "support": support}
    return out
