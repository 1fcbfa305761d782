"""Does sparse attention generalize to longer sequences? Train small decoders with softmax, entmax (alpha 1.5),
learnable-alpha entmax and ASEntmax attention at a short length; evaluate them at multiples of it.

    python -m recipes.length_generalization --config tiny|gpu [--attention softmax,entmax,learnable,asentmax]
        [--seeds 0,1] [--tasks mqar,flipflop,stdlib_lm] [--out DIR] [--<any config field> VALUE ...]
    python -m recipes.length_generalization --merge DIR [DIR ...] --out DIR   (combine runs made in parallel)

Writes to --out: results.json (recipes.report describes it), length_generalization.png, and
checkpoints/<task>-<attention>-seed<seed>.pt (the model's state_dict and config). results.json is rewritten
after every run, so an interrupted invocation keeps what it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from recipes import report
from recipes.model import ATTENTION_TYPES, Decoder, ModelConfig
from recipes.tasks import ByteCorpusTask, FlipFlopTask, MQARTask
from recipes.training import TrainSettings, data_generator, evaluate, measure_throughput, train

TASK_NAMES = ("mqar", "flipflop", "stdlib_lm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RecipeConfig:
    """Everything the recipe does; every field is also a command-line flag (--field-name)."""

    tasks: Tuple[str, ...] = TASK_NAMES
    attention: Tuple[str, ...] = ATTENTION_TYPES
    seeds: Tuple[int, ...] = (0, 1)
    # model
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    position_encoding: str = "rope"
    # training
    train_length: int = 64
    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    max_run_seconds: float = 600.0
    time_budget_seconds: float = 1e9
    # evaluation
    eval_multipliers: Tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    lm_eval_multipliers: Tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_sequences: int = 128
    eval_tokens_per_batch: int = 65536
    lm_eval_tokens: int = 65536
    # tasks
    mqar_pairs: int = 8
    mqar_queries: int = 8
    mqar_num_keys: int = 32
    flipflop_write_probability: float = 0.1
    flipflop_read_probability: float = 0.1
    lm_max_bytes: int = 20_000_000
    # throughput benchmark (training tokens/s on random tokens, after the runs)
    throughput_lengths: Tuple[int, ...] = (64, 1024, 4096)
    throughput_batch_tokens: int = 16384
    throughput_steps: int = 10
    # execution
    device: str = "cuda"
    dtype: str = "float32"
    entmax_backend: str = "auto"
    timing_warmup_steps: int = 5
    progress_interval: float = 2.0
    save_checkpoints: bool = True
    cpu_threads: int = 1


PRESETS: Dict[str, Dict] = {
    "gpu": {},
    "tiny": dict(seeds=(0,), d_model=32, num_heads=2, num_layers=1, train_length=32, steps=30, batch_size=8,
                 learning_rate=3e-3, eval_multipliers=(1, 2, 4), lm_eval_multipliers=(1, 2), eval_sequences=8,
                 eval_tokens_per_batch=4096, lm_eval_tokens=1024, mqar_pairs=4, mqar_queries=4,
                 mqar_num_keys=8, lm_max_bytes=200_000, throughput_lengths=(32,), throughput_batch_tokens=256,
                 throughput_steps=2, device="cpu", timing_warmup_steps=2, progress_interval=5.0),
}


def build_task(name: str, config: RecipeConfig):
    if name == "mqar":
        return MQARTask(num_keys=config.mqar_num_keys, num_values=config.mqar_num_keys, pairs=config.mqar_pairs,
                        queries=config.mqar_queries)
    if name == "flipflop":
        return FlipFlopTask(config.flipflop_write_probability, config.flipflop_read_probability)
    if name == "stdlib_lm":
        return ByteCorpusTask(config.lm_max_bytes)
    raise ValueError(f"unknown task {name!r}; choose from {TASK_NAMES}")


def validate(config: RecipeConfig) -> None:
    """Raise ValueError for settings the recipe cannot run."""
    for name in config.tasks:
        if name not in TASK_NAMES:
            raise ValueError(f"--tasks: unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    for name in config.attention:
        if name not in ATTENTION_TYPES:
            raise ValueError(f"--attention: unknown type {name!r}; choose from {', '.join(ATTENTION_TYPES)}")
    if not config.seeds:
        raise ValueError("--seeds: give at least one seed")
    if config.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if config.train_length % 2:
        raise ValueError(f"--train-length must be even (flip-flop pairs), got {config.train_length}")
    for flag in ("eval_multipliers", "lm_eval_multipliers"):
        if any(m < 1 for m in getattr(config, flag)):
            raise ValueError(f"--{flag.replace('_', '-')}: multipliers must be >= 1, got {getattr(config, flag)}")
    if config.cpu_threads < 1:
        raise ValueError(f"--cpu-threads must be >= 1, got {config.cpu_threads}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: CUDA is not available here (use --config tiny or --device cpu)")


def environment(config: RecipeConfig) -> Dict:
    """Device, versions and the entmax backend the api resolves to on this device."""
    device = torch.device(config.device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    # ENTFLASH_COMMIT names the commit where git cannot (a copied working tree, as on the device machine,
    # whose git metadata may lag behind the files)
    info["commit"] = os.environ.get("ENTFLASH_COMMIT") or None
    if info["commit"] is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    timeout=10)
            info["commit"] = commit.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["commit"] = None
    if any(name != "softmax" for name in config.attention):
        from entflash.api import resolve_backend
        info["entmax_backend"] = resolve_backend(config.entmax_backend, device, "recipe")
    return info


def _settings(config: RecipeConfig) -> TrainSettings:
    return TrainSettings(steps=config.steps, batch_size=config.batch_size, length=config.train_length,
                         learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                         warmup_fraction=config.warmup_fraction, grad_clip=config.grad_clip,
                         max_seconds=config.max_run_seconds, timing_warmup_steps=config.timing_warmup_steps,
                         progress_interval=config.progress_interval)


def _model(config: RecipeConfig, attention: str, vocab_size: int, seed: int) -> Decoder:
    torch.manual_seed(seed)
    model_config = ModelConfig(vocab_size=vocab_size, d_model=config.d_model, num_heads=config.num_heads,
                               num_layers=config.num_layers, attention=attention,
                               position_encoding=config.position_encoding, entmax_backend=config.entmax_backend)
    return Decoder(model_config).to(config.device)


def run_one(config: RecipeConfig, task, attention: str, seed: int, out_dir: str) -> Dict:
    """Train and evaluate one (task, attention, seed); save its checkpoint; return its run record."""
    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    model = _model(config, attention, task.vocab_size, seed)
    description = f"{task.name}/{attention}/seed{seed}"
    trained = train(model, task, _settings(config), data_generator(task.name, seed), device, dtype, description)
    multipliers = config.lm_eval_multipliers if task.metric == "perplexity" else config.eval_multipliers
    lengths = [config.train_length * m for m in multipliers]
    scores = evaluate(model, task, lengths, config.eval_sequences, config.eval_tokens_per_batch, device, dtype,
                      config.lm_eval_tokens)
    losses = trained["losses"]
    window = max(1, len(losses) // 10)
    record = {"task": task.name, "metric": task.metric, "attention": attention, "seed": seed,
              "train_length": config.train_length, "eval": scores, "train_tokens_per_s": trained["tokens_per_s"],
              "steps_planned": config.steps, "steps_done": trained["steps_done"], "train_seconds": trained["seconds"],
              "loss_start": sum(losses[:window]) / window, "loss_end": sum(losses[-window:]) / window,
              "losses": losses[::max(1, len(losses) // 200)], "attention_parameters": model.attention_parameters()}
    if config.save_checkpoints:
        directory = os.path.join(out_dir, "checkpoints")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{task.name}-{attention}-seed{seed}.pt")
        torch.save({"state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, path)
        record["checkpoint"] = path
    return record


def throughput_rows(config: RecipeConfig, on_row=None) -> List[Dict]:
    """Training tokens/s of each attention type at each of config.throughput_lengths (fresh models, random
    tokens, batch = throughput_batch_tokens // length). A length that fails (e.g. out of memory) gets an "error"
    entry instead of "tokens_per_s". on_row(rows so far) is called after each row (to save progress)."""
    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    rows = []
    for attention in config.attention:
        for length in config.throughput_lengths:
            batch = max(1, config.throughput_batch_tokens // length)
            row = {"attention": attention, "length": length, "batch_size": batch, "dtype": config.dtype}
            try:
                model = _model(config, attention, 256, 0)
                row["tokens_per_s"] = measure_throughput(model, 256, length, batch, config.throughput_steps,
                                                         config.timing_warmup_steps, device, dtype)
            except (RuntimeError, ValueError) as error:  # e.g. out of memory at a long length: keep the others
                row["error"] = f"{type(error).__name__}: {error}"[:500]
            rows.append(row)
            shown = f"{row['tokens_per_s']:12.0f} tokens/s" if "tokens_per_s" in row else row["error"][:120]
            print(f"throughput {attention:>10s} length {length:6d}: {shown}", flush=True)
            if on_row is not None:
                on_row(rows)
    return rows


def run(config: RecipeConfig, out_dir: str) -> Dict:
    """All runs (seed-major, so an early stop keeps whole seeds), then the throughput rows; returns the results
    document, written to out_dir after every run."""
    validate(config)
    torch.set_num_threads(config.cpu_threads)
    document = {"config": dataclasses.asdict(config), "environment": environment(config), "runs": [],
                "throughput": [], "skipped": []}
    seen_warnings = set()
    start = time.perf_counter()
    tasks = {name: build_task(name, config) for name in config.tasks}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in config.seeds:
            for task in tasks.values():
                for attention in config.attention:
                    if time.perf_counter() - start > config.time_budget_seconds:
                        document["skipped"].append({"task": task.name, "attention": attention, "seed": seed})
                        continue
                    record = run_one(config, task, attention, seed, out_dir)
                    document["runs"].append(record)
                    shown = ", ".join(f"{length}: {value:.3f}" for length, value in record["eval"].items())
                    print(f"{task.name:>9s} {attention:>10s} seed {seed}: loss {record['loss_start']:.3f} -> "
                          f"{record['loss_end']:.3f}, {record['train_tokens_per_s']:.0f} tokens/s, "
                          f"{record['steps_done']} steps; {task.metric} {shown}", flush=True)
                    seen_warnings.update(str(w.message) for w in caught)
                    document["environment"]["warnings"] = sorted(seen_warnings)
                    report.write_results(document, out_dir)
        if config.throughput_lengths:
            def save_rows(rows):
                document["throughput"] = list(rows)
                report.write_results(document, out_dir)
            throughput_rows(config, save_rows)
        seen_warnings.update(str(w.message) for w in caught)
    document["environment"]["warnings"] = sorted(seen_warnings)
    document["environment"]["total_seconds"] = time.perf_counter() - start
    report.write_results(document, out_dir)
    if document["runs"] or document["throughput"]:
        report.plot_results(document, out_dir)
    return document


def _parse_field(field: dataclasses.Field):
    """An argparse type for a config field: comma-separated lists for tuples."""
    default = field.default
    if isinstance(default, tuple):
        item_type = type(default[0]) if default else str

        def parse_list(text: str):
            return tuple(item_type(item) for item in text.split(",") if item.strip())
        return parse_list
    if isinstance(default, bool):
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    return type(default)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipes.length_generalization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default="gpu", help="preset the flags below modify")
    parser.add_argument("--out", default="recipe_out", help="output directory (results.json, plot, checkpoints)")
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="instead of running: merge the results.json of these directories into --out")
    for field in dataclasses.fields(RecipeConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=_parse_field(field),
                            default=None, help=f"(default {field.default!r}, preset may change it)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RecipeConfig:
    """The preset named by --config, with every given flag applied on top."""
    values = dict(PRESETS[args.config])
    for field in dataclasses.fields(RecipeConfig):
        given = getattr(args, field.name)
        if given is not None:
            values[field.name] = given
    return RecipeConfig(**values)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        document = report.merge_results(args.merge)
        path = report.write_results(document, args.out)
        report.plot_results(document, args.out)
        print(f"merged {len(document['runs'])} runs into {path}")
        return 0
    config = config_from_args(args)
    try:
        validate(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    document = run(config, args.out)
    print(f"wrote {os.path.join(args.out, report.RESULTS_FILE)} and {os.path.join(args.out, report.PLOT_FILE)} "
          f"({len(document['runs'])} runs, {document['environment']['total_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
