"""The attention implementations the harness compares, behind one small interface.

Each implementation has a name, a `skip_reason(case)` (None when it runs the case; a string saying why not,
recorded instead of a time), and `attend(q, k, v, case)` returning (B, H, N, D). Modes: "fwd" times the
forward on tensors without grad; "fwd_bwd" the forward and `out.backward(dout)`. Every implementation gets
the same tensors and the same scale 1/sqrt(D).

  ours                 entflash.entmax_attention(backend), fixed alpha (float)
  ours_learned_alpha   the same with a per-head alpha tensor (Hq,) that requires grad (fwd+bwd only;
                       check_alpha=False, as entflash.nn.EntmaxAttention)
  fa2                  torch SDPA restricted to the flash backend (FlashAttention-2)
  cudnn                torch SDPA restricted to the cuDNN backend
  sdpa_math            torch SDPA math backend (the CPU-mode baseline)
  adasplash            the `adasplash` package's dispatcher: AdaSplash-2 (`adasplash_v2`) for causal
                       alpha = 1.5, its v1 block-mask kernel (`adasplash_v1`) otherwise; v2 autotunes over a
                       shortened list of its configurations unless ADASPLASH_AUTOTUNE = "full"
  entmax_bisect        the `entmax` package on materialized float32 scores (skipped where it cannot fit)
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

# Live float32 (B, H, N, N) tensors entmax_bisect needs at its peak (scores, scaled scores, bisection
# temporaries; the backward adds the saved output and gradient temporaries).
ENTMAX_BISECT_LIVE_SCORE_TENSORS = {"fwd": 5, "fwd_bwd": 8}
# Fraction of the device's free memory a dense baseline may plan to use.
MEMORY_HEADROOM = 0.85


@dataclass
class Case:
    """One benchmark problem: shapes, mask, alpha, and the input structure (target level and strength)."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool
    alpha: float
    target_sparsity: float
    strength: float
    device: str
    dtype: torch.dtype
    backend: str = "triton"

    @property
    def scale(self) -> float:
        """Softmax/entmax score scale, 1/sqrt(D), shared by every implementation."""
        return 1.0 / math.sqrt(self.head_dim)


class Implementation(ABC):
    """Base: runs every case in both modes. Subclasses define `attend` and, where needed, `skip_reason`."""

    name = "base"
    modes = ("fwd", "fwd_bwd")

    def skip_reason(self, case: Case, mode: str) -> Optional[str]:
        """Why this implementation does not run (case, mode), or None when it does."""
        if mode not in self.modes:
            return f"skipped: {self.name} is timed in modes {list(self.modes)} only"
        return None

    def setup(self, case: Case) -> None:
        """Create per-case state (parameters) before the first call."""

    def extra_grad_tensors(self) -> List[torch.Tensor]:
        """Tensors besides q, k, v whose .grad the fwd+bwd timing resets between calls."""
        return []

    def variant(self, case: Case) -> Optional[str]:
        """Which of its code paths the implementation takes for the case, where it has several."""
        return None

    @abstractmethod
    def attend(self, q, k, v, case: Case) -> torch.Tensor:
        """The attention output for q, k, v of shape (B, H, N, D)."""


def _needs_cuda(case: Case) -> Optional[str]:
    return None if case.device.startswith("cuda") else "skipped: needs a CUDA device"


class Ours(Implementation):
    """entflash.entmax_attention with a fixed float alpha, on the case's backend."""

    name = "ours"

    def attend(self, q, k, v, case):
        from entflash.api import entmax_attention

        return entmax_attention(q, k, v, alpha=case.alpha, causal=case.causal, backend=case.backend)


class OursLearnedAlpha(Implementation):
    """entflash.entmax_attention with a per-head alpha tensor (Hq,) that requires grad, called as
    entflash.nn.EntmaxAttention calls it: check_alpha=False (alpha's values are not read back, no host sync)."""

    name = "ours_learned_alpha"
    modes = ("fwd_bwd",)

    def setup(self, case):
        self.alpha = torch.full((case.heads,), case.alpha, device=case.device, dtype=torch.float32,
                                requires_grad=True)

    def extra_grad_tensors(self):
        return [self.alpha]

    def attend(self, q, k, v, case):
        from entflash.api import entmax_attention

        return entmax_attention(q, k, v, alpha=self.alpha, causal=case.causal, backend=case.backend,
                                check_alpha=False)


class Sdpa(Implementation):
    """torch.nn.functional.scaled_dot_product_attention restricted to one SDPA backend."""

    def __init__(self, name: str, backend_name: str, cuda_only: bool):
        self.name = name
        self.backend_name = backend_name
        self.cuda_only = cuda_only

    def skip_reason(self, case, mode):
        return super().skip_reason(case, mode) or (_needs_cuda(case) if self.cuda_only else None)

    def attend(self, q, k, v, case):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, self.backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=case.scale)


