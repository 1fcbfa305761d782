"""Argument validation shared by every public entry point.

Every failure raises ValueError (bad value or shape) or TypeError (bad type or dtype) with one message
style::

    <caller>: `<argument>` must <expectation>, got <what was passed>

`caller` is the public function the user called (e.g. "entmax_attention"), so the message points at the
user's own call. Checks stay cheap: shapes, dtypes and devices are metadata; the only values read are those
of small tensors (alpha of shape (H,), seqlens of shape (B,), cu_seqlens of shape (B + 1,)).

Reading a tensor's values is a host sync, which `torch.compile(fullgraph=True)` cannot trace: while compiling
(torch.compiler.is_compiling()), the value checks of tensors are skipped and only their types, dtypes, shapes and
devices are checked. Eager calls check everything.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(error_type: type, caller: str, argument: str, expectation: str, got: str) -> None:
    """Raise `error_type` with the package's message style; `argument` is the user-facing name."""
    raise error_type(f"{caller}: `{argument}` must {expectation}, got {got}")


def describe(value) -> str:
    """How an error message shows a bad value: a tensor by dtype, shape and device, anything else by repr and type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{value!r} ({type(value).__name__})"


def _reads_tensor_values() -> bool:
    """Whether value checks of tensors run: not while torch.compile traces (a host sync would break the graph)."""
    return not torch.compiler.is_compiling()


def is_real_number(value) -> bool:
    """A python or numpy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """A python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_tensor(value, argument: str, caller: str, dims: int, layout: str) -> torch.Tensor:
    """Check that `value` is a floating tensor with `dims` dimensions; `layout` names them, e.g. "(B, H, N, D)"."""
    if not isinstance(value, torch.Tensor):
        fail(TypeError, caller, argument, f"be a torch.Tensor {layout}", describe(value))
    if value.dim() != dims:
        fail(ValueError, caller, argument, f"have {dims} dims {layout}", f"shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        fail(TypeError, caller, argument, "have a floating dtype (float16, bfloat16, float32 or float64)",
             str(value.dtype))
    return value


def _check_same_dtype_and_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caller: str,
                                 names: Tuple[str, str, str] = ("q", "k", "v")) -> None:
    q_name = names[0]
    for name, tensor in zip(names[1:], (k, v)):
        if tensor.dtype != q.dtype:
            fail(TypeError, caller, name, f"have the same dtype as `{q_name}` ({q.dtype})", str(tensor.dtype))
        if tensor.device != q.device:
            fail(ValueError, caller, name, f"be on the same device as `{q_name}` ({q.device})", str(tensor.device))


def _check_heads_and_dims(q_shape, k_shape, v_shape, caller: str, head_axis: int,
                          names: Tuple[str, str, str] = ("q", "k", "v")) -> None:
    """Compare the head counts and head dims of q, k, v (head axis `head_axis`, head dim last); `names` are
    their user-facing names."""
    q_name, k_name, v_name = names
    if v_shape[:-1] != k_shape[:-1]:
        fail(ValueError, caller, v_name, f"have the same shape as `{k_name}` {tuple(k_shape)} except the last dim",
             f"shape {tuple(v_shape)}")
    if k_shape[-1] != q_shape[-1]:
        fail(ValueError, caller, k_name, f"have the head dim of `{q_name}` ({q_shape[-1]})", f"shape {tuple(k_shape)}")
    if v_shape[-1] != q_shape[-1]:
        fail(ValueError, caller, v_name, f"have the head dim of `{q_name}` ({q_shape[-1]})", f"shape {tuple(v_shape)}")
    if q_shape[-1] == 0:
        fail(ValueError, caller, q_name, "have a head dim of at least 1", f"shape {tuple(q_shape)}")
    num_q_heads, num_kv_heads = q_shape[head_axis], k_shape[head_axis]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        fail(ValueError, caller, k_name, f"have a head count dividing the {num_q_heads} heads of `{q_name}` (GQA)",
             f"{num_kv_heads} heads (shape {tuple(k_shape)})")


def check_qkv(q, k, v, caller: str, names: Tuple[str, str, str] = ("q", "k", "v")) -> None:
    """Validate padded attention inputs: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D), Hq % Hkv == 0,
    one floating dtype and one device for all three. `names`: what messages call q, k, v (e.g. the KV caches)."""
    q_name, k_name, v_name = names
    check_tensor(q, q_name, caller, 4, "(B, Hq, Nq, D)")
    check_tensor(k, k_name, caller, 4, "(B, Hkv, Nk, D)")
    check_tensor(v, v_name, caller, 4, "(B, Hkv, Nk, D)")
    _check_same_dtype_and_device(q, k, v, caller, names)
    if k.shape[0] != q.shape[0]:
        fail(ValueError, caller, k_name, f"have the batch size of `{q_name}` ({q.shape[0]})",
             f"shape {tuple(k.shape)}")
    _check_heads_and_dims(q.shape, k.shape, v.shape, caller, head_axis=1, names=names)


def check_packed_qkv(q, k, v, caller: str) -> None:
    """Validate packed (varlen) inputs: q (total_q, Hq, D), k and v (total_k, Hkv, D), Hq % Hkv == 0."""
    check_tensor(q, "q", caller, 3, "(total_q, Hq, D)")
    check_tensor(k, "k", caller, 3, "(total_k, Hkv, D)")
    check_tensor(v, "v", caller, 3, "(total_k, Hkv, D)")
    _check_same_dtype_and_device(q, k, v, caller)
    _check_heads_and_dims(q.shape, k.shape, v.shape, caller, head_axis=1)


def check_rows_input(x, dim, caller: str, argument: str = "x") -> int:
    """Validate the input of a row-wise op (entmax, the entmax losses): a floating tensor with at least one
    dimension, ``dim`` an int in range and at least one entry along it. Returns ``dim`` as a non-negative axis."""
    if not isinstance(x, torch.Tensor):
        fail(TypeError, caller, argument, "be a torch.Tensor", type(x).__name__)
    if x.dtype not in FLOAT_DTYPES:
        fail(TypeError, caller, argument, "have a floating dtype (float16, bfloat16, float32 or float64)",
             str(x.dtype))
    if x.dim() == 0:
        fail(ValueError, caller, argument, "have at least one dimension", "a 0-dim tensor")
    if not is_integer(dim):
        fail(TypeError, caller, "dim", "be an int", describe(dim))
    if not -x.dim() <= dim < x.dim():
        fail(ValueError, caller, "dim", f"lie in [{-x.dim()}, {x.dim()}) for `{argument}` of shape {tuple(x.shape)}",
             repr(dim))
    dim = int(dim) % x.dim()
    if x.shape[dim] == 0:
        fail(ValueError, caller, argument, f"have at least one entry along dim={dim}", f"shape {tuple(x.shape)}")
    return dim


def check_flag(value, argument: str, caller: str) -> bool:
    """Check a boolean option (`causal`, `return_aux`)."""
    if not isinstance(value, bool):
        fail(TypeError, caller, argument, "be a bool", describe(value))
    return value


def check_alpha(alpha, num_heads: int, device: torch.device, caller: str, read_values: bool = True):
    """Validate alpha: a real number in (1, 2], or a floating tensor of shape (num_heads,) (or 0-dim) on
    `device` whose values all lie in (1, 2].

    Returns a python float, or a (num_heads,) tensor (a 0-dim tensor is expanded, keeping its autograd graph).
    A tensor's values are read (on a GPU, a host sync that waits for every queued kernel) only with read_values
    and not while torch.compile traces; its type, shape and device are always checked.
    """
    if isinstance(alpha, torch.Tensor):
        if not alpha.is_floating_point():
            fail(TypeError, caller, "alpha", "be a floating tensor", str(alpha.dtype))
        if alpha.shape not in (torch.Size([]), torch.Size([num_heads])):
            fail(ValueError, caller, "alpha", f"be a float or a tensor of shape ({num_heads},) (one per query head)",
                 f"shape {tuple(alpha.shape)}")
        if alpha.device != device:
            fail(ValueError, caller, "alpha", f"be on the device of `q` ({device})", str(alpha.device))
        values = alpha.detach()
        if read_values and _reads_tensor_values() and not bool(((values > 1) & (values <= 2)).all()):
            fail(ValueError, caller, "alpha", "lie in (1, 2] for every head",
                 f"values {[round(a, 6) for a in values.reshape(-1).tolist()]}")
        return alpha.expand(num_heads) if alpha.dim() == 0 else alpha
    return check_alpha_number(alpha, caller, "be a float in (1, 2] or a tensor of shape (Hq,)")


def check_alpha_number(alpha, caller: str, expectation: str) -> float:
    """Validate a non-tensor alpha: a real number in (1, 2]; return it as a float.

    expectation: what the TypeError says `alpha` must be (the tensor forms differ between callers)."""
    if not is_real_number(alpha):
        fail(TypeError, caller, "alpha", expectation, describe(alpha))
    if not 1.0 < float(alpha) <= 2.0:
        fail(ValueError, caller, "alpha", "lie in (1, 2] (1 would be softmax, 2 is sparsemax)", repr(alpha))
    return float(alpha)


def check_scale(scale, head_dim: int, caller: str) -> float:
    """Validate `scale` (a positive finite number, or None meaning 1/sqrt(head_dim)); return it as a float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not is_real_number(scale):
        fail(TypeError, caller, "scale", "be a positive finite float or None", describe(scale))
    if torch.compiler.is_compiling():
        return scale  # may be symbolic (torch.compile(dynamic=True)): like tensor values, not checked while tracing
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        fail(ValueError, caller, "scale", "be a positive finite float or None", repr(scale))
    return float(scale)


