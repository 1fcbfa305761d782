"""Seeded training data for the length-generalization recipe: two synthetic tasks and a byte-level corpus.

Every task yields batches as a pair of int64 tensors (inputs, targets), both (B, N): the model reads `inputs`
and is scored, at each position, on predicting `targets`; positions that carry no answer hold IGNORE_INDEX.
Nothing is downloaded: the synthetic tasks are generated from a torch.Generator, and the corpus is the Python
standard library's own source files, read from the running interpreter.

* MQAR (multi-query associative recall): `pairs` key-value pairs open the sequence; the rest is noise tokens
  among which `queries` of the keys reappear, each followed by its value. The answer is the value, predicted at
  the query key's position. Longer sequences keep the same pairs and queries and add noise between them, so the
  distance from a query to its key grows with the length.
* Flip-flop (Liu et al., 2023): instruction-bit pairs `w b` (write b), `i b` (ignore), `r b` (read: b is the
  last written bit). The answer is the bit after each `r`, predicted at the `r` position.
* Byte corpus: concatenated standard-library .py files, split into train and held-out text by file.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Tuple

import torch

IGNORE_INDEX = -100


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")


@dataclass(frozen=True)
class MQARTask:
    """Multi-query associative recall over a vocabulary of noise, key and value tokens.

    Token ids: noise [0, num_noise), keys [num_noise, num_noise + num_keys), values after the keys.
    A sequence of length N needs 2 * (pairs + queries) <= N.
    """

    num_keys: int = 32
    num_values: int = 32
    num_noise: int = 16
    pairs: int = 8
    queries: int = 8

    name = "mqar"
    metric = "accuracy"

    def __post_init__(self):
        for field in ("num_keys", "num_values", "num_noise", "pairs", "queries"):
            _check_positive(field, getattr(self, field))
        if self.pairs > self.num_keys:
            raise ValueError(f"MQAR: `pairs` ({self.pairs}) must not exceed `num_keys` ({self.num_keys})")
        if self.queries > self.pairs:
            raise ValueError(f"MQAR: `queries` ({self.queries}) must not exceed `pairs` ({self.pairs})")

    @property
    def vocab_size(self) -> int:
        return self.num_noise + self.num_keys + self.num_values

    def min_length(self) -> int:
        return 2 * (self.pairs + self.queries)

    def sample(self, batch: int, length: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """A batch (inputs, targets), both (batch, length) int64 on the CPU."""
        _check_positive("batch", batch)
        if length < self.min_length():
            raise ValueError(f"MQAR: `length` must be at least 2 * (pairs + queries) = {self.min_length()}, "
                             f"got {length}")
        key_offset, value_offset = self.num_noise, self.num_noise + self.num_keys
        keys = torch.rand(batch, self.num_keys, generator=generator).argsort(dim=1)[:, :self.pairs] + key_offset
        values = torch.randint(self.num_values, (batch, self.pairs), generator=generator) + value_offset
        inputs = torch.randint(self.num_noise, (batch, length), generator=generator)
        targets = torch.full((batch, length), IGNORE_INDEX, dtype=torch.int64)
        context = torch.stack((keys, values), dim=2).reshape(batch, 2 * self.pairs)
        inputs[:, :2 * self.pairs] = context
        # Queries occupy distinct 2-token slots of the region after the context: key at 2*slot, value after it.
        slots_available = (length - 2 * self.pairs) // 2
        slots = torch.rand(batch, slots_available, generator=generator).argsort(dim=1)[:, :self.queries]
        query_positions = 2 * self.pairs + 2 * slots
        which_pair = torch.rand(batch, self.pairs, generator=generator).argsort(dim=1)[:, :self.queries]
        query_keys = keys.gather(1, which_pair)
        query_values = values.gather(1, which_pair)
        inputs.scatter_(1, query_positions, query_keys)
        inputs.scatter_(1, query_positions + 1, query_values)
        targets.scatter_(1, query_positions, query_values)
        return inputs, targets


@dataclass(frozen=True)
class FlipFlopTask:
    """Flip-flop language: tokens w=0, r=1, i=2 (instructions) and 0 -> 3, 1 -> 4 (bits).

    Each instruction is drawn with probabilities (write, read, 1 - write - read); the first is always a write.
    A sequence of length N holds N // 2 instruction-bit pairs (N must be even).
    """

    write_probability: float = 0.1
    read_probability: float = 0.1

    name = "flipflop"
    metric = "accuracy"
    WRITE, READ, IGNORE, BIT_ZERO = 0, 1, 2, 3

    def __post_init__(self):
        w, r = self.write_probability, self.read_probability
        if not (0 < w < 1 and 0 < r < 1 and w + r <= 1):
            raise ValueError(f"flip-flop: probabilities must satisfy 0 < write, 0 < read, write + read <= 1, "
                             f"got write={w!r}, read={r!r}")

    @property
    def vocab_size(self) -> int:
        return 5

    def min_length(self) -> int:
        return 2

    def sample(self, batch: int, length: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """A batch (inputs, targets), both (batch, length) int64 on the CPU."""
        _check_positive("batch", batch)
        if length < 2 or length % 2:
            raise ValueError(f"flip-flop: `length` must be an even int >= 2, got {length}")
        steps = length // 2
        draw = torch.rand(batch, steps, generator=generator)
        instructions = torch.full((batch, steps), self.IGNORE, dtype=torch.int64)
        instructions[draw < self.write_probability + self.read_probability] = self.READ
        instructions[draw < self.write_probability] = self.WRITE
        instructions[:, 0] = self.WRITE
        bits = torch.randint(2, (batch, steps), generator=generator)
        step_index = torch.arange(steps).expand(batch, steps)
        last_write = torch.where(instructions == self.WRITE, step_index, 0).cummax(dim=1).values
        is_read = instructions == self.READ
        bits = torch.where(is_read, bits.gather(1, last_write), bits)
        inputs = torch.stack((instructions, bits + self.BIT_ZERO), dim=2).reshape(batch, length)
        targets = torch.full((batch, steps, 2), IGNORE_INDEX, dtype=torch.int64)
        targets[:, :, 0] = torch.where(is_read, bits + self.BIT_ZERO, IGNORE_INDEX)
        return inputs, targets.reshape(batch, length)


def read_stdlib_bytes(max_bytes: int, holdout_every: int = 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the running interpreter's standard-library .py files (site-packages excluded), in sorted path
    order, split by file: every `holdout_every`-th file goes to the held-out text.

    Reading stops once `max_bytes` bytes in total were read. Returns (train, heldout) uint8 tensors (n,).
    """
    _check_positive("max_bytes", max_bytes)
    _check_positive("holdout_every", holdout_every)
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in ("site-packages", "__pycache__"))
        paths.extend(os.path.join(directory, name) for name in sorted(files) if name.endswith(".py"))
    train, heldout, total = [], [], 0
    for index, path in enumerate(sorted(paths)):
        with open(path, "rb") as handle:
            data = handle.read()
        (heldout if index % holdout_every == 0 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not train or not heldout:
        raise RuntimeError(f"too few standard-library sources under {root} for a train/held-out split "
                           f"(max_bytes={max_bytes})")

    def as_tensor(chunks):
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return as_tensor(train), as_tensor(heldout)


class ByteCorpusTask:
    """Next-byte prediction on standard-library sources (vocabulary 256; every position is scored).

    Training batches are random windows of the training text; evaluation windows are the first consecutive,
    non-overlapping windows of the held-out text, so every model sees the same evaluation bytes.
    """

    name = "stdlib_lm"
    metric = "perplexity"
    vocab_size = 256

    def __init__(self, max_bytes: int):
        self.train_bytes, self.heldout_bytes = read_stdlib_bytes(max_bytes)

    def min_length(self) -> int:
        return 1

    @staticmethod
    def _windows(text: torch.Tensor, starts: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        offsets = starts.view(-1, 1) + torch.arange(length + 1).view(1, -1)
        window = text[offsets].long()
        return window[:, :-1], window[:, 1:]

    def sample(self, batch: int, length: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Random training windows: (inputs, targets), both (batch, length) int64."""
        _check_positive("batch", batch)
        if length + 1 > self.train_bytes.numel():
            raise ValueError(f"byte corpus: training text ({self.train_bytes.numel()} bytes) is shorter than "
                             f"length + 1 = {length + 1}")
        starts = torch.randint(self.train_bytes.numel() - length, (batch,), generator=generator)
        return self._windows(self.train_bytes, starts, length)

    def heldout_windows(self, count: int, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The first `count` non-overlapping held-out windows: (inputs, targets), both (count, length) int64."""
        _check_positive("count", count)
        if count * (length + 1) > self.heldout_bytes.numel():
            raise ValueError(f"byte corpus: held-out text ({self.heldout_bytes.numel()} bytes) is shorter than "
                             f"{count} windows of {length + 1} bytes; read more bytes (max_bytes)")
        return self._windows(self.heldout_bytes, torch.arange(count) * (length + 1), length)
