"""Results of a harness run: the JSON document, its markdown table and its plots."""
from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.measure import HOST_BOUND_FRACTION

RATIO_FIELDS = {"fwd_ms": "ratio_fwd_to_fa2", "fwd_bwd_ms": "ratio_fwd_bwd_to_fa2"}


def device_name(device: str) -> str:
    """'nvidia-h100-80gb-hbm3' for a CUDA device, 'cpu' otherwise (lower case, dashes)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def current_commit() -> str:
    """Short commit of the checkout (ENTFLASH_COMMIT overrides; 'unknown' without git), '+dirty' if edited."""
    if os.environ.get("ENTFLASH_COMMIT"):
        return os.environ["ENTFLASH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def new_document(device: str, preset: str, baseline: str, settings: dict) -> dict:
    """The JSON document's top level, with an empty record list."""
    import triton

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": current_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "preset": preset,
        "ratio_baseline": baseline,
        "settings": settings,
        "records": [],
    }


def result_stem(document: dict) -> str:
    """'<device>-<yyyymmdd>-<commit>': the file name of the JSON without its suffix."""
    day = document["date"][:10].replace("-", "")
    commit = re.sub(r"[^A-Za-z0-9]+", "-", document["commit"]).strip("-")
    return f"{document['device']}-{day}-{commit}"


def add_ratios(records: List[dict], baseline: str) -> None:
    """Fill ratio_fwd_to_fa2 / ratio_fwd_bwd_to_fa2 of each record of one case from the baseline's times."""
    base = next((r for r in records if r["impl"] == baseline), None)
    for record in records:
        for time_field, ratio_field in RATIO_FIELDS.items():
            base_ms = base.get(time_field) if base else None
            own_ms = record.get(time_field)
            record[ratio_field] = own_ms / base_ms if own_ms is not None and base_ms else None


def write_json(document: dict, out_dir: Path) -> Path:
    """Write the document to out_dir/<stem>.json (atomically, so an interrupted run leaves a whole file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result_stem(document)}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(document, indent=1))
    partial.replace(path)
    return path


def _cell(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio_cell(value: Optional[float], host_bound: bool = False) -> str:
    return "-" if value is None else f"{value:.2f}x" + ("*" if host_bound else "")


def host_bound(record: dict, time_field: str) -> bool:
    """Whether queuing one call of this record's mode (`time_field`: fwd_ms or fwd_bwd_ms) kept the host busy for
    at least measure.HOST_BOUND_FRACTION of the call's median time (records without a host time: False)."""
    host_ms, own_ms = record.get(f"host_{time_field}"), record.get(time_field)
    return host_ms is not None and bool(own_ms) and host_ms >= HOST_BOUND_FRACTION * own_ms


def _case_key(record: dict):
    return (record["N"], record["D"], record["H"], record["B"], record["causal"], record["alpha"],
            record["target_sparsity"])


def markdown_table(document: dict, impls: Sequence[str]) -> str:
    """One row per case: the baseline's times, then each implementation's fwd and fwd+bwd ratio to it; a ratio
    marked * was host-bound (host_bound), and so depends on the machine's CPU as much as on its GPU."""
    baseline = document["ratio_baseline"]
    tiles = list(document["settings"]["tiles"])
    cases: Dict[tuple, Dict[str, dict]] = {}
    for record in document["records"]:
        cases.setdefault(_case_key(record), {})[record["impl"]] = record
    others = [name for name in impls if name != baseline]
    header = (["N", "D", "H", "B", "causal"] + [f"sparsity {t}" for t in tiles]
              + [f"{baseline} fwd ms", f"{baseline} f+b ms"] + [f"{name} fwd / f+b" for name in others])
    if any(host_bound(record, time) for record in document["records"] for time in RATIO_FIELDS):
        header[-1] += " (* host-bound)"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, by_impl in cases.items():
        any_record = next(iter(by_impl.values()))
        base = by_impl.get(baseline, {})
        row = [str(key[0]), str(key[1]), str(key[2]), str(key[3]), "yes" if key[4] else "no"]
        row += [_cell(any_record["block_sparsity_tiles"].get(t), 3) for t in tiles]
        row += [_cell(base.get("fwd_ms")), _cell(base.get("fwd_bwd_ms"))]
        for name in others:
            record = by_impl.get(name)
            if record is None:
                row.append("")
            elif record["error"] and record["fwd_ms"] is None and record["fwd_bwd_ms"] is None:
                row.append("error")
            elif record["skipped"] and record["fwd_ms"] is None and record["fwd_bwd_ms"] is None:
                row.append("skip")
            else:
                row.append(" / ".join(_ratio_cell(record[ratio], host_bound(record, time))
                                      for time, ratio in RATIO_FIELDS.items()))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_files(document: dict, out_dir: Path) -> List[Path]:
    """One PNG per (D, causal): time ratio to the baseline vs measured block sparsity (first tile), a panel per
    (mode, N), one line per implementation. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    baseline = document["ratio_baseline"]
    records = document["records"]
    written = []
    for head_dim, causal in sorted({(r["D"], r["causal"]) for r in records}):
        group = [r for r in records if r["D"] == head_dim and r["causal"] == causal]
        lengths = sorted({r["N"] for r in group})
        impls = list(dict.fromkeys(r["impl"] for r in group))
        colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
        width = 3.6 * len(lengths) + 2.4
        figure, axes = plt.subplots(2, len(lengths), figsize=(width, 7), squeeze=False)
        for column, length in enumerate(lengths):
            for row, (mode, ratio_field) in enumerate(RATIO_FIELDS.items()):
                axis = axes[row][column]
                for impl in impls:
                    points = sorted((r["block_sparsity"], r[ratio_field]) for r in group
                                    if r["impl"] == impl and r["N"] == length and r[ratio_field] is not None)
                    if points:
                        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl,
                                  color=colors[impl])
                axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
                axis.set_yscale("log")
                axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
                axis.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
                axis.set_xlim(-0.02, 1.02)
                axis.set_title(f"N={length}  {'fwd' if mode == 'fwd_ms' else 'fwd+bwd'}")
                axis.set_xlabel(f"measured block sparsity ({document['settings']['tiles'][0]})")
                axis.set_ylabel(f"time / {baseline}")
        handles, labels = [], []
        for axis in axes.flat:
            for handle, label in zip(*axis.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(handle)
                    labels.append(label)
        figure.legend(handles, labels, loc="center right")
        figure.suptitle(f"{document['device']}  D={head_dim}  {'causal' if causal else 'non-causal'}  "
                        f"alpha={group[0]['alpha']}  ({document['commit']})")
        figure.subplots_adjust(left=1.0 / width, right=1 - 2.2 / width, top=0.9, bottom=0.08, hspace=0.35,
                               wspace=0.35)
        path = out_dir / f"{result_stem(document)}-D{head_dim}-{'causal' if causal else 'noncausal'}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written
