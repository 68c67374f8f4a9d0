"""Combiners: fuse one snippet's video and audio tokens into m tokens (Mirasol3B section 3.2).

Both take the encoders' outputs, (B, S, Nv, Dv) and (B, S, Na, Da), and return (B, S, m, D). The Transformer
Combiner sees each snippet alone (its m tokens: m learned queries' outputs, or, as in the paper, its last m outputs:
``model.combiner_readout``); the Token Turing Machine Combiner carries k memory tokens from snippet to snippet, so a
snippet's output can depend on earlier snippets (never on later ones).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from mirasol_ray.config import ModelConfig
from mirasol_ray.model.layers import TokenPool, Transformer


class _Inputs(nn.Module):
    """Projects video and audio tokens to the combiner width and tags each with a learned modality embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.video = nn.Linear(cfg.video_dim, cfg.dim)
        self.audio = nn.Linear(cfg.audio_dim, cfg.dim)
        self.video_type = nn.Parameter(0.02 * torch.randn(cfg.dim))
        self.audio_type = nn.Parameter(0.02 * torch.randn(cfg.dim))

    def forward(self, video: Tensor, audio: Tensor, audio_present: Tensor) -> tuple[Tensor, Tensor]:
        """-> tokens (B, S, Nv + Na, D), keep mask (B, Nv + Na): a clip without audio keeps only its video tokens."""
        x = torch.cat([self.video(video) + self.video_type, self.audio(audio) + self.audio_type], dim=2)
        Nv, Na = video.shape[2], audio.shape[2]
        keep = torch.cat([audio_present.new_ones(audio_present.shape[0], Nv),
                          repeat(audio_present, "b -> b n", n=Na)], dim=1)
        return x, keep


