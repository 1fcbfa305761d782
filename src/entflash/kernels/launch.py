"""Host-side launch plan shared by the forward stages: flags, lengths, grid and tile configuration."""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch

# ALPHA_MODE constexpr values (kernels/common.py): specialised power code for alpha = 1.5 and 2.
ALPHA_GENERAL, ALPHA_15, ALPHA_2 = 0, 1, 2


def alpha_mode(alpha) -> int:
    """ALPHA_MODE for a python float alpha; per-head tensors always take the general path."""
    if isinstance(alpha, float) or isinstance(alpha, int):
        if float(alpha) == 1.5:
            return ALPHA_15
        if float(alpha) == 2.0:
            return ALPHA_2
    return ALPHA_GENERAL


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: triton.cdiv's value at a fraction of its host cost (in Triton 3.6 it is a
    constexpr_function, a few microseconds per call from host code)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2 for n >= 1, in plain Python."""
    return 1 << max(0, n - 1).bit_length()


def capturing(device: torch.device) -> bool:
    """True while the current CUDA stream of `device` records a CUDA graph: a tensor made then is filled only
    when the graph replays, so host-side caches of device tensors must not keep it."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def head_constant(value: float, n_heads: int, device) -> torch.Tensor:
    """A (n_heads,) float32 tensor filled with `value` on `device` (one rounding from the python float), made
    once per (value, n_heads, device) and shared: the kernels only read it, and a fill per call is host time a
    small problem notices. Never cached while a CUDA graph is being captured (capturing)."""
    device = torch.device(device)
    if capturing(device):
        return _filled.__wrapped__(float(value), n_heads, device)
    return _filled(float(value), n_heads, device)


@functools.lru_cache(maxsize=256)
def _filled(value: float, n_heads: int, device: torch.device) -> torch.Tensor:
    return torch.full((n_heads,), value, device=device, dtype=torch.float32)


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET set, not "0").

    Launchers choose their tile configuration from this, never from the tensors' device, so the
    ahead-of-time compile check (scripts/compile_kernels.py) sees the GPU configuration on a CPU host."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mask_args(causal, window, seqlens_q, seqlens_k):
    """The masking arguments every attention kernel takes (forward and backward): (flags, win_left, win_right).

    flags: the constexprs HAS_LQ/HAS_LK (a length tensor is passed), CAUSAL, WIN_LEFT/WIN_RIGHT (that
    window side is limited); win_left/win_right: the window sizes as ints, 0 for an unlimited side."""
    left, right = window if window is not None else (None, None)
    flags = dict(HAS_LQ=seqlens_q is not None, HAS_LK=seqlens_k is not None, CAUSAL=bool(causal),
                 WIN_LEFT=left is not None, WIN_RIGHT=right is not None)
    return flags, int(left) if left is not None else 0, int(right) if right is not None else 0


def dot_args(dtype) -> dict:
    """The DOT_PREC and UPCAST constexprs of common.mma for inputs of `dtype`: exact-float32 products for
    float32, tf32 otherwise (ignored for 16-bit operands); float32 operands for bf16 under the interpreter."""
    return dict(DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
                UPCAST=interpreting() and dtype == torch.bfloat16)


