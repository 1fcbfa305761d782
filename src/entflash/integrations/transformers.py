"""HuggingFace transformers integration: `attn_implementation="entmax"`.

    from entflash.integrations.transformers import register
    register("entmax", alpha=1.5)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="entmax")

`register` adds two functions under one name: the attention function (transformers' `AttentionInterface`) and
its mask function (`AttentionMaskInterface`, transformers >= 4.53). The mask function hands the attention
function a compact description instead of a dense (B, 1, Nq, Nk) mask:

* None: no padding; the pattern comes from the layer (`module.is_causal` / the `is_causal` kwarg, and the
  `sliding_window` kwarg / `module.sliding_window`);
* a bool tensor (B, Nk'): which keys hold real tokens (Nk' <= Nk: key slots after Nk' are never visible, e.g. the
  unused tail of a static cache); for causal layers the queries are the last Nq of those Nk' positions;
* a bool tensor (B, 2, Nk), only while torch.compile traces a causal layer whose query offset is a tensor (a static
  cache): [:, 0] which key slots hold real tokens (slots after the last query's are False), [:, 1] which slots the
  queries occupy; a fixed shape, computed on the device (the eager form above cuts the keys at the offset's value);
* an int64 tensor (B, N): segment ids of packed sequences (transformers detected packing from position_ids);
* a 4-D tensor (bool, True = visible, or float additive): any other pattern (custom and/or mask functions,
  chunked or block attention, older transformers versions) -> the exact dense path, with a one-time warning.

Semantics follow transformers' masks: causal = key position <= query position; a sliding window of size w on a
causal layer keeps keys with query - w < key (entmax window (w - 1, 0)), on a bidirectional layer
|query - key| <= w (window (w, w)). Right padding becomes `seqlens`; any other padding is removed (tokens packed
into `entmax_attention_varlen`, exact because tokens keep their order); padded query rows return zeros.
Packed batches (`cu_seq_lens_q` / `cu_seq_lens_k` kwargs, or segment ids) run `entmax_attention_varlen`.
Attention dropout > 0 (training) runs the exact dense path, since dropout acts on the probabilities.

Under torch.compile (fullgraph=True) nothing here reads tensor values on the host: a padding mask of any pattern
runs `entflash.nn.unpadded_entmax_attention` (no right-padding / contiguity inspection), a sliding window with
padding asks torch.cond on the device whether the real tokens are contiguous (else the exact dense path, as in
eager), and warnings are not issued. Mask functions other than the plain causal / bidirectional ones (sliding
window, packed sequences, chunked, custom) are closures built inside the traced model that torch.compile cannot
inspect, so they are materialized by transformers' `sdpa_mask` and run the exact dense path (real tokens give the
eager results; padded query positions get what transformers' dense mask gives them instead of zeros). A static
cache's tensor query offset gives the (B, 2, Nk) form above, which runs the same padding path with the queries at
their slots; a tensor kv_offset raises a ValueError naming it. Packed batches given as `cu_seq_lens_q/k` run the
dense path (packing reads the lengths on the host); their equality is not checked.

`add_learnable_alpha(model, ...)` gives each attention layer per-head learnable alpha (and optionally ASEntmax)
parameters, stored as `layer.entflash` (an `entflash.nn.EntmaxAttention`) and read by the attention function.
ASEntmax positions are the `position_ids` the model passes to its attention layers (Llama-style models do), else
the query's index counted from the end of the keys (Nk - Nq + row), right for unpadded and right-padded inputs.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from entflash import checks
from entflash.api import attend, entmax_attention, entmax_attention_varlen
from entflash.nn import EntmaxAttention, choose_on_device, dense_entmax_attention, unpadded_entmax_attention
from entflash.reference.attention import visibility_mask, within_reach

# Attribute under which add_learnable_alpha stores the per-layer parameters.
PARAMETERS_ATTRIBUTE = "entflash"
# Attribute under which the per-token ASEntmax hook keeps the layer's input hidden states for one call.
_HIDDEN_ATTRIBUTE = "_entflash_hidden_states"
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    """Warn once per key; not while torch.compile traces (warnings.warn breaks the graph)."""
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(f"entflash transformers integration: {message}", stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# Mask function
# ---------------------------------------------------------------------------------------------------------------

def _closure_values(function: Callable) -> Dict[str, object]:
    try:
        return dict(inspect.getclosurevars(function).nonlocals)
    except (TypeError, ValueError):
        return {}


def _local_name(function: Callable) -> str:
    """'outer.<locals>.inner' -> 'outer'; a module-level function's own name otherwise."""
    qualname = getattr(function, "__qualname__", "")
    return qualname.split(".<locals>.")[0] if ".<locals>." in qualname else qualname


