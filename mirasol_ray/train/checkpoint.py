"""Checkpoint files: the model (config travels with the weights) and the training state, loaded with
``weights_only=True`` (no pickled code is ever executed).

A checkpoint folder holds::

    model.pt        {"config": ModelConfig as plain types, "model": state_dict}
    train_state.pt  {"optimizer", "scheduler", "step", "epoch", "batch_in_epoch"}
    meta.json       {"step", "epoch", "stage", "metrics", "run_config" (the whole Config: data geometry
                    too), "label_set", "tokenizer" (the file name below, or null for the byte tokenizer)}
    tokenizer.json  the run's tokenizer, byte for byte (or tokenizer.model for sentencepiece)

so a checkpoint is self-contained: evaluation and prediction on another machine need its URI alone, whatever
paths the run was trained with. ``mirasol export`` writes the same in one file::

    {"config", "model", "meta": the meta.json dict, "tokenizer": {"name", "data": bytes} or None}

``resolve_checkpoint`` accepts a ``model.pt`` (or an exported file), a checkpoint folder, or a run folder (its
latest checkpoint), on local disk or ``s3://``.

Under FSDP2 (``train.fsdp``) a checkpoint is **sharded**: no rank gathers the model. Every rank writes its own part
of the weights and the optimiser state through ``torch.distributed.checkpoint`` (:mod:`mirasol_ray.train.sharded`:
``.metadata`` and one ``__<rank>_0.distcp`` per rank), ``model.pt`` holds the config alone with ``"sharded": True``
and ``train_state.pt`` holds ``"optimizer": None``. Everything that reads a checkpoint goes through
:func:`load_model_state` (the whole model's weights, whichever kind) or, for a model being trained,
:func:`load_weights_into`, so evaluation, prediction, ``train.init_from`` and ``mirasol export`` read both kinds.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import torch

from mirasol_ray import storage
from mirasol_ray.model.mirasol import load_model

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
SHARDED = "sharded"
"""``model.pt``'s flag of a sharded checkpoint (its weights are the folder's DCP shards)."""
TOKENIZER_FILES = {".json": "tokenizer.json", ".model": "tokenizer.model"}
"""A tokenizer's name inside a checkpoint, by the suffix of the file it came from."""


def tokenizer_payload(spec: str, endpoint_url: str = "") -> dict[str, Any] | None:
    """``{"name", "data"}``: the bytes of the tokenizer file ``data.tokenizer`` names, to store in checkpoints;
    None for the built-in byte tokenizer."""
    if spec in ("", "byte"):
        return None
    suffix = os.path.splitext(spec)[1]
    return {"name": TOKENIZER_FILES[suffix], "data": storage.read_bytes(spec, endpoint_url)}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimiser state dicts, keyed by parameter name, for plain, DDP and FSDP2
    models alike. A collective under FSDP2: every rank calls it, rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    m = unwrap(model)
    return (get_model_state_dict(m, options=_full_options()),
            get_optimizer_state_dict(m, optimizer, options=_full_options()))


def restore_state(model: torch.nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load what :func:`gather_state` saved into a (possibly sharded) model and its optimiser."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    m = unwrap(model)
    set_model_state_dict(m, model_sd, options=StateDictOptions(full_state_dict=True))
    # A parameter that has had no gradient yet (the audio-video path while train.freeze_av_steps holds it) has no
    # AdamW state to save. Loading is therefore not strict, and the state the loader makes up for such a parameter
    # (step 1, zero moments) is dropped again: AdamW starts it at its first gradient, as the uninterrupted run does.
    set_optimizer_state_dict(m, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False))
    saved = optim_sd.get("state", {})
    for name, p in m.named_parameters():
        if name not in saved:
            optimizer.state.pop(p, None)


def write_checkpoint(folder: str, model: torch.nn.Module, model_sd: dict | None, optim_sd: dict | None = None,
                     scheduler=None, *, step: int, epoch: int = 0, batch_in_epoch: int = 0, stage: str = "",
                     metrics: dict | None = None, run_config: dict | None = None,
                     label_set: list[str] | None = None, tokenizer: dict[str, Any] | None = None,
                     sharded: bool = False) -> str:
    """Write a checkpoint into a local ``folder`` (Ray Train then uploads it). ``tokenizer``: see
    :func:`tokenizer_payload`. ``sharded``: the weights and optimiser state are in the folder's DCP shards
    (written by every rank, :func:`mirasol_ray.train.sharded.save`), not in ``model_sd``/``optim_sd``; the
    training state holds the scheduler and the data position."""
    os.makedirs(folder, exist_ok=True)
    state = {"config": unwrap(model).config.to_dict(), "model": {}, SHARDED: True} if sharded else {
        "config": unwrap(model).config.to_dict(), "model": model_sd}
    torch.save(state, os.path.join(folder, MODEL_FILE))
    if optim_sd is not None or sharded:
        torch.save({"optimizer": optim_sd, "scheduler": scheduler.state_dict() if scheduler else {},
                    "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch},
                   os.path.join(folder, STATE_FILE))
    if tokenizer is not None:
        with open(os.path.join(folder, tokenizer["name"]), "wb") as f:
            f.write(tokenizer["data"])
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump({"step": step, "epoch": epoch, "stage": stage, "metrics": metrics or {},
                   "run_config": run_config or {}, "label_set": label_set,
                   "tokenizer": tokenizer["name"] if tokenizer else None}, f)
    return folder


def load_torch(uri: str, endpoint_url: str = "") -> Any:
    """``torch.load(weights_only=True)`` of a local file (memory-mapped: loading it again, or reading only its
    small entries, costs little) or of an object in storage."""
    if not storage.is_remote(uri):
        path = storage.strip_scheme(uri)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"not found: {uri}")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    data = storage.read_bytes(uri, endpoint_url)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def latest_checkpoint_dir(run_uri: str, endpoint_url: str = "") -> str | None:
    """The checkpoint folder with the highest step under a run folder, or None."""
    best, best_step = None, -1
    for name in storage.listdir(run_uri, endpoint_url):
        if not name.startswith("checkpoint"):
            continue
        meta_uri = storage.join(run_uri, name, META_FILE)
        try:
            step = json.loads(storage.read_text(meta_uri, endpoint_url))["step"]
        except (FileNotFoundError, KeyError, ValueError):
            continue
        if step > best_step:
            best, best_step = storage.join(run_uri, name), step
    return best


