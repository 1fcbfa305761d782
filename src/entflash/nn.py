"""Attention modules built on `entflash.entmax_attention`.

* `HeadAlpha`: alpha per head, learnable as alpha = 1 + sigmoid(a), or fixed.
* `ASEntmaxScaling`: the ASEntmax factor delta + beta * log(i + 2) ** gamma for the query at 0-based absolute
  position i (delta = 1), with beta, gamma learnable per head or predicted per token from the hidden state.
* `EntmaxAttention`: holds those per-head parameters and calls `entmax_attention` on (B, H, N, D) tensors.
* `MultiheadEntmaxAttention`: a drop-in for `torch.nn.MultiheadAttention` (same constructor arguments, forward
  arguments, parameter names and state_dict), with alpha-entmax instead of softmax.
* `dense_entmax_attention`: the exact path for arbitrary masks and for returning the attention weights,
  materializing the (B, H, Nq, Nk) probabilities through the reference row-wise entmax.
* `unpadded_entmax_attention`: entmax_attention with any key (and query) padding pattern, without reading the
  masks on the host (a stable per-row permutation moves real tokens to the front; lengths stay on the device).

Under torch.compile the mask handling reads no tensor values on the host (a host read breaks the graph): masks
whose structure eager code finds by inspection are either handled for every pattern at once (key padding:
`unpadded_entmax_attention`) or dispatched on the device with `torch.cond` (is this bool mask torch's causal
mask? is there any padding?), and the dense path's row-wise entmax runs as the opaque custom ops
`entflash::dense_entmax_forward / _backward`.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from entflash import checks
from entflash.api import attend, entmax_attention
from entflash.reference import rowwise
from entflash.reference.attention import compute_dtype_for

# Learnable alpha stays inside (1 + ALPHA_MARGIN, 2]: the alpha gradient is singular at alpha = 1.
ALPHA_MARGIN = 1e-4
ASENTMAX_MODES = ("head", "token")


def _logit(probability: float) -> float:
    return math.log(probability) - math.log1p(-probability)


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class HeadAlpha(nn.Module):
    """alpha per attention head: learnable as alpha = 1 + sigmoid(a), or fixed.

    num_heads: number of (query) heads H.
    init_alpha: the initial alpha, a float or a sequence of H floats; in (1, 2) when learnable (a = logit(alpha - 1)
        must be finite), in (1, 2] when fixed.
    learnable: keep `a` as an nn.Parameter of shape (H,); otherwise alpha is a constant.

    Calling the module returns alpha: a (H,) float32 tensor when learnable or when the fixed values differ per
    head, else a python float (which lets the fused kernels specialize on it).
    """

    def __init__(self, num_heads: int, init_alpha: Union[float, Sequence[float]] = 1.5, learnable: bool = True):
        super().__init__()
        caller = "HeadAlpha"
        if not checks.is_integer(num_heads) or num_heads < 1:
            checks.fail(ValueError, caller, "num_heads", "be an int >= 1", repr(num_heads))
        if checks.is_real_number(init_alpha):
            values = [float(init_alpha)] * num_heads
        else:
            values = [float(a) for a in torch.as_tensor(init_alpha, dtype=torch.float64).reshape(-1).tolist()]
            if len(values) != num_heads:
                checks.fail(ValueError, caller, "init_alpha", f"be a float or {num_heads} floats (one per head)",
                            f"{len(values)} values")
        upper_ok = (lambda a: a < 2.0) if learnable else (lambda a: a <= 2.0)
        if not all(1.0 < a and upper_ok(a) for a in values):
            interval = "(1, 2)" if learnable else "(1, 2]"
            checks.fail(ValueError, caller, "init_alpha", f"lie in {interval} for every head", repr(values))
        self.num_heads = num_heads
        self.learnable = bool(learnable)
        if self.learnable:
            self.alpha_logit = nn.Parameter(torch.tensor([_logit(a - 1.0) for a in values], dtype=torch.float32))
        else:
            self.register_buffer("fixed_alpha", torch.tensor(values, dtype=torch.float32), persistent=False)
            self._fixed_float = values[0] if len(set(values)) == 1 else None

    def forward(self) -> Union[float, torch.Tensor]:
        """alpha: a (H,) float32 tensor in (1, 2], or a python float when fixed and equal for every head."""
        if self.learnable:
            return (1.0 + torch.sigmoid(self.alpha_logit)).clamp(min=1.0 + ALPHA_MARGIN)
        if self._fixed_float is not None:
            return self._fixed_float
        return self.fixed_alpha

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, learnable={self.learnable}"


class ASEntmaxScaling(nn.Module):
    """ASEntmax query scaling: factor_i = 1 + beta * log(i + 2) ** gamma for the query at 0-based position i.

    Multiplying query row i by factor_i multiplies its logits by it, which keeps attention sharp as the context
    grows (Vasylenko et al., "Long-Context Generalization with Sparse Attention").

    num_heads: H.
    mode: "head": beta = softplus(b_h), gamma = 2 * tanh(g_h) with learnable (H,) parameters b, g;
        "token": beta = softplus(w_beta . h + b), gamma = 2 * tanh(w_gamma . h + g) predicted per token and head
        from the hidden state h (two nn.Linear(hidden_size, H), weights initialized to zero).
    hidden_size: size of h; required for mode "token".
    init_beta: initial beta (> 0); init_gamma: initial gamma in (-2, 2).
    """

    def __init__(self, num_heads: int, mode: str = "head", hidden_size: Optional[int] = None,
                 init_beta: float = 0.1, init_gamma: float = 1.0):
        super().__init__()
        caller = "ASEntmaxScaling"
        if mode not in ASENTMAX_MODES:
            checks.fail(ValueError, caller, "mode", f"be one of {ASENTMAX_MODES}", repr(mode))
        if not (checks.is_real_number(init_beta) and init_beta > 0):
            checks.fail(ValueError, caller, "init_beta", "be a float > 0", repr(init_beta))
        if not (checks.is_real_number(init_gamma) and -2.0 < init_gamma < 2.0):
            checks.fail(ValueError, caller, "init_gamma", "lie in (-2, 2)", repr(init_gamma))
        raw_beta, raw_gamma = _inverse_softplus(float(init_beta)), math.atanh(float(init_gamma) / 2.0)
        self.num_heads, self.mode = num_heads, mode
        if mode == "head":
            self.beta_raw = nn.Parameter(torch.full((num_heads,), raw_beta))
            self.gamma_raw = nn.Parameter(torch.full((num_heads,), raw_gamma))
            return
        if not checks.is_integer(hidden_size) or hidden_size < 1:
            checks.fail(ValueError, caller, "hidden_size", "be an int >= 1 for mode 'token'", repr(hidden_size))
        self.beta_proj = nn.Linear(hidden_size, num_heads)
        self.gamma_proj = nn.Linear(hidden_size, num_heads)
        for projection, raw in ((self.beta_proj, raw_beta), (self.gamma_proj, raw_gamma)):
            nn.init.zeros_(projection.weight)
            nn.init.constant_(projection.bias, raw)

    def forward(self, positions: torch.Tensor, hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scaling factors for query rows.

        positions: integer tensor (B, N) or (1, N) (or (N,)) of 0-based absolute positions.
        hidden_states: (B, N, hidden_size), required for mode "token".
        Returns float32 factors of shape (B or 1, H, N, 1), each >= 1.
        """
        caller = "ASEntmaxScaling"
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.dim() not in (1, 2):
            checks.fail(TypeError, caller, "positions", "be an integer tensor (B, N) or (N,)",
                        checks.describe(positions))
        positions = positions.reshape(-1, positions.shape[-1]) if positions.dim() == 2 else positions[None]
        log_position = torch.log(positions.clamp(min=0).to(torch.float32) + 2.0)[:, None, :]  # (B, 1, N)
        if self.mode == "head":
            beta = F.softplus(self.beta_raw).view(1, -1, 1)
            gamma = (2.0 * torch.tanh(self.gamma_raw)).view(1, -1, 1)
        else:
            if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
                checks.fail(ValueError, caller, "hidden_states", "be a (B, N, hidden_size) tensor in mode 'token'",
                            checks.describe(hidden_states))
            if hidden_states.shape[1] != positions.shape[-1]:
                checks.fail(ValueError, caller, "hidden_states",
                            f"have N = {positions.shape[-1]} tokens (as positions)",
                            f"shape {tuple(hidden_states.shape)}")
            hidden = hidden_states.to(self.beta_proj.weight.dtype)
            beta = F.softplus(self.beta_proj(hidden)).transpose(1, 2).float()
            gamma = (2.0 * torch.tanh(self.gamma_proj(hidden))).transpose(1, 2).float()
        return (1.0 + beta * log_position.pow(gamma)).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, mode={self.mode!r}"


