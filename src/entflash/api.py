"""Public attention entry points: validate (entflash.checks), normalize, dispatch to one backend.

Backends share the signature of docs/ARCHITECTURE.md:
  "torch"  -> entflash.reference.attention.torch_attention (exact, chunked, any device)
  "triton" -> entflash.autograd.triton_attention (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1)
  "auto"   -> "triton" when q is on CUDA and entflash.autograd imports, else "torch".
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional

import torch

from entflash import checks
from entflash.reference.attention import torch_attention

_FUSED_MODULE = "entflash.autograd"
_INTERPRETER_ON = ("1", "true", "yes", "on")


def _triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _INTERPRETER_ON


@torch.compiler.assume_constant_result
def _fused_module_import_error() -> str:
    """Why entflash.autograd cannot be imported ("" when it imports).

    torch.compile evaluates this once while tracing and keeps the answer as a constant (importlib cannot be
    traced); eager calls import each time, so a module installed or removed later is noticed.
    """
    try:
        importlib.import_module(_FUSED_MODULE)
    except ImportError as error:
        return str(error) or type(error).__name__
    return ""


def _fused_backend(name: str, caller: str, required: bool) -> Optional[Callable]:
    """The function `name` of entflash.autograd, or None when it cannot be imported and not `required`.

    required: raise RuntimeError (naming the cause) instead of returning None.
    """
    error = _fused_module_import_error()
    function = getattr(sys.modules[_FUSED_MODULE], name, None) if not error else None
    if function is None and required:
        cause = error or f"module {_FUSED_MODULE!r} has no attribute {name!r}"
        raise RuntimeError(f"{caller}: backend='triton' requested but the fused backend is unavailable "
                           f"({_FUSED_MODULE}.{name}: {cause})")
    return function


def resolve_backend(backend: str, device: torch.device, caller: str) -> str:
    """Turn the validated `backend` option into "torch" or "triton" for tensors on `device`.

    Raises ValueError for "triton" on a non-CUDA device without TRITON_INTERPRET=1.
    """
    if backend == "auto":
        if device.type == "cuda" and _fused_backend("triton_attention", caller, required=False) is not None:
            return "triton"
        return "torch"
    if backend == "triton" and device.type != "cuda" and not _triton_interpreter_enabled():
        raise ValueError(f"{caller}: `backend` 'triton' on device {device} needs the Triton interpreter: set the "
                         "environment variable TRITON_INTERPRET=1 before importing entflash (or use "
                         "backend='torch')")
    return backend


def normalize_options(q, alpha, causal, scale, window, return_aux, backend, caller, deterministic=False,
                      check_alpha=True):
    """Validate the options shared by the padded and packed entry points; return them normalized (deterministic
    is only validated: every backward path of the fused backend is deterministic, entmax_attention's docstring;
    check_alpha=False leaves a tensor alpha's values unread)."""
    num_q_heads, head_dim = q.shape[1], q.shape[-1]  # (B, H, N, D) and packed (total, H, D) alike
    checks.check_flag(deterministic, "deterministic", caller)
    read_alpha = checks.check_flag(check_alpha, "check_alpha", caller)
    alpha = checks.check_alpha(alpha, num_q_heads, q.device, caller, read_values=read_alpha)
    causal = checks.check_flag(causal, "causal", caller)
    scale = checks.check_scale(scale, head_dim, caller)
    window = checks.check_window(window, caller)
    return_aux = checks.check_flag(return_aux, "return_aux", caller)
    backend = resolve_backend(checks.check_backend(backend, caller), q.device, caller)
    return alpha, causal, scale, window, return_aux, backend


def entmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, alpha=1.5, causal: bool = False,
                     scale: Optional[float] = None, window=None, seqlens=None, return_aux: bool = False,
                     backend: str = "auto", deterministic: bool = False, check_alpha: bool = True):
    """alpha-entmax attention with SDPA's layout.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv)).
        One floating dtype (float16, bfloat16, float32, float64) and one device; any strides, so a transposed
        (B, N, H, D) tensor works without a copy.
    alpha: float in (1, 2] (1.5 default; 2 is sparsemax), or a float tensor of shape (Hq,) (or 0-dim), which may
        require grad.
    causal: query i sees keys j <= i + (Nk - Nq): bottom-right aligned, so with Nq < Nk the queries are the last
        Nq positions (decoding, chunked prefill).
    scale: multiplies q . k; default 1 / sqrt(D).
    window: None or (left, right): query i sees keys in [i + off - left, i + off + right] with off = Nk - Nq
        (per sequence with seqlens); None on a side is unlimited.
    seqlens: None; an int tensor (B,) of valid lengths for queries and keys (needs Nq == Nk); or a pair
        (seqlens_q, seqlens_k) of (B,) int tensors (either may be None). Right padding.
    return_aux: also return a dict with "tau" (B, Hq, Nq) float32 thresholds in (alpha-1)*score units and
        "support" (B, Hq, Nq) int32 non-zeros per row (the Triton backend adds "tile_map").
    backend: "auto", "torch" or "triton".
    deterministic: ask for gradients that are bit-identical from run to run (FlashAttention's keyword). The fused
        backend gives them either way: its backward uses no atomics (a GQA group's dK/dV are summed inside one
        program), so both values run the same kernels. The torch backend is as deterministic as the PyTorch ops
        it runs on that device (torch.use_deterministic_algorithms); on the CPU it is.
    check_alpha: read a tensor alpha's values to check that they lie in (1, 2] (a ValueError otherwise). On a GPU
        the read waits for every kernel queued before the call (a host sync per call). False skips it, for an
        alpha in range by construction, such as entflash.nn.HeadAlpha's (EntmaxAttention passes False): values
        outside (1, 2] then give unspecified outputs, a NaN alpha NaN outputs. A float alpha is always checked.

    Returns out (B, Hq, Nq, D) in q's dtype (and the aux dict when return_aux). Rows that see no key (padding,
    or everything masked) are zeros with tau = +inf and support 0, and receive zero gradients.
    """
    return attend(q, k, v, alpha=alpha, causal=causal, scale=scale, window=window, seqlens=seqlens,
                  return_aux=return_aux, backend=backend, deterministic=deterministic, check_alpha=check_alpha)