def resolve_checkpoint(uri: str, endpoint_url: str = "") -> str:
    """The ``model.pt`` URI behind a file, checkpoint folder or run folder; FileNotFoundError names the URI."""
    if uri.endswith(".pt"):
        if not storage.exists(uri, endpoint_url):
            raise FileNotFoundError(f"checkpoint not found: {uri}")
        return uri
    direct = storage.join(uri, MODEL_FILE)
    if storage.exists(direct, endpoint_url):
        return direct
    latest = latest_checkpoint_dir(uri, endpoint_url)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint at {uri}")
    return storage.join(latest, MODEL_FILE)


def is_sharded_state(state: dict[str, Any]) -> bool:
    """Whether a loaded ``model.pt`` is a sharded checkpoint's (config only; weights in the DCP shards)."""
    return bool(state.get(SHARDED))


def load_model_state(model_uri: str, endpoint_url: str = "") -> dict[str, Any]:
    """``{"config", "model", ...}`` of a resolved ``model.pt`` with the whole model's weights, also for a sharded
    checkpoint (read from its shards in this process: the model's, not the optimiser's)."""
    state = load_torch(model_uri, endpoint_url)
    if is_sharded_state(state):
        from mirasol_ray.train import sharded

        state = {**state, "model": sharded.model_weights(_folder(model_uri), endpoint_url)}
        state.pop(SHARDED)
    return state


def load_model_from(uri: str, endpoint_url: str = ""):
    """Rebuild a model from a checkpoint alone (file, checkpoint folder or run folder; sharded or not)."""
    return load_model(load_model_state(resolve_checkpoint(uri, endpoint_url), endpoint_url))


def load_weights_into(model: torch.nn.Module, uri: str, endpoint_url: str = "") -> dict[str, list[str]]:
    """Initialise ``model`` from a checkpoint's weights (finetune from pretrain). Parameters whose shapes differ
    (e.g. a classification head sized for another label set) are left as initialised and reported. From a
    sharded checkpoint every rank reads only what it holds (a collective under a process group)."""
    model_uri = resolve_checkpoint(uri, endpoint_url)
    state = load_torch(model_uri, endpoint_url)
    if is_sharded_state(state):
        from mirasol_ray.train import sharded

        return sharded.load_weights_into(model, _folder(model_uri), endpoint_url)
    state = state["model"]
    own = unwrap(model).state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    result = unwrap(model).load_state_dict(keep, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": sorted(set(state) - set(keep))}






def _folder(uri: str) -> str:
    import posixpath

    return posixpath.dirname(uri) if storage.is_remote(uri) else os.path.dirname(uri)


def read_meta(model_uri: str, endpoint_url: str = "") -> dict[str, Any]:
    """meta.json beside a resolved ``model.pt``; an exported file's own ``meta``; {} if neither."""
    uri = storage.join(_folder(model_uri), META_FILE)
    if storage.exists(uri, endpoint_url):
        return json.loads(storage.read_text(uri, endpoint_url))
    if model_uri.endswith(".pt"):
        return load_torch(model_uri, endpoint_url).get("meta") or {}
    return {}


def tokenizer_spec(model_uri: str, meta: dict[str, Any], endpoint_url: str = "") -> str:
    """A ``data.tokenizer`` value for the tokenizer a checkpoint carries: the file in its folder, or (an exported
    file) its bytes written to a temporary file that lives as long as this process; "byte" when it has none."""
    name = meta.get("tokenizer")
    if not name:
        return "byte"
    beside = storage.join(_folder(model_uri), name)
    if storage.exists(beside, endpoint_url):
        return beside
    embedded = load_torch(model_uri, endpoint_url).get("tokenizer")
    if not embedded:
        raise FileNotFoundError(f"checkpoint {model_uri} names tokenizer {name} but does not hold it")
    return _temporary_file(embedded["name"], embedded["data"])


def _temporary_file(name: str, data: bytes) -> str:
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="mirasol-tokenizer-")
    atexit.register(shutil.rmtree, d, True)
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def export(checkpoint: str, out: str, endpoint_url: str = "") -> dict[str, Any]:
    """One self-contained file (weights, model config, run config, label set, tokenizer bytes) from a checkpoint
    (file, checkpoint folder or run folder; local or ``s3://``), written to ``out`` (local or ``s3://``)."""
    model_uri = resolve_checkpoint(checkpoint, endpoint_url)
    state = load_model_state(model_uri, endpoint_url)
    meta = read_meta(model_uri, endpoint_url)
    tok = tokenizer_spec(model_uri, meta, endpoint_url)
    state = {"config": state["config"], "model": state["model"], "meta": meta,
             "tokenizer": None if tok == "byte" else {"name": meta["tokenizer"],
                                                      "data": storage.read_bytes(tok, endpoint_url)}}
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(out, buf.getvalue(), endpoint_url)
    return {"checkpoint": model_uri, "out": out, "step": meta.get("step"), "bytes": buf.tell(),
            "parameters": sum(v.numel() for v in state["model"].values())}