def check_window(window, caller: str) -> Optional[Tuple[Optional[int], Optional[int]]]:
    """Validate `window`: None, or a pair (left, right) of ints >= 0 or None (None = unlimited on that side)."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        fail(TypeError, caller, "window", "be None or a pair (left, right) of ints >= 0 or None", describe(window))
    sides = []
    for side_name, side in zip(("left", "right"), window):
        if side is None:
            sides.append(None)
            continue
        if not is_integer(side):
            fail(TypeError, caller, "window", f"have an int >= 0 or None as its {side_name} side", describe(side))
        if side < 0:
            fail(ValueError, caller, "window", f"have a {side_name} side >= 0", repr(tuple(window)))
        sides.append(int(side))
    return sides[0], sides[1]


def check_backend(backend, caller: str) -> str:
    """Validate `backend`: one of "auto", "torch", "triton"."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        fail(ValueError, caller, "backend", f"be one of {', '.join(repr(b) for b in BACKENDS)}", repr(backend))
    return backend


def check_lengths(lengths, argument: str, batch: int, max_length: int, device: torch.device,
                  caller: str, read_values: bool = True) -> torch.Tensor:
    """Validate a (batch,) integer tensor of lengths in [0, max_length]; return it as int32 on `device`.

    The range is checked only with read_values and not while torch.compile traces: it reads the values (on a
    GPU, one host sync)."""
    if not isinstance(lengths, torch.Tensor):
        fail(TypeError, caller, argument, f"be an integer tensor of shape ({batch},)", describe(lengths))
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        fail(TypeError, caller, argument, "have an integer dtype (int32 or int64)", str(lengths.dtype))
    if lengths.shape != (batch,):
        fail(ValueError, caller, argument, f"have shape ({batch},) (one length per batch entry)",
             f"shape {tuple(lengths.shape)}")
    if lengths.device != device:
        fail(ValueError, caller, argument, f"be on the device of `q` ({device})", str(lengths.device))
    if batch > 0 and read_values and _reads_tensor_values():
        check_length_range(*length_range(lengths), argument, max_length, caller)
    return lengths.to(torch.int32)


