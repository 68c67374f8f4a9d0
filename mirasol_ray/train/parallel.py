"""How a model is laid over the workers: FSDP2 or DDP, mixed precision, activation checkpointing, compile.

One function, :func:`parallelize`, in the spirit of torchtitan's per-model ``parallelize`` step: the training loop,
``mirasol bench step`` and the tests all go through it, so what the config asks for is what runs. No Ray here: it
needs only ``torch.distributed`` (initialised by Ray Train's TorchTrainer, or by a test's own process group).

- ``train.fsdp``: FSDP2 (``fully_shard``) on every transformer :class:`~mirasol_ray.model.layers.Block` (one unit
  each: its parameters are gathered just before it runs and freed after) and on the root (everything else: patch
  embeddings, position tables, the text embedding, small heads). On GPUs a :class:`MixedPrecisionPolicy` computes
  in bf16 and reduces gradients in fp32; the sharded fp32 parameters stay the optimiser's. Otherwise DDP.
- ``model.activation_checkpointing``: each block's activations are recomputed in backward (training only).
- ``train.compile``: each block is compiled (``torch.compile``) separately: the repeated structure compiles once
  per block shape, and FSDP's hooks stay outside the compiled code, as torchtitan does.

Under FSDP2 a parameter outside a block is a sharded DTensor until the root's forward gathers it, so only methods
registered as forward methods may be called on the model; and generation, whose step count depends on the data,
must not gather block by block (each rank would issue a different sequence of collectives). Evaluation therefore
runs inside :func:`evaluating`: the whole model is gathered once on every rank, each rank decodes its own
rows with no collective, and the parameters are freed again after.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from mirasol_ray.model.layers import Block, Transformer
from mirasol_ray.model.mirasol import build_model

FORWARD_METHODS = ("generate", "score_options", "score_candidates", "classify", "text_logits")
"""The model's entry points besides ``forward`` (see :class:`~mirasol_ray.model.mirasol.Mirasol`). Methods they
call internally (``encode_av``, ``start_decoding``) are not registered: a nested registered call would free the
root's parameters when it returns, under its caller's feet."""


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def bf16_compute(device: torch.device, precision: str) -> bool:
    """bf16 on a GPU unless ``precision`` is fp32; on a CPU only when asked for (``precision: bf16``)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute every block's activations in backward (training only, never with a decoding cache)."""
    for m in model.modules():
        if isinstance(m, Transformer):
            m.checkpointing = on


def blocks(model: nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def parallelize(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """Apply the config's activation checkpointing, compile and data parallelism (FSDP2 or DDP) to ``model``.

    ``cfg`` is a :class:`mirasol_ray.config.Config`. Without a process group (one process) the model is only moved
    to ``device``, with checkpointing and compile as asked. Returns the model to train (DDP wraps it; FSDP2 and
    the single process change it in place).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP2's default mesh and NCCL use the current device
    model = model.to(device)
    set_activation_checkpointing(model, cfg.model.activation_checkpointing)
    if cfg.train.compile:
        from torch import _dynamo

        # One code object (Block.forward) for every block of every component: each width, mask pattern, mode
        # (training, evaluation, cached decoding) is a variant of it, beyond dynamo's default of 8 (the rest
        # would silently run eager).
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
        for block in blocks(model):
            block.compile()
    if not distributed():
        return model
    if cfg.train.fsdp:
        return shard(model, device, cfg.train.precision)
    if torch.distributed.get_world_size() == 1:
        return model

    ids = [device.index] if device.type == "cuda" else None
    # find_unused_parameters: a held audio-video path (train.freeze_av_steps) runs outside the autograd graph, and
    # a pretrained part may hold parameters this model never uses (the cost: one graph traversal a step)
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def shard(model: nn.Module, device: torch.device, precision: str = "auto") -> nn.Module:
    """FSDP2 per block and at the root; bf16 compute with fp32 gradient reduction where :func:`bf16_compute`."""

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16_compute(device, precision) else MixedPrecisionPolicy())
    for block in blocks(model):
        fully_shard(block, mp_policy=mp, reshard_after_forward=True)
    # the root's parameters would be gathered again at once for backward: keep them through forward
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The :class:`Mirasol` under a DDP wrapper (FSDP2 and a single process do not wrap)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model ready for evaluation on this rank alone; yields the module whose methods to call.

    Under FSDP2 every parameter is gathered on every rank for the duration: a collective on entry (every rank
    enters together), after which forward passes issue no collective at all, so ranks may run different numbers
    of batches and decoding steps; the gathered parameters are freed on exit. Compiled blocks (``train.compile``)
    run eagerly here: step-by-step decoding, with its growing key/value cache, would compile a variant per length
    and gain little from it.
    """
    compiled = {b: b._compiled_call_impl for b in blocks(model) if getattr(b, "_compiled_call_impl", None)}
    for b in compiled:
        b._compiled_call_impl = None
    try:
        if not is_fsdp(model):
            yield unwrap(model)
            return
        units = [m for m in model.modules() if is_fsdp(m)]
        model.set_reshard_after_forward(False)  # recursive
        for m in units:  # the same order on every rank
            m.unshard()
        try:
            yield model
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(m is not model, recurse=False)
    finally:
        for b, impl in compiled.items():
            b._compiled_call_impl = impl


def gradient_sync(model: nn.Module, sync: bool):
    """A context in which backward does (``sync``) or does not all-reduce/reduce-scatter gradients: DDP's
    ``no_sync`` or FSDP2's ``set_requires_gradient_sync``; gradient accumulation syncs only on the last
    micro-batch."""
    if sync or not distributed():
        return contextlib.nullcontext()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def mean_over_ranks(values: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """``values`` with each of ``keys`` replaced by its mean over the ranks that have it (a key a rank lacks, e.g.
    the classification loss on a rank with no labelled row, does not count there). A collective: every rank
    calls it with the same ``keys``."""
    if not distributed():
        return dict(values)
    dev = _collective_device()
    sums = torch.tensor([[values.get(k, 0.0), float(k in values)] for k in keys], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(sums)
    out = dict(values)
    for k, (total, n) in zip(keys, sums.tolist()):
        if n:
            out[k] = total / n
    return out


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a process group."""
    if not distributed():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own random streams (dropout, sampling) after the shared model initialisation: distinct
    per rank, and distinct from the initialisation's ``seed``."""
    return seed * 1_000_003 + 1 + rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_on_rank(model_cfg, seed: int, rank: int) -> nn.Module:
    """The model a rank starts from: the same initial weights on every rank (all seeded with ``seed``), after
    which each rank's random streams are its own (:func:`rank_seed`), so dropout masks differ between ranks."""

    seed_everything(seed)
    model = build_model(model_cfg)
    seed_everything(rank_seed(seed, rank))
    return model
