"""Benchmark entmax attention against FlashAttention-2, cuDNN, adasplash, dense entmax: python -m benchmarks.attention

For each case (N, D, causal, sparsity level) it builds structured inputs (benchmarks.inputs), measures their
exact block sparsity (benchmarks.sparsity), then runs every selected implementation (benchmarks.impls) on the
same tensors, forward and forward+backward, recording median times, the ratio to FA2, peak memory and
first-call time; for `ours` also how its tau solver did on the inputs (benchmarks.solver). A failing
implementation records its error and the run goes on. The JSON is rewritten after every case, so an interrupted
run keeps what it measured. Plots and a markdown table come at the end.

Presets (shapes as FlashAttention's benchmark: B = tokens // N, H = hidden // D):
  --quick  N = 4096, D in {64, 128}, causal, dense and ~90% block sparsity (well under a minute on an H100)
  --paper  N in {1k..32k}, D in {64, 128}, causal and not, 4 levels (0, 0.6, 0.9, 0.97 targets)
Neither preset runs `adasplash` unless named in --impls. Its AdaSplash-2 kernels autotune 60 configurations
per (N, D), ~90 s each time on an H100; the harness keeps 14 of them unless --adasplash-autotune full
(benchmarks.impls; README.md has the companion runs).
  --cpu    tiny shapes through ours' torch backend, float32, on the CPU (checks the harness, times mean little)
"""
from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import impls as impls_module, report
from benchmarks.impls import Case, Implementation, all_implementations
from benchmarks.inputs import AttentionInputs, calibrated_inputs
from benchmarks.measure import BenchSettings, first_call, host_queue_ms, median_ms, peak_memory_gib
from benchmarks.solver import solver_stats
from benchmarks.sparsity import DEFAULT_TILES, block_sparsity, tile_name