def classify_mask_function(mask_function: Callable):
    """Recognize transformers' standard mask functions.

    Returns ("causal" | "bidirectional", packed_sequence_mask or None) for the causal, bidirectional and
    sliding-window patterns (the window itself is read from the layer) and their packed-sequence wrappers;
    None for anything else (custom or/and masks, chunked or block attention), which then needs a dense mask.

    While torch.compile traces, only the plain causal and bidirectional functions are recognized: the others are
    closures built inside the traced model, whose contents torch.compile cannot read, so they get the dense mask.
    """
    from transformers import masking_utils

    if mask_function is masking_utils.causal_mask_function:
        return "causal", None
    if mask_function is masking_utils.bidirectional_mask_function:
        return "bidirectional", None
    if torch.compiler.is_compiling() or _local_name(mask_function) != "and_masks":
        return None
    parts = _closure_values(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    names = [_local_name(part) for part in parts]
    if names == ["sliding_window_overlay", "causal_mask_function"]:
        return "causal", None
    if names == ["sliding_window_bidirectional_overlay", "bidirectional_mask_function"]:
        return "bidirectional", None
    if "packed_sequence_mask_function" not in names:
        return None
    # packed sequences: and_masks(pattern, packed) up to transformers 5.22; from 5.23 the pattern is wrapped in
    # remap_positions_for_packed_sequence (it then sees positions, the same within one segment), either order
    packed = names.index("packed_sequence_mask_function")
    segments = _closure_values(parts[packed]).get("packed_sequence_mask")
    inner = parts[1 - packed]
    if names[1 - packed] == "remap_positions_for_packed_sequence":
        inner = _closure_values(inner).get("mask_function")
    inner_kind = classify_mask_function(inner) if callable(inner) else None
    if isinstance(segments, torch.Tensor) and inner_kind is not None and inner_kind[1] is None:
        return inner_kind[0], segments
    return None


def _as_int(value, argument: str) -> int:
    if not isinstance(value, torch.Tensor):
        return int(value)
    if torch.compiler.is_compiling():  # .item() is a host read, which a traced graph cannot hold
        checks.fail(ValueError, "entmax_mask", argument,
                    "be a python int under torch.compile (its value sets the mask's shape; only a causal layer's "
                    "q_offset, as a static cache gives it, may be a tensor)", checks.describe(value))
    return int(value.item())


def _static_cache_mask(batch_size: int, q_length: int, kv_length: int, q_offset: torch.Tensor, kv_offset: int,
                       attention_mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """The causal mask description for a tensor q_offset while torch.compile traces (a static cache): bool
    (B, 2, kv_length), a shape that does not depend on the offset's value. [:, 0]: which key slots hold real tokens
    (slot j is kv_offset + j; slots from q_offset + q_length on are unused cache, never visible); [:, 1]: which
    slots the queries occupy (q_offset .. q_offset + q_length - 1). Computed on the device."""
    q_offset = q_offset.to(device).reshape(())
    slots = torch.arange(kv_offset, kv_offset + kv_length, device=device)
    end = q_offset + q_length
    written = slots < end
    queries = (slots >= q_offset) & written
    keys = written[None].expand(batch_size, kv_length)
    if attention_mask is not None:
        # Pads by the full length whatever the mask's (generate() grows it each step): no guard on its length.
        padding = torch.nn.functional.pad(attention_mask.to(device=device, dtype=torch.bool), (0, kv_length))
        keys = keys & padding[:, kv_offset:kv_offset + kv_length]
    return torch.stack([keys, queries[None].expand(batch_size, kv_length)], dim=1)


def entmax_mask(batch_size: int, q_length: Optional[int] = None, kv_length: int = 0, q_offset=0, kv_offset=0,
                mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
                cache_position: Optional[torch.Tensor] = None, **kwargs) -> Optional[torch.Tensor]:
    """Mask function for `AttentionMaskInterface` (same keyword arguments as transformers' `sdpa_mask`).

    batch_size, q_length, kv_length: sizes of the attention call; q_offset / kv_offset: absolute position of the
    first query / key slot (older transformers pass `cache_position` instead of q_length / q_offset).
    attention_mask: the 2-D (B, >= kv_offset + kv_length) padding mask (True / 1 = real token) or None.
    Returns the compact description documented in the module docstring.
    """
    from transformers import masking_utils

    if cache_position is not None and q_length is None:
        q_length, q_offset = int(cache_position.shape[0]), cache_position[0]
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    kind = classify_mask_function(mask_function)
    if kind is None:
        _warn_once("dense-mask", "this model builds a custom attention mask (not causal / sliding window / padding "
                   "/ packing); the exact dense path is used (O(N^2) memory)")  # (no warning while compiling)
        dense_kwargs = {key: kwargs[key] for key in ("use_vmap", "device") if key in kwargs}
        return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                       q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                       attention_mask=attention_mask, allow_is_causal_skip=False,
                                       allow_is_bidirectional_skip=False, **dense_kwargs)
    pattern, segments = kind
    if segments is not None:
        return segments.to(torch.int64)
    kv_offset = _as_int(kv_offset, "kv_offset")
    # Causal: key slots after the last query are never visible (e.g. a static cache's unused tail).
    visible_length = kv_length
    if pattern == "causal":
        if isinstance(q_offset, torch.Tensor) and torch.compiler.is_compiling():
            # A static cache's offset: cutting the keys to the visible length would read it on the host.
            device = attention_mask.device if attention_mask is not None else kwargs.get("device", q_offset.device)
            return _static_cache_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, device)
        q_offset = _as_int(q_offset, "q_offset")
        visible_length = max(0, min(kv_length, q_offset + q_length - kv_offset))
    if attention_mask is None:
        if visible_length == kv_length:
            return None
        device = kwargs.get("device", "cpu")
        return torch.ones(batch_size, visible_length, dtype=torch.bool, device=device)
    padding = attention_mask.to(torch.bool)
    if padding.shape[-1] < kv_offset + kv_length:
        padding = torch.nn.functional.pad(padding, (0, kv_offset + kv_length - padding.shape[-1]))
    keys = padding[:, kv_offset:kv_offset + visible_length]
    # Eager calls drop a mask without padding (the fastest path); under torch.compile that would be a host read,
    # and the attention function handles any padding pattern without one.
    if visible_length == kv_length and not torch.compiler.is_compiling() and bool(keys.all()):
        return None
    return keys