@dataclass
class StageSpec:
    """Everything the three forward kernels share for one call.

    lq/lk: int32 (B,) length tensors or a dummy pointer (flags say which); win_left/win_right: ints
    (0 when that side is unlimited); group = Hq // Hkv; grid = (num query blocks, B * Hq);
    tiles: BLOCK_M/BLOCK_N/BLOCK_D/DOT_PREC/UPCAST constexprs of the solve and output stages; the sweep runs
    sweep_block_m-row query blocks instead (its own grid); *_launch: num_warps/num_stages per stage;
    kv_tma: whether tile_source may hand the kernels TMA descriptors of k and v (tma_plan); tma_launch: launch
    options the Newton and output passes add when they read through descriptors (TMA_MAXNREG).
    """
    lq: torch.Tensor
    lk: torch.Tensor
    win_left: int
    win_right: int
    group: int
    num_m_blocks: int
    grid: tuple
    alpha_mode: int
    lists: torch.Tensor  # int32 scratch, NK_CHUNK entries per program: candidate key tiles
    nk_chunk: int
    sweep_block_m: int = 64
    flags: dict = field(default_factory=dict)
    tiles: dict = field(default_factory=dict)
    sweep_launch: dict = field(default_factory=dict)
    sparse_launch: dict = field(default_factory=dict)
    kv_tma: bool = False  # may the stages read key/value tiles through TMA descriptors (tile_source)?
    tma_launch: dict = field(default_factory=dict)  # extra launch options of the later stages when they do
    descriptors: dict = field(default_factory=dict)  # tile_source's descriptors, made once per tensor and call


def make_spec(q, k, alpha, alpha_t, causal, window, seqlens_q, seqlens_k) -> StageSpec:
    """Build the launch plan for q (B, Hq, Nq, D), k (B, Hkv, Nk, D) and the normalized arguments.

    Tile choice: key tiles are always 64 wide, the granularity of the tile map. The Newton and output passes
    take 64-row query blocks and 4 warps for 16-bit inputs up to D = 128: a program then visits a key tile only
    when its own 64 rows need it, where a 128-row block visits the tiles either half needs. On the H100 at
    N = 16k they ran the solve 7-15% and the output pass 8-39% faster than 128-row blocks at D = 64, dense and
    ~60% block sparse (benchmarks/results/kernel_dev-e5b7144-sparse-m64.json), and at D = 128 the output pass
    0%, 32% and 41% faster and the solve 5%, 6% and 31% faster, dense, ~57% and ~89% block sparse
    (kernel_dev-1b1c87a-d128-m64.json; on sm_90 the output kernel spills 0-4 bytes, 16 with GQA, a per-head
    alpha, a window and seqlens together).
    float32 tiles (exact-float32 products) take 128 rows and 8 warps on a GPU: with 64 rows and 4 warps they
    spill. 64 rows also under the interpreter (which runs each program in numpy) and for D = 256 (registers).
    The sweep takes 64-row blocks for 16-bit inputs (its tile maxima are per 64 rows anyway): on
    the H200 they ran it 5-9% faster than 128-row ones at N = 16k, D 64 and 128, dense and ~90% block sparse
    (benchmarks/results/kernel_dev-02f55a3-sweep-m64.json, ms_sweep_m64w4).
    """
    B, H, Nq, D = q.shape
    block_d = max(16, next_power_of_2(D))
    half = q.element_size() == 2
    block_m = 64 if interpreting() or block_d > 128 or half else 128
    # 128-row blocks (float32): the later stages need 8 warps (with 4, the output kernel spilled at D = 64 and ran
    # 5x slower at D = 128; kernel_dev-9b67436.json); 64-row blocks take 4 warps. The sweep takes 64-row blocks
    # and 4 warps for 16-bit inputs up to D = 128; float32 tiles (exact-float32 products) keep the shared
    # blocks and need 8 warps' registers (scripts/compile_kernels.py's spill counts)
    warps = 8
    if block_m == 64:
        warps = 4 if block_d <= 128 else 8
    sweep_block_m = 64 if half else block_m
    sweep_cap = SWEEP_MAXNREG.get(block_d) if half else None
    sweep_cap = dict(maxnreg=sweep_cap) if sweep_cap else {}
    sweep_warps = 4 if block_d <= 128 and half else 8
    flags, win_left, win_right = mask_args(causal, window, seqlens_q, seqlens_k)
    kv_tma = tma_plan(q, block_d, seqlens_k)
    n_mb = cdiv(Nq, block_m)
    nk_chunk = min(512, max(16, next_power_of_2(cdiv(k.shape[2], 64))))
    return StageSpec(
        lq=seqlens_q if seqlens_q is not None else alpha_t,
        lk=seqlens_k if seqlens_k is not None else alpha_t,
        win_left=win_left,
        win_right=win_right,
        group=H // k.shape[1],
        num_m_blocks=n_mb,
        grid=(n_mb, B * H),
        alpha_mode=alpha_mode(alpha),
        lists=torch.empty(n_mb * B * H * nk_chunk, device=q.device, dtype=torch.int32),
        nk_chunk=nk_chunk,
        flags=flags,
        tiles=dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=block_d, **dot_args(q.dtype)),
        sweep_block_m=sweep_block_m,
        sweep_launch=dict(num_warps=sweep_warps, num_stages=3 if block_d <= 128 else 2, **sweep_cap),
        sparse_launch=dict(num_warps=warps, num_stages=2),
        kv_tma=kv_tma,
        tma_launch=dict(maxnreg=TMA_MAXNREG) if kv_tma and block_d <= 64 and TMA_MAXNREG else {},
    )