GPU_IMPLS = ("fa2", "cudnn", "ours", "ours_learned_alpha", "entmax_bisect")
QUICK_IMPLS = ("fa2", "cudnn", "ours", "ours_learned_alpha")
CPU_IMPLS = ("sdpa_math", "ours", "ours_learned_alpha", "entmax_bisect")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Preset:
    """What one preset runs: shapes, levels (target block sparsity), implementations and timing budgets."""

    lengths: Tuple[int, ...]
    head_dims: Tuple[int, ...]
    causal: Tuple[bool, ...]
    levels: Tuple[float, ...]
    impls: Tuple[str, ...]
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    backend: str = "triton"
    tokens: int = 16384
    hidden: int = 2048
    settings: BenchSettings = field(default_factory=BenchSettings)
    max_len: Dict[str, int] = field(default_factory=dict)  # implementation -> longest N it is run at
    dense_level_only: Tuple[str, ...] = ()  # implementations whose cost ignores sparsity: run at level 0 only
    budget_s: Optional[float] = None  # start no new case after this many seconds (fits one 10-minute call)

    def shape(self, seq_len: int, head_dim: int) -> Tuple[int, int]:
        """(batch, heads) of a case: B = tokens // N and H = hidden // D, at least 1 each."""
        return max(1, self.tokens // seq_len), max(1, self.hidden // head_dim)


PRESETS = {
    "quick": Preset(lengths=(4096,), head_dims=(64, 128), causal=(True,), levels=(0.0, 0.9),
                    impls=QUICK_IMPLS, settings=BenchSettings(warmup_ms=10, rep_ms=50)),
    "paper": Preset(lengths=(1024, 2048, 4096, 8192, 16384, 32768), head_dims=(64, 128), causal=(True, False),
                    levels=(0.0, 0.6, 0.9, 0.97), impls=GPU_IMPLS,
                    settings=BenchSettings(warmup_ms=5, rep_ms=20),
                    max_len={"entmax_bisect": 1024}, dense_level_only=("entmax_bisect",), budget_s=480),
    "cpu": Preset(lengths=(256,), head_dims=(16,), causal=(True, False), levels=(0.0, 0.9), impls=CPU_IMPLS,
                  device="cpu", dtype=torch.float32, backend="torch", tokens=256, hidden=32,
                  settings=BenchSettings(cpu_reps=2)),
}


def _describe(error: BaseException) -> str:
    """'Type: first line ... last line' of an exception (Triton puts the cause on the last line)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    return f"{type(error).__name__}: {text[:500]}"


def _callables(impl: Implementation, case: Case, inputs: AttentionInputs):
    """(mode -> zero-argument callable, grads to reset) for the forward (no grad) and forward+backward."""
    q_fwd, k_fwd, v_fwd = (t.detach() for t in (inputs.q, inputs.k, inputs.v))
    q, k, v = (t.detach().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))

    def forward():
        with torch.no_grad():
            return impl.attend(q_fwd, k_fwd, v_fwd, case)

    def forward_backward():
        impl.attend(q, k, v, case).backward(inputs.dout)

    return {"fwd": forward, "fwd_bwd": forward_backward}, [q, k, v]


def _preset_skip_reason(name: str, case: Case, preset: Preset) -> Optional[str]:
    """Why the preset leaves implementation `name` out of this case (its N limit, dense-only), or None."""
    limit = preset.max_len.get(name)
    if limit is not None and case.seq_len > limit:
        return f"skipped: preset runs {name} up to N={limit}"
    if name in preset.dense_level_only and case.target_sparsity > 0:
        return f"skipped: preset runs {name} on dense inputs only (its cost ignores sparsity)"
    return None


def run_implementation(impl: Implementation, case: Case, inputs: AttentionInputs, sparsity: Dict[str, float],
                       preset: Preset) -> dict:
    """Time one implementation on one case, both modes; failures and skips become strings in the record."""
    record = {
        "impl": impl.name, "N": case.seq_len, "D": case.head_dim, "H": case.heads, "B": case.batch,
        "causal": case.causal, "alpha": case.alpha, "dtype": str(case.dtype).replace("torch.", ""),
        "target_sparsity": case.target_sparsity, "strength": case.strength,
        "block_sparsity": next(iter(sparsity.values())),
        "block_sparsity_tiles": sparsity,
        "fwd_ms": None, "fwd_bwd_ms": None, "ratio_fwd_to_fa2": None, "ratio_fwd_bwd_to_fa2": None,
        "peak_mem_gib": None, "peak_mem_fwd_gib": None, "compile_s": None, "compile_fwd_bwd_s": None,
        "host_fwd_ms": None, "host_fwd_bwd_ms": None,
        "variant": impl.variant(case),
        "skipped": None, "error": None,
    }
    skipped, errors = [], []
    try:
        impl.setup(case)
        calls, grads = _callables(impl, case, inputs)
    except Exception as error:  # noqa: BLE001 - any failure is recorded, the run goes on
        record["error"] = f"setup: {_describe(error)}"
        return record
    grads = grads + impl.extra_grad_tensors()
    for mode, time_field, memory_field, compile_field, host_field in (
            ("fwd", "fwd_ms", "peak_mem_fwd_gib", "compile_s", "host_fwd_ms"),
            ("fwd_bwd", "fwd_bwd_ms", "peak_mem_gib", "compile_fwd_bwd_s", "host_fwd_bwd_ms")):
        reason = impl.skip_reason(case, mode) or _preset_skip_reason(impl.name, case, preset)
        if reason:
            skipped.append(f"{mode}: {reason}")
            continue
        try:
            for tensor in grads:
                tensor.grad = None
            record[compile_field] = first_call(calls[mode], case.device)
            record[memory_field] = peak_memory_gib(calls[mode], case.device)
            record[time_field] = median_ms(calls[mode], case.device, preset.settings, grad_to_none=grads)
            record[host_field] = host_queue_ms(calls[mode], case.device)
        except Exception as error:  # noqa: BLE001 - any failure is recorded, the run goes on
            errors.append(f"{mode}: {_describe(error)}")
        finally:
            for tensor in grads:
                tensor.grad = None
            if case.device.startswith("cuda"):
                torch.cuda.empty_cache()
    if record["peak_mem_gib"] is None:
        record["peak_mem_gib"] = record["peak_mem_fwd_gib"]
    record["skipped"] = "; ".join(skipped) or None
    record["error"] = "; ".join(errors) or None
    return record


def _solver_record(inputs: AttentionInputs, case: Case) -> Optional[dict]:
    """benchmarks.solver's statistics of the fused forward on this case (None where Triton cannot run); a
    failure is recorded as {"error": ...}, the run goes on."""
    try:
        return solver_stats(inputs.q, inputs.k, inputs.v, case.alpha, case.causal, case.scale)
    except Exception as error:  # noqa: BLE001 - any failure is recorded, the run goes on
        return {"error": _describe(error)}


def run_case(seq_len: int, head_dim: int, causal: bool, level: float, preset: Preset, impls: Sequence[str],
             alpha: float, tiles, sinks: int, seed: int) -> List[dict]:
    """Calibrate, build and measure the inputs of one case, then run every implementation on them."""
    batch, heads = preset.shape(seq_len, head_dim)
    started = time.perf_counter()
    inputs, strength = calibrated_inputs(batch, heads, seq_len, head_dim, level, causal=causal, dtype=preset.dtype,
                                         device=preset.device, alpha=alpha, tile=tiles[0], sinks=sinks, seed=seed)
    sparsity = block_sparsity(inputs.q, inputs.k, alpha=alpha, causal=causal, tiles=tiles)
    setup_s = time.perf_counter() - started
    case = Case(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, causal=causal, alpha=alpha,
                target_sparsity=level, strength=strength, device=preset.device, dtype=preset.dtype,
                backend=preset.backend)
    catalog = all_implementations()
    records = [run_implementation(catalog[name], case, inputs, sparsity, preset) for name in impls]
    # after the timings: its kernels would otherwise be compiled before ours' first call, hiding compile_s
    solver = _solver_record(inputs, case) if "ours" in impls else None
    for record in records:
        record["case_setup_s"] = setup_s
        if record["impl"] == "ours":
            record["solver"] = solver
    del inputs
    gc.collect()
    return records


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="preset", action="store_const", const="quick", help="one N (default)")
    which.add_argument("--paper", dest="preset", action="store_const", const="paper", help="the full sweep")
    which.add_argument("--cpu", dest="preset", action="store_const", const="cpu", help="tiny shapes, CPU")
    parser.add_argument("--impls", nargs="+", choices=sorted(all_implementations()), help="implementations")
    parser.add_argument("--n", nargs="+", type=int, help="sequence lengths N")
    parser.add_argument("--d", nargs="+", type=int, help="head dims D")
    parser.add_argument("--causal", choices=("yes", "no", "both"), help="causal, non-causal or both")
    parser.add_argument("--levels", nargs="+", type=float, help="target block sparsities (0 = dense inputs)")
    parser.add_argument("--alpha", type=float, default=1.5, help="entmax alpha (default 1.5)")
    parser.add_argument("--tiles", nargs="+", default=[tile_name(t) for t in DEFAULT_TILES],
                        help="tile sizes RxC for the measured block sparsity; the first one is calibrated")
    parser.add_argument("--sinks", type=int, default=0, help="number of sink keys in structured inputs")
    parser.add_argument("--backend", help="entflash backend for ours (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--warmup-ms", type=float, help="do_bench warmup budget (ms)")
    parser.add_argument("--rep-ms", type=float, help="do_bench repetition budget (ms)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and PNG files")
    parser.add_argument("--budget-s", type=float,
                        help="start no new case after this many seconds (default: the preset's; 0 = no limit)")
    parser.add_argument("--tag", default="", help="suffix of the file names (to keep split runs apart)")
    parser.add_argument("--adasplash-autotune", choices=("short", "full"), default=impls_module.ADASPLASH_AUTOTUNE,
                        help="adasplash v2's autotune list: a short one (benchmarks.impls) or its own full one")
    parser.set_defaults(preset="quick")
    return parser.parse_args(argv)


def _configured_preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    changes = {}
    if args.n:
        changes["lengths"] = tuple(args.n)
    if args.d:
        changes["head_dims"] = tuple(args.d)
    if args.causal:
        changes["causal"] = {"yes": (True,), "no": (False,), "both": (True, False)}[args.causal]
    if args.levels:
        changes["levels"] = tuple(args.levels)
    if args.impls:
        changes["impls"] = tuple(args.impls)
    if args.backend:
        changes["backend"] = args.backend
    if args.budget_s is not None:
        changes["budget_s"] = args.budget_s or None
    if args.warmup_ms is not None or args.rep_ms is not None:
        changes["settings"] = replace(preset.settings, **{k: v for k, v in (("warmup_ms", args.warmup_ms),
                                                                            ("rep_ms", args.rep_ms)) if v})
    preset = replace(preset, **changes)
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset!r} needs a CUDA device; use --cpu on a machine without one")
    return preset


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the selected preset, write JSON and PNGs, print the table; returns the JSON document."""
    args = parse_args(argv)
    preset = _configured_preset(args)
    impls_module.ADASPLASH_AUTOTUNE = args.adasplash_autotune
    if preset.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only contend with whatever else runs (CI's workers)
    tiles = tuple(tuple(int(x) for x in t.lower().split("x")) for t in args.tiles)
    baseline = "fa2" if preset.device == "cuda" else "sdpa_math"
    impls = list(dict.fromkeys([baseline] + list(preset.impls))) if baseline in preset.impls else list(preset.impls)
    settings = {"preset": args.preset, "lengths": preset.lengths, "head_dims": preset.head_dims,
                "causal": preset.causal, "levels": preset.levels, "impls": impls, "tokens": preset.tokens,
                "hidden": preset.hidden, "tiles": [tile_name(t) for t in tiles], "sinks": args.sinks,
                "backend": preset.backend, "warmup_ms": preset.settings.warmup_ms,
                "rep_ms": preset.settings.rep_ms, "max_len": preset.max_len,
                "dense_level_only": preset.dense_level_only, "budget_s": preset.budget_s, "seed": args.seed,
                "adasplash_autotune": args.adasplash_autotune}
    document = report.new_document(preset.device, args.preset, baseline, settings)
    if args.tag:
        document["commit"] = f"{document['commit']}-{args.tag}"
    started = time.perf_counter()
    json_path = None
    cases = list(itertools.product(preset.lengths, preset.head_dims, preset.causal, preset.levels))
    document["not_run"] = []
    for index, (seq_len, head_dim, causal, level) in enumerate(cases):
        elapsed = time.perf_counter() - started
        if preset.budget_s is not None and elapsed > preset.budget_s:
            document["not_run"] = [dict(N=c[0], D=c[1], causal=c[2], target_sparsity=c[3]) for c in cases[index:]]
            print(f"time budget of {preset.budget_s:.0f}s spent: {len(cases) - index} cases not run (see "
                  f"'not_run'; rerun them with --n/--d/--causal/--levels and --tag)", flush=True)
            break
        records = run_case(seq_len, head_dim, causal, level, preset, impls, args.alpha, tiles, args.sinks,
                           args.seed)
        report.add_ratios(records, baseline)
        document["records"].extend(records)
        json_path = report.write_json(document, args.out)
        print(f"[{time.perf_counter() - started:7.1f}s] N={seq_len} D={head_dim} causal={causal} target={level} "
              f"sparsity={records[0]['block_sparsity_tiles']} setup={records[0]['case_setup_s']:.1f}s", flush=True)
        for record in records:
            print(f"    {record['impl']:<20} fwd={record['fwd_ms']} fwd_bwd={record['fwd_bwd_ms']} "
                  f"compile={record['compile_s']} error={record['error']}", flush=True)
    json_path = report.write_json(document, args.out)
    plots = report.plot_files(document, args.out)
    print(f"\nresults: {json_path}")
    for path in plots:
        print(f"plot:    {path}")
    print(f"total:   {time.perf_counter() - started:.1f}s\n")
    print(report.markdown_table(document, impls))
    return document


if __name__ == "__main__":
    main(sys.argv[1:])
