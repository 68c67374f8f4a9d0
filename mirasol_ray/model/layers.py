"""The one attention / block / transformer implementation every part of the model is built from.

Masks are boolean and mean "may attend" (True = keep), broadcastable to (B, heads, Nq, Nk), the convention of
``F.scaled_dot_product_attention``. A per-layer ``cache`` dict makes incremental decoding possible: self-attention
appends the new keys/values to it, cross-attention computes the context's keys/values once and reuses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                cache: dict[str, Tensor] | None = None) -> Tensor:
        """x: (B, N, D) queries; context: (B, M, Dc) keys/values, x itself when None (self-attention)."""
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        cross = context is not None
        if cache is not None and cross and "k" in cache:
            k, v = cache["k"], cache["v"]  # the context does not change while decoding
        else:
            kv = rearrange(self.to_kv(context if cross else x), "b m (two h d) -> two b h m d", two=2, h=self.heads)
            k, v = kv[0], kv[1]  # (B, h, M, d)
            if cache is not None:
                if not cross and "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float, dropout: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention (when ``context_dim``), MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, context_dim: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout=dropout)
        self.cross = context_dim > 0
        if self.cross:
            self.norm_x = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, context_dim=context_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cache: dict[str, dict] | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask=mask, cache=None if cache is None else cache["self"]))
        if self.cross:
            x = x + self.drop(self.cross_attn(self.norm_x(x), context, mask=context_mask,
                                              cache=None if cache is None else cache["cross"]))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of :class:`Block` with a final LayerNorm; optional activation checkpointing per block."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 context_dim: int = 0, checkpointing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, context_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.checkpointing = checkpointing

    def new_cache(self) -> list[dict[str, dict]]:
        """Empty per-layer key/value cache for incremental decoding."""
        return [{"self": {}, "cross": {}} for _ in self.blocks]

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cache: list[dict[str, dict]] | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            if self.checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, context, context_mask, use_reentrant=False)
            else:
                x = block(x, mask, context, context_mask, None if cache is None else cache[i])
        return self.norm(x)


class TokenPool(nn.Module):
    """Attention pooling of N tokens to n (TokenLearner, as the Token Turing Machine reads and writes with).

    Each output token is a softmax-weighted sum of the inputs; the weights come from a small MLP on each input, so
    which inputs matter is learned. ``mask`` (B, N) drops tokens (absent audio) from every sum.
    """

    def __init__(self, dim: int, n_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, n_out))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # x: (B, N, D) -> (B, n, D)
        logits = self.score(self.norm(x)).float()  # (B, N, n)
        if mask is not None:
            logits = logits.masked_fill(~mask[..., None], float("-inf"))
        weights = logits.softmax(dim=1).to(x.dtype)
        return torch.einsum("b n k, b n d -> b k d", weights, x)


def init_weights(module: nn.Module) -> None:
    """ViT/GPT-style init: truncated normal(0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
