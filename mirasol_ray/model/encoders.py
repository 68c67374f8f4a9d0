"""Snippet encoders: ViTs that see one snippet at a time, so their cost grows linearly with the number of snippets.

Audio arrives already cut per snippet ([B, S, M, T], same time window as the snippet's frames): each snippet's
audio tokens come from its own window, never from strided time steps of the whole clip (the misalignment
FIELD_NOTES records in lucidrains' chunking).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from mirasol_ray.model.config import ModelConfig
from mirasol_ray.model.layers import Transformer

# ImageNet statistics: video stays uint8 until it is on the device, and is normalised here.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class VideoEncoder(nn.Module):
    """ViT over one snippet's tubelets: dense t x p x p tubelets, or Sparse Video Tubes.

    Sparse Video Tubes (Piergiovanni et al. 2023, "Rethinking Video ViTs: Sparse Video Tubes"): 1 x p x p image
    patches of the snippet's first frame (the same kind of tokens an image ViT sees) plus a few large 3D tubes
    whose stride exceeds their size, so the snippet costs far fewer tokens than dense tubelets.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        F_, (H, W), p = cfg.frames_per_snippet, cfg.image_size, cfg.patch_size
        self.patch_size, self.tubelet_frames, self.sparse = p, cfg.tubelet_frames, cfg.sparse_tubes
        if self.sparse:
            (tt, tp), (st, sp) = cfg.sparse_tube_size, cfg.sparse_tube_stride
            self.image_patch = nn.Linear(p * p * 3, cfg.video_dim)
            self.tubes = nn.Conv3d(3, cfg.video_dim, kernel_size=(tt, tp, tp), stride=(st, sp, sp))
            n_tubes = ((F_ - tt) // st + 1) * ((H - tp) // sp + 1) * ((W - tp) // sp + 1)
            n_tokens = (H // p) * (W // p) + n_tubes
        else:
            self.tubelet = nn.Linear(cfg.tubelet_frames * p * p * 3, cfg.video_dim)
            n_tokens = (F_ // cfg.tubelet_frames) * (H // p) * (W // p)
        self.num_tokens = n_tokens
        self.pos = nn.Parameter(0.02 * torch.randn(n_tokens, cfg.video_dim))
        self.vit = Transformer(cfg.video_dim, cfg.video_depth, cfg.video_heads, cfg.mlp_ratio, cfg.dropout,
                               checkpointing=cfg.activation_checkpointing)
        self.register_buffer("mean", torch.tensor(_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(_STD), persistent=False)

    def forward(self, video: Tensor) -> Tensor:
        # video: uint8 (B, S, F, H, W, 3) -> (B, S, Nv, Dv)
        B = video.shape[0]
        x = (rearrange(video, "b s f h w c -> (b s) f h w c").float() / 255.0 - self.mean) / self.std
        p = self.patch_size
        if self.sparse:
            image = rearrange(x[:, 0], "n (h ph) (w pw) c -> n (h w) (ph pw c)", ph=p, pw=p)
            tubes = self.tubes(rearrange(x, "n f h w c -> n c f h w"))
            tokens = torch.cat([self.image_patch(image), rearrange(tubes, "n d f h w -> n (f h w) d")], dim=1)
        else:
            tokens = self.tubelet(rearrange(x, "n (f pt) (h ph) (w pw) c -> n (f h w) (pt ph pw c)",
                                            pt=self.tubelet_frames, ph=p, pw=p))
        return rearrange(self.vit(tokens + self.pos), "(b s) n d -> b s n d", b=B)


class AudioEncoder(nn.Module):
    """ViT over one snippet's log-mel patches."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch = cfg.audio_patch
        pm, pt = cfg.audio_patch
        n_tokens = (cfg.n_mels // pm) * (cfg.mel_frames // pt)
        self.num_tokens = n_tokens
        self.norm = nn.LayerNorm(pm * pt)  # log-mel scale differs by front end: normalise each patch
        self.embed = nn.Linear(pm * pt, cfg.audio_dim)
        self.pos = nn.Parameter(0.02 * torch.randn(n_tokens, cfg.audio_dim))
        self.vit = Transformer(cfg.audio_dim, cfg.audio_depth, cfg.audio_heads, cfg.mlp_ratio, cfg.dropout,
                               checkpointing=cfg.activation_checkpointing)

    def forward(self, audio: Tensor) -> Tensor:
        # audio: (B, S, M, T) log-mel -> (B, S, Na, Da)
        pm, pt = self.patch
        patches = rearrange(audio, "b s (m pm) (t pt) -> (b s) (m t) (pm pt)", pm=pm, pt=pt)
        x = self.vit(self.embed(self.norm(patches)) + self.pos)
        return rearrange(x, "(b s) n d -> b s n d", b=audio.shape[0])