# ---------------------------------------------------------------------------------------------------------------
# Attention function
# ---------------------------------------------------------------------------------------------------------------

def _layer_window(causal: bool, sliding_window) -> Optional[Tuple[int, int]]:
    """transformers' sliding_window w -> entmax window (left, right)."""
    if sliding_window is None:
        return None
    if not checks.is_integer(sliding_window) or sliding_window < 1:
        checks.fail(ValueError, "entmax attention", "sliding_window", "be an int >= 1 or None", repr(sliding_window))
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _is_prefix(valid: torch.Tensor) -> bool:
    """True when every row of the bool (B, N) tensor is True on a prefix and False after it."""
    lengths = valid.sum(dim=1, keepdim=True)
    return bool(torch.equal(torch.arange(valid.shape[1], device=valid.device)[None] < lengths, valid))


def _is_contiguous_on_device(valid: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: whether the True entries of every row of the bool (B, N) tensor form one run (or none)."""
    starts = valid & ~torch.nn.functional.pad(valid, (1, 0))[:, :-1]
    return (starts.sum(dim=1) <= 1).all()


def _is_contiguous(valid: torch.Tensor) -> bool:
    """True when the True entries of every row of the bool (B, N) tensor form one run (or none)."""
    return bool(_is_contiguous_on_device(valid))


def _dense_keep(num_queries: int, num_keys: int, causal: bool, window, device, key_valid=None, segments=None):
    """Dense visibility (B or 1, 1, Nq, Nk) for self-attention whose queries are the last Nq of the Nk keys: the
    causal / window rule of the reference (bottom-right aligned), then the key padding and the packed segments."""
    keep = visibility_mask(0, num_queries, num_queries, num_keys, causal, window, None, None, device)
    if key_valid is not None:
        keep = keep & key_valid[:, None, :]
    if segments is not None:
        keep = keep & (segments[:, num_keys - num_queries:, None] == segments[:, None, :])
    return keep[:, None]


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def _segments_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


class _Call:
    """One attention call: (B, H, N, D) tensors and the options every path shares. check_alpha: whether the fused
    paths read a tensor alpha's values to check them (False for a layer's HeadAlpha, in range by construction)."""

    def __init__(self, query, key, value, alpha, scale, backend, check_alpha=True):
        self.query, self.key, self.value = query, key, value
        self.alpha, self.scale, self.backend, self.check_alpha = alpha, scale, backend, check_alpha

    def padded(self, causal, window, seqlens=None) -> torch.Tensor:
        """seqlens: None, or lengths counted from the attention mask (in range by construction: not read back)."""
        return attend(self.query, self.key, self.value, alpha=self.alpha, causal=causal, scale=self.scale,
                      window=window, seqlens=seqlens, return_aux=False, backend=self.backend,
                      check_alpha=self.check_alpha, read_lengths=False, caller="entmax attention")

    def dense(self, keep=None, bias=None, dropout_p=0.0) -> torch.Tensor:
        out, _ = dense_entmax_attention(self.query, self.key, self.value, alpha=self.alpha, scale=self.scale,
                                        keep=keep, bias=bias, dropout_p=dropout_p)
        return out

    def unpadded(self, query_valid: torch.Tensor, key_valid: torch.Tensor, causal, window) -> torch.Tensor:
        """Gather real tokens (bool (B, Nq) / (B, Nk)) into varlen form, attend, scatter back (zeros elsewhere)."""
        tokens_q = self.query.transpose(1, 2)[query_valid]
        tokens_k = self.key.transpose(1, 2)[key_valid]
        tokens_v = self.value.transpose(1, 2)[key_valid]
        lengths_q, lengths_k = query_valid.sum(dim=1), key_valid.sum(dim=1)
        tokens_out = entmax_attention_varlen(
            tokens_q, tokens_k, tokens_v, _cu_seqlens(lengths_q), _cu_seqlens(lengths_k),
            max(int(lengths_q.max()), 1), max(int(lengths_k.max()), 1), alpha=self.alpha, causal=causal,
            scale=self.scale, window=window, backend=self.backend, check_alpha=self.check_alpha)
        out = tokens_out.new_zeros(self.query.shape[0], self.query.shape[2], *tokens_out.shape[1:])
        out[query_valid] = tokens_out
        return out.transpose(1, 2)

    def packed(self, segments: torch.Tensor, causal, window) -> torch.Tensor:
        """Self-attention within runs of equal segment ids (int (B, N)); runs never cross batch rows."""
        batch, num_tokens = segments.shape
        row_major = segments.to(torch.int64) + torch.arange(batch, device=segments.device)[:, None] * (
            int(segments.max()) + 1 if segments.numel() else 1)
        _, lengths = torch.unique_consecutive(row_major.reshape(-1), return_counts=True)
        cu_seqlens = _cu_seqlens(lengths)
        max_length = int(lengths.max())
        flat = [t.transpose(1, 2).reshape(batch * num_tokens, t.shape[1], t.shape[3])
                for t in (self.query, self.key, self.value)]
        out = entmax_attention_varlen(*flat, cu_seqlens, cu_seqlens, max_length, max_length, alpha=self.alpha,
                                      causal=causal, scale=self.scale, window=window, backend=self.backend,
                                      check_alpha=self.check_alpha)
        return out.view(batch, num_tokens, *out.shape[1:]).transpose(1, 2)


def _layer_parameters(module: nn.Module, num_heads: int) -> Optional[EntmaxAttention]:
    parameters = getattr(module, PARAMETERS_ATTRIBUTE, None)
    if parameters is None:
        return None
    if parameters.num_heads != num_heads:
        checks.fail(ValueError, "entmax attention", f"{type(module).__name__}.{PARAMETERS_ATTRIBUTE}",
                    f"hold {num_heads} heads (the query's)", f"{parameters.num_heads}")
    return parameters


def _asentmax_positions(kwargs, num_queries: int, num_keys: int, device, attention_mask=None) -> torch.Tensor:
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == num_queries:
        return position_ids.reshape(-1, num_queries).to(device)
    if _is_static_cache_mask(attention_mask):  # the query slots, found on the device
        return _static_query_slots(attention_mask.to(device), num_queries)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.dtype == torch.bool:
        num_keys = attention_mask.shape[1]  # keys after these are unused cache slots
    return torch.arange(num_keys - num_queries, num_keys, device=device)[None]


def _is_static_cache_mask(attention_mask) -> bool:
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 3


def _static_query_slots(mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """int64 (B, Nq): the key slot of each query, from the static-cache description (bool (B, 2, Nk))."""
    first = mask[:, 1].to(torch.int64).argmax(dim=1)  # the first query slot (argmax returns the first maximum)
    return first[:, None] + torch.arange(num_queries, device=mask.device)


def make_attention_function(alpha=1.5, backend: str = "auto") -> Callable:
    """The function registered with transformers' AttentionInterface.

    alpha: default alpha (float in (1, 2] or an (H,) tensor) for layers without `add_learnable_alpha` parameters.
    backend: entmax_attention backend ("auto", "torch", "triton").

    The returned function has transformers' attention-function signature:
    (module, query (B, H, Nq, D), key, value (B, Hkv, Nk, D), attention_mask, dropout=0.0, scaling=None,
    sliding_window=None, is_causal=None, **kwargs) -> (output (B, Nq, H, D), None).
    """
    caller = "entmax attention"
    default_alpha = checks.check_alpha(alpha, 1, torch.device("cpu"), "register") if not isinstance(
        alpha, torch.Tensor) else alpha
    backend = checks.check_backend(backend, "register")

    def entmax_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                 scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                                 is_causal: Optional[bool] = None, **kwargs):
        for name in _UNSUPPORTED_KWARGS:
            if kwargs.get(name) is not None:
                checks.fail(ValueError, caller, name, "be None (alpha-entmax attention has no such option)",
                            repr(type(kwargs[name]).__name__))
        if kwargs.get("output_attentions"):
            _warn_once("weights", "output_attentions is not supported; attention weights are returned as None")
        num_queries, num_keys = query.shape[2], key.shape[2]
        parameters = _layer_parameters(module, query.shape[1])
        if parameters is not None:
            layer_alpha = parameters.alpha_for(query)
            if parameters.asentmax is not None:
                positions = _asentmax_positions(kwargs, num_queries, num_keys, query.device, attention_mask)
                query = parameters.scale_queries(query, positions, getattr(module, _HIDDEN_ATTRIBUTE, None))
        else:
            layer_alpha = default_alpha
            if isinstance(layer_alpha, torch.Tensor):
                layer_alpha = layer_alpha.to(query.device)
        causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))
        if sliding_window is None:
            sliding_window = getattr(module, "sliding_window", None)
        window = _layer_window(causal, sliding_window)
        # a layer's own alpha comes from its HeadAlpha, in range by construction: not read back (a host sync)
        call = _Call(query, key, value, layer_alpha, scaling, backend, check_alpha=parameters is None)
        dropout_p = float(dropout) if module.training else 0.0
        out = _dispatch(call, attention_mask, causal, window, dropout_p, kwargs)
        return out.transpose(1, 2).contiguous(), None

    entmax_attention_forward.default_alpha = default_alpha
    return entmax_attention_forward


def _dispatch(call: _Call, attention_mask, causal: bool, window, dropout_p: float, kwargs) -> torch.Tensor:
    """Pick the path for one call; returns (B, H, Nq, D)."""
    query = call.query
    batch, num_queries, num_keys = query.shape[0], query.shape[2], call.key.shape[2]
    cu_seq_lens_q, cu_seq_lens_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if (cu_seq_lens_k is not None and cu_seq_lens_q is not None and not torch.compiler.is_compiling()
                and not torch.equal(cu_seq_lens_q, cu_seq_lens_k)):
            checks.fail(ValueError, "entmax attention", "cu_seq_lens_k", "equal cu_seq_lens_q (packed self-attention)",
                        "different offsets")
        if num_queries != num_keys:
            checks.fail(ValueError, "entmax attention", "cu_seq_lens_q", "come with Nq == Nk (no KV cache)",
                        f"Nq={num_queries}, Nk={num_keys}")
        cu_seqlens = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k
        attention_mask = _segments_from_cu_seqlens(cu_seqlens.to(query.device), batch * num_queries).view(
            batch, num_queries)
    if dropout_p > 0:
        _warn_once("dropout", "attention dropout > 0 acts on the probabilities, so training runs the exact dense "
                   "path (O(N^2) memory); set the model's attention dropout to 0 for the fused path")

    if attention_mask is None:
        if dropout_p > 0:
            keep = _dense_keep(num_queries, num_keys, causal, window, query.device)
            return call.dense(keep=keep, dropout_p=dropout_p)
        return call.padded(causal, window)

    if attention_mask.dim() == 4:
        _warn_once("dense-4d", "received a dense 4-D attention mask; using the exact dense path (O(N^2) memory)")
        mask = attention_mask[:, :, :, :num_keys]
        if mask.dtype == torch.bool:
            return call.dense(keep=mask, dropout_p=dropout_p)
        return call.dense(bias=mask, dropout_p=dropout_p)

    if _is_static_cache_mask(attention_mask):
        return _dispatch_static_cache(call, attention_mask, causal, window, dropout_p)

    if attention_mask.dim() != 2:
        checks.fail(ValueError, "entmax attention", "attention_mask", "be None, 2-D, 3-D or 4-D",
                    f"shape {tuple(attention_mask.shape)}")

    if not attention_mask.dtype == torch.bool:  # packed segment ids
        if tuple(attention_mask.shape) != (batch, num_queries) or num_queries != num_keys:
            checks.fail(ValueError, "entmax attention", "attention_mask",
                        f"hold segment ids of shape ({batch}, {num_queries}) with Nq == Nk",
                        f"shape {tuple(attention_mask.shape)}, Nk={num_keys}")
        segments = attention_mask.to(query.device)
        if dropout_p > 0 or torch.compiler.is_compiling():  # packing reads the segment lengths on the host
            keep = _dense_keep(num_queries, num_keys, causal, window, query.device, segments=segments)
            return call.dense(keep=keep, dropout_p=dropout_p)
        return call.packed(segments, causal, window)

    key_valid = attention_mask.to(query.device)
    visible_keys = key_valid.shape[1]
    if visible_keys > num_keys or (causal and visible_keys < num_queries):
        checks.fail(ValueError, "entmax attention", "attention_mask",
                    f"have between {num_queries if causal else 1} and {num_keys} key columns",
                    f"shape {tuple(key_valid.shape)}")
    if visible_keys < num_keys:
        call.key, call.value = call.key[:, :, :visible_keys], call.value[:, :, :visible_keys]
        num_keys = visible_keys
    if torch.compiler.is_compiling():
        return _dispatch_padding_traced(call, key_valid, causal, window, dropout_p)
    query_valid = key_valid[:, num_keys - num_queries:] if causal else torch.ones(
        batch, num_queries, dtype=torch.bool, device=query.device)
    # Query positions are only defined relative to the keys for causal layers; bidirectional windows need Nq == Nk.
    if dropout_p > 0 or (window is not None and not _is_contiguous(key_valid)) or (
            not causal and window is not None and (num_queries != num_keys or not bool(key_valid.all()))):
        if not causal and num_queries != num_keys and window is not None:
            checks.fail(ValueError, "entmax attention", "sliding_window", "be None for cross-attention", repr(window))
        keep = _dense_keep(num_queries, num_keys, causal, window, query.device, key_valid=key_valid)
        keep = keep & query_valid[:, None, :, None]
        return call.dense(keep=keep, dropout_p=dropout_p)
    if bool(key_valid.all()):
        return call.padded(causal, window)
    if _is_prefix(key_valid) and _is_prefix(query_valid):
        lengths_q = query_valid.sum(dim=1).to(torch.int32) if causal else None
        return call.padded(causal, window, seqlens=(lengths_q, key_valid.sum(dim=1).to(torch.int32)))
    return call.unpadded(query_valid, key_valid, causal, window)


def _dispatch_static_cache(call: _Call, mask: torch.Tensor, causal: bool, window, dropout_p: float
                           ) -> torch.Tensor:
    """The static-cache description (bool (B, 2, Nk), from entmax_mask while torch.compile traces): key slot j is
    visible to the query in slot s iff j holds a real token and j <= s (and lies in the window around s).

    The real keys are the real tokens in slots before the last query's, so the real queries are the last real keys
    of their row: after unpadded_entmax_attention moves the real tokens to the front (keeping their order), the r-th
    of Lq real queries is the (Lk - Lq + r)-th real key, and its bottom-right causal rule (rank j <= r + Lk - Lq)
    is "real key slot <= query slot", for any padding pattern. Padded query rows give zeros, as in eager.
    """
    batch, num_queries, num_keys = call.query.shape[0], call.query.shape[2], call.key.shape[2]
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, 2, num_keys):
        checks.fail(ValueError, "entmax attention", "attention_mask",
                    f"be a bool tensor of shape ({batch}, 2, {num_keys}) when 3-D (entmax_mask's static-cache form)",
                    f"{mask.dtype}, shape {tuple(mask.shape)}")
    if not causal:
        checks.fail(ValueError, "entmax attention", "attention_mask",
                    "be 3-D (entmax_mask's static-cache form) only for causal layers", "a non-causal layer")
    mask = mask.to(call.query.device)
    key_valid = mask[:, 0]
    slots = _static_query_slots(mask, num_queries)
    query_valid = key_valid.gather(1, slots.clamp(max=num_keys - 1)) & (slots < num_keys)
    return _dispatch_padding_traced(call, key_valid, causal, window, dropout_p, static=(query_valid, slots))


def _dense_keep_at(slots: torch.Tensor, num_keys: int, causal: bool, window, key_valid: torch.Tensor,
                   query_valid: torch.Tensor) -> torch.Tensor:
    """Dense visibility (B, 1, Nq, Nk) for queries at the given key slots (int (B, Nq)): key j is visible iff it is
    real, (causal) j <= slot, and (window (l, r)) slot - l <= j <= slot + r; padded query rows see nothing."""
    keys = torch.arange(num_keys, device=slots.device)[None, None, :]
    keep = within_reach(keys, slots[:, :, None], causal, window, key_valid[:, None, :] & query_valid[:, :, None])
    return keep[:, None]


def _dispatch_padding_traced(call: _Call, key_valid: torch.Tensor, causal: bool, window, dropout_p: float,
                             static=None) -> torch.Tensor:
    """_dispatch's padding-mask paths while torch.compile traces: the same results, no host reads of the mask.

    key_valid: bool (B, Nk), call's keys already cut to Nk. Eager code inspects the mask (no padding, right
    padding, contiguous runs) to pick among entmax_attention, seqlens and varlen packing; here
    unpadded_entmax_attention handles every pattern at once. The eager conditions that still need the mask's
    values (a sliding window is only exact on contiguous real tokens) are decided on the device by torch.cond,
    whose other branch is the exact dense path, as in eager. Dropout runs the dense path.
    static: None, or (query_valid bool (B, Nq), query slots int (B, Nq)) for a causal layer's static-cache form,
    whose queries are not the last Nq key slots.
    """
    query = call.query
    num_queries, num_keys = query.shape[2], call.key.shape[2]

    def query_valid():  # a view of key_valid, so formed inside each torch.cond branch (no aliased captures)
        if static is not None:
            return static[0]
        return key_valid[:, num_keys - num_queries:] if causal else None

    def dense(q, k, v):
        if static is not None:
            keep = _dense_keep_at(static[1], num_keys, causal, window, key_valid, static[0])
        else:
            keep = _dense_keep(num_queries, num_keys, causal, window, query.device, key_valid=key_valid)
            if causal:
                keep = keep & query_valid()[:, None, :, None]
        return _Call(q, k, v, call.alpha, call.scale, call.backend).dense(keep=keep, dropout_p=dropout_p)

    def unpadded(q, k, v):
        return unpadded_entmax_attention(q, k, v, key_valid, query_valid(), alpha=call.alpha, causal=causal,
                                         scale=call.scale, window=window, backend=call.backend,
                                         check_alpha=call.check_alpha)

    tensors = (query, call.key, call.value)
    if dropout_p > 0:
        return dense(*tensors)
    if window is None:
        return unpadded(*tensors)
    if causal:
        return choose_on_device(_is_contiguous_on_device(key_valid), unpadded, dense, tensors)
    if num_queries != num_keys:
        checks.fail(ValueError, "entmax attention", "sliding_window", "be None for cross-attention", repr(window))
    return choose_on_device(key_valid.all(), lambda q, k, v: entmax_attention(
        q, k, v, alpha=call.alpha, causal=False, scale=call.scale, window=window, backend=call.backend,
        check_alpha=call.check_alpha), dense, tensors)


# ---------------------------------------------------------------------------------------------------------------
# Registration and learnable parameters
# ---------------------------------------------------------------------------------------------------------------

def register(name: str = "entmax", alpha=1.5, backend: str = "auto") -> str:
    """Register alpha-entmax attention with transformers under `name`; returns `name`.

    name: the `attn_implementation` string to use (from_pretrained / from_config / set_attn_implementation).
    alpha: default alpha for every layer, a float in (1, 2] or an (H,) tensor (layers with parameters from
        `add_learnable_alpha` use their own).
    backend: "auto" (fused kernels on CUDA, exact torch path elsewhere), "torch" or "triton".

    Registers the attention function with `AttentionInterface` and, where transformers has it (>= 4.53),
    `entmax_mask` with `AttentionMaskInterface` under the same name.
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or name.startswith("flash_attention"):
        checks.fail(ValueError, "register", "name", "be a new non-empty attention implementation name", repr(name))
    attention_function = make_attention_function(alpha, backend)
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.50 keeps a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        ALL_ATTENTION_FUNCTIONS[name] = attention_function
    else:
        AttentionInterface.register(name, attention_function)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds dense 4-D masks itself: the dense path handles them
        return name
    AttentionMaskInterface.register(name, entmax_mask)
    return name


