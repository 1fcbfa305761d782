"""Command line: `python -m entflash demo` (also the `entflash` console script).

The demo builds attention inputs with realistic structure (random content, a shared positional code that makes
attention local, a few "sink" keys every query attends to), runs entmax attention (fused kernels on CUDA, the
exact torch backend elsewhere) and softmax SDPA, checks both against dense float64 materialized references,
and prints support sizes, 64 x 64 block sparsity, errors and timings. Exit code 1 when entmax's error check fails.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from entflash import api
from entflash.reference.rowwise import entmax_threshold

TILE = 64
SINK_KEYS = 4
# Max |error| vs the float64 reference that counts as correct, per compute dtype of the inputs.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_inputs(batch: int, heads: int, seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 seed: int, content: float = 0.5, locality: float = 0.8, width: float = 64.0,
                 sink_strength: float = 0.6):
    """q, k, v of shape (batch, heads, seq_len, head_dim) in `dtype` on `device`.

    q and k are `content` times unit-variance noise, plus `locality` times a shared positional code (random
    Fourier features: code_i . code_j / head_dim ~ exp(-(i - j)^2 / (2 width^2)), width in positions), so
    attention is local; the first SINK_KEYS keys and every query also carry `sink_strength` times one shared
    direction per head ("sink" keys). v is unit-variance noise.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    half = max(head_dim // 2, 1)
    frequencies = torch.randn(half, generator=generator, dtype=torch.float64) / width
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * frequencies[None, :]
    code = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)[:, :head_dim]
    code = F.pad(code, (0, head_dim - code.shape[-1])) * math.sqrt(head_dim / half)
    sink = torch.randn(heads, 1, head_dim, generator=generator, dtype=torch.float64)
    q = content * q + locality * code + sink_strength * sink
    k = content * k + locality * code
    k[:, :, :SINK_KEYS] += sink_strength * sink
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def dense_reference(q, k, v, alpha: float, causal: bool):
    """Materialized float64 attention probabilities: entmax (alpha) and softmax, each (B, H, N, N), with outputs.

    Returns a dict with "entmax_probs", "entmax_out", "softmax_out" (float64).
    """
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        num_queries, num_keys = scores.shape[-2:]
        hidden = torch.ones(num_queries, num_keys, dtype=torch.bool, device=scores.device).triu(num_keys
                                                                                                - num_queries + 1)
        scores = scores.masked_fill(hidden, -math.inf)
    tau = entmax_threshold(scores, alpha, dim=-1)
    probs = torch.clamp((alpha - 1) * scores - tau, min=0) ** (1 / (alpha - 1))
    return {"entmax_probs": probs, "entmax_out": probs @ v, "softmax_out": torch.softmax(scores, -1) @ v}


