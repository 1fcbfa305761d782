"""Benchmark row-wise entmax and the entmax loss: `python benchmarks/rowwise.py [--cpu] [--out DIR]`.

For each case (rows x cols, dtype) it times, on the same tensors, forward and forward+backward of:
  ours          entflash.kernels.rowwise.fused_entmax (alpha = 1.5 fast path; also alpha = 1.25 general)
  bisect        entmax.entmax_bisect (the `entmax` package, alpha = 1.5 and 1.25)
  entmax15      entmax.entmax15 (sort-based, alpha = 1.5)
  adasplash     adasplash.triton_entmax (alpha = 1.5, histogram start, 2 iterations, its defaults;
                autotuned over 2 of its 15 configs, ADASPLASH_CONFIGS, to keep compile time in budget)
  softmax       torch.softmax (the speed of light for a row-wise normalizer)
and the losses: ours_loss (fused_entmax_loss, alpha = 1.5) and ours_loss_api (the public entflash.entmax_loss,
its argument checks and reshapes included; on CPU tensors it runs the exact PyTorch loss) against F.cross_entropy.
A missing package or a failing implementation is recorded as an error; the run goes on.

On a machine without git metadata, set ENTFLASH_COMMIT=<short hash>.
Writes benchmarks/results/rowwise-<device>-<yyyymmdd>-<commit>.json (device, torch, triton, commit, date,
records: one per (op, impl, alpha, dtype, rows, cols) with the median ms from triton.testing.do_bench,
fwd_ms and fwd_bwd_ms, and on CUDA fwd_bwd_host_ms, the host time to enqueue one fwd+bwd) and prints a
markdown table, naming the cases whose fwd+bwd is bound by host time. --cpu runs tiny shapes through the Triton
interpreter (checks the harness; its times mean nothing). --budget-s stops starting new cases once spent.
--table JSON prints the table of a saved run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"

GPU_CASES = [(32768, 1024), (2048, 32768), (512, 131072)]
CPU_CASES = [(4, 64), (2, 3000)]
ENTMAX_IMPLS = ["ours", "bisect", "entmax15", "adasplash", "softmax", "ours_a1.25", "bisect_a1.25"]
LOSS_IMPLS = ["ours_loss", "ours_loss_api", "cross_entropy"]
ADASPLASH_CONFIGS = {(256, 4), (512, 8)}  # (BLOCK_N, num_warps) kept from adasplash's autotune list


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes through the Triton interpreter")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no new case after this")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--sweep", action="store_true", help="also time a few tile configs of ours")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a saved run and exit")
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.cpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import entflash  # noqa: E402
from entflash.kernels import rowwise as kr  # noqa: E402


def commit() -> str:
    """ENTFLASH_COMMIT if set (device copies carry no git metadata), else the checkout's short commit,
    '+dirty' when tracked files differ, else 'unknown'."""
    if os.environ.get("ENTFLASH_COMMIT"):
        return os.environ["ENTFLASH_COMMIT"]
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_ms(fn, device) -> float:
    """Median milliseconds of fn: do_bench on CUDA, a few wall-clock calls on CPU."""
    if device == "cuda":
        return float(triton.testing.do_bench(fn, warmup=ARGS.warmup_ms, rep=ARGS.rep_ms,
                                             return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def host_ms(fn, device, calls: int = 20) -> Optional[float]:
    """Milliseconds of host time per call to enqueue `calls` back-to-back calls (CUDA only, else None).
    When this reaches the timed median, the case is bound by Python, autograd and launches rather than
    by the GPU, and its figures move with the machine's CPU."""
    if device != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def entmax_impl(name):
    """(alpha, f(x) -> p) for an implementation name; imports lazily so a missing package is one error."""
    if name.startswith("ours"):
        alpha = 1.25 if name.endswith("1.25") else 1.5
        return alpha, lambda x: kr.fused_entmax(x, alpha, -1)
    if name.startswith("bisect"):
        from entmax import entmax_bisect
        alpha = 1.25 if name.endswith("1.25") else 1.5
        return alpha, lambda x: entmax_bisect(x, alpha, -1)
    if name == "entmax15":
        from entmax import entmax15
        return 1.5, lambda x: entmax15(x, -1)
    if name == "adasplash":
        import adasplash.triton_entmax_v2 as ada
        from adasplash import triton_entmax
        for kernel in (ada._fwd_entmax, ada._bwd_entmax):  # autotune over 2 of its 15 configs (device budget)
            if hasattr(kernel, "configs"):
                kernel.configs = [c for c in kernel.configs
                                  if (c.kwargs["BLOCK_N"], c.num_warps) in ADASPLASH_CONFIGS] or kernel.configs
        return 1.5, lambda x: triton_entmax(x, alpha=1.5)
    if name == "softmax":
        return None, lambda x: torch.softmax(x, -1)
    raise KeyError(name)


