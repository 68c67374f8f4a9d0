"""The model's own config: everything needed to rebuild a Mirasol3B model from a checkpoint alone.

Flat on purpose (no nested dataclasses, no Optional): ``dataclasses.asdict`` of it is plain python, travels in a
``weights_only`` checkpoint, and the YAML loader in :mod:`mirasol_ray.config` can coerce every field.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    # --- geometry: set from the data section by mirasol_ray.config.Config; listed here so a checkpoint is complete
    max_snippets: int = 4
    """Most snippets a clip may have: size of the time-aligned model's snippet position table."""
    frames_per_snippet: int = 4
    """F: frames in one snippet."""
    image_size: tuple[int, int] = (64, 64)
    """(H, W) of a frame."""
    n_mels: int = 64
    """M: log-mel bins."""
    mel_frames: int = 32
    """T: log-mel frames per snippet."""
    max_text_len: int = 96
    """Prompt + target tokens: size of the text decoder's position table."""
    vocab_size: int = 260
    """Text vocabulary (the tokenizer's, specials included)."""
    num_classes: int = 0
    """Classes of the linear head (cls_mode == "head"); 0 = no head."""

    # --- video snippet encoder (ViT over tubelets)
    video_dim: int = 96
    """Width of the video ViT."""
    video_depth: int = 2
    """Blocks of the video ViT."""
    video_heads: int = 4
    """Attention heads of the video ViT."""
    tubelet_frames: int = 2
    """t of a t x p x p tubelet."""
    patch_size: int = 16
    """p: spatial side of a tubelet, and of the 2D image patches with sparse tubes."""
    sparse_tubes: bool = False
    """Sparse Video Tubes (Piergiovanni et al. 2023): 2D patches of the snippet's first frame plus sparse 3D tubes,
    instead of dense tubelets."""
    sparse_tube_size: tuple[int, int] = (4, 16)
    """(t, p) kernel of a sparse 3D tube."""
    sparse_tube_stride: tuple[int, int] = (4, 32)
    """(t, p) stride of the sparse 3D tubes: larger than the kernel makes them sparse."""

    # --- audio snippet encoder (ViT over log-mel patches)
    audio_dim: int = 96
    """Width of the audio ViT."""
    audio_depth: int = 2
    """Blocks of the audio ViT."""
    audio_heads: int = 4
    """Attention heads of the audio ViT."""
    audio_patch: tuple[int, int] = (16, 16)
    """(mel bins, frames) of a log-mel patch."""

    # --- combiner
    combiner: str = "ttm"
    """"transformer" or "ttm" (Token Turing Machine)."""
    combiner_depth: int = 2
    """Blocks of the combiner's transformer (the TTM's process unit)."""
    combiner_tokens: int = 4
    """m: output tokens per snippet."""
    ttm_memory: int = 16
    """k: memory tokens the TTM carries from snippet to snippet."""
    ttm_read: int = 8
    """r: tokens the TTM reads from memory + inputs and processes."""

    # --- time-aligned autoregressive model
    dim: int = 128
    """Width of the combiner and the time-aligned model."""
    depth: int = 2
    """Blocks of the time-aligned model."""
    heads: int = 4
    """Attention heads of the combiner and the time-aligned model."""
    latent_loss: str = "cosine"
    """Latent prediction loss: "l2" or "cosine"."""
    latent_loss_weight: float = 1.0
    """Weight of the latent loss in the total."""

    # --- context autoregressive model (text decoder)
    text_dim: int = 128
    """Width of the text decoder."""
    text_depth: int = 2
    """Blocks of the text decoder (each: causal self-attention, cross-attention, MLP)."""
    text_heads: int = 4
    """Attention heads of the text decoder."""
    pad_id: int = 0
    """Tokenizer's PAD id (byte tokenizer: 0)."""
    bos_id: int = 1
    """Tokenizer's BOS id: generation starts from it (byte tokenizer: 1)."""
    eos_id: int = 2
    """Tokenizer's EOS id: generation of a row stops at it (byte tokenizer: 2)."""
    score_length_norm: bool = False
    """score_options divides each option's log-likelihood by its token count."""

    # --- classification
    cls_mode: str = "generate"
    """How a clip's class is predicted: "generate" (the decoder writes the label text), "score" (trained like
    generate; predicts the label whose text the decoder finds most likely among the whole label set: gives a
    ranking, so top-5) or "head" (linear head on pooled latents; needs num_classes)."""
    cls_loss_weight: float = 1.0
    """Weight of the head's cross-entropy in the total (cls_mode == "head")."""

    # --- shared
    mlp_ratio: float = 4.0
    """MLP hidden width over block width."""
    dropout: float = 0.0
    """Dropout on attention weights and MLP/residual outputs."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (training only): less memory, ~1/3 more compute."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        positive = ("max_snippets", "frames_per_snippet", "n_mels", "mel_frames", "max_text_len", "vocab_size",
                    "video_dim", "video_depth", "video_heads", "tubelet_frames", "patch_size", "audio_dim",
                    "audio_depth", "audio_heads", "combiner_depth", "combiner_tokens", "ttm_memory", "ttm_read",
                    "dim", "depth", "heads", "text_dim", "text_depth", "text_heads")
        for name in positive:
            _check(getattr(self, name) > 0, name, "must be positive")
        _check(self.num_classes >= 0, "num_classes", "must be >= 0")
        for name in ("pad_id", "bos_id", "eos_id"):
            _check(0 <= getattr(self, name) < self.vocab_size, name, f"must be in [0, vocab_size {self.vocab_size})")
        for name in ("image_size", "sparse_tube_size", "sparse_tube_stride", "audio_patch"):
            _check(all(v > 0 for v in getattr(self, name)), name, "must be positive")
        H, W = self.image_size
        p = self.patch_size
        _check(H % p == 0 and W % p == 0, "patch_size", f"must divide image_size {self.image_size}")
        if self.sparse_tubes:
            (tt, tp), (st, sp) = self.sparse_tube_size, self.sparse_tube_stride
            _check(tt <= self.frames_per_snippet and tp <= min(H, W), "sparse_tube_size",
                   f"must fit in a snippet ({self.frames_per_snippet} frames of {self.image_size})")
            _check(st >= tt and sp >= tp, "sparse_tube_stride", "must be >= sparse_tube_size (tubes are sparse)")
        else:
            _check(self.frames_per_snippet % self.tubelet_frames == 0, "tubelet_frames",
                   f"must divide frames_per_snippet {self.frames_per_snippet}")
        pm, pt = self.audio_patch
        _check(self.n_mels % pm == 0, "audio_patch", f"mel size {pm} must divide n_mels {self.n_mels}")
        _check(self.mel_frames % pt == 0, "audio_patch", f"frame size {pt} must divide mel_frames {self.mel_frames}")
        for width, heads in (("video_dim", "video_heads"), ("audio_dim", "audio_heads"), ("dim", "heads"),
                             ("text_dim", "text_heads")):
            _check(getattr(self, width) % getattr(self, heads) == 0, width,
                   f"{getattr(self, width)} must be divisible by {heads} {getattr(self, heads)}")
        _check(self.combiner in ("transformer", "ttm"), "combiner", f"must be transformer|ttm, got {self.combiner!r}")
        _check(self.latent_loss in ("l2", "cosine"), "latent_loss", f"must be l2|cosine, got {self.latent_loss!r}")
        _check(self.cls_mode in ("generate", "score", "head"), "cls_mode",
               f"must be generate|score|head, got {self.cls_mode!r}")
        if self.cls_mode == "head":
            _check(self.num_classes > 0, "num_classes", "must be positive when cls_mode is 'head'")
        _check(self.latent_loss_weight >= 0, "latent_loss_weight", "must be >= 0")
        _check(self.cls_loss_weight >= 0, "cls_loss_weight", "must be >= 0")
        _check(self.mlp_ratio > 0, "mlp_ratio", "must be positive")
        _check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """Plain python (tuples as lists): safe for ``torch.load(weights_only=True)`` and YAML."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(raw) - set(hints))
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        kwargs = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in raw.items()}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"model.{field} {message}")
