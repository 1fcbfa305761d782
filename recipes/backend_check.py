"""Before spending GPU time on training: does the fused ("triton") backend agree with the exact ("torch") one?

    python -m recipes.backend_check [--device cuda] [--tolerance 2e-3] [--case I | --count]

Runs entmax_attention with both backends on the same random causal problems, the way the recipe's models call
it (alpha = 1.5 as a float, and a learnable (H,) alpha tensor), and compares the outputs and the gradients of
q, k, v (and alpha). Prints one JSON line and exits 0 when every difference is within the tolerance, 1 when one
is not or the fused backend fails; the recipe's GPU script then trains on the torch backend. Before that line,
one JSON line per finished case (with its seconds, which include kernel compilation), so a run stopped by a
timeout still shows how far it got. `--case I` runs only case I (0 .. count - 1, `--count` prints the count), so
that the cases, each dominated by compiling its kernels, can run in parallel processes (recipes/run_gpu.sh).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Callable, Dict, Optional

import torch

# (batch, heads, length, head_dim): the training shape of the GPU config and an odd long evaluation length.
SHAPES = ((4, 4, 64, 32), (1, 4, 1100, 32))


def _attention_and_grads(q, k, v, alpha, backend: str):
    """out and the gradients of sum(out * weight) w.r.t. q, k, v (and alpha when it is a tensor)."""
    from entflash.api import entmax_attention

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    alpha_leaf = alpha.detach().clone().requires_grad_(True) if isinstance(alpha, torch.Tensor) else alpha
    out = entmax_attention(*leaves, alpha=alpha_leaf, causal=True, backend=backend)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    inputs = leaves + ([alpha_leaf] if isinstance(alpha, torch.Tensor) else [])
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    return [out.detach()] + list(grads)


ALPHA_KINDS = ("float", "tensor")
CASE_COUNT = len(SHAPES) * len(ALPHA_KINDS)


def compare(device: torch.device, tolerance: float, on_case: Optional[Callable[[Dict], None]] = None,
            only_case: Optional[int] = None) -> Dict:
    """Max absolute difference triton vs torch for each shape and alpha kind; "ok" when all are within
    `tolerance` (relative to the largest magnitude of the torch result). on_case(case) after each case.
    only_case: run only that case (index over shapes x alpha kinds); the inputs are the same as in a full run."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    report = {"device": str(device), "tolerance": tolerance, "cases": [], "ok": True}
    for shape_index, (batch, heads, length, head_dim) in enumerate(SHAPES):
        q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(device) for _ in range(3))
        for kind_index, kind in enumerate(ALPHA_KINDS):
            if only_case is not None and only_case != shape_index * len(ALPHA_KINDS) + kind_index:
                continue
            alpha = 1.5 if kind == "float" else torch.tensor([1.3, 1.5, 1.7, 2.0], device=device)[:heads]
            start = time.perf_counter()
            fused = _attention_and_grads(q, k, v, alpha, "triton")
            exact = _attention_and_grads(q, k, v, alpha, "torch")
            names = ["out", "dq", "dk", "dv", "dalpha"][:len(exact)]
            errors = {name: ((f - e).abs().max() / e.abs().max().clamp(min=1e-6)).item()
                      for name, f, e in zip(names, fused, exact)}
            case_ok = all(error <= tolerance for error in errors.values())
            report["cases"].append({"shape": [batch, heads, length, head_dim],
                                    "alpha": "float 1.5" if isinstance(alpha, float) else "tensor (H,)",
                                    "relative_max_error": errors, "ok": case_ok,
                                    "seconds": time.perf_counter() - start})
            report["ok"] = report["ok"] and case_ok
            if on_case is not None:
                on_case(report["cases"][-1])
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.backend_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tolerance", type=float, default=2e-3)
    parser.add_argument("--case", type=int, help=f"run only this case, 0 .. {CASE_COUNT - 1}")
    parser.add_argument("--count", action="store_true", help="print the number of cases and exit")
    args = parser.parse_args(argv)
    if args.count:
        print(CASE_COUNT)
        return 0
    if args.case is not None and not 0 <= args.case < CASE_COUNT:
        parser.error(f"--case must lie in 0 .. {CASE_COUNT - 1}, got {args.case}")
    print(json.dumps({"start": time.strftime("%H:%M:%S"), "torch": torch.__version__}), flush=True)
    try:
        report = compare(torch.device(args.device), args.tolerance,
                         on_case=lambda case: print(json.dumps(case), flush=True), only_case=args.case)
    except Exception as error:  # any failure of the fused path means: train on the exact backend
        report = {"device": args.device, "ok": False, "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(limit=4)}
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