# AdaSplash-2's autotuned kernels (module adasplash.adasplash_v2) and the launch configurations the harness keeps
# of theirs with ADASPLASH_AUTOTUNE = "short": 4 warps, 2 or 3 stages, and for its tau kernel the (BLOCK_M, BLOCK_N)
# pairs (128, 64) and (64, 64). Its full lists (30 configurations for the tau kernel, 6 for each other) compile for
# about 90 s per (N, D) on an H100, a large part of a device session.
ADASPLASH_V2_KERNELS = ("_get_tau", "_get_tau_v2", "_get_tau_v3", "_get_output", "_bwd_q_kernel", "_bwd_kv_kernel")
ADASPLASH_SHORT_BLOCKS = {(128, 64), (64, 64)}
ADASPLASH_AUTOTUNE = "short"  # or "full": adasplash's own lists (benchmarks.attention --adasplash-autotune)


def _kept_by_short_autotune(config) -> bool:
    blocks = (config.kwargs.get("BLOCK_M"), config.kwargs.get("BLOCK_N"))
    return (config.num_warps == 4 and config.num_stages in (2, 3)
            and (blocks == (None, None) or blocks in ADASPLASH_SHORT_BLOCKS))


def shorten_adasplash_autotune() -> Dict[str, int]:
    """Restrict adasplash v2's autotuned kernels to the configurations _kept_by_short_autotune accepts (a kernel
    none of whose configurations pass keeps its list). Returns {kernel name: configurations left}."""
    import adasplash.adasplash_v2 as v2

    left = {}
    for name in ADASPLASH_V2_KERNELS:
        kernel = getattr(v2, name, None)
        if kernel is None or not hasattr(kernel, "configs"):
            continue
        kernel.configs = [c for c in kernel.configs if _kept_by_short_autotune(c)] or kernel.configs
        left[name] = len(kernel.configs)
    return left


class AdaSplash(Implementation):
    """The `adasplash` package's public dispatcher (AdaSplash-2 where it applies, v1 otherwise). With
    ADASPLASH_AUTOTUNE = "short", its v2 kernels autotune over a shortened list (shorten_adasplash_autotune);
    v1 does not autotune."""

    name = "adasplash"

    def __init__(self):
        self.shortened = False

    def skip_reason(self, case, mode):
        return super().skip_reason(case, mode) or _needs_cuda(case)

    def variant(self, case: Case) -> str:
        """Which kernel family the dispatcher picks: 'v1', or for causal alpha = 1.5 'v2 (short autotune)' or
        'v2 (full autotune)' (ADASPLASH_AUTOTUNE)."""
        return f"v2 ({ADASPLASH_AUTOTUNE} autotune)" if case.causal and case.alpha == 1.5 else "v1"

    def setup(self, case):
        if ADASPLASH_AUTOTUNE == "short" and not self.shortened:
            shorten_adasplash_autotune()
            self.shortened = True

    def attend(self, q, k, v, case):
        import adasplash

        return adasplash.adasplash(q, k, v, alpha=case.alpha, is_causal=case.causal)


class EntmaxBisect(Implementation):
    """Dense alpha-entmax (`entmax.entmax_bisect`) over materialized float32 scores, then p @ v."""

    name = "entmax_bisect"

    def planned_bytes(self, case: Case, mode: str) -> int:
        """Bytes of (B, H, N, N) float32 temporaries this mode needs at its peak (an estimate)."""
        score_bytes = case.batch * case.heads * case.seq_len ** 2 * 4
        return ENTMAX_BISECT_LIVE_SCORE_TENSORS[mode] * score_bytes

    def skip_reason(self, case, mode):
        reason = super().skip_reason(case, mode)
        if reason or not case.device.startswith("cuda"):
            return reason
        free_bytes, _ = torch.cuda.mem_get_info()
        needed = self.planned_bytes(case, mode)
        if needed > MEMORY_HEADROOM * free_bytes:
            return (f"skipped: needs ~{needed / 2**30:.1f} GiB of scores, "
                    f"{free_bytes / 2**30:.1f} GiB free")
        return None

    def attend(self, q, k, v, case):
        from entmax import entmax_bisect

        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(case.scale)
        if case.causal:
            n = case.seq_len
            hidden = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu_(1)
            scores = scores.masked_fill(hidden, float("-inf"))
        probabilities = entmax_bisect(scores, alpha=case.alpha, dim=-1)
        return torch.matmul(probabilities.to(v.dtype), v)


def all_implementations() -> Dict[str, Implementation]:
    """Every implementation by name, in the order they run (fa2 first: the others' ratios divide by it)."""
    implementations = [
        Sdpa("fa2", "FLASH_ATTENTION", cuda_only=True),
        Sdpa("cudnn", "CUDNN_ATTENTION", cuda_only=True),
        Sdpa("sdpa_math", "MATH", cuda_only=False),
        Ours(),
        OursLearnedAlpha(),
        AdaSplash(),
        EntmaxBisect(),
    ]
    return {implementation.name: implementation for implementation in implementations}