def length_range(lengths: torch.Tensor) -> Tuple[int, int]:
    """(min, max) of a non-empty integer tensor as python ints, from one read (a host sync on a GPU)."""
    low, high = torch.stack(torch.aminmax(lengths)).tolist()
    return low, high


def check_length_range(low: int, high: int, argument: str, max_length: int, caller: str) -> None:
    """Raise ValueError naming `argument` unless [low, high] lies within [0, max_length]."""
    if low < 0 or high > max_length:
        fail(ValueError, caller, argument, f"hold lengths in [0, {max_length}]", f"values in [{low}, {high}]")


def check_seqlens(seqlens, batch: int, num_queries: int, num_keys: int, device: torch.device, caller: str,
                  read_values: bool = True):
    """Validate the public `seqlens` option and split it into (seqlens_q, seqlens_k).

    seqlens: None; a (batch,) integer tensor giving both lengths (needs num_queries == num_keys); or a pair
    (seqlens_q, seqlens_k) whose entries are (batch,) integer tensors or None. read_values: check their range
    (check_lengths).
    Returns (seqlens_q, seqlens_k), each None or an int32 (batch,) tensor on `device`.
    """
    if seqlens is None:
        return None, None
    if isinstance(seqlens, torch.Tensor):
        if num_queries != num_keys:
            fail(ValueError, caller, "seqlens",
                 f"be a pair (seqlens_q, seqlens_k) when Nq ({num_queries}) != Nk ({num_keys})", "one tensor")
        lengths = check_lengths(seqlens, "seqlens", batch, num_keys, device, caller, read_values)
        return lengths, lengths
    if not isinstance(seqlens, (tuple, list)) or len(seqlens) != 2:
        fail(TypeError, caller, "seqlens", "be None, a (B,) integer tensor or a pair (seqlens_q, seqlens_k)",
             describe(seqlens))
    seqlens_q, seqlens_k = seqlens
    if seqlens_q is not None:
        seqlens_q = check_lengths(seqlens_q, "seqlens[0]", batch, num_queries, device, caller, read_values)
    if seqlens_k is not None:
        seqlens_k = check_lengths(seqlens_k, "seqlens[1]", batch, num_keys, device, caller, read_values)
    return seqlens_q, seqlens_k