def block_sparsity(probs: torch.Tensor, causal: bool, tile: int = TILE) -> float:
    """1 - (tiles holding a non-zero) / (tiles holding a visible entry), tiles of tile x tile over (B, H, Nq, Nk)."""
    num_queries, num_keys = probs.shape[-2:]
    padded_q, padded_k = -(-num_queries // tile) * tile, -(-num_keys // tile) * tile
    nonzero = F.pad((probs > 0).to(torch.float32), (0, padded_k - num_keys, 0, padded_q - num_queries))
    visible = torch.ones(num_queries, num_keys, device=probs.device)
    if causal:
        visible = visible.tril(num_keys - num_queries)
    visible = F.pad(visible, (0, padded_k - num_keys, 0, padded_q - num_queries))

    def tiles(x):
        return x.unflatten(-2, (-1, tile)).unflatten(-1, (-1, tile)).amax(dim=(-3, -1)) > 0

    valid_tiles = tiles(visible).expand(tiles(nonzero).shape)
    return 1.0 - tiles(nonzero)[valid_tiles].double().mean().item()


def time_call(function: Callable[[], object], device: torch.device, min_runs: int = 1,
              budget_s: float = 1.0) -> float:
    """Median wall time of `function` in milliseconds after one untimed warm-up call (kernel compilation and
    autotuning on CUDA, first-call allocations everywhere): at least `min_runs` runs, more while under
    `budget_s` seconds in total, at most 50. CUDA is synchronized around each run."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    function()
    synchronize()
    runs, started = [], time.perf_counter()
    while len(runs) < min_runs or (time.perf_counter() - started < budget_s and len(runs) < 50):
        begin = time.perf_counter()
        function()
        synchronize()
        runs.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(runs)


def _forward_and_backward(attention: Callable, q, k, v) -> Callable[[], None]:
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)

    def run():
        out = attention(*inputs)
        torch.autograd.grad(out, inputs, grad_out)

    return run


def run_demo(args: argparse.Namespace) -> Dict[str, object]:
    """Run the demo for parsed `args`; returns the measurements (see format_table)."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = api.resolve_backend("auto", device, "entflash demo")
    q, k, v = build_inputs(args.batch, args.heads, args.seq_len, args.head_dim, dtype, device, args.seed)

    def entmax(q, k, v):
        return api.entmax_attention(q, k, v, alpha=args.alpha, causal=args.causal, backend=backend)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    with torch.no_grad():
        out, aux = api.entmax_attention(q, k, v, alpha=args.alpha, causal=args.causal, return_aux=True,
                                        backend=backend)
        softmax_out = sdpa(q, k, v)
    reference = dense_reference(q, k, v, args.alpha, args.causal)
    support = aux["support"].double()
    results = {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "backend": backend,
        "support_mean": support.mean().item(), "support_min": int(support.min()), "support_max": int(support.max()),
        "softmax_support_mean": (reference["entmax_probs"].shape[-1] + 1) / 2 if args.causal
        else float(reference["entmax_probs"].shape[-1]),
        "block_sparsity": block_sparsity(reference["entmax_probs"], args.causal),
        "entmax_error": (out.double() - reference["entmax_out"]).abs().max().item(),
        "softmax_error": (softmax_out.double() - reference["softmax_out"]).abs().max().item(),
        "tolerance": TOLERANCE[dtype],
    }
    with torch.no_grad():
        results["entmax_fwd_ms"] = time_call(lambda: entmax(q, k, v), device, budget_s=args.time_budget)
        results["sdpa_fwd_ms"] = time_call(lambda: sdpa(q, k, v), device, budget_s=args.time_budget)
    results["entmax_fwd_bwd_ms"] = time_call(_forward_and_backward(entmax, q, k, v), device,
                                             budget_s=args.time_budget)
    results["sdpa_fwd_bwd_ms"] = time_call(_forward_and_backward(sdpa, q, k, v), device,
                                           budget_s=args.time_budget)
    results["passed"] = results["entmax_error"] <= results["tolerance"]
    return results


def format_table(args: argparse.Namespace, results: Dict[str, object]) -> str:
    """The demo's printed report: a header line, a two-column table (entmax, softmax SDPA) and a verdict."""
    header = (f"entflash demo: B={args.batch} H={args.heads} N={args.seq_len} D={args.head_dim} alpha={args.alpha} "
              f"{'causal' if args.causal else 'non-causal'} | device={results['device']} dtype={results['dtype']} "
              f"entmax backend={results['backend']}")
    rows = [
        ("support per row (mean)", f"{results['support_mean']:.1f}", f"{results['softmax_support_mean']:.1f}"),
        ("support per row (min / max)", f"{results['support_min']} / {results['support_max']}", "dense"),
        (f"block sparsity ({TILE}x{TILE} tiles)", f"{results['block_sparsity']:.3f}", "0.000"),
        ("max |error| vs float64", f"{results['entmax_error']:.2e}", f"{results['softmax_error']:.2e}"),
        ("forward time (ms)", f"{results['entmax_fwd_ms']:.2f}", f"{results['sdpa_fwd_ms']:.2f}"),
        ("forward+backward time (ms)", f"{results['entmax_fwd_bwd_ms']:.2f}", f"{results['sdpa_fwd_bwd_ms']:.2f}"),
    ]
    width = max(len(name) for name, _, _ in rows) + 2
    lines = [header, f"{'':<{width}}{'entmax':>14}{'softmax SDPA':>16}"]
    lines += [f"{name:<{width}}{ours:>14}{theirs:>16}" for name, ours, theirs in rows]
    verdict = "PASS" if results["passed"] else "FAIL"
    lines.append(f"check: {verdict} (entmax max error {results['entmax_error']:.2e}, tolerance "
                 f"{results['tolerance']:.0e} for {results['dtype']})")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _alpha(text: str) -> float:
    value = float(text)
    if not 1.0 < value <= 2.0:
        raise argparse.ArgumentTypeError(f"must lie in (1, 2], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `entflash` argument parser (one command: demo)."""
    parser = argparse.ArgumentParser(prog="entflash", description="entflash: alpha-entmax sparse attention")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run entmax attention vs softmax SDPA on structured inputs")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="torch device (default: cuda if available, else cpu)")
    demo.add_argument("--seq-len", type=_positive_int, default=512, help="sequence length N (default 512)")
    demo.add_argument("--alpha", type=_alpha, default=1.5, help="entmax alpha in (1, 2] (default 1.5)")
    demo.add_argument("--heads", type=_positive_int, default=4, help="attention heads H (default 4)")
    demo.add_argument("--head-dim", type=_positive_int, default=64, help="head dimension D (default 64)")
    demo.add_argument("--batch", type=_positive_int, default=1, help="batch size B (default 1)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                      help="input dtype (default: bfloat16 on cuda, float32 elsewhere)")
    demo.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                      help="causal attention (default on)")
    demo.add_argument("--time-budget", type=float, default=1.0,
                      help="seconds spent repeating each timed call after its warm-up (default 1.0; one run at "
                           "least)")
    return parser


def main(argv=None) -> int:
    """Entry point of `python -m entflash` and the `entflash` script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available")
    results = run_demo(args)
    print(format_table(args, results))
    return 0 if results["passed"] else 1
