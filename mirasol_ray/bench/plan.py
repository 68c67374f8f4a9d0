"""What a training step costs, counted on the meta device (no memory allocated, no GPU needed).

- :func:`step_flops`: the FLOPs of one forward + backward. *Model* FLOPs count the model once (what MFU means:
  the work the model defines, whatever the implementation does); *hardware* FLOPs add what activation
  checkpointing recomputes in backward: every block's forward up to the last tensor backward needs (torch's
  non-reentrant checkpoint stops there, so a block's final MLP projection is not run again). Counted by ``torch.utils.flop_counter`` on meta
  tensors, where attention runs as its math decomposition (two batched matmuls), so attention is counted in full
  (dense, masks ignored), even where the fused kernel a GPU runs has no formula in the counter.
- :func:`memory_plan`: bytes per GPU of parameters, gradients, AdamW state and saved activations, under DDP or
  FSDP2 (``train.fsdp``), with and without activation checkpointing, and whether that fits a card.

Activations are the tensors autograd saves for backward, measured on meta tensors under :class:`Autocast16`, an
emulation of CUDA's bf16 autocast (matmuls, linear layers and attention take bf16 inputs; norms, softmax and
losses run in fp32), so what is saved has the dtypes a GPU run saves.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from mirasol_ray.data.schema import row_spec, text_spec
from mirasol_ray.model.layers import Block
from mirasol_ray.model.mirasol import Mirasol, build_model

GiB = 2**30
CARDS = {"H100 80GB": 81_559 * 2**20, "H200 141GB": 143_771 * 2**20}
"""Memory a card reports (``nvidia-smi``, MiB)."""
USABLE = 0.9
"""Fraction of a card's memory a plan may fill to "fit": the rest is CUDA context, NCCL buffers, allocator
fragmentation and workspaces, which this plan does not model."""


def meta_batch(data_cfg, batch_size: int, texts: int = 1) -> dict[str, Any]:
    """A batch of the schema's shapes and dtypes on the meta device, ``texts`` full-length QA texts per clip.

    The texts come flattened, clip by clip, without the K axis and its ``text_mask`` (which texts are present is
    data the meta device does not hold; :func:`mirasol_ray.model.mirasol.texts_of` reads such a batch as the same
    number of texts for every clip)."""

    batch: dict[str, Any] = {}
    per_text = text_spec(data_cfg)
    for name, (shape, dtype) in row_spec(data_cfg).items():
        if name in ("text_mask", "text_index", "num_texts"):
            continue
        rows, shape = (batch_size * texts, per_text[name][0]) if name in per_text else (batch_size, shape)
        torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
        batch[name] = torch.empty((rows, *shape), dtype=torch_dtype, device="meta")
    batch["key"] = [str(i) for i in range(batch_size)]
    return batch


def meta_model(model_cfg, checkpointing: bool) -> Mirasol:
    cfg = dataclasses.replace(model_cfg, activation_checkpointing=checkpointing, dropout=0.0)
    with torch.device("meta"):
        return build_model(cfg).train()


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def step_flops(cfg, batch_size: int, texts: int = 1) -> dict[str, float]:
    """``{"model", "hardware"}`` FLOPs of one forward + backward at ``batch_size`` clips of ``texts`` full-length
    texts each, for ``cfg`` (a Config); hardware = model unless ``model.activation_checkpointing`` recomputes the
    blocks."""
    batch = meta_batch(cfg.data, batch_size, texts)
    out = {}
    for kind, recompute in (("model", False), ("hardware", cfg.model.activation_checkpointing)):
        model = meta_model(cfg.model, recompute)
        with FlopCounterMode(display=False) as counter:
            model(batch)["loss"].backward()
        out[kind] = float(counter.get_total_flops())
    return out


# ----------------------------------------------------------------------------------------------------------------
# memory


LOW = {F.linear, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, torch.mm, torch.einsum, F.conv3d,
       F.conv2d}
"""Functions CUDA autocast runs in bf16 (its lower-precision list, as far as this model uses it)."""
FULL = {F.layer_norm, F.softmax, F.log_softmax, Tensor.softmax, Tensor.log_softmax, F.cross_entropy,
        F.cosine_similarity}
"""Functions CUDA autocast runs in fp32."""


class Autocast16(TorchFunctionMode):
    """A GPU's bf16 step, emulated above autograd for tensors CUDA autocast cannot see (meta): floating inputs of
    :data:`LOW` functions are cast to bf16, of :data:`FULL` ones to fp32, where autocast casts them, so autograd
    saves the same tensors in the same dtypes; and attention saves what a fused kernel saves
    (:class:`FusedAttention`), not the (Nq x Nk) weights of the math decomposition meta tensors would run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            (q, k, v), kwargs = _cast(((args + (None,) * 3)[:3], kwargs), torch.bfloat16)
            for name, value in zip(("query", "key", "value"), (q, k, v)):
                if value is None:
                    raise TypeError(f"scaled_dot_product_attention without {name}")
            return FusedAttention.apply(q, k, v, args[3] if len(args) > 3 else kwargs.get("attn_mask"))
        if func in LOW:
            args, kwargs = _cast((args, kwargs), torch.bfloat16)
        elif func in FULL:
            args, kwargs = _cast((args, kwargs), torch.float32)
        return func(*args, **kwargs)


class FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash, memory-efficient, cuDNN) keeps for backward: q, k, v, the mask, the
    output and one fp32 log-sum-exp per query row. Shapes only: for counting on meta tensors, never for running."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, h, Nq, dv)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, h, Nq)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("FusedAttention only counts what a fused kernel saves")