def check_cu_seqlens(cu_seqlens, argument: str, total: int, device: torch.device, caller: str):
    """Validate cumulative sequence offsets (B + 1,): integer, starting at 0, non-decreasing, ending at `total`.

    Returns (offsets as int32 on `device`, the longest sequence as an int), from one read of the values (a host
    sync on a GPU); while torch.compile traces the values are neither read nor checked and the longest is None.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        fail(TypeError, caller, argument, "be an integer tensor of shape (B + 1,)", describe(cu_seqlens))
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        fail(TypeError, caller, argument, "have an integer dtype (int32 or int64)", str(cu_seqlens.dtype))
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        fail(ValueError, caller, argument, "have shape (B + 1,) with B >= 1", f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        fail(ValueError, caller, argument, f"be on the device of `q` ({device})", str(cu_seqlens.device))
    if not _reads_tensor_values():
        return cu_seqlens.to(torch.int32), None
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        fail(ValueError, caller, argument, "start at 0", f"{offsets[0]} first")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        fail(ValueError, caller, argument, "be non-decreasing", str(offsets))
    if offsets[-1] != total:
        fail(ValueError, caller, argument, f"end at the packed length {total}", f"{offsets[-1]} last")
    return cu_seqlens.to(torch.int32), max(b - a for a, b in zip(offsets, offsets[1:]))


def check_max_seqlen(max_seqlen, argument: str, longest: Optional[int], caller: str) -> int:
    """Validate `max_seqlen`: an int no smaller than `longest`, the longest sequence (check_cu_seqlens; None, while
    torch.compile traces, skips that bound)."""
    if not is_integer(max_seqlen):
        fail(TypeError, caller, argument, "be an int", describe(max_seqlen))
    if longest is None:
        return int(max_seqlen)
    if max_seqlen < longest:
        fail(ValueError, caller, argument, f"be at least the longest sequence ({longest})", repr(max_seqlen))
    return int(max_seqlen)
