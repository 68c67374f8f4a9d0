"""Sharded checkpoints (FSDP2): ``torch.distributed.checkpoint`` (DCP), each rank writing its own shard.

A sharded checkpoint folder holds DCP's files, ``.metadata`` (written by rank 0: which rank's file holds which
slice of which tensor) and one ``__<rank>_0.distcp`` per rank, for ``{"model": ..., "optimizer": ...}`` keyed by
parameter name, beside the small files every checkpoint has (see :mod:`mirasol_ray.train.checkpoint`). Every rank
writes into a local folder of its own; Ray Train's ``report`` uploads all of them into one checkpoint folder of
the run (local or ``s3://``). Nothing is ever gathered on one rank, so saving costs every rank its own shard only.

Loading reads the shards where they are (a local folder or ``s3://``, by byte ranges: no rank downloads what it
does not hold) into a model sharded over any number of ranks, or into a plain model in one process: DCP reshards.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from mirasol_ray import storage
from mirasol_ray.train.strict import Shapes, init_plan, require_same_tensors, shapes_of

METADATA = ".metadata"


def is_sharded(folder: str) -> bool:
    """Whether a checkpoint folder (local or ``s3://``) holds a DCP checkpoint."""
    return storage.exists(storage.join(folder, METADATA))


def _reader(folder: str):
    if storage.is_s3(folder):
        # torch 2.13 no longer exports FsspecReader from the package (it reads through fsspec: s3fs, ranged GETs)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(folder, **storage.s3fs_options())
    return dcp.FileSystemReader(storage.strip_scheme(folder))


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        out["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return out


def save(local_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's shard of the model and optimiser state into ``local_dir`` (rank 0 also writes
    ``.metadata``). A collective: every rank calls it, each with a folder of its own (they need not share a disk)."""

    os.makedirs(local_dir, exist_ok=True)
    dcp.save(_states(model, optimizer), storage_writer=dcp.FileSystemWriter(local_dir))


def load(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into ``model`` and ``optimizer``, however they are now sharded (FSDP2 over any
    number of ranks, or a plain model). A collective under a process group.

    The model's tensors must be the checkpoint's, by name and shape: a difference raises
    :class:`~mirasol_ray.train.strict.CheckpointMismatch` naming it, before anything is read. The one optional
    part is a parameter's optimiser state: one that had no gradient yet (the audio-video path while
    ``train.freeze_av_steps`` holds it) has none in the checkpoint and keeps none, as in the run that wrote it:
    AdamW starts it at its first gradient. Everything else is read strictly (DCP raises on a key it lacks)."""

    reader = _reader(folder)
    meta = reader.read_metadata().state_dict_metadata
    states = _states(model, optimizer)  # the optimiser's state is created (zeros) so that DCP can fill it
    require_same_tensors(folder, saved_model_shapes(meta), shapes_of(states["model"]))
    prefix = "optimizer.state."
    with_state = {k[len(prefix):].rsplit(".", 1)[0] for k in meta if k.startswith(prefix)}
    states["optimizer"]["state"] = {k: v for k, v in states["optimizer"]["state"].items() if k in with_state}
    dcp.load(states, storage_reader=reader)
    set_model_state_dict(model, states["model"])
    # not strict: the parameters left out above have no state to set, and the optimiser's load_state_dict leaves
    # them none (the zeros _states made for them are replaced)
    set_optimizer_state_dict(model, optimizer, states["optimizer"], options=StateDictOptions(strict=False))


def saved_model_shapes(meta: dict[str, Any]) -> Shapes:
    """The model's tensor names and shapes in a DCP checkpoint's metadata (``read_metadata().state_dict_metadata``:
    keys ``model.<name>``; None: a value stored as bytes, not a tensor)."""

    return {k.removeprefix("model."): tuple(m.size) if isinstance(m, TensorStorageMetadata) else None
            for k, m in meta.items() if k.startswith("model.")}


def model_weights(folder: str) -> dict[str, torch.Tensor]:
    """The whole model's weights from a sharded checkpoint, as one plain state dict in this process (evaluation,
    prediction, export). Reads the model's shards only, not the optimiser's. Call it outside a process group (or
    from every rank of one)."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: loading into this process", which is the point
        state = _load_state_dict_from_keys({"model"}, storage_reader=_reader(folder))
    return state["model"]


def load_weights_into(model: nn.Module, folder: str, strict: bool = True) -> dict[str, list[str]]:
    """Initialise ``model`` (plain, DDP or FSDP2) from a sharded checkpoint's weights (``train.init_from``), by the
    rule of :func:`mirasol_ray.train.strict.init_plan` (the classification head may differ; another difference
    is an error naming it when ``strict``), and return ``{"missing", "unexpected"}``. Reads the model's tensors
    only: the optimiser's state in the checkpoint is not wanted. A collective under a process group."""

    reader = _reader(folder)
    own = get_model_state_dict(model)
    plan = init_plan(folder, saved_model_shapes(reader.read_metadata().state_dict_metadata),
                          shapes_of(own), strict)
    states = {"model": {k: own[k] for k in plan["load"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a process group DCP says it loads into this process alone
        dcp.load(states, storage_reader=reader)  # every key is in the checkpoint (init_plan): strict
    set_model_state_dict(model, states["model"], options=StateDictOptions(strict=False))
    return {"missing": plan["missing"], "unexpected": plan["unexpected"]}
