"""Snippet encoders: ViTs that see one snippet at a time, so their cost grows linearly with the number of snippets.

Audio arrives already cut per snippet ([B, S, M, T], same time window as the snippet's frames): each snippet's
audio tokens come from its own window, never from strided time steps of the whole clip (the misalignment
FIELD_NOTES records in lucidrains' chunking).

Both encoders can take the layout of a timm ViT (class/register tokens, a 2D position grid, pre-norm, layer scale,
its norm epsilon and activation: the ``video_*`` / ``audio_*`` options of :class:`ModelConfig`), so that weights
loaded by :mod:`mirasol_ray.model.pretrained` compute what they computed in timm.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from mirasol_ray.config import ModelConfig
from mirasol_ray.model.layers import BlockOptions, Transformer, make_norm


def vit_options(cfg: ModelConfig, part: str) -> BlockOptions:
    """Block options of the ``part`` ("video" or "audio") ViT."""
    get = lambda name: getattr(cfg, f"{part}_{name}")  # noqa: E731
    return BlockOptions(norm_eps=get("norm_eps"), qkv_bias=get("qkv_bias"), act=get("act"),
                        mlp_hidden=get("mlp_hidden"), layer_scale=get("layer_scale"))


class _ViT(nn.Module):
    """What the two encoders share: prefix tokens, their positions, the optional pre-norm, the blocks."""

    def __init__(self, cfg: ModelConfig, part: str):
        super().__init__()
        dim = getattr(cfg, f"{part}_dim")
        n_prefix = getattr(cfg, f"{part}_prefix_tokens")
        self.prefix = nn.Parameter(0.02 * torch.randn(n_prefix, dim)) if n_prefix else None
        self.prefix_pos = (nn.Parameter(0.02 * torch.randn(n_prefix, dim))
                           if n_prefix and getattr(cfg, f"{part}_prefix_pos") else None)
        self.norm_pre = make_norm("layernorm", dim, getattr(cfg, f"{part}_norm_eps")) \
            if getattr(cfg, f"{part}_pre_norm") else None
        self.vit = Transformer(dim, getattr(cfg, f"{part}_depth"), getattr(cfg, f"{part}_heads"), cfg.mlp_ratio,
                               cfg.dropout, checkpointing=cfg.activation_checkpointing, opts=vit_options(cfg, part))

    def encode(self, tokens: Tensor) -> Tensor:
        """tokens: (N, n, D) patch tokens with their positions -> (N, prefix + n, D)."""
        if self.prefix is not None:
            prefix = self.prefix if self.prefix_pos is None else self.prefix + self.prefix_pos
            tokens = torch.cat([repeat(prefix, "k d -> n k d", n=tokens.shape[0]), tokens], dim=1)
        if self.norm_pre is not None:
            tokens = self.norm_pre(tokens)
        return self.vit(tokens)


class ConvStem(nn.Module):
    """log2(p) 3x3 stride-2 convolutions, each with a GroupNorm (one group: the whole feature map) and a GELU, then
    a 1x1 projection to ``dim``: (N, in_ch, H, W) -> (N, dim, H/p, W/p), the p-pixel grid of a patch embedding
    (Xiao et al. 2021). Channels start at ``channels`` and double at each convolution, up to ``dim``."""

    def __init__(self, in_ch: int, channels: int, patch: int, dim: int, bias: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(patch.bit_length() - 1):
            out = min(channels * 2**i, dim)
            layers += [nn.Conv2d(in_ch, out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, out), nn.GELU()]
            in_ch = out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(in_ch, dim, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.convs(x))


class VideoEncoder(_ViT):
    """ViT over one snippet's tubelets: dense t x p x p tubelets, or Sparse Video Tubes.

    Sparse Video Tubes (Piergiovanni et al. 2023, "Rethinking Video ViTs: Sparse Video Tubes"): 1 x p x p image
    patches of the snippet's first frame (the same kind of tokens an image ViT sees) plus a few large 3D tubes
    whose stride exceeds their size, so the snippet costs far fewer tokens than dense tubelets.

    Positions are "joint" (one learned row per token) or "factorized": a 2D grid of the frame's patches (where an
    image ViT's table goes) plus, for dense tubelets, a time table that starts at zero, and for sparse tubes a table
    of their own.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, "video")
        F_, (H, W), p = cfg.frames_per_snippet, cfg.image_size, cfg.patch_size
        D = cfg.video_dim
        self.patch_size, self.tubelet_frames, self.sparse = p, cfg.tubelet_frames, cfg.sparse_tubes
        self.conv_stem = cfg.video_stem == "conv" and not self.sparse
        grid = (H // p) * (W // p)
        bias = cfg.video_patch_bias
        if self.sparse:
            (tt, tp), (st, sp) = cfg.sparse_tube_size, cfg.sparse_tube_stride
            self.image_patch = nn.Linear(p * p * 3, D, bias=bias)
            self.tubes = nn.Conv3d(3, D, kernel_size=(tt, tp, tp), stride=(st, sp, sp), bias=bias)
            n_tubes = ((F_ - tt) // st + 1) * ((H - tp) // sp + 1) * ((W - tp) // sp + 1)
            n_tokens = grid + n_tubes
        else:
            if cfg.video_stem == "conv":
                self.stem = ConvStem(cfg.tubelet_frames * 3, cfg.video_stem_channels, p, D, bias=bias)
            else:
                self.tubelet = nn.Linear(cfg.tubelet_frames * p * p * 3, D, bias=bias)
            n_tubes = 0
            n_tokens = (F_ // cfg.tubelet_frames) * grid
        self.factorized = cfg.video_pos == "factorized"
        if self.factorized:
            self.pos = nn.Parameter(0.02 * torch.randn(grid, D))  # (h w) grid of one frame
            if self.sparse:
                self.tube_pos = nn.Parameter(0.02 * torch.randn(n_tubes, D))
            else:
                self.time_pos = nn.Parameter(torch.zeros(F_ // cfg.tubelet_frames, D))
        else:
            self.pos = nn.Parameter(0.02 * torch.randn(n_tokens, D))
        self.max_token = cfg.video_max_token
        self.num_tokens = n_tokens + cfg.video_prefix_tokens + int(self.max_token)
        self.register_buffer("mean", torch.tensor(cfg.video_mean), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.video_std), persistent=False)

    def _positions(self) -> Tensor:
        """(n_tokens, D) position of every non-prefix token."""
        if not self.factorized:
            return self.pos
        if self.sparse:
            return torch.cat([self.pos, self.tube_pos], dim=0)
        return rearrange(self.time_pos[:, None] + self.pos[None], "f n d -> (f n) d")

    def forward(self, video: Tensor) -> Tensor:
        # video: uint8 (B, S, F, H, W, 3) -> (B, S, Nv, Dv), Nv = prefix tokens + patch/tube tokens
        B = video.shape[0]
        x = (rearrange(video, "b s f h w c -> (b s) f h w c").float() / 255.0 - self.mean) / self.std
        p = self.patch_size
        if self.sparse:
            image = rearrange(x[:, 0], "n (h ph) (w pw) c -> n (h w) (ph pw c)", ph=p, pw=p)
            tubes = self.tubes(rearrange(x, "n f h w c -> n c f h w"))
            tokens = torch.cat([self.image_patch(image), rearrange(tubes, "n d f h w -> n (f h w) d")], dim=1)
        elif self.conv_stem:
            grid = self.stem(rearrange(x, "n (f pt) h w c -> (n f) (pt c) h w", pt=self.tubelet_frames))
            tokens = rearrange(grid, "(n f) d h w -> n (f h w) d", n=x.shape[0])
        else:
            tokens = self.tubelet(rearrange(x, "n (f pt) (h ph) (w pw) c -> n (f h w) (pt ph pw c)",
                                            pt=self.tubelet_frames, ph=p, pw=p))
        out = self.encode(tokens + self._positions())
        if self.max_token:
            out = torch.cat([out, out.amax(dim=1, keepdim=True)], dim=1)
        return rearrange(out, "(b s) n d -> b s n d", b=B)


class AudioEncoder(_ViT):
    """ViT over one snippet's log-mel patches: mel bins as an image's rows, frames as its columns."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, "audio")
        self.patch = cfg.audio_patch
        pm, pt = cfg.audio_patch
        n_tokens = (cfg.n_mels // pm) * (cfg.mel_frames // pt)
        self.num_tokens = n_tokens + cfg.audio_prefix_tokens
        # log-mel scale differs by front end: normalise each patch
        self.norm = nn.LayerNorm(pm * pt) if cfg.audio_patch_norm else None
        self.embed = nn.Linear(pm * pt, cfg.audio_dim, bias=cfg.audio_patch_bias)
        self.pos = nn.Parameter(0.02 * torch.randn(n_tokens, cfg.audio_dim))

    def forward(self, audio: Tensor) -> Tensor:
        # audio: (B, S, M, T) log-mel -> (B, S, Na, Da)
        pm, pt = self.patch
        patches = rearrange(audio, "b s (m pm) (t pt) -> (b s) (m t) (pm pt)", pm=pm, pt=pt)
        if self.norm is not None:
            patches = self.norm(patches)
        x = self.encode(self.embed(patches) + self.pos)
        return rearrange(x, "(b s) n d -> b s n d", b=audio.shape[0])