def _cast(tree, dtype):
    def cast(x):
        return x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != dtype else x

    return tree_map(cast, tree)


def saved_activations(model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
    """Bytes autograd saves for backward in one forward (parameters excluded, each storage once), and how they
    split over the transformer blocks: ``{"total", "outside_blocks", "block_inputs", "largest_block"}``.

    With activation checkpointing a block keeps only its inputs until backward, where it recomputes its own
    activations one block at a time: peak ~= outside_blocks + block_inputs + largest_block. Measured with
    checkpointing off (the plan derives the "on" figure), since the recompute hides what a block saves."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int, Any]] = {}
    inputs: dict[int, int] = {}
    current: list[Any] = [None]

    def pre(block, args):
        current[0] = block
        for t in args:
            if isinstance(t, Tensor) and t.untyped_storage()._cdata not in params:
                inputs.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())

    def post(block, args, out):
        current[0] = None

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), current[0])
        return t

    handles = [h for b in model.modules() if isinstance(b, Block)
               for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    try:
        with Autocast16(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch)
    finally:
        for h in handles:
            h.remove()
    per_block: dict[Any, int] = defaultdict(int)
    for nbytes, block in saved.values():
        per_block[block] += nbytes
    outside = per_block.pop(None, 0)
    return {"total": float(sum(n for n, _ in saved.values())), "outside_blocks": float(outside),
            "block_inputs": float(sum(inputs.values())), "largest_block": float(max(per_block.values(), default=0))}


def memory_plan(cfg, gpus: int, fsdp: bool, batch_size: int) -> dict[str, Any]:
    """Bytes per GPU of a training step of ``cfg`` (a Config) at ``batch_size`` per GPU, on ``gpus`` GPUs.

    Parameters are kept in fp32 and AdamW holds two fp32 moments per parameter.
    - DDP: every GPU holds all of them: parameters 4 B, gradients 4 B, DDP's gradient buckets 4 B, AdamW 8 B per
      parameter, and autocast's bf16 copies of the weights during the step (2 B).
    - FSDP2: parameters, gradients and AdamW state are split over the GPUs (16 B / gpus per parameter); in flight
      are the root unit's bf16 parameters for the whole step (2 B) with its fp32 gradients (4 B), and two blocks
      at a time gathered in bf16 (one computing, one prefetched) with their gradients before reduce-scatter
      (bf16 + fp32).
    Activations: :func:`saved_activations` at this batch size, without and with activation checkpointing.
    """
    model = meta_model(cfg.model, checkpointing=False)
    P = sum(p.numel() for p in model.parameters())
    block_params = [sum(p.numel() for p in b.parameters()) for b in model.modules() if isinstance(b, Block)]
    root = P - sum(block_params)
    acts = saved_activations(model, meta_batch(cfg.data, batch_size))
    if fsdp:
        states = {"parameters": 4 * P / gpus, "gradients": 4 * P / gpus, "optimizer": 8 * P / gpus,
                  "in_flight": root * (2 + 4) + 2 * max(block_params, default=0) * (2 + 2 + 4)}
    else:
        states = {"parameters": 4 * P, "gradients": 4 * P + 4 * P, "optimizer": 8 * P, "in_flight": 2 * P}
    fixed = sum(states.values())
    with_ac = acts["outside_blocks"] + acts["block_inputs"] + acts["largest_block"]
    totals = {"without_checkpointing": fixed + acts["total"], "with_checkpointing": fixed + with_ac}
    fits = {card: {k: v <= USABLE * cap for k, v in totals.items()} for card, cap in CARDS.items()}
    return {"preset_params": P, "gpus": gpus, "fsdp": fsdp, "batch_size_per_gpu": batch_size,
            "bytes": {**states, "activations_without_checkpointing": acts["total"],
                      "activations_with_checkpointing": with_ac},
            "activations": acts, "totals": totals, "fits": fits, "usable_fraction": USABLE}


def print_plan(plan: dict[str, Any], preset: str) -> None:
    b, t = plan["bytes"], plan["totals"]
    mode = f"FSDP2 over {plan['gpus']} GPUs" if plan["fsdp"] else f"DDP on {plan['gpus']} GPUs (replicated)"
    print(f"{preset}: {plan['preset_params'] / 1e9:.2f}B parameters, {mode}, batch {plan['batch_size_per_gpu']} "
          f"per GPU, bf16 compute, fp32 parameters and AdamW state")
    rows = [("parameters (fp32)", b["parameters"]), ("gradients" + ("" if plan["fsdp"] else " + DDP buckets"),
                                                    b["gradients"]),
            ("AdamW state (fp32 x2)", b["optimizer"]),
            ("gathered in flight" if plan["fsdp"] else "autocast weight copies", b["in_flight"]),
            ("activations, no checkpointing", b["activations_without_checkpointing"]),
            ("activations, checkpointing", b["activations_with_checkpointing"])]
    for name, v in rows:
        print(f"  {name:<32}{v / GiB:>9.1f} GiB")
    for key, label in (("without_checkpointing", "total, no checkpointing"),
                       ("with_checkpointing", "total, checkpointing")):
        verdict = ", ".join(f"{card}: {'fits' if plan['fits'][card][key] else 'does NOT fit'}" for card in CARDS)
        print(f"  {label:<32}{t[key] / GiB:>9.1f} GiB   ({verdict})")
    print(f"  (fits = at most {USABLE:.0%} of the card's memory; the rest is left to the CUDA context, "
          "communication buffers and fragmentation)")