def attend(q, k, v, *, alpha, causal, scale, window, seqlens, return_aux, backend, deterministic=False,
           check_alpha=True, read_lengths=True, caller="entmax_attention"):
    """entmax_attention's body, for the library's own callers. read_lengths=False leaves the values of `seqlens`
    unread (their types, shapes and devices are still checked): for lengths in range by construction, such as
    nn.unpadded_entmax_attention's counts of mask entries, where a read would wait for the GPU. caller: the
    name that error messages give."""
    checks.check_qkv(q, k, v, caller)
    alpha, causal, scale, window, return_aux, backend = normalize_options(
        q, alpha, causal, scale, window, return_aux, backend, caller, deterministic, check_alpha)
    seqlens_q, seqlens_k = checks.check_seqlens(seqlens, q.shape[0], q.shape[2], k.shape[2], q.device, caller,
                                                read_lengths)
    if backend == "triton":
        attention = _fused_backend("triton_attention", caller, required=True)
    else:
        attention = torch_attention
    return attention(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, return_aux)


def _pack_positions(cu_seqlens: torch.Tensor, total: int):
    """For packed offsets cu_seqlens (B + 1,), the (batch index, position) of each of the `total` tokens."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch_index = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                          output_size=total)
    position = torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[batch_index]
    return batch_index, position


def _pad(packed: torch.Tensor, batch_index, position, batch: int, max_len: int) -> torch.Tensor:
    """(total, H, D) packed tokens -> (B, H, max_len, D) zero-padded (differentiable)."""
    padded = packed.new_zeros(batch, max_len, packed.shape[1], packed.shape[2])
    padded[batch_index, position] = packed
    return padded.transpose(1, 2)


def entmax_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, alpha=1.5,
                            causal: bool = False, scale: Optional[float] = None, window=None,
                            return_aux: bool = False, backend: str = "auto", deterministic: bool = False,
                            check_alpha: bool = True):
    """alpha-entmax attention over packed variable-length sequences (FlashAttention's varlen convention).

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D), Hq % Hkv == 0. Sequence b holds query tokens
    cu_seqlens_q[b]:cu_seqlens_q[b+1] and key tokens cu_seqlens_k[b]:cu_seqlens_k[b+1] (int tensors (B + 1,),
    starting at 0, non-decreasing, ending at total_q / total_k). max_seqlen_q, max_seqlen_k: ints at least the
    longest query / key sequence. Each sequence is its own attention problem (causal and window bottom-right
    aligned per sequence). Other options (deterministic and check_alpha included) as entmax_attention.

    Returns out (total_q, Hq, D) in q's dtype; with return_aux also a dict with "tau" (total_q, Hq) float32 and
    "support" (total_q, Hq) int32 (and the backend's "tile_map", in the padded (B, Hq, ...) layout, if any).
    """
    caller = "entmax_attention_varlen"
    checks.check_packed_qkv(q, k, v, caller)
    alpha, causal, scale, window, return_aux, backend = normalize_options(
        q, alpha, causal, scale, window, return_aux, backend, caller, deterministic, check_alpha)
    cu_seqlens_q, longest_q = checks.check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device, caller)
    cu_seqlens_k, longest_k = checks.check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device, caller)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        checks.fail(ValueError, caller, "cu_seqlens_k", f"have the shape of `cu_seqlens_q` "
                    f"{tuple(cu_seqlens_q.shape)} (one entry per sequence + 1)", f"shape {tuple(cu_seqlens_k.shape)}")
    max_seqlen_q = checks.check_max_seqlen(max_seqlen_q, "max_seqlen_q", longest_q, caller)
    max_seqlen_k = checks.check_max_seqlen(max_seqlen_k, "max_seqlen_k", longest_k, caller)
    if backend == "triton":
        varlen_attention = _fused_backend("triton_attention_varlen", caller, required=False)
        if varlen_attention is not None:
            return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alpha, causal,
                                    scale, window, return_aux)
        attention = _fused_backend("triton_attention", caller, required=True)
    else:
        attention = torch_attention

    batch = cu_seqlens_q.shape[0] - 1
    q_batch, q_position = _pack_positions(cu_seqlens_q, q.shape[0])
    k_batch, k_position = _pack_positions(cu_seqlens_k, k.shape[0])
    result = attention(_pad(q, q_batch, q_position, batch, max_seqlen_q),
                       _pad(k, k_batch, k_position, batch, max_seqlen_k),
                       _pad(v, k_batch, k_position, batch, max_seqlen_k),
                       alpha, causal, scale, window,
                       cu_seqlens_q[1:] - cu_seqlens_q[:-1], cu_seqlens_k[1:] - cu_seqlens_k[:-1], return_aux)
    out, aux = result if return_aux else (result, None)
    out = out.transpose(1, 2)[q_batch, q_position]
    if not return_aux:
        return out
    aux = dict(aux)
    for name in ("tau", "support"):
        aux[name] = aux[name].transpose(1, 2)[q_batch, q_position]
    return out, aux
