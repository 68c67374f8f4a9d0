"""The model's own config: everything needed to rebuild a Mirasol3B model from a checkpoint alone.

Flat on purpose (no nested dataclasses, no Optional): ``dataclasses.asdict`` of it is plain python, travels in a
``weights_only`` checkpoint, and the YAML loader in :mod:`mirasol_ray.config` can coerce every field.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")
"""MLP activations: exact GELU, tanh-approximated GELU (GPT-2's gelu_new), CLIP's QuickGELU, SiLU, ReLU."""


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
    video_stem: str = "patch"
    """How a dense tubelet becomes a token. "patch": one linear projection of its t x p x p pixels (the ViT of
    the paper, and what video_init loads). "conv": a stack of log2(p) 3x3 stride-2 convolutions (each with a
    GroupNorm and a GELU) over the tubelet's frames as channels, down to the same p-pixel grid, then a linear
    projection: the "hybrid ViT" (Dosovitskiy et al. 2021) with the convolutional stem of Xiao et al. 2021 ("Early
    convolutions help transformers see better"). The same tokens, built from local, translation-equivariant
    features: on the demo's clips the tiny preset's 2-block ViT, trained from scratch to name each snippet's shape,
    reached 0.97 held-out in 200 steps on them and 0.52 on linear 16-pixel tubelets (docs/PERFORMANCE.md, "The
    demo"); +7% FLOPs a demo training step."""
    video_max_token: bool = False
    """Append one token per snippet to the video encoder's output: the channel-wise max of its tokens, so the
    Combiner can read a feature wherever in the frame it fires (a max read named held-out shapes at 0.97 where a
    mean read stayed at 0.41, docs/PERFORMANCE.md, "The demo"). Not in the paper; no parameters."""
    video_stem_channels: int = 16
    """Channels of the conv stem's first convolution; each next one doubles them, up to video_dim."""
    sparse_tubes: bool = False
    """Sparse Video Tubes (Piergiovanni et al. 2023): 2D patches of the snippet's first frame plus sparse 3D tubes,
    instead of dense tubelets."""
    sparse_tube_size: tuple[int, int] = (4, 16)
    """(t, p) kernel of a sparse 3D tube."""
    sparse_tube_stride: tuple[int, int] = (4, 32)
    """(t, p) stride of the sparse 3D tubes: larger than the kernel makes them sparse."""
    video_init: str = ""
    """Pretrained weights for the video encoder: a timm ViT (``.safetensors``, or a ``.pth`` state dict with timm's
    names, or a folder holding one with timm's ``config.json``), local path or ``s3://``. Its architecture replaces the
    video_* sizes and options below (docs: README, "Starting from pretrained weights")."""
    video_inflation: str = "central"
    """How video_init's 2D patch embedding becomes a t-frame tubelet: "central" (the 2D kernel on the tubelet's
    frame t//2, zeros on the others: at start the encoder sees that frame as the image model did) or "average" (the
    kernel / t on every frame: it sees the tubelet's mean frame)."""
    video_pos: str = "joint"
    """"joint": one learned position per token of the snippet; "factorized": a 2D grid table (an image ViT's,
    interpolated to the frame size) plus a per-tubelet time table that starts at zero."""
    video_prefix_tokens: int = 0
    """Learned tokens before the patch tokens (a ViT's class token, then its register tokens); they are in the output."""
    video_prefix_pos: bool = False
    """The position table has rows for the prefix tokens (timm's default; not with no_embed_class)."""
    video_pre_norm: bool = False
    """A norm after the embeddings, before the blocks (CLIP ViTs)."""
    video_norm_eps: float = 1e-5
    """LayerNorm epsilon of the video ViT (timm ViTs: 1e-6; CLIP: 1e-5)."""
    video_qkv_bias: bool = True
    video_patch_bias: bool = True
    video_layer_scale: bool = False
    """Per-channel scales on the residual branches (DINOv2)."""
    video_act: str = "gelu"
    """MLP activation: gelu | gelu_tanh | quick_gelu | silu | relu."""
    video_mlp_hidden: int = 0
    """MLP hidden width; 0 = mlp_ratio * video_dim."""
    video_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean of frames in [0, 1], subtracted before the patch embedding (the pretrained model's)."""
    video_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    # --- audio snippet encoder (ViT over log-mel patches)
    audio_dim: int = 96
    """Width of the audio ViT."""
    audio_depth: int = 2
    """Blocks of the audio ViT."""
    audio_heads: int = 4
    """Attention heads of the audio ViT."""
    audio_patch: tuple[int, int] = (16, 16)
    """(mel bins, frames) of a log-mel patch."""
    audio_init: str = ""
    """Pretrained weights for the audio encoder: a timm ViT, as video_init (an image ViT's 3-channel patch
    embedding is summed over its channels, as AST does: the ViT sees the spectrogram as a grey image)."""
    audio_patch_norm: bool = True
    """LayerNorm on each raw log-mel patch before the embedding (log-mel scales differ by front end)."""
    audio_prefix_tokens: int = 0
    audio_prefix_pos: bool = False
    audio_pre_norm: bool = False
    audio_norm_eps: float = 1e-5
    audio_qkv_bias: bool = True
    audio_patch_bias: bool = True
    audio_layer_scale: bool = False
    audio_act: str = "gelu"
    audio_mlp_hidden: int = 0
    """As the video_* options of the same names, for the audio ViT."""

    # --- combiner
    combiner: str = "ttm"
    """"transformer" or "ttm" (Token Turing Machine)."""
    combiner_depth: int = 2
    """Blocks of the combiner's transformer (the TTM's process unit)."""
    combiner_tokens: int = 4
    """m: output tokens per snippet."""
    combiner_readout: str = "queries"
    """How the Transformer Combiner (``combiner: transformer``) reads out its m tokens. "queries": m learned query
    tokens join the snippet's tokens and their outputs are the snippet's (this implementation's own form). "last":
    the paper's (Mirasol3B sec. 3.2): a transformer over the snippet's concatenated video and audio tokens, its last
    m outputs kept (the last m tokens the clip has: its video's when it has no audio). The two hold different
    tensors (only "queries" has ``combiner.out_tokens``), so a checkpoint of one does not load into the other."""
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
    text_init: str = ""
    """Pretrained language model for the text decoder: a Hugging Face transformers folder (``config.json`` +
    ``model.safetensors`` or its shards; Llama, Mistral, Qwen2 or GPT-2 architecture), local or ``s3://``. Its
    architecture replaces the text_* options, and its tokenizer becomes the run's unless data.tokenizer is set."""
    text_norm: str = "layernorm"
    """"layernorm" or "rmsnorm"."""
    text_norm_eps: float = 1e-5
    text_pos: str = "learned"
    """"learned" (a table of max_text_len positions, as GPT-2) or "rope" (rotary, as Llama)."""
    text_rope_theta: float = 10000.0
    text_rope_scaling: str = ""
    """"" | "linear" | "llama3" (Llama 3.1+ long-context frequencies)."""
    text_rope_scaling_args: tuple[float, ...] = ()
    """linear: (factor,); llama3: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)."""
    text_kv_heads: int = 0
    """Key/value heads (grouped-query attention when fewer than text_heads); 0 = text_heads."""
    text_head_dim: int = 0
    """Width of one head; 0 = text_dim // text_heads."""
    text_mlp: str = "plain"
    """"plain" (fc, act, fc) or "gated" (SwiGLU-style: down(act(gate(x)) * up(x)))."""
    text_act: str = "gelu"
    text_mlp_hidden: int = 0
    """MLP hidden width; 0 = mlp_ratio * text_dim."""
    text_qkv_bias: bool = True
    text_out_bias: bool = True
    text_mlp_bias: bool = True
    text_tied_head: bool = True
    """The output head is the input embedding (else a separate ``lm_head``)."""
    text_vocab_rows: int = 0
    """Rows of the embedding when more than vocab_size: a pretrained LM's table is often padded past its tokenizer."""
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
    init_strict: bool = True
    """A missing, unexpected or mis-shaped tensor in a pretrained checkpoint (video_init, audio_init, text_init) or
    in the checkpoint ``train.init_from`` names (the classification head excepted: it is the fine-tuning run's own)
    is an error; false reports it and leaves that part as initialised. Resuming a run is always strict."""

    @property
    def embed_rows(self) -> int:
        """Rows of the text embedding and output head: the tokenizer's vocabulary, or a pretrained LM's if larger."""
        return max(self.vocab_size, self.text_vocab_rows)

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
        pairs = [("video_dim", "video_heads"), ("audio_dim", "audio_heads"), ("dim", "heads")]
        if not self.text_head_dim:
            pairs.append(("text_dim", "text_heads"))
        for width, heads in pairs:
            _check(getattr(self, width) % getattr(self, heads) == 0, width,
                   f"{getattr(self, width)} must be divisible by {heads} {getattr(self, heads)}")
        _check(self.combiner in ("transformer", "ttm"), "combiner", f"must be transformer|ttm, got {self.combiner!r}")
        _check(self.combiner_readout in ("queries", "last"), "combiner_readout",
               f"must be queries|last, got {self.combiner_readout!r}")
        _check(self.combiner_readout == "queries" or self.combiner == "transformer", "combiner_readout",
               f"{self.combiner_readout!r} is the Transformer Combiner's (model.combiner=transformer), not the "
               f"{self.combiner!r} one's")
        _check(self.latent_loss in ("l2", "cosine"), "latent_loss", f"must be l2|cosine, got {self.latent_loss!r}")
        _check(self.cls_mode in ("generate", "score", "head"), "cls_mode",
               f"must be generate|score|head, got {self.cls_mode!r}")
        if self.cls_mode == "head":
            _check(self.num_classes > 0, "num_classes", "must be positive when cls_mode is 'head'")
        _check(self.latent_loss_weight >= 0, "latent_loss_weight", "must be >= 0")
        _check(self.cls_loss_weight >= 0, "cls_loss_weight", "must be >= 0")
        _check(self.mlp_ratio > 0, "mlp_ratio", "must be positive")
        for part in ("video", "audio"):
            _check(getattr(self, f"{part}_act") in ACTIVATIONS, f"{part}_act", f"must be one of {'|'.join(ACTIVATIONS)}")
            _check(getattr(self, f"{part}_prefix_tokens") >= 0, f"{part}_prefix_tokens", "must be >= 0")
            _check(getattr(self, f"{part}_norm_eps") > 0, f"{part}_norm_eps", "must be positive")
            _check(getattr(self, f"{part}_mlp_hidden") >= 0, f"{part}_mlp_hidden", "must be >= 0")
        _check(self.video_stem in ("patch", "conv"), "video_stem", f"must be patch|conv, got {self.video_stem!r}")
        if self.video_stem == "conv":
            _check(p >= 2 and p & (p - 1) == 0, "video_stem", f"conv needs a power-of-two patch_size, got {p}")
            _check(not self.sparse_tubes, "video_stem", "conv needs dense tubelets (sparse_tubes false)")
            _check(not self.video_init, "video_stem", "conv cannot load video_init (a ViT's linear patch embedding)")
            _check(self.video_stem_channels > 0, "video_stem_channels", "must be positive")
        _check(self.video_pos in ("joint", "factorized"), "video_pos", "must be joint|factorized")
        _check(self.video_inflation in ("central", "average"), "video_inflation", "must be central|average")
        _check(all(s > 0 for s in self.video_std), "video_std", "must be positive")
        _check(self.text_norm in ("layernorm", "rmsnorm"), "text_norm", "must be layernorm|rmsnorm")
        _check(self.text_norm_eps > 0, "text_norm_eps", "must be positive")
        _check(self.text_pos in ("learned", "rope"), "text_pos", "must be learned|rope")
        _check(self.text_mlp in ("plain", "gated"), "text_mlp", "must be plain|gated")
        _check(self.text_act in ACTIVATIONS, "text_act", f"must be one of {'|'.join(ACTIVATIONS)}")
        _check(self.text_mlp_hidden >= 0 and self.text_head_dim >= 0 and self.text_vocab_rows >= 0, "text_mlp_hidden",
               "text_mlp_hidden, text_head_dim and text_vocab_rows must be >= 0")
        kv = self.text_kv_heads or self.text_heads
        _check(self.text_heads % kv == 0, "text_kv_heads", f"{kv} must divide text_heads {self.text_heads}")
        if self.text_pos == "rope":
            _check(self.text_rope_theta > 0, "text_rope_theta", "must be positive")
            _check((self.text_head_dim or self.text_dim // self.text_heads) % 2 == 0, "text_head_dim",
                   "must be even with rotary positions")
        n_args = {"": 0, "linear": 1, "llama3": 4}
        _check(self.text_rope_scaling in n_args, "text_rope_scaling", "must be ''|linear|llama3")
        _check(len(self.text_rope_scaling_args) == n_args.get(self.text_rope_scaling, 0), "text_rope_scaling_args",
               f"needs {n_args.get(self.text_rope_scaling, 0)} values for text_rope_scaling "
               f"{self.text_rope_scaling!r}")
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