def _head_count(module: nn.Module, model: nn.Module) -> Optional[int]:
    for attribute in ("num_heads", "num_attention_heads", "n_head"):
        value = getattr(module, attribute, None)
        if checks.is_integer(value):
            return int(value)
    for config in (getattr(module, "config", None), getattr(model, "config", None)):
        if config is None:
            continue
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text_config, "num_attention_heads", None)
        if checks.is_integer(value):
            return int(value)
    return None


def attention_layers(model: nn.Module) -> List[nn.Module]:
    """The attention layers of a transformers model: modules with an `is_causal` attribute that dispatch to the
    attention interface (the innermost such modules; wrappers holding one are skipped)."""
    candidates = [module for module in model.modules()
                  if hasattr(module, "is_causal") and any(isinstance(child, nn.Module) for child in module.children())
                  and not isinstance(module, EntmaxAttention)]
    innermost = []
    for module in candidates:
        if not any(other is not module and other in set(module.modules()) for other in candidates):
            innermost.append(module)
    return innermost


def _remember_hidden_states(module: nn.Module, args, kwargs) -> None:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    setattr(module, _HIDDEN_ATTRIBUTE, hidden if isinstance(hidden, torch.Tensor) else None)


def _forget_hidden_states(module: nn.Module, args, kwargs, output) -> None:
    setattr(module, _HIDDEN_ATTRIBUTE, None)