# Read tiles through TMA where tma_plan allows. On the H100 at N = 16384, causal, alpha = 1.5, fwd / fwd+bwd went
# from 2.21 / 1.28, 1.63 / 0.73, 0.94 / 0.32, 0.67 / 0.21 to 2.14 / 1.20, 1.56 / 0.68, 0.91 / 0.31, 0.64 / 0.21 x FA2
# at D = 64 (dense, ~60%, ~90%, ~97% block sparse) and from 1.47 / 1.07, 1.29 / 0.68, 0.84 / 0.32, 0.55 / 0.20 to
# 1.39 / 1.01, 1.20 / 0.63, 0.78 / 0.31, 0.52 / 0.19 at D = 128 (benchmarks/results/*-c85477c-tma-n16k-tma.json
# against *-cbb482e-n16k-prev.json, one machine). False sends every tile through pointers (the tests compare both).
TMA_TILES = True
# Register cap of the kernels that stream tiles through TMA at 16-bit D <= 64 (the Newton and output passes, dK/dV
# and dQ): the descriptors free registers, so 168 per thread (three 4-warp programs per multiprocessor instead of
# two) spills little on sm_90 (alpha = 1.5: output 8-16, dK/dV 24-56 bytes per thread, 108 with a two-sided window;
# the general-alpha output kernel 204: scripts/compile_kernels.py), and on the H100 at N = 16384, D = 64 fwd /
# fwd+bwd went from 2.14 / 1.23, 1.60 / 0.67, 0.91 / 0.31, 0.65 / 0.20 to 1.97 / 1.13, 1.51 / 0.65, 0.88 / 0.29,
# 0.62 / 0.20 x FA2 causal and from 1.93 / 1.23, 1.58 / 0.72 to 1.80 / 1.12, 1.46 / 0.70 non-causal (dense, ~60%),
# the learnable alpha's fwd+bwd from 1.66 to 1.49 dense causal (*-c85477c-tma-n16k-d64-tma.json against
# *-c85477c-tma-r168-n16k-d64-tma-r168.json).
# 0 lifts the cap.
TMA_MAXNREG = 168
# Register caps of the 16-bit sweep (4 warps) by BLOCK_D, chosen to keep the programs per multiprocessor it had
# before the per-row references (kernels/sweep.py): four at D <= 64 (128 registers), three at D = 128 (168; its
# 66 KB of shared memory allows no more). With the references it compiled on sm_90 to 133 registers at D = 64,
# alpha = 1.5, bf16 (136 with a per-head alpha) and to 180 at D = 128 with seqlens; capped, no spills
# (scripts/compile_kernels.py). Not yet timed on the GPU. An empty dict lifts the caps.
SWEEP_MAXNREG = {16: 128, 32: 128, 64: 128, 128: 168}


