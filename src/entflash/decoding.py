"""Decoding over a preallocated KV cache: entmax_attention_with_kvcache (FlashAttention's flash_attn_with_kvcache,
in SDPA's (B, H, N, D) layout).

The call validates its arguments (entflash.checks, message style "<caller>: `<argument>` must ..."), writes the
new keys and values into the cache in place, and runs entflash.entmax_attention's body over the valid prefix of
each sequence (seqlens=(None, lengths)), so the same torch / fused backends and the same masking semantics
(docs/ARCHITECTURE.md) apply. It uses the attention kernels as they are; a dedicated split-K decoding kernel
(one query row against a long cache, split over the cache) is not built yet.
"""
from __future__ import annotations

from typing import Optional

import torch

from entflash import api, checks

_CALLER = "entmax_attention_with_kvcache"


def _check_new(k_new, v_new, k_cache: torch.Tensor) -> int:
    """Validate the optional new keys/values (B, Hkv, Nnew, D) against the cache; return Nnew (0 when absent)."""
    if k_new is None and v_new is None:
        return 0
    if v_new is None:
        checks.fail(ValueError, _CALLER, "v_new", "be given together with `k_new`", "None")
    if k_new is None:
        checks.fail(ValueError, _CALLER, "k_new", "be given together with `v_new`", "None")
    checks.check_tensor(k_new, "k_new", _CALLER, 4, "(B, Hkv, Nnew, D)")
    checks.check_tensor(v_new, "v_new", _CALLER, 4, "(B, Hkv, Nnew, D)")
    batch, num_kv_heads, _, head_dim = k_cache.shape
    for name, new in (("k_new", k_new), ("v_new", v_new)):
        if new.dtype != k_cache.dtype:
            checks.fail(TypeError, _CALLER, name, f"have the dtype of the cache ({k_cache.dtype})", str(new.dtype))
        if new.device != k_cache.device:
            checks.fail(ValueError, _CALLER, name, f"be on the device of the cache ({k_cache.device})",
                        str(new.device))
    if (k_new.shape[0], k_new.shape[1], k_new.shape[3]) != (batch, num_kv_heads, head_dim):
        checks.fail(ValueError, _CALLER, "k_new", f"have shape ({batch}, {num_kv_heads}, Nnew, {head_dim}) "
                    "(the B, Hkv and D of `k_cache`)", f"shape {tuple(k_new.shape)}")
    if v_new.shape != k_new.shape:
        checks.fail(ValueError, _CALLER, "v_new", f"have the shape of `k_new` {tuple(k_new.shape)}",
                    f"shape {tuple(v_new.shape)}")
    return k_new.shape[2]


def _cache_lengths(cache_seqlens, batch: int, num_slots: int, num_new: int, device: torch.device) -> torch.Tensor:
    """The tokens already in the cache per sequence, as an int32 (B,) tensor on `device`, once checked.

    cache_seqlens: None (every slot filled), a python int (the same for every sequence) or a (B,) integer
    tensor, with values in [0, num_slots] (else ValueError naming `cache_seqlens`); appending num_new tokens must
    not pass the end of the cache (else ValueError naming `k_new`). A tensor's values are read once (a host sync)
    for both checks, which are skipped while torch.compile traces, like the checks of entflash.checks; None and an
    int are known on the host.
    """
    if cache_seqlens is None:
        longest = num_slots
        lengths = torch.full((batch,), num_slots, dtype=torch.int32, device=device)
    elif checks.is_integer(cache_seqlens):
        if not 0 <= cache_seqlens <= num_slots:
            checks.fail(ValueError, _CALLER, "cache_seqlens", f"lie in [0, {num_slots}] (Ncache of `k_cache`)",
                        repr(cache_seqlens))
        longest = int(cache_seqlens)
        lengths = torch.full((batch,), longest, dtype=torch.int32, device=device)
    elif not isinstance(cache_seqlens, torch.Tensor):
        checks.fail(TypeError, _CALLER, "cache_seqlens", f"be None, an int or an integer tensor of shape ({batch},)",
                    checks.describe(cache_seqlens))
    else:
        # type, shape and device there; the range here, from the same read as the room
        lengths = checks.check_lengths(cache_seqlens, "cache_seqlens", batch, num_slots, device, _CALLER,
                                       read_values=False)
        if batch == 0 or torch.compiler.is_compiling():
            return lengths
        low, longest = checks.length_range(lengths)
        checks.check_length_range(low, longest, "cache_seqlens", num_slots, _CALLER)
    if batch > 0 and longest + num_new > num_slots:
        checks.fail(ValueError, _CALLER, "k_new",
                    f"fit in the cache (cache_seqlens[b] + Nnew <= Ncache = {num_slots} for every b)",
                    f"Nnew = {num_new} with max(cache_seqlens) = {longest}")
    return lengths