def add_learnable_alpha(model: nn.Module, init_alpha: Union[float, List[float]] = 1.5,
                        asentmax: Union[bool, str] = False, asentmax_init: Tuple[float, float] = (0.1, 1.0)
                        ) -> List[nn.Module]:
    """Give every attention layer of `model` per-head learnable alpha (and optionally ASEntmax) parameters.

    init_alpha: initial alpha in (1, 2), a float or one float per head.
    asentmax: False; True or "head" (beta, gamma learnable per head); "token" (predicted per token from the
        layer's input hidden state; a forward pre-hook keeps it for the attention function).
    asentmax_init: initial (beta, gamma).

    The parameters live in `layer.entflash` (an entflash.nn.EntmaxAttention, on the layer's device and in
    float32), so they are part of model.parameters() and the state_dict. They take effect when the model runs with
    an attention implementation registered by `register`. Returns the modified layers.
    """
    caller = "add_learnable_alpha"
    if not isinstance(model, nn.Module):
        checks.fail(TypeError, caller, "model", "be a torch.nn.Module", checks.describe(model))
    mode = {False: None, None: None, True: "head", "head": "head", "token": "token"}.get(asentmax, "invalid")
    if mode == "invalid":
        checks.fail(ValueError, caller, "asentmax", "be False, True, 'head' or 'token'", repr(asentmax))
    layers = attention_layers(model)
    if not layers:
        checks.fail(ValueError, caller, "model", "contain attention layers (modules with `is_causal`)",
                    type(model).__name__)
    hidden_size = None
    if mode == "token":
        config = model.config.get_text_config() if hasattr(model, "config") else None
        hidden_size = getattr(config, "hidden_size", None)
    for layer in layers:
        num_heads = _head_count(layer, model)
        if num_heads is None:
            checks.fail(ValueError, caller, "model", "expose its number of attention heads", type(layer).__name__)
        reference = next(layer.parameters())
        parameters = EntmaxAttention(num_heads, init_alpha, learn_alpha=True, asentmax=mode,
                                     hidden_size=hidden_size, asentmax_init=asentmax_init)
        setattr(layer, PARAMETERS_ATTRIBUTE, parameters.to(reference.device))
        if mode == "token":
            layer.register_forward_pre_hook(_remember_hidden_states, with_kwargs=True)
            layer.register_forward_hook(_forget_hidden_states, with_kwargs=True)
    return layers
