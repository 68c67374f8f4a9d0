"""The context autoregressive model: a causal text decoder that cross-attends to the time-aligned latents.

The decoded sequence is ``cat(prompt, target)``: a left-padded prompt followed by a right-padded target is one
contiguous run of tokens, with pads only at its two ends. Positions count valid tokens (cumulative mask), so a
token's position does not depend on how much padding precedes it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mirasol_ray.model.config import ModelConfig
from mirasol_ray.model.layers import Transformer


def text_mask(valid: Tensor, num_new: int) -> Tensor:
    """Attention mask (B, 1, n, L) for the last ``num_new`` of L tokens: causal, pads hidden as keys.

    valid: (B, L) bool. A query always sees itself, so a pad query (left padding) has one key, not zero (which
    would give NaN); pad outputs are never read.
    """
    L = valid.shape[1]
    q = torch.arange(L - num_new, L, device=valid.device)[:, None]  # (n, 1) absolute query index
    k = torch.arange(L, device=valid.device)[None, :]  # (1, L)
    return (((k <= q) & valid[:, None, :]) | (k == q))[:, None]


class TextDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.pos = nn.Embedding(cfg.max_text_len, cfg.text_dim)
        self.transformer = Transformer(cfg.text_dim, cfg.text_depth, cfg.text_heads, cfg.mlp_ratio, cfg.dropout,
                                       context_dim=cfg.dim, checkpointing=cfg.activation_checkpointing)

    def forward(self, ids: Tensor, valid: Tensor, context: Tensor, context_mask: Tensor,
                cache: list[dict] | None = None) -> Tensor:
        """Hidden states (B, n, Dt) of the last n = ids.shape[1] tokens of the sequence.

        ids: (B, n) token ids, the whole sequence without a cache, only the tokens the cache has not seen with one;
        valid: (B, L) bool over the whole sequence so far; context: (B, N, D) latents; context_mask: (B, N).
        """
        n = ids.shape[1]
        if valid.shape[1] > self.pos.num_embeddings:
            raise ValueError(f"text of {valid.shape[1]} tokens exceeds max_text_len {self.pos.num_embeddings}")
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)[:, -n:]
        x = self.embed(ids) + self.pos(positions)
        return self.transformer(x, mask=text_mask(valid, n), context=context,
                                context_mask=context_mask[:, None, None, :], cache=cache)

    def logits(self, h: Tensor) -> Tensor:
        """Output head tied to the input embedding: (..., Dt) -> (..., V)."""
        return h @ self.embed.weight.t()

    def new_cache(self) -> list[dict]:
        return self.transformer.new_cache()
