"""Results of the length-generalization recipe: summary over seeds, the JSON file, the plot, merging.

A results document is a dict:
  "config"       the recipe configuration (a dict of its fields)
  "environment"  device, versions, entmax backend, warnings seen
  "runs"         one dict per (task, attention, seed): "task", "metric", "attention", "seed", "train_length",
                 "eval" {str(length): value}, "train_tokens_per_s", "steps_done", "losses", ...
  "throughput"   one dict per (attention, length): "attention", "length", "batch_size", "dtype", and
                 "tokens_per_s" (or "error" when that measurement failed)
  "summary"      {task: {"metric": str, "attention": {type: {"eval": {str(length): {"mean", "min", "max",
                 "std", "seeds"}}, "train_tokens_per_s": mean over seeds}}}}
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_FILE = "results.json"
PLOT_FILE = "length_generalization.png"


def _spread(values: List[float]) -> Dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.pstdev(values), "seeds": len(values)}


def summarize(runs: List[Dict]) -> Dict:
    """Per task and attention type: mean/min/max/std over seeds of the metric at each eval length, and the mean
    training tokens/s."""
    summary: Dict = {}
    for run in runs:
        task = summary.setdefault(run["task"], {"metric": run["metric"], "train_length": run["train_length"],
                                                "attention": {}})
        entry = task["attention"].setdefault(run["attention"], {"values": {}, "tokens_per_s": []})
        entry["tokens_per_s"].append(run["train_tokens_per_s"])
        for length, value in run["eval"].items():
            entry["values"].setdefault(length, []).append(value)
    for task in summary.values():
        for name, entry in task["attention"].items():
            task["attention"][name] = {
                "eval": {length: _spread(values) for length, values in
                         sorted(entry["values"].items(), key=lambda item: int(item[0]))},
                "train_tokens_per_s": statistics.fmean(entry["tokens_per_s"]),
            }
    return summary


def write_results(document: Dict, out_dir: str) -> str:
    """Recompute the summary, write out_dir/results.json; returns its path."""
    document["summary"] = summarize(document["runs"])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULTS_FILE)
    with open(path + ".tmp", "w") as handle:
        json.dump(document, handle, indent=1)
    os.replace(path + ".tmp", path)  # a process killed mid-write leaves the previous complete file
    return path


def merge_results(directories: List[str]) -> Dict:
    """One document from the results.json files of several output directories: runs and throughput rows
    concatenated; the first's config and environment, with the warnings and entmax backends of all; each
    source's config and environment under "merged_from"."""
    documents = []
    for directory in directories:
        path = os.path.join(directory, RESULTS_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"merge: no {RESULTS_FILE} in {directory!r}")
        with open(path) as handle:
            documents.append(json.load(handle))
    environment = dict(documents[0]["environment"])
    environment["warnings"] = sorted({w for d in documents for w in d["environment"].get("warnings", [])})
    backends = {d["environment"]["entmax_backend"] for d in documents if "entmax_backend" in d["environment"]}
    if backends:
        environment["entmax_backend"] = ",".join(sorted(backends))
    merged = {"config": documents[0]["config"], "environment": environment, "runs": [], "throughput": [],
              "merged_from": []}
    for directory, document in zip(directories, documents):
        merged["runs"].extend(document["runs"])
        merged["throughput"].extend(document.get("throughput", []))
        merged["merged_from"].append({"directory": directory, "config": document["config"],
                                      "environment": document["environment"]})
    return merged


def plot_results(document: Dict, out_dir: str) -> str:
    """One panel per task (metric vs evaluation length, a line per attention type: mean over seeds, band from
    min to max) and, when measured, a panel of training tokens/s vs length. Writes out_dir/<PLOT_FILE>."""
    summary = document.get("summary") or summarize(document["runs"])
    panels = list(summary.items())
    throughput = [row for row in document.get("throughput", []) if "tokens_per_s" in row]
    count = len(panels) + (1 if throughput else 0)
    if count == 0:
        raise ValueError("plot: the results hold no runs and no throughput rows")
    figure, axes = plt.subplots(1, count, figsize=(4.6 * count, 3.8), squeeze=False)
    for axis, (task_name, task) in zip(axes[0], panels):
        for attention, entry in task["attention"].items():
            lengths = [int(length) for length in entry["eval"]]
            stats = list(entry["eval"].values())
            line, = axis.plot(lengths, [s["mean"] for s in stats], marker="o", label=attention)
            axis.fill_between(lengths, [s["min"] for s in stats], [s["max"] for s in stats],
                              color=line.get_color(), alpha=0.2)
        axis.axvline(task["train_length"], color="grey", linestyle="--", linewidth=1)
        axis.set_xscale("log", base=2)
        if task["metric"] == "perplexity":
            axis.set_yscale("log")
        axis.set_xlabel("evaluation length (dashed: training length)")
        axis.set_ylabel(task["metric"])
        axis.set_title(task_name)
        axis.legend(fontsize=8)
    if throughput:
        axis = axes[0][-1]
        for attention in dict.fromkeys(row["attention"] for row in throughput):
            rows = sorted((row for row in throughput if row["attention"] == attention), key=lambda r: r["length"])
            axis.plot([r["length"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=attention)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length")
        axis.set_ylabel("training tokens/s")
        axis.set_title("training throughput")
        axis.legend(fontsize=8)
    figure.suptitle(f"{document['environment'].get('device', '')}: mean over seeds, band = min..max", fontsize=9)
    figure.tight_layout()
    path = os.path.join(out_dir, PLOT_FILE)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def markdown_tables(document: Dict) -> str:
    """Markdown tables: per task, the metric (mean ± std over seeds) at each eval length per attention type with
    the mean training tokens/s of the runs; then the throughput rows, one column per length."""
    summary = document.get("summary") or summarize(document["runs"])
    lines = []
    for task_name, task in summary.items():
        lengths = list(next(iter(task["attention"].values()))["eval"])
        lines.append(f"**{task_name}** ({task['metric']}, trained at {task['train_length']}; "
                     f"mean ± std over seeds)\n")
        lines.append("| attention | " + " | ".join(lengths) + " | tokens/s in training |")
        lines.append("|---" * (len(lengths) + 2) + "|")
        for attention, entry in task["attention"].items():
            cells = [f"{s['mean']:.3f} ± {s['std']:.3f}" if s["seeds"] > 1 else f"{s['mean']:.3f}"
                     for s in (entry["eval"].get(length) for length in lengths) if s is not None]
            lines.append(f"| {attention} | " + " | ".join(cells) + f" | {entry['train_tokens_per_s']:,.0f} |")
        lines.append("")
    throughput = document.get("throughput", [])
    if throughput:
        lengths = sorted({row["length"] for row in throughput})
        lines.append("**training throughput alone** (tokens/s; fwd + bwd + AdamW, "
                     f"{throughput[0].get('dtype', '')})\n")
        lines.append("| attention | " + " | ".join(f"N = {n}" for n in lengths) + " |")
        lines.append("|---" * (len(lengths) + 1) + "|")
        for attention in dict.fromkeys(row["attention"] for row in throughput):
            by_length = {row["length"]: row for row in throughput if row["attention"] == attention}
            cells = [f"{by_length[n]['tokens_per_s']:,.0f}" if "tokens_per_s" in by_length.get(n, {}) else "failed"
                     for n in lengths]
            lines.append(f"| {attention} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m recipes.report RESULTS_DIR   (prints the results as markdown tables)")
    with open(os.path.join(sys.argv[1], RESULTS_FILE)) as results:
        print(markdown_tables(json.load(results)))