class TransformerCombiner(nn.Module):
    """A transformer over one snippet's tokens at a time; ``cfg.combiner_readout`` says which m outputs are the
    snippet's:

    - "queries": m learned tokens join the snippet's [video, audio] tokens; their outputs.
    - "last" (the paper's, sec. 3.2): the last m outputs over the snippet's concatenated [video, audio] tokens,
      i.e. the last m tokens the clip has (the last m video tokens for a clip without audio, whose audio tokens
      are masked out).

    Attention within a snippet is bidirectional in both: nothing is predicted inside a snippet (the time-aligned
    model's autoregression is over snippets), and the paper describes no causal mask there (nor does the one public
    implementation, lucidrains/mirasol-pytorch, whose combiner is an unmasked encoder). So every one of the m
    outputs depends on every token the snippet has, and on nothing of other snippets.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.m = cfg.combiner_tokens
        self.inputs = _Inputs(cfg)
        if cfg.combiner_readout == "queries":
            self.out_tokens = nn.Parameter(0.02 * torch.randn(cfg.combiner_tokens, cfg.dim))
        else:
            self.register_parameter("out_tokens", None)
        self.transformer = Transformer(cfg.dim, cfg.combiner_depth, cfg.heads, cfg.mlp_ratio, cfg.dropout,
                                       checkpointing=cfg.activation_checkpointing)

    def forward(self, video: Tensor, audio: Tensor, audio_present: Tensor) -> Tensor:
        x, keep = self.inputs(video, audio, audio_present)  # (B, S, N, D), (B, N)
        B, S, N, D = x.shape
        Nv, m = video.shape[2], self.m
        x = rearrange(x, "b s n d -> (b s) n d")
        if self.out_tokens is not None:
            x = torch.cat([repeat(self.out_tokens, "m d -> bs m d", bs=B * S), x], dim=1)  # (B*S, m + N, D)
            keep = torch.cat([keep.new_ones(B, m), keep], dim=1)  # (B, m + N)
        mask = repeat(keep, "b n -> (b s) 1 1 n", s=S)  # key mask, same for every query
        out = self.transformer(x, mask=mask)  # (B*S, [m +] N, D)
        if self.out_tokens is not None:
            out = out[:, :m]  # (B*S, m, D)
        else:
            if m > Nv:
                raise ValueError(f"model.combiner_tokens {m} is more than the snippet's {Nv} video tokens: the last-m "
                                 "readout of a clip without audio keeps m of them")
            end = torch.where(audio_present, N, Nv)  # (B,): one past the clip's last kept token
            idx = end[:, None] - m + torch.arange(m, device=end.device)  # (B, m)
            idx = repeat(idx, "b m -> (b s) m d", s=S, d=D)
            out = out.gather(1, idx)  # (B*S, m, D)
        return rearrange(out, "(b s) m d -> b s m d", b=B)


class TTMCombiner(nn.Module):
    """Token Turing Machine Combiner (Ryoo et al. 2023), one step per snippet.

    read:    r tokens pooled from [memory, snippet inputs]
    process: a transformer over the r tokens -> the snippet's output (pooled to m tokens when m != r)
    write:   new k-token memory pooled from [memory, processed, inputs]
    Learned embeddings tell the pools which tokens are memory, inputs or processed outputs.

    **Slot retention** (``model.ttm_slot_retention``, the long-video presets'). As published, each write is a
    TokenLearner pool over all k + r + N tokens, so at initialisation a memory slot keeps about k / (k + r + N) of
    itself per snippet (0.42 in ``tiny_long``) and snippet 0's trace is float noise after ~64 snippets: the memory
    cannot carry the start of a 128-snippet video to its end unless training first learns to keep it. With
    retention, the write is still the same pool over the same tokens, with one more term in its logits, a
    location-based address as in the Neural Turing Machines TTM builds on: output slot i's logit for its own old
    value gets ``retention[i] + log(k + r + N - 1)``, a learned per-slot log-odds of keeping itself against
    everything else the write sees. Initialised so the slots' half-lives spread log-uniformly from 1 snippet (a slot
    that is mostly rewritten each snippet) to twice ``max_snippets`` (one that keeps ~70% of what it holds over
    128 snippets); training moves them. The type embeddings then only steer the pools' scores and are not pooled
    into the memory (kept at ~1 per write, they would build up in a slot that keeps itself).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.dim
        self.inputs = _Inputs(cfg)
        self.memory0 = nn.Parameter(0.02 * torch.randn(cfg.ttm_memory, D))
        self.memory_type = nn.Parameter(0.02 * torch.randn(D))
        self.input_type = nn.Parameter(0.02 * torch.randn(D))
        self.output_type = nn.Parameter(0.02 * torch.randn(D))
        self.read = TokenPool(D, cfg.ttm_read)
        self.process = Transformer(D, cfg.combiner_depth, cfg.heads, cfg.mlp_ratio, cfg.dropout,
                                   checkpointing=cfg.activation_checkpointing)
        self.write = TokenPool(D, cfg.ttm_memory)
        self.out_pool = TokenPool(D, cfg.combiner_tokens) if cfg.combiner_tokens != cfg.ttm_read else None
        if cfg.ttm_slot_retention:
            half_life = torch.logspace(0, math.log10(2 * cfg.max_snippets), cfg.ttm_memory)  # (k,) in snippets
            keep = 0.5 ** (1 / half_life)  # the share of itself slot i keeps per write
            self.retention = nn.Parameter(torch.log(keep / (1 - keep)))  # (k,) log-odds
        else:
            self.register_parameter("retention", None)

    def forward(self, video: Tensor, audio: Tensor, audio_present: Tensor) -> Tensor:
        x, keep = self.inputs(video, audio, audio_present)  # (B, S, N, D), (B, N)
        B, S, N = x.shape[:3]
        memory = repeat(self.memory0, "k d -> b k d", b=B)
        k, r = memory.shape[1], self.read.score[-1].out_features
        read_keep = torch.cat([keep.new_ones(B, k), keep], dim=1)
        write_keep = torch.cat([keep.new_ones(B, k + r), keep], dim=1)
        prior = None
        if self.retention is not None:  # (k + r + N, k): slot i's own old value, at row i, column i
            own = torch.diag(self.retention + math.log(k + r + N - 1))
            prior = torch.cat([own, own.new_zeros(r + N, k)], dim=0)
        outputs = []
        for t in range(S):
            inputs = x[:, t] + self.input_type  # (B, N, D)
            mem = memory + self.memory_type  # (B, k, D)
            z = self.process(self.read(torch.cat([mem, inputs], dim=1), read_keep))  # (B, r, D)
            outputs.append(z if self.out_pool is None else self.out_pool(z))
            if t < S - 1:  # the last snippet's memory would never be read
                tagged = torch.cat([mem, z + self.output_type, inputs], dim=1)  # (B, k + r + N, D)
                if prior is None:
                    memory = self.write(tagged, write_keep)  # (B, k, D)
                else:  # scores from the tagged tokens, values untagged
                    memory = self.write(torch.cat([memory, z, x[:, t]], dim=1), write_keep, scores_of=tagged,
                                        prior=prior)
        return torch.stack(outputs, dim=1)  # (B, S, m, D)


def build_combiner(cfg: ModelConfig) -> nn.Module:
    return TTMCombiner(cfg) if cfg.combiner == "ttm" else TransformerCombiner(cfg)
