"""Pretrained weights, converted: timm ViTs for the snippet encoders, a Hugging Face causal LM for the text decoder.

Pure functions on a checkpoint's tensors (by name) and its ``config.json`` (a dict): nothing here reads a file.
Finding and reading the files (``model.video_init``, ``audio_init``, ``text_init``: paths or ``s3://`` URIs) is
:mod:`mirasol_ray.train.weights`, which hands its tensors over as a :class:`Tensors`. Neither timm nor transformers
is imported: their names and configs are read here.

* :func:`vit_arch`, :func:`lm_arch`: what a checkpoint is (width, depth, heads, MLP, norm, positions, ...), and
  :func:`vit_fields` / ``LMArch.fields``: the ``model`` options that follow from it (the driver's prepare step
  writes them into the config, so a model rebuilds from the config alone).
* :func:`load_part`: the tensors converted (fused qkv split, GPT-2's Conv1D weights transposed, position grids
  interpolated, 2D patch embeddings inflated to tubelets, new vocabulary rows) and copied in; each decoder block's
  new cross-attention gets a zero output projection, so the decoder starts as the LM. On meta tensors it is a
  rehearsal that raises what the load would, naming the tensor. :func:`startup_table` says what was loaded,
  adapted, new and ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from mirasol_ray.config import ModelConfig


class PretrainedError(ValueError):
    """A pretrained checkpoint that cannot be used as asked: the message names the setting, file and tensor."""


PARTS = {"video_init": "video_encoder", "audio_init": "audio_encoder", "text_init": "text_decoder"}
"""Each setting and the part of the model it initialises."""

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Tensors(Protocol):
    """A checkpoint's tensors by name, as the conversions read them (:class:`mirasol_ray.train.weights.TensorSource`
    reads them from files, or gives meta tensors from the files' headers)."""

    names: dict[str, str]
    """Our view of each name (a DDP ``module.`` or a transformers ``model.`` prefix dropped) -> the file's."""

    def keys(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def strip_prefix(self, *prefixes: str) -> None: ...

    def file_name(self, name: str) -> str: ...


# ----------------------------------------------------------------------------------------------------------------
# architectures: what the files say the model is


# heads of timm's ViT sizes (the names say the size; a state dict does not record heads)
_VIT_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16,
              "gigantic": 16, "so400m": 16}


@dataclass
class VitArch:
    """A timm VisionTransformer as its state dict and config.json describe it."""

    name: str
    dim: int
    depth: int
    heads: int
    patch: int
    in_chans: int
    mlp_hidden: int
    qkv_bias: bool
    patch_bias: bool
    layer_scale: bool
    n_cls: int
    n_reg: int
    prefix_pos: bool
    pre_norm: bool
    final_norm: str
    eps: float
    act: str
    grid: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    notes: list[str] = field(default_factory=list)

    @property
    def n_prefix(self) -> int:
        return self.n_cls + self.n_reg

    def describe(self) -> str:
        extras = [s for s, on in (("pre-norm", self.pre_norm), ("layer scale", self.layer_scale),
                                  (f"{self.n_reg} registers", self.n_reg)) if on]
        return (f"timm ViT{' ' + self.name if self.name else ''}: {self.dim} wide, {self.depth} blocks, {self.heads} "
                f"heads, patch {self.patch}, grid {self.grid[0]}x{self.grid[1]}" + "".join(", " + e for e in extras))


def _square(n: int) -> int:
    r = math.isqrt(n)
    return r if r * r == n else 0


