"""A small pre-norm decoder-only transformer whose attention is switchable.

Attention types (ATTENTION_TYPES), all causal, all on (B, H, N, D) tensors:
  "softmax"    torch's scaled_dot_product_attention.
  "entmax"     alpha = 1.5 entmax attention.
  "learnable"  entmax with a learnable alpha per head: alpha = 1 + sigmoid(a), a of shape (H,), starting at 1.5.
  "asentmax"   ASEntmax: alpha = 1.5 entmax after scaling the query at 0-based position i by
               1 + beta * log(i + 2) ** gamma, with beta = softplus(b) and gamma = 2 * tanh(c), b and c learnable
               per head (initially beta = 0.1, gamma = 1). Scaling q row-wise scales that query's logits.
The three entmax types are entflash.nn.EntmaxAttention (which calls entflash.api.entmax_attention: fused Triton
kernels on CUDA, the exact torch path on CPU).
Positions: rotary embeddings ("rope") or none ("nope").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_TYPES = ("softmax", "entmax", "learnable", "asentmax")
POSITION_ENCODINGS = ("rope", "nope")
ENTMAX_ALPHA = 1.5


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the decoder. head_dim = d_model // num_heads."""

    vocab_size: int
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    attention: str = "softmax"
    position_encoding: str = "rope"
    mlp_ratio: int = 4
    entmax_backend: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"`attention` must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"`position_encoding` must be one of {POSITION_ENCODINGS}, "
                             f"got {self.position_encoding!r}")
        for field in ("vocab_size", "d_model", "num_heads", "num_layers", "mlp_ratio"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{field}` must be a positive int, got {value!r}")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(f"`d_model` ({self.d_model}) must split into `num_heads` ({self.num_heads}) heads "
                             f"of an even head dim")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def rotate(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x (B, H, N, D) at positions 0..N-1 (half-split pairing); same shape."""
    length, head_dim = x.shape[-2], x.shape[-1]
    half = head_dim // 2
    frequencies = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(length, device=x.device, dtype=torch.float32).view(-1, 1) * frequencies
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


def _entmax_module(config: ModelConfig):
    """entflash.nn.EntmaxAttention configured for config.attention (one of the three entmax types)."""
    try:
        from entflash.nn import EntmaxAttention
    except ImportError as error:
        raise ImportError(f"attention {config.attention!r} needs entflash.nn.EntmaxAttention ({error})") from error
    return EntmaxAttention(config.num_heads, alpha=ENTMAX_ALPHA, learn_alpha=config.attention == "learnable",
                           asentmax="head" if config.attention == "asentmax" else None,
                           backend=config.entmax_backend)


class SwitchableAttention(nn.Module):
    """Causal multi-head self-attention: x (B, N, d_model) -> (B, N, d_model), of type `config.attention`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.entmax = None if config.attention == "softmax" else _entmax_module(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, head_dim = self.config.num_heads, self.config.head_dim
        q, k, v = self.qkv(x).view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        if self.config.position_encoding == "rope":
            q, k = rotate(q), rotate(k)
        if self.entmax is None:
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mixed = self.entmax(q, k, v, causal=True)
        return self.out(mixed.transpose(1, 2).reshape(batch, length, self.config.d_model))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + mlp(norm(x)). x: (B, N, d_model)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = SwitchableAttention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Token ids (B, N) int64 -> next-token logits (B, N, vocab_size)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=1.0 / math.sqrt(config.d_model))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))

    def attention_parameters(self) -> dict:
        """The learned attention-shape values per layer (alpha for "learnable"; beta, gamma for "asentmax"),
        as plain lists, for the results file."""
        values = {}
        for index, block in enumerate(self.blocks):
            entmax = block.attention.entmax
            if self.config.attention == "learnable":
                values[f"layer{index}.alpha"] = entmax.alpha().detach().cpu().tolist()
            if self.config.attention == "asentmax":
                values[f"layer{index}.beta"] = F.softplus(entmax.asentmax.beta_raw).detach().cpu().tolist()
                values[f"layer{index}.gamma"] = (2 * torch.tanh(entmax.asentmax.gamma_raw)).detach().cpu().tolist()
        return values
