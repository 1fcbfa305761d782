"""The speed targets of the forward and backward issues, checked against harness results.

    python -m benchmarks.targets benchmarks/results/<run>-a.json benchmarks/results/<run>-b.json

Merges the records of the given JSON files (one run split into parts) and, for each target, takes the cases
it is stated for (bf16, N in TARGET_LENGTHS, D in {64, 128}, causal and non-causal, a block-sparsity band
measured at 64x64), then prints how many meet it and the range of the measured ratio. Ratios are time over
FA2's time in the same case (`ratio_fwd_to_fa2`, `ratio_fwd_bwd_to_fa2`); the learnable-alpha target compares
`ours_learned_alpha` with `ours` in the same case; the adasplash target, where adasplash ran, compares ours
with it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TARGET_LENGTHS = (4096, 16384, 32768)
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class Target:
    """One stated target: `ratio(case)` must be <= `limit` on the cases whose sparsity lies in `band`."""

    issue: str
    text: str
    band: Tuple[float, float]
    limit: float
    ratio: Callable[[Dict[str, dict]], Optional[float]]


def _to_fa2(mode: str) -> Callable[[Dict[str, dict]], Optional[float]]:
    return lambda case: case.get("ours", {}).get(f"ratio_{mode}_to_fa2")


def _learned_over_fixed(case: Dict[str, dict]) -> Optional[float]:
    learned, fixed = case.get("ours_learned_alpha", {}), case.get("ours", {})
    if learned.get("fwd_bwd_ms") and fixed.get("fwd_bwd_ms"):
        return learned["fwd_bwd_ms"] / fixed["fwd_bwd_ms"]
    return None


def _over_adasplash(mode: str) -> Callable[[Dict[str, dict]], Optional[float]]:
    def ratio(case):
        ours, theirs = case.get("ours", {}).get(f"{mode}_ms"), case.get("adasplash", {}).get(f"{mode}_ms")
        return ours / theirs if ours and theirs else None
    return ratio


TARGETS = (
    Target("forward", "forward at >= 95% block sparsity <= 0.7x FA2", (0.95, 1.0), 0.7, _to_fa2("fwd")),
    Target("forward", "forward on dense attention <= 1.8x FA2", (0.0, 0.05), 1.8, _to_fa2("fwd")),
    Target("forward", "forward faster than adasplash", (0.0, 1.0), 1.0, _over_adasplash("fwd")),
    Target("backward", "fwd+bwd at >= 95% block sparsity <= 0.30x FA2", (0.95, 1.0), 0.30, _to_fa2("fwd_bwd")),
    Target("backward", "fwd+bwd at 55-75% block sparsity <= 0.60x FA2", (0.55, 0.75), 0.60, _to_fa2("fwd_bwd")),
    Target("backward", "fwd+bwd on dense attention <= 1.10x FA2", (0.0, 0.05), 1.10, _to_fa2("fwd_bwd")),
    Target("backward", "learnable alpha fwd+bwd within 10% of fixed alpha", (0.0, 1.0), 1.10, _learned_over_fixed),
    Target("backward", "fwd+bwd faster than adasplash", (0.0, 1.0), 1.0, _over_adasplash("fwd_bwd")),
)


def group_cases(records: Sequence[dict]) -> List[Tuple[dict, Dict[str, dict]]]:
    """Records grouped by case: [(the case's keys and its measured sparsity, {impl: record})]."""
    cases: Dict[tuple, Dict[str, dict]] = {}
    for record in records:
        key = (record["N"], record["D"], record["H"], record["B"], record["causal"], record["alpha"],
               record.get("dtype"), record.get("target_sparsity"))
        cases.setdefault(key, {})[record["impl"]] = record
    grouped = []
    for key, by_impl in cases.items():
        sparsity = next((r["block_sparsity"] for r in by_impl.values() if r.get("block_sparsity") is not None), None)
        grouped.append(({"N": key[0], "D": key[1], "causal": key[4], "dtype": key[6], "sparsity": sparsity}, by_impl))
    return grouped


def check_targets(records: Sequence[dict], head_dims: Sequence[int] = HEAD_DIMS) -> List[dict]:
    """One row per target: cases in scope (N in TARGET_LENGTHS, D in head_dims, bf16), how many meet the limit,
    and the range of the ratio."""
    rows = []
    for target in TARGETS:
        ratios = []
        for case, by_impl in group_cases(records):
            if case["N"] not in TARGET_LENGTHS or case["D"] not in head_dims or case["dtype"] not in (None, "bfloat16"):
                continue
            if case["sparsity"] is None or not target.band[0] <= case["sparsity"] <= target.band[1]:
                continue
            ratio = target.ratio(by_impl)
            if ratio is not None:
                ratios.append(ratio)
        rows.append({"issue": target.issue, "target": target.text, "cases": len(ratios),
                     "met": sum(r <= target.limit for r in ratios),
                     "best": min(ratios) if ratios else None, "worst": max(ratios) if ratios else None})
    return rows


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| issue | target | cases | met | best | worst |", "|---|---|---|---|---|---|"]
    for row in rows:
        best = f"{row['best']:.2f}x" if row["best"] is not None else "-"
        worst = f"{row['worst']:.2f}x" if row["worst"] is not None else "-"
        lines.append(f"| {row['issue']} | {row['target']} | {row['cases']} | {row['met']} | {best} | {worst} |")
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description="Check harness results against the issues' speed targets.")
    parser.add_argument("paths", nargs="+", metavar="RESULTS.json", help="harness JSON files (their records pooled)")
    parser.add_argument("--d", nargs="+", type=int, default=list(HEAD_DIMS),
                        help="head dims whose cases count (default: the issues' 64 and 128)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    records = [record for path in args.paths for record in json.loads(Path(path).read_text())["records"]]
    rows = check_targets(records, args.d)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