def vit_arch(setting: str, uri: str, config: dict[str, Any], src: Tensors, fallback_heads: int) -> VitArch:
    """What a timm ViT checkpoint is (``uri``, for messages), from its tensors' names and shapes and its
    ``config.json`` (``config``; {} for a bare state dict): a timm state dict does not record heads, so they come
    from the architecture's name, else ``fallback_heads``."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"):
        if key not in src:
            raise PretrainedError(f"model.{setting} {uri}: not a timm VisionTransformer with learned absolute "
                                  f"positions (no {key})")
    dim, in_chans, ph, pw = src.shape("patch_embed.proj.weight")
    if ph != pw:
        raise PretrainedError(f"model.{setting} {uri}: non-square patches {ph}x{pw} are not supported")
    keys = set(src.keys())
    depth = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    cfg = config
    args, pcfg, name = cfg.get("model_args") or {}, cfg.get("pretrained_cfg") or {}, cfg.get("architecture", "")
    notes = []
    size = re.match(r"^(?:vit|deit3?)_([a-z0-9]+)_", name)
    heads = args.get("num_heads") or (_VIT_HEADS.get(size.group(1)) if size else None)
    if not heads:
        heads = fallback_heads
        notes.append(f"heads: {heads}, from the config (a state dict does not record them)")
    if dim % heads:
        raise PretrainedError(f"model.{setting} {uri}: width {dim} is not divisible by {heads} heads: set the "
                              f"model's heads for this checkpoint")
    act = args.get("act_layer") if isinstance(args.get("act_layer"), str) else None
    act = act or ("quick_gelu" if "quickgelu" in name else "gelu")
    if act not in ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu"):
        raise PretrainedError(f"model.{setting} {uri}: activation {act!r} is not supported")
    # timm's ViTs use LayerNorm(eps=1e-6); its CLIP ViTs nn.LayerNorm's 1e-5
    eps = 1e-5 if "clip" in name else 1e-6
    if not name:
        notes.append("norm epsilon 1e-6 (timm's ViT default; no config.json says otherwise)")
    n_cls = int("cls_token" in keys)
    n_reg = src.shape("reg_token")[1] if "reg_token" in keys else 0
    n_pos, n_prefix = src.shape("pos_embed")[1], n_cls + n_reg
    grid, prefix_pos = None, False
    # the grid of the position table: from the size the model was built for (model_args), the size it was
    # trained at (pretrained_cfg), or, for a bare state dict, a square that fits the table
    for size_in in (args.get("img_size"), pcfg.get("input_size")):
        if not size_in:
            continue
        h, w = size_in[-2:] if isinstance(size_in, (list, tuple)) else (size_in, size_in)
        g = (h // ph, w // ph)
        if n_pos in (g[0] * g[1], g[0] * g[1] + n_prefix):
            grid, prefix_pos = g, bool(n_prefix) and n_pos == g[0] * g[1] + n_prefix
            break
    if grid is None:
        side = _square(n_pos - n_prefix) if n_prefix else 0
        if side:
            grid, prefix_pos = (side, side), True
        elif _square(n_pos):
            grid = (_square(n_pos), _square(n_pos))
        else:
            raise PretrainedError(f"model.{setting} {uri}: cannot tell the position grid from pos_embed's "
                                  f"{n_pos} rows: add timm's config.json (model_args.img_size)")
    final = "norm" if "norm.weight" in keys else "fc_norm" if "fc_norm.weight" in keys else ""
    if not final:
        raise PretrainedError(f"model.{setting} {uri}: ViTs without a final norm are not supported")
    if final == "fc_norm":
        notes.append("fc_norm (a norm after pooling in timm) is applied to every token as the final norm")
    mean, std = tuple(pcfg.get("mean") or IMAGENET_MEAN), tuple(pcfg.get("std") or IMAGENET_STD)
    if not pcfg.get("mean"):
        notes.append("frame mean/std: ImageNet's (no config.json says otherwise)")
    return VitArch(name, dim, depth, heads, ph, in_chans, src.shape("blocks.0.mlp.fc1.weight")[0],
                   "blocks.0.attn.qkv.bias" in keys, "patch_embed.proj.bias" in keys, "blocks.0.ls1.gamma" in keys,
                   n_cls, n_reg, prefix_pos, "norm_pre.weight" in keys, final, eps, act, grid, mean, std, notes)


def vit_fields(part: str, arch: VitArch) -> dict[str, Any]:
    """The ``model`` options a ViT checkpoint sets for ``part`` ("video" or "audio")."""
    out = {f"{part}_dim": arch.dim, f"{part}_depth": arch.depth, f"{part}_heads": arch.heads,
           f"{part}_mlp_hidden": arch.mlp_hidden, f"{part}_qkv_bias": arch.qkv_bias,
           f"{part}_patch_bias": arch.patch_bias, f"{part}_layer_scale": arch.layer_scale,
           f"{part}_prefix_tokens": arch.n_prefix, f"{part}_prefix_pos": arch.prefix_pos,
           f"{part}_pre_norm": arch.pre_norm, f"{part}_norm_eps": arch.eps, f"{part}_act": arch.act}
    if part == "video":
        out.update(patch_size=arch.patch, video_pos="factorized", video_mean=arch.mean, video_std=arch.std)
    else:
        out["audio_patch"] = (arch.patch, arch.patch)
    return out


_HF_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
           "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
_LLAMA_LIKE = ("llama", "mistral", "qwen2")


@dataclass
class LMArch:
    """A transformers causal LM as its config.json describes it."""

    family: str
    """"llama" (Llama, Mistral, Qwen2: RMSNorm, RoPE, SwiGLU) or "gpt2"."""
    model_type: str
    fields: dict[str, Any]
    """The ``model`` options it sets."""
    vocab: int
    n_positions: int

    def describe(self) -> str:
        f = self.fields
        kv = f.get("text_kv_heads") or f["text_heads"]
        return (f"{self.model_type} LM: {f['text_dim']} wide, {f['text_depth']} blocks, {f['text_heads']} heads"
                + (f" ({kv} kv)" if kv != f["text_heads"] else "") + f", vocab {self.vocab}")


def _rope(cfg: dict[str, Any], setting: str) -> tuple[float, str, tuple[float, ...]]:
    """(theta, scaling kind, scaling args) from transformers' v4 (rope_theta, rope_scaling) or v5 (rope_parameters)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    spec = {**scaling, **params}
    kind = spec.get("rope_type", spec.get("type", "default"))
    if float(spec.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise PretrainedError(f"model.{setting}: partial rotary embeddings are not supported")
    if kind in ("default", None):
        return theta, "", ()
    if kind == "linear":
        return theta, "linear", (float(spec["factor"]),)
    if kind == "llama3":
        return theta, "llama3", (float(spec["factor"]), float(spec["low_freq_factor"]),
                                 float(spec["high_freq_factor"]), float(spec["original_max_position_embeddings"]))
    raise PretrainedError(f"model.{setting}: RoPE scaling {kind!r} is not supported (default, linear, llama3 are)")


def lm_arch(setting: str, uri: str, config: dict[str, Any], max_text_len: int) -> LMArch:
    """What a transformers causal LM is, from its ``config.json`` (``config``); ``uri`` for messages."""
    cfg = config
    if not cfg:
        raise PretrainedError(f"model.{setting} {uri}: a transformers folder with config.json is needed")
    mt = cfg.get("model_type", "")
    act = _HF_ACT.get(cfg.get("hidden_act", cfg.get("activation_function", "")))
    if mt in _LLAMA_LIKE:
        D, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or D // heads
        theta, scaling, scaling_args = _rope(cfg, setting)
        window = cfg.get("sliding_window") if (mt == "mistral" or cfg.get("use_sliding_window")) else None
        if window and window < max_text_len:
            raise PretrainedError(f"model.{setting}: sliding-window attention ({window}) shorter than max_text_len "
                                  f"{max_text_len} is not supported")
        bias = bool(cfg.get("attention_bias", False))
        fields = dict(text_dim=D, text_depth=cfg["num_hidden_layers"], text_heads=heads,
                      text_kv_heads=cfg.get("num_key_value_heads") or heads,
                      text_head_dim=head_dim if head_dim * heads != D else 0, text_norm="rmsnorm",
                      text_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), text_pos="rope", text_rope_theta=theta,
                      text_rope_scaling=scaling, text_rope_scaling_args=scaling_args, text_mlp="gated",
                      text_act=act, text_mlp_hidden=cfg["intermediate_size"],
                      text_qkv_bias=True if mt == "qwen2" else bias, text_out_bias=bias if mt == "llama" else False,
                      text_mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
                      text_tied_head=bool(cfg.get("tie_word_embeddings", False)))
        family, n_positions = "llama", int(cfg.get("max_position_embeddings", 0))
    elif mt == "gpt2":
        D = cfg["n_embd"]
        if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
            raise PretrainedError(f"model.{setting}: GPT-2 attention scaling other than 1/sqrt(head_dim) is not "
                                  "supported")
        fields = dict(text_dim=D, text_depth=cfg["n_layer"], text_heads=cfg["n_head"], text_kv_heads=0,
                      text_head_dim=0, text_norm="layernorm", text_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                      text_pos="learned", text_rope_scaling="", text_rope_scaling_args=(), text_mlp="plain",
                      text_act=act, text_mlp_hidden=cfg.get("n_inner") or 4 * D, text_qkv_bias=True,
                      text_out_bias=True, text_mlp_bias=True, text_tied_head=bool(cfg.get("tie_word_embeddings", True)))
        family, n_positions = "gpt2", int(cfg["n_positions"])
        if n_positions < max_text_len:
            raise PretrainedError(f"model.{setting}: the LM has {n_positions} positions, fewer than max_text_len "
                                  f"{max_text_len}")
    else:
        raise PretrainedError(f"model.{setting} {uri}: model_type {mt!r} is not supported (llama, mistral, "
                              "qwen2, gpt2 are)")
    if act is None:
        raise PretrainedError(f"model.{setting}: activation {cfg.get('hidden_act', cfg.get('activation_function'))!r} "
                              "is not supported")
    fields["text_vocab_rows"] = int(cfg["vocab_size"])
    return LMArch(family, mt, fields, int(cfg["vocab_size"]), n_positions)


