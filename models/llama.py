"""A compact Llama-style decoder: RMSNorm, rotary embeddings, causal SDPA, SwiGLU.

Written so that its exported graph is what conversions target: every projection is an
``nn.Linear`` without bias (``aten.linear``), RMSNorm is the six-op pattern
``x * rsqrt(mean(x**2) + eps) * w``, attention is ``scaled_dot_product_attention`` with
``is_causal=True`` and the output projection is named ``output``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of a :class:`Llama` model."""

    dim: int = 256
    n_layers: int = 6
    n_heads: int = 16
    vocab_size: int = 2048
    hidden_dim: int | None = None
    """SwiGLU hidden size; default: ``4 * dim * 2 / 3`` rounded up to a multiple of 32."""
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    rope_theta: float = 10000.0

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        return 32 * ((hidden + 31) // 32)


PRESETS: dict[str, LlamaConfig] = {
    # The shape training frameworks use for their debug runs.
    "debug": LlamaConfig(dim=256, n_layers=6, n_heads=16, vocab_size=2048),
    # Small enough for unit tests; every linear still has dims divisible by 32.
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=128),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(
    head_dim: int, max_seq_len: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables of shape ``[max_seq_len, head_dim // 2]``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., :h/2], x[..., h/2:])`` of ``x: [B, L, H, D]`` by position."""
    seq_len = x.shape[1]
    cos = cos.narrow(0, 0, seq_len).view(1, seq_len, 1, -1)
    sin = sin.narrow(0, 0, seq_len).view(1, seq_len, 1, -1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        shape = (bsz, seq_len, self.n_heads, self.head_dim)
        q = apply_rotary(self.wq(x).view(shape), cos, sin)
        k = apply_rotary(self.wk(x).view(shape), cos, sin)
        v = self.wv(x).view(shape)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seq_len, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Token ids ``[B, L]`` → logits ``[B, L, vocab]``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = self.config.dim**-0.5 if name == "output.weight" else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self.output(self.norm(h))


class LlamaWithLoss(nn.Module):
    """Wraps :class:`Llama` so the cross-entropy loss is part of the captured graph.

    ``forward(tokens, labels)`` returns the mean next-token loss; handlers that rewrite
    the loss (e.g. ``chunked_cross_entropy``) need it inside the graph.
    """

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


def build_llama(
    preset: str = "debug", *, with_loss: bool = False, seed: int | None = 0, **overrides
) -> nn.Module:
    """Build a Llama model from a preset name (``debug`` or ``tiny``) plus field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Llama preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = Llama(cfg)
    return LlamaWithLoss(model) if with_loss else model