def _new_slots(cache_lengths: torch.Tensor, num_new: int) -> torch.Tensor:
    """The cache slots of the new tokens, cache_lengths[b] + [0, Nnew), as an int64 (B, 1, Nnew, 1) index."""
    slots = cache_lengths.to(torch.int64)[:, None] + torch.arange(num_new, device=cache_lengths.device)
    return slots[:, None, :, None]


def _append(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
    """Write new (B, H, Nnew, D) into cache (B, H, Ncache, D) in place at the (B, 1, Nnew, 1) slots of _new_slots."""
    cache.scatter_(2, slots.expand(new.shape), new)


def entmax_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  cache_seqlens=None, *, k_new: Optional[torch.Tensor] = None,
                                  v_new: Optional[torch.Tensor] = None, alpha=1.5, causal: bool = True,
                                  scale: Optional[float] = None, window=None, return_aux: bool = False,
                                  backend: str = "auto"):
    """alpha-entmax attention of new queries against a preallocated KV cache (decoding, chunked prefill,
    speculative decoding); FlashAttention's flash_attn_with_kvcache in SDPA's layout.

    q: (B, Hq, Nq, D), the queries of the last Nq positions of each sequence (Nq = 1 for plain decoding).
    k_cache, v_cache: (B, Hkv, Ncache, D) preallocated caches, Hq % Hkv == 0 (query head h reads kv head
        h // (Hq // Hkv)); same floating dtype and device as q; any strides (a transposed (B, Ncache, Hkv, D)
        buffer works, and is written through).
    cache_seqlens: tokens already in the cache per sequence: None (the whole cache is valid), a python int (the
        same for every sequence) or an integer tensor (B,) on q's device, each in [0, Ncache].
    k_new, v_new: None, or both (B, Hkv, Nnew, D) in the cache's dtype and device. They are written into the
        caches in place at slots cache_seqlens[b] .. cache_seqlens[b] + Nnew - 1 (other slots are untouched;
        ValueError naming `k_new` if that passes Ncache), and attention runs over the updated lengths.
    alpha, scale, window, return_aux: as entflash.entmax_attention (alpha a float in (1, 2] or a (Hq,) tensor;
        scale defaults to 1 / sqrt(D); window (left, right) in key positions around each query's own position).
    causal: bottom-right aligned (default True). With L_b = cache_seqlens[b] + Nnew the valid length after the
        append, query i of sequence b sits at position L_b - Nq + i and sees keys j < L_b with
        j <= L_b - Nq + i; non-causal queries see every key j < L_b (window still applies). A query whose
        position is negative (L_b < Nq) sees no key and gives zeros.
    backend: "auto", "torch" or "triton", as entflash.entmax_attention.

    cache_seqlens is not advanced: add Nnew to it before the next call. Gradients flow to q, alpha, k_new and
    v_new within one call; the cache then carries the graph of that append, so generate under torch.no_grad().

    Slots at or beyond L_b are never read, so the cache may be allocated with torch.empty: whatever they hold
    (NaN and inf included) does not reach the output (tests/test_padding_contents.py).

    This runs entflash.entmax_attention's body (api.attend) with seqlens=(None, L) over the cache, so it uses the
    attention kernels (the fused ones stop at each sequence's L_b; the torch backend scores all Ncache slots and
    masks them); a dedicated split-K decoding kernel is not built yet, so a decoding query's work is not split over
    the cache.

    Returns out (B, Hq, Nq, D) in q's dtype; with return_aux also the dict of entmax_attention: "tau"
    (B, Hq, Nq) float32 in (alpha-1) * score units, "support" (B, Hq, Nq) int32, and on the fused path the
    64 x 64 "tile_map" (B, Hq, ceil(Nq/64), ceil(Ncache/64)). Every argument is validated before the cache is
    written, so a call that raises leaves the cache as it was.
    """
    checks.check_qkv(q, k_cache, v_cache, _CALLER, names=("q", "k_cache", "v_cache"))
    num_new = _check_new(k_new, v_new, k_cache)
    batch, num_slots = q.shape[0], k_cache.shape[2]
    alpha, causal, scale, window, return_aux, backend = api.normalize_options(
        q, alpha, causal, scale, window, return_aux, backend, _CALLER)
    cache_lengths = _cache_lengths(cache_seqlens, batch, num_slots, num_new, q.device)
    if num_new > 0:
        slots = _new_slots(cache_lengths, num_new)  # one index for both caches
        _append(k_cache, k_new, slots)
        _append(v_cache, v_new, slots)
    # the options and lengths are checked above (lengths in [0, Ncache] after _cache_lengths): attend does not read a
    # tensor alpha or the lengths again, each a host sync per call on a GPU
    lengths = cache_lengths + num_new
    return api.attend(q, k_cache, v_cache, alpha=alpha, causal=causal, scale=scale, window=window,
                      seqlens=(None, lengths), return_aux=return_aux, backend=backend, check_alpha=False,
                      read_lengths=False, caller=_CALLER)