def time_entmax(name, x, record):
    alpha, f = entmax_impl(name)
    record["alpha"] = alpha
    xg = x.detach().clone().requires_grad_(True)
    g = torch.randn_like(x)
    with torch.no_grad():
        record["fwd_ms"] = median_ms(lambda: f(x), x.device.type)

    def fwd_bwd():
        xg.grad = None
        f(xg).backward(g)

    record["fwd_bwd_ms"] = median_ms(fwd_bwd, x.device.type)
    record["fwd_bwd_host_ms"] = host_ms(fwd_bwd, x.device.type)


def time_loss(name, x, target, record):
    if name == "ours_loss":
        record["alpha"] = 1.5
        f = lambda z: kr.fused_entmax_loss(z, target, 1.5)  # noqa: E731
    elif name == "ours_loss_api":
        record["alpha"] = 1.5
        f = lambda z: entflash.entmax_loss(z, target, 1.5)  # noqa: E731
    else:
        record["alpha"] = None
        f = lambda z: F.cross_entropy(z, target)  # noqa: E731
    xg = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        record["fwd_ms"] = median_ms(lambda: f(x), x.device.type)

    def fwd_bwd():
        xg.grad = None
        f(xg).backward()

    record["fwd_bwd_ms"] = median_ms(fwd_bwd, x.device.type)
    record["fwd_bwd_host_ms"] = host_ms(fwd_bwd, x.device.type)


def sweep_records(x, device):
    """Forward times of ours (alpha 1.5) under a few tile configs: which default to keep."""
    n = x.shape[1]
    configs = [(None, None)]
    if n > 8192:
        configs += [(4096, 8), (8192, 8), (16384, 16)]
    out = []
    for block_n, warps in configs:
        rec = {"op": "sweep", "impl": "ours", "block_n": block_n, "num_warps": warps,
               "dtype": str(x.dtype).replace("torch.", ""), "rows": x.shape[0], "cols": n}
        try:
            rec["fwd_ms"] = median_ms(lambda: kr.entmax_rows_forward(x, 1.5, block_n=block_n,
                                                                      num_warps=warps), device)
        except Exception as err:  # noqa: BLE001 - record and go on
            rec["error"] = f"{type(err).__name__}: {err}"[:300]
        out.append(rec)
    return out


def _ratio(rs, num, den, key) -> float:
    """rs[num][key] / rs[den][key], NaN where either is missing."""
    a, b = rs.get(num, {}).get(key), rs.get(den, {}).get(key)
    return a / b if a is not None and b else float("nan")