def query_positions(num_queries: int, position_offset, device: torch.device) -> torch.Tensor:
    """0-based absolute positions of `num_queries` consecutive queries starting at `position_offset`.

    position_offset: int, or an integer tensor (B,) (one offset per sequence, e.g. KV-cache lengths).
    Returns int64 (1, N) or (B, N).
    """
    steps = torch.arange(num_queries, device=device)
    if isinstance(position_offset, torch.Tensor):
        if position_offset.is_floating_point() or position_offset.dim() != 1:
            checks.fail(TypeError, "query_positions", "position_offset", "be an int or an integer (B,) tensor",
                        checks.describe(position_offset))
        return position_offset.to(device=device, dtype=torch.int64)[:, None] + steps[None]
    if not checks.is_integer(position_offset) or position_offset < 0:
        checks.fail(ValueError, "query_positions", "position_offset", "be an int >= 0", repr(position_offset))
    return (steps + int(position_offset))[None]


class EntmaxAttention(nn.Module):
    """alpha-entmax attention with per-head parameters: learnable (or fixed) alpha and optional ASEntmax.

    num_heads: number of query heads H.
    alpha: initial alpha (float or H floats); in (1, 2) when learn_alpha, (1, 2] otherwise.
    learn_alpha: learn alpha per head as 1 + sigmoid(a).
    asentmax: None (off), "head" (beta, gamma per head) or "token" (predicted from the hidden state; needs
        hidden_size and the hidden states at forward time). See ASEntmaxScaling.
    asentmax_init: (beta, gamma) initial values.
    backend: passed to entmax_attention ("auto", "torch", "triton").

    forward(q, k, v) takes SDPA-layout tensors q (B, H, Nq, D), k, v (B, Hkv, Nk, D) and returns (B, H, Nq, D).
    """

    def __init__(self, num_heads: int, alpha: Union[float, Sequence[float]] = 1.5, learn_alpha: bool = True,
                 asentmax: Optional[str] = None, hidden_size: Optional[int] = None,
                 asentmax_init: Tuple[float, float] = (0.1, 1.0), backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_alpha = HeadAlpha(num_heads, alpha, learnable=learn_alpha)
        if asentmax is None:
            self.asentmax = None
        else:
            self.asentmax = ASEntmaxScaling(num_heads, asentmax, hidden_size, *asentmax_init)
        self.backend = checks.check_backend(backend, "EntmaxAttention")

    def alpha(self) -> Union[float, torch.Tensor]:
        """Current alpha: a python float or a (H,) float32 tensor."""
        return self.head_alpha()

    def alpha_for(self, reference: torch.Tensor) -> Union[float, torch.Tensor]:
        """alpha ready for entmax_attention: a float, or a (H,) tensor on `reference`'s device."""
        alpha = self.alpha()
        return alpha.to(reference.device) if isinstance(alpha, torch.Tensor) else alpha

    def scale_queries(self, q: torch.Tensor, positions: Optional[torch.Tensor] = None,
                      hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Apply ASEntmax to q (B, H, N, D): row i multiplied by its factor; identity when ASEntmax is off.

        positions: integer (B, N) / (1, N) 0-based absolute positions (default 0..N-1).
        hidden_states: (B, N, hidden) for mode "token".
        """
        if self.asentmax is None:
            return q
        if positions is None:
            positions = query_positions(q.shape[2], 0, q.device)
        factors = self.asentmax(positions.to(q.device), hidden_states)
        return q * factors.to(q.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                scale: Optional[float] = None, window=None, seqlens=None, position_offset=0,
                positions: Optional[torch.Tensor] = None, hidden_states: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Attention output (B, H, Nq, D).

        q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D). causal, scale, window, seqlens: as entmax_attention
        (bottom-right causal alignment).
        position_offset: int or (B,) int tensor: absolute position of the first query (the KV-cache length when
            decoding), used by ASEntmax; ignored when `positions` (integer (B, Nq)) is given.
        hidden_states: (B, Nq, hidden) for ASEntmax mode "token".
        """
        if q.dim() != 4 or q.shape[1] != self.num_heads:
            checks.fail(ValueError, "EntmaxAttention", "q", f"have shape (B, {self.num_heads}, Nq, D)",
                        checks.describe(q))
        if self.asentmax is not None and positions is None:
            positions = query_positions(q.shape[2], position_offset, q.device)
        q = self.scale_queries(q, positions, hidden_states)
        # HeadAlpha's alpha is in (1, 2] by construction (checked at init when fixed; 1 + sigmoid clamped when
        # learnable), so its values are not read back: a read per call would wait for the GPU
        return entmax_attention(q, k, v, alpha=self.alpha_for(q), causal=causal, scale=scale, window=window,
                                seqlens=seqlens, backend=self.backend, check_alpha=False)


def _repeat_kv_heads(tensor: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hq, N, D): query head h reads kv head h // (Hq // Hkv)."""
    groups = num_q_heads // tensor.shape[1]
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


# The dense path's row-wise entmax as torch custom ops, used while torch.compile traces: the reference solver
# reads tensor values on the host (window size, convergence), which a traced graph cannot hold, so it stays
# opaque. rows (R, n) in the compute dtype; alpha_rows (R, 1) for a per-row alpha, or None with the python float
# alpha_value (the reference's closed forms for 1.5 and 2 key on it). Eager calls use rowwise.entmax directly.

@torch.library.custom_op("entflash::dense_entmax_forward", mutates_args=())
def dense_entmax_forward_op(rows: torch.Tensor, alpha_rows: Optional[torch.Tensor], alpha_value: float
                            ) -> torch.Tensor:
    """alpha-entmax of each row of rows (R, n): the reference rowwise.entmax (masked -inf entries give 0)."""
    return rowwise.entmax(rows, alpha_rows if alpha_rows is not None else alpha_value, dim=-1)


@dense_entmax_forward_op.register_fake
def _dense_entmax_forward_fake(rows, alpha_rows, alpha_value):
    return torch.empty_like(rows)


@torch.library.custom_op("entflash::dense_entmax_backward", mutates_args=())
def dense_entmax_backward_op(grad_p: torch.Tensor, p: torch.Tensor, alpha_rows: Optional[torch.Tensor],
                             alpha_value: float, need_alpha: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d rows (R, n), d alpha_rows (R, 1), or an empty tensor when not need_alpha) from the saved p: the
    reference's closed-form gradients (rowwise._EntmaxFunction.backward)."""
    if alpha_rows is None:
        alpha_rows = torch.full((p.shape[0], 1), alpha_value, dtype=p.dtype, device=p.device)
    saved = _SavedRows(saved_tensors=(p, alpha_rows), needs_input_grad=(True, need_alpha, False))
    grad_rows, grad_alpha, _ = rowwise._EntmaxFunction.backward(saved, grad_p)
    return grad_rows, (grad_alpha if need_alpha else p.new_empty(0))


class _SavedRows:
    """What rowwise._EntmaxFunction.backward reads from its autograd context."""

    def __init__(self, saved_tensors, needs_input_grad):
        self.saved_tensors, self.needs_input_grad = saved_tensors, needs_input_grad


@dense_entmax_backward_op.register_fake
def _dense_entmax_backward_fake(grad_p, p, alpha_rows, alpha_value, need_alpha):
    return torch.empty_like(p), p.new_empty((p.shape[0], 1) if need_alpha else (0,))


def _dense_entmax_setup_context(ctx, inputs, output):
    _, alpha_rows, alpha_value = inputs
    ctx.save_for_backward(output, alpha_rows)
    ctx.alpha_value = alpha_value


def _dense_entmax_autograd(ctx, grad_p):
    p, alpha_rows = ctx.saved_tensors
    need_alpha = alpha_rows is not None and ctx.needs_input_grad[1]
    grad_rows, grad_alpha = dense_entmax_backward_op(grad_p, p, alpha_rows, ctx.alpha_value, need_alpha)
    return grad_rows, (grad_alpha if need_alpha else None), None


dense_entmax_forward_op.register_autograd(_dense_entmax_autograd, setup_context=_dense_entmax_setup_context)


def _dense_entmax(scores: torch.Tensor, alpha) -> torch.Tensor:
    """Row-wise entmax of scores (B, H, Nq, Nk) (compute dtype) with alpha a float or a (H,) tensor: the reference
    in eager calls, the custom ops above while torch.compile traces."""
    if not torch.compiler.is_compiling():
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.to(scores.dtype).view(1, -1, 1, 1)
        return rowwise.entmax(scores, alpha, dim=-1)
    alpha_rows, alpha_value = None, 0.0
    if isinstance(alpha, torch.Tensor):
        alpha_rows = alpha.to(scores.dtype).view(1, -1, 1).expand(scores.shape[:-1]).reshape(-1, 1)
    else:
        alpha_value = float(alpha)
    rows = scores.reshape(-1, scores.shape[-1])
    return dense_entmax_forward_op(rows, alpha_rows, alpha_value).view(scores.shape)


def dense_entmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, alpha=1.5,
                           scale: Optional[float] = None, keep: Optional[torch.Tensor] = None,
                           bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact alpha-entmax attention with an arbitrary mask, materializing the probabilities (small inputs).

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq % Hkv == 0.
    alpha: float in (1, 2] or a (Hq,) tensor (differentiable).
    scale: multiplies q . k (default 1/sqrt(D)).
    keep: bool tensor broadcastable to (B, Hq, Nq, Nk); True where a query may see a key.
    bias: float tensor broadcastable to (B, Hq, Nq, Nk) added to the scaled scores (-inf hides a key).
    dropout_p: dropout applied to the probabilities (as softmax attention does); 0 when evaluating.

    Returns (out (B, Hq, Nq, D) in q's dtype, weights (B, Hq, Nq, Nk) float32/float64). Rows with no visible key
    give zero weights and zero output. Memory is O(B * Hq * Nq * Nk).
    """
    caller = "dense_entmax_attention"
    checks.check_qkv(q, k, v, caller)
    alpha = checks.check_alpha(alpha, q.shape[1], q.device, caller)
    scale = checks.check_scale(scale, q.shape[-1], caller)
    compute_dtype = compute_dtype_for(q.dtype)
    keys = _repeat_kv_heads(k, q.shape[1]).to(compute_dtype)
    values = _repeat_kv_heads(v, q.shape[1]).to(compute_dtype)
    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(compute_dtype)
    if keep is not None:
        if keep.dtype != torch.bool:
            checks.fail(TypeError, caller, "keep", "be a bool tensor", str(keep.dtype))
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = _dense_entmax(scores, alpha)  # -inf entries and all -inf rows give exact zeros
    attended = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.matmul(attended, values).to(q.dtype)
    return out, weights


def _front_order(valid: torch.Tensor) -> torch.Tensor:
    """Stable per-row permutation (B, N) int64 of a bool (B, N) tensor: its True positions first, in order, then
    its False positions."""
    return torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)


def _token_index(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return order[:, None, :, None].expand(x.shape[0], x.shape[1], order.shape[1], x.shape[3])


def _take_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) with row b's tokens in the order order[b] (differentiable)."""
    return x.gather(2, _token_index(x, order))


def _put_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of _take_tokens: token i of row b goes back to position order[b, i] (differentiable)."""
    return torch.zeros_like(x).scatter(2, _token_index(x, order), x)


def unpadded_entmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
                              query_valid: Optional[torch.Tensor] = None, *, alpha=1.5, causal: bool = False,
                              scale: Optional[float] = None, window=None, backend: str = "auto",
                              check_alpha: bool = True) -> torch.Tensor:
    """entmax_attention over the real tokens of padded rows, for any padding pattern, reading no mask values on the
    host (so torch.compile(fullgraph=True) traces it).

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D). key_valid: bool (B, Nk), True where a key is a real token.
    query_valid: bool (B, Nq), True where a query is real (padded query rows return zeros), or None: every query
        row attends (and queries keep their order).
    alpha, causal, scale, window, backend, check_alpha: as entmax_attention.

    Real keys (and real queries) move to the front of their row, keeping their order (a stable per-row
    permutation), entmax_attention runs with seqlens = (real queries or None, real keys) counted on the device, and
    the outputs move back to their positions. causal and window then apply, bottom-right aligned, to the ranks of
    the real tokens: the r-th of Lq real queries sees the j-th of Lk real keys iff j <= r + Lk - Lq (and the window
    around that key). Without causal and window this is attention with the padded keys masked, for any pattern.
    For self-attention whose queries are the last Nq key positions (query_valid = key_valid[:, Nk - Nq:]),
    causal is "real key position <= query position" for any pattern; a window counted in positions is the same
    as one counted in ranks when each row's real tokens are contiguous (left or right padding).

    Returns (B, Hq, Nq, D) in q's dtype.
    """
    caller = "unpadded_entmax_attention"
    checks.check_qkv(q, k, v, caller)
    for name, mask, length in (("key_valid", key_valid, k.shape[2]), ("query_valid", query_valid, q.shape[2])):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (q.shape[0],
                                                                                                 length):
            checks.fail(ValueError, caller, name, f"be a bool tensor of shape ({q.shape[0]}, {length})",
                        checks.describe(mask))
    key_order = _front_order(key_valid)
    k, v = _take_tokens(k, key_order), _take_tokens(v, key_order)
    # counts of mask entries: in range by construction, so attend does not read them back (a host sync)
    lengths_k = key_valid.sum(dim=1, dtype=torch.int32)
    options = dict(alpha=alpha, causal=causal, scale=scale, window=window, return_aux=False, backend=backend,
                   check_alpha=check_alpha, read_lengths=False, caller=caller)
    if query_valid is None:
        return attend(q, k, v, seqlens=(None, lengths_k), **options)
    query_order = _front_order(query_valid)
    out = attend(_take_tokens(q, query_order), k, v,
                 seqlens=(query_valid.sum(dim=1, dtype=torch.int32), lengths_k), **options)
    return _put_tokens(out, query_order)  # rows past each row's real queries are zeros


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def choose_on_device(predicate: torch.Tensor, if_true, if_false, tensors) -> torch.Tensor:
    """torch.cond(predicate, if_true, if_false, tensors) for branches that take `tensors` (e.g. q, k, v) and return
    one tensor. torch.cond needs the branches' outputs, and the gradients they send back to `tensors`, to share a
    layout: both are made contiguous. Only the chosen branch runs; the compiled graph holds both."""
    def branch(function):
        def run(*inputs):
            return function(*(_ContiguousGradient.apply(x) for x in inputs)).contiguous()
        return run

    return torch.cond(predicate, branch(if_true), branch(if_false), tuple(tensors))


def _future_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """torch's causal mask (top-left aligned, as is_causal): bool (Nq, Nk), True where a key is masked."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).triu(1)


def _structured_mask(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], is_causal: bool,
                     num_queries: int, num_keys: int):
    """Express torch-style masks as entmax_attention options, if possible.

    Returns (causal, seqlens) when the masks amount to "no mask", top-left causal (Nq == Nk) or right-padded keys
    without causality; None otherwise (the caller takes the dense path).
    """
    causal = False
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool or attn_mask.dim() != 2:
            return None
        if bool(attn_mask.any()):
            future = _future_mask(num_queries, num_keys, attn_mask.device)
            if num_queries != num_keys or not torch.equal(attn_mask, future):
                return None
            causal = True
    elif is_causal:
        if num_queries != num_keys:
            return None
        causal = True
    if key_padding_mask is None or not bool(key_padding_mask.any()):
        return causal, None
    if causal or key_padding_mask.dtype != torch.bool:
        return None
    valid = ~key_padding_mask
    lengths = valid.sum(dim=1)
    prefix = torch.arange(num_keys, device=valid.device)[None] < lengths[:, None]
    if not torch.equal(prefix, valid):
        return None
    return False, (None, lengths.to(torch.int32))


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch-style mask (bool True = masked, or float additive) -> float additive mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadEntmaxAttention(nn.Module):
    """torch.nn.MultiheadAttention with alpha-entmax instead of softmax.

    Constructor arguments, forward arguments, parameter names (in_proj_weight or q/k/v_proj_weight, in_proj_bias,
    out_proj, bias_k, bias_v) and mask conventions are those of torch.nn.MultiheadAttention, so
    `load_state_dict(mha.state_dict(), strict=False)` copies a softmax module's weights. Extra arguments:
    alpha (float in (1, 2], or H floats), learn_alpha (per-head alpha = 1 + sigmoid(a), needs alpha < 2),
    backend ("auto", "torch", "triton").

    Masks: key_padding_mask (N, S) and attn_mask (L, S) or (N * num_heads, L, S), bool with True = masked, or float
    (added to the scores). is_causal=True without attn_mask applies a causal mask (torch requires the mask too).
    Without masks, with a causal mask, or with right-padded keys (non-causal), and need_weights=False and no
    dropout, the call runs on entmax_attention (fused on GPU); every other case runs the exact dense path
    (O(N * H * L * S) memory). Rows whose every key is masked give zeros (softmax gives NaN).
    Under torch.compile (fullgraph=True works with every mask) the choice reads no mask values on the host: a bool
    key_padding_mask of any pattern without a causal mask runs unpadded_entmax_attention, a bool (L, S) attn_mask
    is tested on the device (torch.cond) for torch's causal mask, and the rest runs the dense path as in eager.
    need_weights=True returns the sparse attention weights (N, L, S) averaged over heads, or (N, H, L, S) with
    average_attn_weights=False (unbatched inputs drop N).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 alpha: Union[float, Sequence[float]] = 1.5, learn_alpha: bool = False, backend: str = "auto"):
        super().__init__()
        caller = "MultiheadEntmaxAttention"
        if not checks.is_integer(embed_dim) or embed_dim < 1:
            checks.fail(ValueError, caller, "embed_dim", "be an int >= 1", repr(embed_dim))
        if not checks.is_integer(num_heads) or num_heads < 1 or embed_dim % num_heads:
            checks.fail(ValueError, caller, "num_heads", f"be an int >= 1 dividing embed_dim ({embed_dim})",
                        repr(num_heads))
        if not (checks.is_real_number(dropout) and 0.0 <= dropout < 1.0):
            checks.fail(ValueError, caller, "dropout", "lie in [0, 1)", repr(dropout))
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), bool(batch_first), bool(add_zero_attn)
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.attention = EntmaxAttention(num_heads, alpha, learn_alpha=learn_alpha, backend=backend)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch.nn.MultiheadAttention's initialization."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for extra in (self.bias_k, self.bias_v):
            if extra is not None:
                nn.init.xavier_normal_(extra)

    def _project(self, query, key, value):
        """(N, L, E), (N, S, kdim), (N, S, vdim) -> q (N, L, E), k, v (N, S, E)."""
        biases = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, S, E) -> (N, H, S, head_dim)."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As torch.nn.MultiheadAttention.forward.

        query (L, N, E) (or (N, L, E) with batch_first, or unbatched (L, E)); key (S, N, kdim), value (S, N, vdim)
        likewise. Returns (attn_output shaped like query with E features, attn_weights or None).
        """
        caller = "MultiheadEntmaxAttention"
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (2, 3):
                checks.fail(ValueError, caller, name, "be a 2-D (unbatched) or 3-D tensor", checks.describe(tensor))
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0).flatten(0, 1)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # Now (L, N, E) / (S, N, kdim); compute in (N, L, E).
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, num_queries = query.shape[0], query.shape[1]
        if key.shape[0] != batch or value.shape[:2] != key.shape[:2]:
            checks.fail(ValueError, caller, "key", "share batch and length with value and the batch of query",
                        f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            attn_mask, key_padding_mask = self._pad_masks(attn_mask, key_padding_mask)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(k.shape[:2] + (1, self.head_dim))], dim=2)
            v = torch.cat([v, v.new_zeros(v.shape[:2] + (1, self.head_dim))], dim=2)
            attn_mask, key_padding_mask = self._pad_masks(attn_mask, key_padding_mask)
        num_keys = k.shape[2]
        self._check_masks(attn_mask, key_padding_mask, batch, num_queries, num_keys)
        dropout_p = self.dropout if self.training else 0.0
        masks = (attn_mask, key_padding_mask, is_causal, batch, num_queries, num_keys)
        weights = None
        if torch.compiler.is_compiling():  # no host reads of mask values: see _attend_traced
            if need_weights or dropout_p > 0:
                out, weights = self._attend_dense(q, k, v, *masks, dropout_p)
            else:
                out = self._attend_traced(q, k, v, *masks)
        else:
            structured = _structured_mask(attn_mask, key_padding_mask, is_causal and attn_mask is None,
                                          num_queries, num_keys)
            if structured is not None and not need_weights and dropout_p == 0.0:
                causal, seqlens = structured
                out = self.attention(q, k, v, causal=causal, seqlens=seqlens)
            else:
                if structured is None and not need_weights:
                    warnings.warn("MultiheadEntmaxAttention: this mask is not causal / right padding only; running "
                                  "the exact dense path (O(N*H*L*S) memory)", stacklevel=2)
                out, weights = self._attend_dense(q, k, v, *masks, dropout_p)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, num_queries, self.embed_dim))
        out = out if self.batch_first and not unbatched else out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = weights.to(out.dtype)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, (weights.squeeze(0) if unbatched else weights)

    def _attend_dense(self, q, k, v, attn_mask, key_padding_mask, is_causal, batch, num_queries, num_keys,
                      dropout_p):
        """The exact dense path: (out (N, H, L, head_dim), weights (N, H, L, S))."""
        bias = self._additive_mask(attn_mask, key_padding_mask, is_causal, batch, num_queries, num_keys, q)
        return dense_entmax_attention(q, k, v, alpha=self.attention.alpha_for(q), bias=bias, dropout_p=dropout_p)

    def _attend_traced(self, q, k, v, attn_mask, key_padding_mask, is_causal, batch, num_queries, num_keys):
        """forward's path choice while torch.compile traces (need_weights=False, no dropout), with no host reads.

        Eager forward inspects the masks' values (_structured_mask). Here a bool key_padding_mask of any pattern
        without a causal mask runs unpadded_entmax_attention (no inspection needed), and the remaining questions
        (is this bool attn_mask torch's causal mask, or empty? does a causal call have any padding?) are answered
        on the device by torch.cond, whose other branch is the exact dense path, as in eager. Float masks, 3-D
        masks and is_causal with L != S run the dense path.
        """
        attention = self.attention

        def dense(q, k, v):
            return self._attend_dense(q, k, v, attn_mask, key_padding_mask, is_causal, batch, num_queries, num_keys,
                                      0.0)[0]

        def without_attn_mask(causal):
            def attend(q, k, v):
                if key_padding_mask is None:
                    return attention(q, k, v, causal=causal)
                if not causal:
                    return unpadded_entmax_attention(q, k, v, ~key_padding_mask, alpha=attention.alpha_for(q),
                                                     backend=attention.backend)
                return choose_on_device(key_padding_mask.any(), dense,
                                        lambda q, k, v: attention(q, k, v, causal=True), (q, k, v))
            return attend

        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            return dense(q, k, v)
        if attn_mask is None:
            if is_causal and num_queries != num_keys:
                return dense(q, k, v)
            return without_attn_mask(is_causal)(q, k, v)
        if attn_mask.dtype != torch.bool or attn_mask.dim() != 2:
            return dense(q, k, v)

        def empty_or_dense(q, k, v):
            return choose_on_device(attn_mask.any(), dense, without_attn_mask(False), (q, k, v))

        if num_queries != num_keys:
            return empty_or_dense(q, k, v)
        is_future = torch.eq(attn_mask, _future_mask(num_queries, num_keys, attn_mask.device)).all()
        return choose_on_device(is_future, without_attn_mask(True), empty_or_dense, (q, k, v))

    @staticmethod
    def _pad_masks(attn_mask, key_padding_mask):
        """Append one visible key column to the masks (for bias_k/bias_v or the zero attention key)."""
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
        return attn_mask, key_padding_mask

    def _check_masks(self, attn_mask, key_padding_mask, batch, num_queries, num_keys) -> None:
        caller = "MultiheadEntmaxAttention"
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, num_keys):
            checks.fail(ValueError, caller, "key_padding_mask", f"have shape ({batch}, {num_keys})",
                        f"shape {tuple(key_padding_mask.shape)}")
        if attn_mask is not None and tuple(attn_mask.shape) not in (
                (num_queries, num_keys), (batch * self.num_heads, num_queries, num_keys)):
            checks.fail(ValueError, caller, "attn_mask", f"have shape ({num_queries}, {num_keys}) or "
                        f"({batch * self.num_heads}, {num_queries}, {num_keys})", f"shape {tuple(attn_mask.shape)}")

    def _additive_mask(self, attn_mask, key_padding_mask, is_causal, batch, num_queries, num_keys, q):
        """All masks merged into one additive float mask broadcastable to (N, H, L, S), or None."""
        dtype = compute_dtype_for(q.dtype)
        bias = None
        if attn_mask is not None:
            bias = _as_additive(attn_mask, dtype)
            bias = bias.view(batch, self.num_heads, num_queries, num_keys) if bias.dim() == 3 else bias[None, None]
        elif is_causal:
            bias = _as_additive(_future_mask(num_queries, num_keys, q.device), dtype)[None, None]
        if key_padding_mask is not None:
            padding = _as_additive(key_padding_mask, dtype)[:, None, None, :]
            bias = padding if bias is None else bias + padding
        return bias