# ----------------------------------------------------------------------------------------------------------------
# plans: which of our tensors come from which of theirs, and how


@dataclass
class Entry:
    own: str
    """Our parameter's name."""
    src: tuple[str, ...]
    """The checkpoint tensors it is made from."""
    fn: Callable[..., torch.Tensor] = lambda t: t
    note: str = ""
    """How it was adapted ("" when copied as is)."""


def resample_grid(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(gh*gw, D) position table on an old grid -> new grid: bicubic with antialiasing, in float32, as timm's
    ``resample_abs_pos_embed``."""
    if tuple(old) == tuple(new):
        return pos
    D = pos.shape[-1]
    if pos.is_meta:
        return pos.new_empty(new[0] * new[1], D)
    grid = pos.float().reshape(1, old[0], old[1], D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(-1, D).to(pos.dtype)


def inflate(w2d: torch.Tensor, frames: int, mode: str) -> torch.Tensor:
    """(D, C, p, p) 2D kernel -> (D, C, t, p, p): on the central frame t//2 (zeros elsewhere) or w/t on each."""
    if mode == "average":
        return w2d[:, :, None].expand(-1, -1, frames, -1, -1) / frames
    out = w2d.new_zeros(w2d.shape[0], w2d.shape[1], frames, *w2d.shape[2:])
    out[:, :, frames // 2] = w2d
    return out


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """Extra rows (tokens the LM does not know, e.g. a PAD) start as the mean of its rows."""
    if w.shape[0] >= rows:
        return w
    return torch.cat([w, w.mean(0, keepdim=True).expand(rows - w.shape[0], -1)], dim=0)


def _vit_entries(part: str, cfg: ModelConfig, arch: VitArch) -> list[Entry]:
    enc = f"{part}_encoder"
    D, n_pp = arch.dim, (arch.n_prefix if arch.prefix_pos else 0)
    E: list[Entry] = []
    if arch.n_prefix:
        keys = tuple(k for k, n in (("cls_token", arch.n_cls), ("reg_token", arch.n_reg)) if n)
        E.append(Entry(f"{enc}.prefix", keys, lambda *t: torch.cat([x.reshape(-1, D) for x in t])))
    if n_pp:
        E.append(Entry(f"{enc}.prefix_pos", ("pos_embed",), lambda pe: pe[0, :n_pp]))
    if part == "video":
        H, W = cfg.image_size
        new = (H // arch.patch, W // arch.patch)
    else:
        new = (cfg.n_mels // arch.patch, cfg.mel_frames // arch.patch)
    E.append(Entry(f"{enc}.pos", ("pos_embed",), lambda pe: resample_grid(pe[0, n_pp:], arch.grid, new),
                   "" if arch.grid == new else
                   f"pos_embed {arch.grid[0]}x{arch.grid[1]} -> {new[0]}x{new[1]} (bicubic, as timm resamples)"))
    proj, proj_b = "patch_embed.proj.weight", "patch_embed.proj.bias"
    bias = (proj_b,) if arch.patch_bias else ()
    if part == "audio":
        summed = arch.in_chans > 1
        E.append(Entry(f"{enc}.embed.weight", (proj,), lambda w: w.sum(1).reshape(D, -1),
                       f"{arch.in_chans}-channel patch embedding summed to 1 (a grey image)" if summed else ""))
        if bias:
            E.append(Entry(f"{enc}.embed.bias", bias))
    else:
        if arch.in_chans != 3:
            raise PretrainedError(f"model.video_init: the ViT takes {arch.in_chans} channels, not RGB")
        flat = lambda w: w.permute(0, 2, 3, 1).reshape(D, -1)  # noqa: E731  (D, C, p, p) -> (D, (ph pw c))
        if cfg.sparse_tubes:
            E.append(Entry(f"{enc}.image_patch.weight", (proj,), flat))
            E += [Entry(f"{enc}.image_patch.bias", bias)] if bias else []
            (tt, tp), _ = cfg.sparse_tube_size, cfg.sparse_tube_stride
            if tp == arch.patch:  # else the tubes are new
                E.append(Entry(f"{enc}.tubes.weight", (proj,), lambda w: inflate(w, tt, cfg.video_inflation),
                               f"2D patch embedding -> {tt}-frame tubes ({cfg.video_inflation} inflation)"))
                E += [Entry(f"{enc}.tubes.bias", bias)] if bias else []
        else:
            t = cfg.tubelet_frames
            E.append(Entry(f"{enc}.tubelet.weight", (proj,),
                           lambda w: inflate(w, t, cfg.video_inflation).permute(0, 2, 3, 4, 1).reshape(D, -1),
                           f"2D patch embedding -> {t}-frame tubelets ({cfg.video_inflation} inflation)"
                           if t > 1 else ""))
            E += [Entry(f"{enc}.tubelet.bias", bias)] if bias else []
    if arch.pre_norm:
        E += [Entry(f"{enc}.norm_pre.{w}", (f"norm_pre.{w}",)) for w in ("weight", "bias")]
    wb = ("weight", "bias")
    for i in range(arch.depth):
        o, s = f"{enc}.vit.blocks.{i}", f"blocks.{i}"
        E += [Entry(f"{o}.norm1.{w}", (f"{s}.norm1.{w}",)) for w in wb]
        E += [Entry(f"{o}.norm2.{w}", (f"{s}.norm2.{w}",)) for w in wb]
        for w in (wb if arch.qkv_bias else ("weight",)):
            E.append(Entry(f"{o}.attn.to_q.{w}", (f"{s}.attn.qkv.{w}",), lambda t: t[:D]))
            E.append(Entry(f"{o}.attn.to_kv.{w}", (f"{s}.attn.qkv.{w}",), lambda t: t[D:]))
        E += [Entry(f"{o}.attn.to_out.{w}", (f"{s}.attn.proj.{w}",)) for w in wb]
        E += [Entry(f"{o}.mlp.0.{w}", (f"{s}.mlp.fc1.{w}",)) for w in wb]
        E += [Entry(f"{o}.mlp.2.{w}", (f"{s}.mlp.fc2.{w}",)) for w in wb]
        if arch.layer_scale:
            E += [Entry(f"{o}.ls{j}.gamma", (f"{s}.ls{j}.gamma",)) for j in (1, 2)]
    E += [Entry(f"{enc}.vit.norm.{w}", (f"{arch.final_norm}.{w}",)) for w in wb]
    return E


def _vit_ignorable(name: str) -> bool:
    """Classifier parts that a feature encoder does not use."""
    return name.startswith(("head.", "attn_pool.", "fc_norm.", "head_drop."))


def _lm_entries(cfg: ModelConfig, arch: LMArch) -> list[Entry]:
    rows, D = cfg.embed_rows, cfg.text_dim
    dec = "text_decoder"
    extra = rows - arch.vocab
    pad_note = f"{extra} new row(s) past the LM's {arch.vocab} (mean of its rows)" if extra > 0 else ""
    E = [Entry(f"{dec}.embed.weight", ("embed_tokens.weight" if arch.family == "llama" else "wte.weight",),
               lambda w: _pad_rows(w, rows), pad_note)]
    if not cfg.text_tied_head:
        E.append(Entry(f"{dec}.lm_head.weight", ("lm_head.weight",), lambda w: _pad_rows(w, rows), pad_note))
    if arch.family == "llama":
        for i in range(cfg.text_depth):
            o, s = f"{dec}.transformer.blocks.{i}", f"layers.{i}"
            a = f"{s}.self_attn"
            E.append(Entry(f"{o}.norm1.weight", (f"{s}.input_layernorm.weight",)))
            E.append(Entry(f"{o}.norm2.weight", (f"{s}.post_attention_layernorm.weight",)))
            for w in (("weight", "bias") if cfg.text_qkv_bias else ("weight",)):
                E.append(Entry(f"{o}.attn.to_q.{w}", (f"{a}.q_proj.{w}",)))
                E.append(Entry(f"{o}.attn.to_kv.{w}", (f"{a}.k_proj.{w}", f"{a}.v_proj.{w}"),
                               lambda k, v: torch.cat([k, v], dim=0)))
            for w in (("weight", "bias") if cfg.text_out_bias else ("weight",)):
                E.append(Entry(f"{o}.attn.to_out.{w}", (f"{a}.o_proj.{w}",)))
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                for w in (("weight", "bias") if cfg.text_mlp_bias else ("weight",)):
                    E.append(Entry(f"{o}.mlp.{ours}.{w}", (f"{s}.mlp.{theirs}.{w}",)))
        E.append(Entry(f"{dec}.transformer.norm.weight", ("norm.weight",)))
    else:  # GPT-2: Conv1D weights are (in, out), a Linear's transposed
        L = cfg.max_text_len
        E.append(Entry(f"{dec}.pos.weight", ("wpe.weight",), lambda w: w[:L],
                       f"wpe: first {L} of {arch.n_positions} positions" if L < arch.n_positions else ""))
        for i in range(cfg.text_depth):
            o, s = f"{dec}.transformer.blocks.{i}", f"h.{i}"
            for w in ("weight", "bias"):
                E.append(Entry(f"{o}.norm1.{w}", (f"{s}.ln_1.{w}",)))
                E.append(Entry(f"{o}.norm2.{w}", (f"{s}.ln_2.{w}",)))
            E.append(Entry(f"{o}.attn.to_q.weight", (f"{s}.attn.c_attn.weight",), lambda w: w[:, :D].t()))
            E.append(Entry(f"{o}.attn.to_kv.weight", (f"{s}.attn.c_attn.weight",), lambda w: w[:, D:].t()))
            E.append(Entry(f"{o}.attn.to_q.bias", (f"{s}.attn.c_attn.bias",), lambda b: b[:D]))
            E.append(Entry(f"{o}.attn.to_kv.bias", (f"{s}.attn.c_attn.bias",), lambda b: b[D:]))
            for ours, theirs in (("attn.to_out", "attn.c_proj"), ("mlp.0", "mlp.c_fc"), ("mlp.2", "mlp.c_proj")):
                E.append(Entry(f"{o}.{ours}.weight", (f"{s}.{theirs}.weight",), lambda w: w.t()))
                E.append(Entry(f"{o}.{ours}.bias", (f"{s}.{theirs}.bias",)))
        E += [Entry(f"{dec}.transformer.norm.{w}", (f"ln_f.{w}",)) for w in ("weight", "bias")]
    return E


def _lm_ignorable(cfg: ModelConfig) -> Callable[[str], bool]:
    def ignorable(name: str) -> bool:
        if name == "lm_head.weight" and cfg.text_tied_head:
            return True  # tied: the embedding is the head
        # buffers older transformers saved: GPT-2's causal mask, Llama's rotary frequencies
        return name.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq"))
    return ignorable


# ----------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class PartReport:
    part: str
    setting: str
    uri: str
    describe: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[tuple[str, str]] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    """(checkpoint key, our parameter) for tensors the checkpoint lacks."""
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)
    """(checkpoint key(s), our parameter, their converted shape, ours)."""
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = [f"missing key {k} (for {own})" for k, own in self.missing]
        out += [f"unexpected key {k}" for k in self.unexpected]
        out += [f"{k} gives shape {tuple(a)}, {own} needs {tuple(b)}" for k, own, a, b in self.mismatched]
        return out


def _apply(model: torch.nn.Module, rep: PartReport, entries: list[Entry], src: Tensors,
           ignorable: Callable[[str], bool], strict: bool, meta: bool) -> None:
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if k.startswith(rep.part + ".")}
    used: set[str] = set()
    planned: set[str] = set()
    values: dict[str, torch.Tensor] = {}
    for e in entries:
        if e.own not in own:
            raise RuntimeError(f"pretrained plan names {e.own}, which the model does not have")
        planned.add(e.own)
        absent = [k for k in e.src if k not in src]
        if absent:
            rep.missing.append((src.file_name(absent[0]), e.own))
            continue
        used.update(e.src)
        value = e.fn(*(src.get(k) for k in e.src))
        if tuple(value.shape) != tuple(own[e.own].shape):
            rep.mismatched.append(("+".join(e.src), e.own, tuple(value.shape), tuple(own[e.own].shape)))
            continue
        values[e.own] = value
        (rep.adapted.append((e.own, e.note)) if e.note else rep.loaded.append(e.own))
    for k in src.keys():
        if k not in used:
            (rep.ignored if ignorable(k) else rep.unexpected).append(src.names[k])
    rep.new = [k for k in own if k not in planned]
    problems = rep.problems()
    if problems and strict:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PretrainedError(f"model.{rep.setting} {rep.uri}: {problems[0]}{more}; set model.init_strict=false to "
                              "load the rest and leave these as initialised")
    if not meta:
        with torch.no_grad():
            for name, value in values.items():
                own[name].copy_(value)


def load_part(model: torch.nn.Module, cfg: ModelConfig, setting: str, uri: str, config: dict[str, Any],
              src: Tensors, meta: bool = False) -> PartReport:
    """Convert the tensors of the checkpoint ``setting`` names (``src``, its ``config.json`` as ``config``) and copy
    them into their part of ``model`` (built from the resolved ``cfg``). With ``meta`` nothing is copied: a
    rehearsal on meta tensors that raises what the load would."""
    part = PARTS[setting]
    if part == "text_decoder":
        src.strip_prefix("model.", "transformer.")
        arch = lm_arch(setting, uri, config, cfg.max_text_len)
        rep = PartReport(part, setting, uri, arch.describe())
        _apply(model, rep, _lm_entries(cfg, arch), src, _lm_ignorable(cfg), cfg.init_strict, meta)
        cross = [n for n in rep.new if ".cross_attn." in n or ".norm_x." in n]
        if cross:
            rep.notes.append(f"cross-attention in {cfg.text_depth} blocks is new; its output projections start "
                             "at zero, so the decoder starts as the LM")
            if not meta:
                with torch.no_grad():
                    for blk in model.text_decoder.transformer.blocks:
                        blk.cross_attn.to_out.weight.zero_()
                        blk.cross_attn.to_out.bias.zero_()
        return rep
    kind = part.split("_")[0]
    arch = vit_arch(setting, uri, config, src, getattr(cfg, f"{kind}_heads"))
    rep = PartReport(part, setting, uri, arch.describe(), notes=list(arch.notes))
    _apply(model, rep, _vit_entries(kind, cfg, arch), src, _vit_ignorable, cfg.init_strict, meta)
    return rep


def startup_table(reports: list[PartReport], model: torch.nn.Module) -> str:
    """What came from where: tensors loaded as they were, adapted, new, ignored or skipped, per part; the model's
    parts no checkpoint initialised."""
    rows = [("part", "loaded", "adapted", "new", "ignored", "skipped", "from")]
    for r in reports:
        rows.append((r.part, str(len(r.loaded)), str(len(r.adapted)), str(len(r.new)), str(len(r.ignored)),
                     str(len(r.problems())), r.uri))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["pretrained weights:"]
    lines += [("  " + "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths)))).rstrip() for row in rows]
    for r in reports:
        lines.append(f"  {r.part}: {r.describe}")
        for own, how in r.adapted:
            lines.append(f"    adapted {own}: {how}")
        new = _summarise(r.new)
        if new:
            lines.append(f"    new: {new}")
        if r.ignored:
            lines.append(f"    ignored: {', '.join(r.ignored[:6])}{' ...' if len(r.ignored) > 6 else ''}")
        lines += [f"    skipped: {p}" for p in r.problems()]
        lines += [f"    note: {n}" for n in r.notes]
    done = {r.part for r in reports}
    fresh = [name for name, _ in model.named_children() if name not in done]
    lines.append(f"  initialised fresh: {', '.join(fresh)}")
    return "\n".join(lines)


def _summarise(names: list[str]) -> str:
    """Parameter names folded to modules, block indices as ``*``: ``...blocks.*.cross_attn`` once for all."""
    folded = []
    for n in names:
        n = re.sub(r"\.(weight|bias|gamma)$", "", n)
        n = re.sub(r"(\.blocks)\.\d+\.([^.]+).*", r"\1.*.\2", n)
        if n not in folded:
            folded.append(n)
    return ", ".join(folded)