def markdown(records) -> str:
    """One row per (op, cols, dtype): each implementation's fwd / fwd+bwd ms and ours' speedups."""
    keys = sorted({(r["op"], r["rows"], r["cols"], r["dtype"]) for r in records if r["op"] != "sweep"})
    lines = []
    for op, impls, base in (("entmax", ENTMAX_IMPLS, "softmax"), ("loss", LOSS_IMPLS, "cross_entropy")):
        lines.append(f"\n### {op}: median ms, forward / forward+backward\n")
        head = "| rows x cols | dtype | " + " | ".join(impls) + f" | ours / {base} (f+b) |"
        lines += [head, "|" + "---|" * (len(impls) + 3)]
        for k in keys:
            if k[0] != op:
                continue
            rs = {r["impl"]: r for r in records if (r["op"], r["rows"], r["cols"], r["dtype"]) == k}
            cells = []
            for i in impls:
                r = rs.get(i, {})
                cells.append(" / ".join(f"{r[m]:.3f}" if m in r else ("err" if "error" in r else "-")
                                        for m in ("fwd_ms", "fwd_bwd_ms")))
            ratio = _ratio(rs, "ours" if op == "entmax" else "ours_loss", base, "fwd_bwd_ms")
            lines.append(f"| {k[1]} x {k[2]} | {k[3]} | " + " | ".join(cells) + f" | {ratio:.2f} |")
        if op == "entmax":
            lines += ["\nspeedup of ours (others' ms / ours' ms), forward / forward+backward:\n",
                      "| rows x cols | dtype | bisect | entmax15 | adasplash | bisect (alpha 1.25) |",
                      "|---|---|---|---|---|---|"]
            for k in keys:
                if k[0] != op:
                    continue
                rs = {r["impl"]: r for r in records if (r["op"], r["rows"], r["cols"], r["dtype"]) == k}
                cells = [f"{_ratio(rs, other, mine, 'fwd_ms'):.1f} / {_ratio(rs, other, mine, 'fwd_bwd_ms'):.1f}"
                         for other, mine in (("bisect", "ours"), ("entmax15", "ours"), ("adasplash", "ours"),
                                             ("bisect_a1.25", "ours_a1.25"))]
                lines.append(f"| {k[1]} x {k[2]} | {k[3]} | " + " | ".join(cells) + " |")
    bound = [r for r in records if r.get("fwd_bwd_host_ms") and r.get("fwd_bwd_ms")
             and r["fwd_bwd_host_ms"] >= 0.8 * r["fwd_bwd_ms"]]
    if bound:
        lines += ["\nfwd+bwd bound by host time (enqueueing a call takes >= 80% of its timed median, so the figure "
                  "moves with the CPU): " + ", ".join(f"{r['impl']} {r['rows']} x {r['cols']} {r['dtype']} "
                                                     f"({r['fwd_bwd_host_ms']:.3f} of {r['fwd_bwd_ms']:.3f} ms)"
                                                     for r in bound)]
    sweeps = [r for r in records if r["op"] == "sweep"]
    if sweeps:
        lines += ["\n### ours forward under tile configs (block_n, num_warps; None = default)\n",
                  "| rows x cols | dtype | config | fwd ms |", "|---|---|---|---|"]
        lines += [f"| {r['rows']} x {r['cols']} | {r['dtype']} | {r['block_n']}, {r['num_warps']} | "
                  f"{r.get('fwd_ms', float('nan')):.3f} |" for r in sweeps]
    return "\n".join(lines)


def main():
    if ARGS.table:
        print(markdown(json.loads(Path(ARGS.table).read_text())["records"]))
        return
    device = "cpu" if ARGS.cpu else "cuda"
    dev_name = "cpu" if ARGS.cpu else torch.cuda.get_device_name().replace(" ", "_")
    now = datetime.datetime.now(datetime.timezone.utc)
    doc = {"device": dev_name, "torch": torch.__version__, "triton": triton.__version__,
           "commit": commit(), "date": now.isoformat(timespec="seconds"),
           "settings": {"warmup_ms": ARGS.warmup_ms, "rep_ms": ARGS.rep_ms, "timer": "do_bench median"},
           "records": []}
    out_dir = Path(ARGS.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"rowwise-{dev_name}-{now:%Y%m%d}-{doc['commit'].replace('+', '-')}"
    path = out_dir / f"{stem}.json"
    start = time.time()
    cases = CPU_CASES if ARGS.cpu else GPU_CASES
    gen = torch.Generator(device=device).manual_seed(0)
    for rows, cols in cases:
        for dtype in (torch.bfloat16, torch.float32):
            if time.time() - start > ARGS.budget_s:
                print(f"budget spent: skipping {rows}x{cols} {dtype}", flush=True)
                continue
            x = (torch.randn(rows, cols, device=device, generator=gen) * 2).to(dtype)
            target = torch.randint(0, cols, (rows,), device=device, generator=gen)
            base = {"rows": rows, "cols": cols, "dtype": str(dtype).replace("torch.", "")}
            jobs = [("entmax", i) for i in ENTMAX_IMPLS] + [("loss", i) for i in LOSS_IMPLS]
            for op, impl in jobs:
                rec = dict(base, op=op, impl=impl)
                try:
                    if op == "entmax":
                        time_entmax(impl, x, rec)
                    else:
                        time_loss(impl, x, target, rec)
                except Exception as err:  # noqa: BLE001 - one failing implementation must not stop the run
                    rec["error"] = f"{type(err).__name__}: {err}"[:300]
                doc["records"].append(rec)
                print(json.dumps(rec), flush=True)
            if ARGS.sweep:
                doc["records"] += sweep_records(x, device)
            path.write_text(json.dumps(doc, indent=1))
            del x, target
            if device == "cuda":
                torch.cuda.empty_cache()
    path.write_text(json.dumps(doc, indent=1))
    print(markdown(doc["records"]))
    print(f"\nwrote {path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