def tma_plan(q, block_d: int, seqlens_k) -> bool:
    """Do the kernels read their streamed tiles through TMA descriptors (Hopper's tensor memory accelerator)? Asked
    for k and v by the forward stages (make_spec) and, with seqlens_q also absent, by the backward kernels.

    A descriptor load moves a whole (64, D) tile with one instruction and no per-element address or mask
    arithmetic, which the pointer loads spend about 30 instructions per tile and thread on (sm_90 SASS of the
    sweep's far-tile path, D = 64). It reads every row below N, so it is taken only without seqlens_k (whose keys
    past a row's length may hold anything); only for 16-bit inputs with D = block_d <= 128, the shapes the tiles
    were tuned on (float32 tiles read through TMA compiled to 32 registers and 11 KB of spills per thread on sm_90,
    D = 64, against 255 registers and 0.5 KB through pointers). On a GPU it needs compute capability 9.0;
    the interpreter runs it on the CPU (the tests), and a CPU host that plans for a GPU
    (scripts/compile_kernels.py) plans it as for sm_90. Each tensor must also suit TMA (tile_source)."""
    if not TMA_TILES or seqlens_k is not None or q.element_size() != 2 or q.shape[-1] != block_d or block_d > 128:
        return False
    if q.device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_capability(q.device) >= (9, 0)
    return True


def tile_source(t: torch.Tensor, spec: StageSpec):
    """What a forward kernel's K or V argument takes for t (B, Hkv, Nk, D): (tma_tiles' descriptor of (BLOCK_N,
    BLOCK_D) tiles, True) when the plan reads tiles through TMA (StageSpec.kv_tma) and t suits it, else (t, False):
    the kernels then load through pointers (common.head_rows)."""
    (source,), via_tma = tile_sources((t,), lambda u: plan_descriptor(u, spec))
    return source, via_tma


def plan_descriptor(t: torch.Tensor, spec: StageSpec):
    """The forward plan's descriptor of t's (BLOCK_N, BLOCK_D) tiles, made once per tensor and call (k serves three
    stages); None when the plan reads through pointers or TMA cannot describe t."""
    if not spec.kv_tma:
        return None
    block_n, block_d = spec.tiles["BLOCK_N"], spec.tiles["BLOCK_D"]
    key = (t.data_ptr(), t.shape, t.stride(), t.dtype, block_n, block_d)
    if key not in spec.descriptors:  # host time, ~0.02 ms per descriptor in cProfile
        spec.descriptors[key] = tma_tiles(t, block_n, block_d)
    return spec.descriptors[key]


def tile_sources(tensors, describe):
    """Kernel arguments for tensors that one kernel streams under one TMA constexpr: (their descriptors, True) when
    describe(t) gives one for every t, else (the tensors themselves, False), all read through pointers. describe
    returns None where the plan reads through pointers or TMA cannot describe t."""
    descriptors = tuple(describe(t) for t in tensors)
    if any(d is None for d in descriptors):
        return tuple(tensors), False
    return descriptors, True


def tma_tiles(t: torch.Tensor, block_rows: int, block_d: int):
    """A TensorDescriptor of t (B, H, N, D) reading (1, 1, block_rows, block_d) blocks, or None where TMA cannot
    describe t: a last dim that is not contiguous, or a base or another stride that is not a multiple of 16 bytes
    (a dim of size 1 is only ever read at index 0: its stride is replaced by that of a packed layout)."""
    shape, strides = list(t.shape), list(t.stride())
    packed = 1  # the stride of a dim in a packed layout of t's shape
    for dim in range(len(shape) - 1, -1, -1):
        if shape[dim] == 1:
            strides[dim] = packed
        packed *= shape[dim]
    bytes_per_element = t.element_size()
    if strides[-1] != 1 or t.data_ptr() % 16:
        return None
    for stride in strides[:-1]:
        if stride < 1 or stride * bytes_per_element % 16:
            return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, shape, strides, [1, 1, block_rows, block_d])
