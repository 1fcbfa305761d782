"""Short summary of a harness JSON: `python -m benchmarks.summary RESULTS.json` (used by scripts/gpu_check.sh).

Prints the device and versions, each distinct error per implementation (with how many records hit it),
and the markdown table.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from benchmarks.report import markdown_table


def summarize(document: dict) -> str:
    """The summary text of one results document."""
    lines = [f"device {document['device']}  torch {document['torch']}  triton {document['triton']}  "
             f"commit {document['commit']}  date {document['date']}  records {len(document['records'])}"]
    errors = Counter((r["impl"], r["error"]) for r in document["records"] if r["error"])
    for (impl, error), count in sorted(errors.items()):
        lines.append(f"  error x{count} {impl}: {error[:240]}")
    if not errors:
        lines.append("  no implementation raised an error")
    lines += _solver_lines(document["records"])
    impls = document["settings"]["impls"]
    lines += ["", markdown_table(document, impls)]
    return "\n".join(lines)


def _solver_lines(records) -> list:
    """The ranges of the ours records' `solver` statistics (benchmarks/solver.py), and its errors."""
    stats = [r["solver"] for r in records if r.get("solver") and "error" not in r["solver"]]
    lines = []
    if stats:
        held = [s["hist_bound_held"] for s in stats]
        gaps = [s["hist_gap_bins"] for s in stats]
        lines.append(f"  tau solver (ours, {len(stats)} cases): histogram bound held in "
                     f"{min(held):.4f}-{max(held):.4f} of rows, mean gap {min(gaps):.2f}-{max(gaps):.2f} bins, "
                     f"tau error after the training solve <= {max(s['tau_err_max'] for s in stats):.1e}; "
                     f"Newton passes {stats[0]['newton_passes']}")
        training = [s for s in stats if "hist_gap_bins_training" in s]  # records of runs after 1d7fbb0
        if training:
            held = [s["hist_bound_held_training"] for s in training]
            gaps = [s["hist_gap_bins_training"] for s in training]
            lines.append(f"  training's histogram start: held in {min(held):.4f}-{max(held):.4f} of rows, mean gap "
                         f"{min(gaps):.2f}-{max(gaps):.2f} bins")
    errors = Counter(r["solver"]["error"] for r in records if r.get("solver") and "error" in r["solver"])
    lines += [f"  solver statistics error x{count}: {error[:240]}" for error, count in sorted(errors.items())]
    return lines


def main(argv=None) -> None:
    """Print the summary of each JSON path given on the command line."""
    for path in (argv if argv is not None else sys.argv[1:]):
        print(summarize(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main()
