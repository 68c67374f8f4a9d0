"""The context autoregressive model: a causal text decoder that cross-attends to the time-aligned latents.

The decoded sequence is ``cat(prompt, target)``: a left-padded prompt followed by a right-padded target is one
contiguous run of tokens, with pads only at its two ends. Positions count valid tokens (cumulative mask), so a
token's position does not depend on how much padding precedes it.

Its blocks take the shape of a pretrained causal LM's (the ``text_*`` options of :class:`ModelConfig`): LayerNorm
or RMSNorm, learned or rotary positions, a plain or gated (SwiGLU) MLP, grouped-query attention, biases or not, a
tied or separate output head. Loaded by :mod:`mirasol_ray.model.pretrained`, it computes what the LM computed in
Hugging Face transformers; each block's cross-attention is new, and starts with a zero output projection, so the
decoder starts as the LM.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mirasol_ray.config import ModelConfig
from mirasol_ray.model.layers import BlockOptions, Transformer


def text_mask(valid: Tensor, num_new: int) -> Tensor:
    """Attention mask (B, 1, n, L) for the last ``num_new`` of L tokens: causal, pads hidden as keys.

    valid: (B, L) bool. A query always sees itself, so a pad query (left padding) has one key, not zero (which
    would give NaN); pad outputs are never read.
    """
    L = valid.shape[1]
    q = torch.arange(L - num_new, L, device=valid.device)[:, None]  # (n, 1) absolute query index
    k = torch.arange(L, device=valid.device)[None, :]  # (1, L)
    return (((k <= q) & valid[:, None, :]) | (k == q))[:, None]


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """(head_dim / 2,) inverse frequencies of the rotary embedding, with Llama-3 or linear scaling."""
    d = cfg.text_head_dim or cfg.text_dim // cfg.text_heads
    inv = 1.0 / (cfg.text_rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    args = cfg.text_rope_scaling_args
    if cfg.text_rope_scaling == "linear":
        inv = inv / args[0]
    elif cfg.text_rope_scaling == "llama3":  # as transformers' _compute_llama3_parameters
        factor, low, high, old_len = args
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def text_block_options(cfg: ModelConfig) -> BlockOptions:
    return BlockOptions(norm=cfg.text_norm, norm_eps=cfg.text_norm_eps, head_dim=cfg.text_head_dim,
                        kv_heads=cfg.text_kv_heads, qkv_bias=cfg.text_qkv_bias, out_bias=cfg.text_out_bias,
                        mlp=cfg.text_mlp, mlp_hidden=cfg.text_mlp_hidden, mlp_bias=cfg.text_mlp_bias,
                        act=cfg.text_act)


class TextDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rows = cfg.embed_rows
        self.max_len = cfg.max_text_len
        self.embed = nn.Embedding(rows, cfg.text_dim)
        if cfg.text_pos == "learned":
            self.pos = nn.Embedding(cfg.max_text_len, cfg.text_dim)
        else:
            self.pos = None
            # not a buffer: recomputed from the config, so a model built on the meta device needs nothing restored
            self._rope_cfg = cfg
        self.transformer = Transformer(cfg.text_dim, cfg.text_depth, cfg.text_heads, cfg.mlp_ratio, cfg.dropout,
                                       context_dim=cfg.dim, checkpointing=cfg.activation_checkpointing,
                                       opts=text_block_options(cfg))
        self.lm_head = None if cfg.text_tied_head else nn.Linear(cfg.text_dim, rows, bias=False)

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, n, head_dim) at ``positions`` (B, n), in float32."""
        inv = rope_inv_freq(self._rope_cfg).to(positions.device)
        freqs = positions[..., None].float() * inv  # (B, n, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, ids: Tensor, valid: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                cache: list[dict] | None = None, context_index: Tensor | None = None,
                text_context_mask: Tensor | None = None) -> Tensor:
        """Hidden states (B, n, Dt) of the last n = ids.shape[1] tokens of the sequence.

        ids: (B, n) token ids, the whole sequence without a cache, only the tokens the cache has not seen with one;
        valid: (B, L) bool over the whole sequence so far; context: (C, N, D) latents, context_mask: (C, N), with
        C = B, or any C with ``context_index`` (B,) naming each sequence's context row (several texts of a clip
        sharing its latents). ``text_context_mask`` (B, N), when given, replaces ``context_mask[context_index]``:
        each sequence's own view of its context (a timestamped caption reads its snippets alone). Without a context
        the cross-attention is skipped: the decoder alone is a language model.
        """
        n = ids.shape[1]
        if valid.shape[1] > self.max_len:
            raise ValueError(f"text of {valid.shape[1]} tokens exceeds max_text_len {self.max_len}")
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)[:, -n:]
        x = self.embed(ids)
        rope = None
        if self.pos is not None:
            x = x + self.pos(positions)
        else:
            rope = self._rope(positions)
        if text_context_mask is not None:
            context_mask = text_context_mask  # (B, N)
        elif context_mask is not None and context_index is not None:
            context_mask = context_mask[context_index]  # (B, N)
        return self.transformer(x, mask=text_mask(valid, n), context=context,
                                context_mask=None if context_mask is None else context_mask[:, None, None, :],
                                cache=cache, rope=rope, context_index=context_index)

    def logits(self, h: Tensor) -> Tensor:
        """Output head, tied to the input embedding unless the LM has its own: (..., Dt) -> (..., V)."""
        return h @ self.embed.weight.t() if self.lm_head is None else self.lm_head(h)

    def new_cache(self) -> list[dict]:
        return self.transformer.new_cache()
