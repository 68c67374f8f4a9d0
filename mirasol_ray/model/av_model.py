"""The time-aligned autoregressive model: a transformer over the snippets' combined tokens, in time order.

Attention is block-causal: the m tokens of snippet t see every token of snippets <= t and none later, so the
output at t is a latent of the clip up to t, from which the model learns to predict snippet t+1's Combiner output.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from mirasol_ray.config import ModelConfig
from mirasol_ray.model.layers import Transformer


def block_causal_mask(num_snippets: int, tokens_per_snippet: int, device: torch.device | None = None) -> Tensor:
    """(S*m, S*m) bool, True where query token i may attend key token j: snippet(j) <= snippet(i)."""
    snippet = torch.arange(num_snippets, device=device).repeat_interleave(tokens_per_snippet)
    return snippet[None, :] <= snippet[:, None]


class TimeAlignedModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.snippet_pos = nn.Embedding(cfg.max_snippets, cfg.dim)
        self.token_pos = nn.Parameter(0.02 * torch.randn(cfg.combiner_tokens, cfg.dim))
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout,
                                       checkpointing=cfg.activation_checkpointing)
        self.predict_next = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, z: Tensor) -> Tensor:
        """z: (B, S, m, D) Combiner outputs -> latents (B, S, m, D); ``predict_next`` maps latent t to snippet t+1."""
        B, S, m, _ = z.shape
        if S > self.snippet_pos.num_embeddings:
            raise ValueError(f"{S} snippets, but the model was built for at most {self.snippet_pos.num_embeddings}")
        pos = rearrange(self.snippet_pos.weight[:S], "s d -> s 1 d") + self.token_pos  # (S, m, D)
        x = rearrange(z + pos, "b s m d -> b (s m) d")
        h = self.transformer(x, mask=block_causal_mask(S, m, z.device))
        return rearrange(h, "b (s m) d -> b s m d", s=S)


def latent_loss(pred: Tensor, z: Tensor, snippet_mask: Tensor, kind: str) -> Tensor:
    """Mean over valid (t, t+1) pairs of the distance between pred[:, t] and the detached z[:, t+1].

    pred, z: (B, S, m, D); snippet_mask: (B, S). l2: mean squared error per token; cosine: 1 - cosine similarity.
    """
    p, target = pred[:, :-1].float(), z[:, 1:].detach().float()
    if kind == "l2":
        per_token = (p - target).pow(2).mean(-1)
    else:
        per_token = 1 - torch.nn.functional.cosine_similarity(p, target, dim=-1)
    valid = repeat(snippet_mask[:, :-1] & snippet_mask[:, 1:], "b s -> b s m", m=z.shape[2]).float()
    return (per_token * valid).sum() / valid.sum().clamp(min=1)
