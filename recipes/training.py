"""Train one model on one task, evaluate it at several lengths, and time training steps.

All functions take the task objects of recipes.tasks (sample(batch, length, generator) -> (inputs, targets),
both (B, N) int64, IGNORE_INDEX where nothing is scored) and the Decoder of recipes.model.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from recipes.model import Decoder
from recipes.tasks import IGNORE_INDEX, ByteCorpusTask

EVAL_SEED = 1_000_003  # evaluation data is the same for every model and training seed


@dataclass(frozen=True)
class TrainSettings:
    """Optimization settings of one run."""

    steps: int
    batch_size: int
    length: int
    learning_rate: float
    weight_decay: float
    warmup_fraction: float
    grad_clip: float
    max_seconds: float
    timing_warmup_steps: int
    progress_interval: float


def autocast_for(device: torch.device, dtype: torch.dtype):
    """An autocast context for bfloat16/float16 on CUDA; a disabled one otherwise (the model stays float32)."""
    enabled = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over scored positions. logits (B, N, V), targets (B, N) with IGNORE_INDEX."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def data_generator(task_name: str, seed: int) -> torch.Generator:
    """The training-data stream of (task, seed): independent of the attention type, so all types see the same
    batches."""
    return torch.Generator().manual_seed(seed * 7919 + zlib.crc32(task_name.encode()))


def make_optimizer(model: torch.nn.Module, settings: TrainSettings):
    """AdamW (no decay on vectors: norms, biases, attention-shape parameters) with linear warmup and cosine decay
    to 10% of the peak rate."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": settings.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}],
                                  lr=settings.learning_rate, betas=(0.9, 0.98))
    warmup = max(1, int(settings.warmup_fraction * settings.steps))

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, settings.steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, rate)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: Decoder, task, settings: TrainSettings, generator: torch.Generator, device: torch.device,
          dtype: torch.dtype, description: str) -> Dict:
    """Train `model` in place on batches of `task` at `settings.length`.

    Stops after settings.steps steps, or earlier once settings.max_seconds of wall time have passed.
    Returns losses (list of floats, one per step), steps_done, seconds, and tokens_per_s measured after the first
    settings.timing_warmup_steps steps (which include kernel compilation), or over all steps if too few ran.
    """
    optimizer, schedule = make_optimizer(model, settings)
    model.train()
    losses: List[torch.Tensor] = []
    start = time.perf_counter()
    timed_start, timed_from = start, 0
    bar = tqdm(range(settings.steps), desc=description, mininterval=settings.progress_interval,
               leave=False, dynamic_ncols=True)
    for step in bar:
        if step == settings.timing_warmup_steps:
            _synchronize(device)
            timed_start, timed_from = time.perf_counter(), step
        inputs, targets = task.sample(settings.batch_size, settings.length, generator)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_for(device, dtype):
            loss = token_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.perf_counter() - start > settings.max_seconds:
            break
    bar.close()
    _synchronize(device)
    end = time.perf_counter()
    steps_done = len(losses)
    timed_steps = steps_done - timed_from
    tokens_per_s = timed_steps * settings.batch_size * settings.length / max(end - timed_start, 1e-9)
    return {"losses": torch.stack(losses).float().cpu().tolist(), "steps_done": steps_done,
            "seconds": end - start, "tokens_per_s": tokens_per_s}


@torch.no_grad()
def _score_batches(model: Decoder, batches: Iterable, device: torch.device, dtype: torch.dtype):
    """Sum of token NLL, number of scored tokens and number of correct argmax predictions over `batches`."""
    nll, count, correct = 0.0, 0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast_for(device, dtype):
            logits = model(inputs).float()
        scored = targets != IGNORE_INDEX
        nll += F.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
        count += int(scored.sum().item())
        correct += int((logits[scored].argmax(-1) == targets[scored]).sum().item())
    return nll, count, correct


def _micro_batches(inputs: torch.Tensor, targets: torch.Tensor, tokens_per_batch: int):
    rows = max(1, tokens_per_batch // inputs.shape[1])
    for start in range(0, inputs.shape[0], rows):
        yield inputs[start:start + rows], targets[start:start + rows]


def evaluate(model: Decoder, task, lengths: Iterable[int], sequences: int, tokens_per_batch: int,
             device: torch.device, dtype: torch.dtype, lm_eval_tokens: Optional[int] = None) -> Dict[str, float]:
    """The task's metric at each evaluation length: {str(length): value}.

    Synthetic tasks: accuracy of the argmax prediction on answer tokens over `sequences` sequences drawn from a
    fixed evaluation seed. Byte corpus: perplexity over the same `lm_eval_tokens` held-out bytes, cut into
    non-overlapping windows of each length (every position of a window is scored).
    """
    model.eval()
    results = {}
    for length in lengths:
        if isinstance(task, ByteCorpusTask):
            inputs, targets = task.heldout_windows(max(1, lm_eval_tokens // (length + 1)), length)
        else:
            inputs, targets = task.sample(sequences, length, torch.Generator().manual_seed(EVAL_SEED + length))
        nll, count, correct = _score_batches(model, _micro_batches(inputs, targets, tokens_per_batch), device, dtype)
        results[str(length)] = math.exp(nll / count) if task.metric == "perplexity" else correct / count
    model.train()
    return results


def measure_throughput(model: Decoder, vocab_size: int, length: int, batch_size: int, steps: int,
                       warmup_steps: int, device: torch.device, dtype: torch.dtype) -> float:
    """Training tokens/s (forward, backward, AdamW step) of `model` on random tokens of shape (batch_size, length),
    timed over `steps` steps after `warmup_steps` untimed ones."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(vocab_size, (batch_size, length), generator=generator).to(device)
    targets = torch.randint(vocab_size, (batch_size, length), generator=generator).to(device)
    model.train()
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            _synchronize(device)
            start = time.perf_counter()
        with autocast_for(device, dtype):
            loss = token_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _synchronize(device)
    return steps * batch_size * length / (time.perf_counter() - start)
