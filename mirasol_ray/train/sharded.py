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
from torch import nn

from mirasol_ray import storage

METADATA = ".metadata"


def is_sharded(folder: str, endpoint_url: str = "") -> bool:
    """Whether a checkpoint folder (local or ``s3://``) holds a DCP checkpoint."""
    return storage.exists(storage.join(folder, METADATA), endpoint_url)


def _reader(folder: str, endpoint_url: str = ""):
    import torch.distributed.checkpoint as dcp

    if storage.is_s3(folder):
        # torch 2.13 no longer exports FsspecReader from the package (it reads through fsspec: s3fs, ranged GETs)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        ep = storage.endpoint(endpoint_url)
        return FsspecReader(folder, **({"client_kwargs": {"endpoint_url": ep}} if ep else {}))
    return dcp.FileSystemReader(storage.strip_scheme(folder))


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        out["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return out


def save(local_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's shard of the model and optimiser state into ``local_dir`` (rank 0 also writes
    ``.metadata``). A collective: every rank calls it, each with a folder of its own (they need not share a disk)."""
    import torch.distributed.checkpoint as dcp

    os.makedirs(local_dir, exist_ok=True)
    dcp.save(_states(model, optimizer), storage_writer=dcp.FileSystemWriter(local_dir))


def load(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, endpoint_url: str = "") -> None:
    """Load a sharded checkpoint into ``model`` and ``optimizer``, however they are now sharded (FSDP2 over any
    number of ranks, or a plain model). A collective under a process group.

    A parameter the checkpoint holds no optimiser state for (one that had no gradient yet: the audio-video path
    while ``train.freeze_av_steps`` holds it) keeps none, as in the run that wrote it: AdamW starts it at its first
    gradient."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    reader = _reader(folder, endpoint_url)
    prefix = "optimizer.state."
    with_state = {k[len(prefix):].rsplit(".", 1)[0] for k in reader.read_metadata().state_dict_metadata
                  if k.startswith(prefix)}
    states = _states(model, optimizer)  # the optimiser's state is created (zeros) so that DCP can fill it
    dcp.load(states, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, states["model"])
    set_optimizer_state_dict(model, optimizer, states["optimizer"])
    by_name = dict(model.named_parameters())
    for name in set(states["optimizer"]["state"]) - with_state:
        optimizer.state.pop(by_name[_param_name(name, by_name)], None)


def _param_name(fqn: str, by_name: dict[str, nn.Parameter]) -> str:
    """The optimiser state's key (a clean parameter name) -> the name under ``model.named_parameters()`` (a DDP
    or activation-checkpointing wrapper adds a prefix)."""
    if fqn in by_name:
        return fqn
    return next(n for n in by_name if n.replace("_checkpoint_wrapped_module.", "").removeprefix("module.") == fqn)


def model_weights(folder: str, endpoint_url: str = "") -> dict[str, torch.Tensor]:
    """The whole model's weights from a sharded checkpoint, as one plain state dict in this process (evaluation,
    prediction, export). Reads the model's shards only, not the optimiser's. Call it outside a process group (or
    from every rank of one)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: loading into this process", which is the point
        state = _load_state_dict_from_keys({"model"}, storage_reader=_reader(folder, endpoint_url))
    return state["model"]


def load_weights_into(model: nn.Module, folder: str, endpoint_url: str = "") -> dict[str, list[str]]:
    """Initialise ``model`` (plain, DDP or FSDP2) from a sharded checkpoint's weights (``train.init_from``).
    Parameters the checkpoint lacks or holds with another shape (e.g. a classification head sized for another
    label set) are left as initialised and reported. A collective under a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    reader = _reader(folder, endpoint_url)
    meta = reader.read_metadata().state_dict_metadata
    own = get_model_state_dict(model)
    keep = {k: v for k, v in own.items() if isinstance(meta.get(f"model.{k}"), TensorStorageMetadata)
            and tuple(meta[f"model.{k}"].size) == tuple(v.shape)}
    states = {"model": keep}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a process group DCP says it loads into this process alone
        dcp.load(states, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, states["model"], options=StateDictOptions(strict=False))
    saved = {k.removeprefix("model.") for k in meta if k.startswith("model.")}
    return {"missing": sorted(set(own) - set(keep)), "unexpected": sorted(saved - set(keep))}
