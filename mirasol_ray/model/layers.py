"""The one attention / block / transformer implementation every part of the model is built from.

Masks are boolean and mean "may attend" (True = keep), broadcastable to (B, heads, Nq, Nk), the convention of
``F.scaled_dot_product_attention``. A per-layer ``cache`` dict makes incremental decoding possible: self-attention
appends the new keys/values to it, cross-attention computes the context's keys/values once and reuses them.

Cross-attention takes a ``context_index``: row i of the queries attends to context row ``context_index[i]``. Many
texts of one clip then share the clip's context, whose keys/values are computed once per clip, not per text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mirasol_ray.config import ACTIVATIONS


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU,
            "silu": nn.SiLU, "relu": nn.ReLU}[name]()


class RMSNorm(nn.Module):
    """RMSNorm as Llama-family LMs compute it: normalised in float32, scaled in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT; DINOv2 ViTs): named ``gamma`` as in timm."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


@dataclass(frozen=True)
class BlockOptions:
    """How a :class:`Block` is made, where architectures differ. The defaults are this project's own blocks (and
    every block built before pretrained weights could be loaded); a pretrained ViT or LM sets what it needs."""

    norm: str = "layernorm"
    """"layernorm" or "rmsnorm"."""
    norm_eps: float = 1e-5
    head_dim: int = 0
    """Width of one attention head; 0 = dim // heads."""
    kv_heads: int = 0
    """Key/value heads of self-attention (grouped-query attention when fewer than heads); 0 = heads."""
    qkv_bias: bool = True
    out_bias: bool = True
    mlp: str = "plain"
    """"plain": fc, act, fc; "gated": down(act(gate(x)) * up(x)) (SwiGLU with act silu)."""
    mlp_hidden: int = 0
    """Hidden width of the MLP; 0 = mlp_ratio * dim."""
    mlp_bias: bool = True
    act: str = "gelu"
    layer_scale: bool = False


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """x: (B, h, n, d); rope: cos, sin (B, n, d), the half-split layout of Hugging Face Llama checkpoints."""
    cos, sin = rope[0][:, None].to(x.dtype), rope[1][:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int = 0, dropout: float = 0.0, head_dim: int = 0,
                 kv_heads: int = 0, qkv_bias: bool = True, out_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.dropout = dropout
        hd = head_dim or dim // heads
        self.to_q = nn.Linear(dim, heads * hd, bias=qkv_bias)
        self.to_kv = nn.Linear(context_dim or dim, 2 * self.kv_heads * hd, bias=qkv_bias)
        self.to_out = nn.Linear(heads * hd, dim, bias=out_bias)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                cache: dict[str, Tensor] | None = None, rope: tuple[Tensor, Tensor] | None = None,
                context_index: Tensor | None = None) -> Tensor:
        """x: (B, N, D) queries; context: (C, M, Dc) keys/values (C = B, or any C with ``context_index`` (B,)
        naming each query row's context row), x itself when None (self-attention); rope: rotary cos/sin (B, N, d)
        for x's positions (self-attention only)."""
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        cross = context is not None
        if cache is not None and cross and "k" in cache:
            k, v = cache["k"], cache["v"]  # the context does not change while decoding
        else:
            kv = rearrange(self.to_kv(context if cross else x), "b m (two h d) -> two b h m d", two=2,
                           h=self.kv_heads)
            k, v = kv[0], kv[1]  # (B or C, kv_heads, M, d)
            if cross and context_index is not None:
                k, v = k[context_index], v[context_index]  # (B, kv_heads, M, d)
            if rope is not None:
                k = apply_rope(k, rope)
            if cache is not None:
                if not cross and "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        if rope is not None:
            q = apply_rope(q, rope)
        if self.kv_heads != self.heads:  # grouped-query attention: each key/value head serves heads/kv_heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float, dropout: float, hidden: int = 0, act: str = "gelu",
                 bias: bool = True):
        hidden = hidden or int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden, bias=bias), make_activation(act), nn.Linear(hidden, dim, bias=bias),
                         nn.Dropout(dropout))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU when act is silu (Llama, Qwen2, Mistral)."""

    def __init__(self, dim: int, hidden: int, dropout: float, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = make_activation(act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(self.act(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention (when ``context_dim``), MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, context_dim: int = 0,
                 opts: BlockOptions = BlockOptions()):
        super().__init__()
        o = opts
        self.norm1 = make_norm(o.norm, dim, o.norm_eps)
        self.attn = Attention(dim, heads, dropout=dropout, head_dim=o.head_dim, kv_heads=o.kv_heads,
                              qkv_bias=o.qkv_bias, out_bias=o.out_bias)
        self.ls1 = LayerScale(dim) if o.layer_scale else nn.Identity()
        self.cross = context_dim > 0
        if self.cross:
            self.norm_x = make_norm(o.norm, dim, o.norm_eps)
            self.cross_attn = Attention(dim, heads, context_dim=context_dim, dropout=dropout, head_dim=o.head_dim)
        self.norm2 = make_norm(o.norm, dim, o.norm_eps)
        hidden = o.mlp_hidden or int(dim * mlp_ratio)
        self.mlp = (GatedMLP(dim, hidden, dropout, o.act, o.mlp_bias) if o.mlp == "gated"
                    else MLP(dim, mlp_ratio, dropout, hidden, o.act, o.mlp_bias))
        self.ls2 = LayerScale(dim) if o.layer_scale else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cache: dict[str, dict] | None = None,
                rope: tuple[Tensor, Tensor] | None = None, context_index: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.ls1(self.attn(self.norm1(x), mask=mask,
                                             cache=None if cache is None else cache["self"], rope=rope)))
        if self.cross and context is not None:  # no context: the decoder alone (a language model)
            x = x + self.drop(self.cross_attn(self.norm_x(x), context, mask=context_mask,
                                              cache=None if cache is None else cache["cross"],
                                              context_index=context_index))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of :class:`Block` with a final norm; optional activation checkpointing per block."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 context_dim: int = 0, checkpointing: bool = False, opts: BlockOptions = BlockOptions()):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, context_dim, opts) for _ in range(depth))
        self.norm = make_norm(opts.norm, dim, opts.norm_eps)
        self.checkpointing = checkpointing

    def new_cache(self) -> list[dict[str, dict]]:
        """Empty per-layer key/value cache for incremental decoding."""
        return [{"self": {}, "cross": {}} for _ in self.blocks]

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cache: list[dict[str, dict]] | None = None,
                rope: tuple[Tensor, Tensor] | None = None, context_index: Tensor | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            if self.checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, context, context_mask, None, rope, context_index, use_reentrant=False)
            else:
                x = block(x, mask, context, context_mask, None if cache is None else cache[i], rope, context_index)
        return self.norm(x)


class TokenPool(nn.Module):
    """Attention pooling of N tokens to n (TokenLearner, as the Token Turing Machine reads and writes with).

    Each output token is a softmax-weighted sum of the inputs; the weights come from a small MLP on each input, so
    which inputs matter is learned. ``mask`` (B, N) drops tokens (absent audio) from every sum.

    The MLP starts as TokenLearner's (scenic's ``MlpBlock``: Xavier-uniform weights, zero biases;
    :func:`init_weights` keeps it so). With the ViTs' 0.02 instead, every weight starts near 1/N: the pool starts
    as a plain mean, in which a snippet's shape (a few of its tokens) drowns in its background, and learns to pick
    tokens slowly (the TTM Combiner's read of the demo's shapes over the conv stem, supervised directly: 0.43 held-out
    after 300 steps with the 0.02 init, 0.92 with this one; docs/HISTORY.md, "The demo")."""

    def __init__(self, dim: int, n_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, n_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.score[0], self.score[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, mask: Tensor | None = None, scores_of: Tensor | None = None,
                prior: Tensor | None = None) -> Tensor:
        """x: (B, N, D) -> (B, n, D). ``scores_of`` (B, N, D): tokens to score instead of x (x is still what is
        pooled); ``prior`` (N, n): added to the logits (a location-based address)."""
        logits = self.score(self.norm(x if scores_of is None else scores_of)).float()  # (B, N, n)
        if prior is not None:
            logits = logits + prior.float()
        if mask is not None:
            logits = logits.masked_fill(~mask[..., None], float("-inf"))
        weights = logits.softmax(dim=1).to(x.dtype)
        return torch.einsum("b n k, b n d -> b k d", weights, x)


def init_weights(module: nn.Module) -> None:
    """ViT/GPT-style init: truncated normal(0.02) weights, zero biases, unit norms and layer scales."""
    if isinstance(module, (nn.Linear, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, LayerScale):
        nn.init.ones_(module.gamma)
    elif isinstance(module, TokenPool):  # after its Linear layers (apply visits children first): TokenLearner's
        module.reset_parameters()
