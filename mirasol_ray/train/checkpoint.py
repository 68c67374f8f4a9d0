"""Checkpoint files: the model (config travels with the weights) and the training state, loaded with
``weights_only=True`` (no pickled code is ever executed).

A checkpoint folder holds::

    model.pt        {"config": ModelConfig as plain types, "model": state_dict}
    train_state.pt  {"optimizer", "scheduler", "step", "epoch", "data_position"} (data_position: what the
                    training data stream consumed, ``ReadPosition.to_dict()``: data/index.py)
    meta.json       {"step", "epoch", "stage", "metrics", "run_config" (the whole Config: data geometry
                    too), "label_set", "tokenizer" (the file name below, or null for the byte tokenizer),
                    "score" ({"metric", "mode"}: what makes a checkpoint of this run the best; null: unscored)}
    tokenizer.json  the run's tokenizer, byte for byte (or tokenizer.model for sentencepiece)
    complete.json   {"step", "files": {name: bytes}}: written last, once every file is in the run folder

so a checkpoint is self-contained: evaluation and prediction on another machine need its URI alone, whatever
paths the run was trained with. ``mirasol export`` writes the same in one file::

    {"config", "model", "meta": the meta.json dict, "tokenizer": {"name", "data": bytes} or None}

A checkpoint is **complete** when its ``complete.json`` is there and every file it lists has the size it lists:
Ray Train uploads a checkpoint's files in no particular order (``pyarrow.fs.copy_files``, threads), and a run
stopped mid-upload leaves a folder that holds some of them. :func:`latest_checkpoint_dir` (the newest complete
checkpoint of a run folder, judged from the folder alone) is the one notion of "latest": resume and
``--checkpoint-choice last`` use it. :func:`best_checkpoint_dir` is the one notion of "best": the complete
checkpoint whose ``metrics`` hold the best value of the run's ``score`` metric (``train.checkpoint_metric``), a
checkpoint being scored only when it was evaluated at its own step; Ray Train's ``CheckpointConfig`` keeps it, and
:func:`prune_checkpoints` never deletes it. ``resolve_checkpoint`` accepts a ``model.pt`` (or an exported file), a
checkpoint folder, or a run folder, on local disk or ``s3://``: a run folder stands for its best checkpoint
(``eval``, ``predict``, ``export``, ``train.init_from``), or its newest when it has no scored one.

Under FSDP2 (``train.fsdp``) a checkpoint is **sharded**: no rank gathers the model. Every rank writes its own part
of the weights and the optimiser state through ``torch.distributed.checkpoint`` (:mod:`mirasol_ray.train.sharded`:
``.metadata`` and one ``__<rank>_0.distcp`` per rank), ``model.pt`` holds the config alone with ``"sharded": True``
and ``train_state.pt`` holds ``"optimizer": None``; ``complete.json`` lists every rank's files. Everything that
reads a checkpoint goes through :func:`load_model_state` (the whole model's weights, whichever kind) or, for a model
being trained, :func:`load_weights_into`, so evaluation, prediction, ``train.init_from`` and ``mirasol export``
read both kinds.
"""

from __future__ import annotations

import atexit
import io
import json
import math
import os
import posixpath
import shutil
import tempfile
import time
import zipfile
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mirasol_ray import storage
from mirasol_ray.model.mirasol import Mirasol, build_model
from mirasol_ray.train import sharded
from mirasol_ray.train.metrics import flatten, show_value
from mirasol_ray.train.strict import init_plan, require_same_tensors, shapes_of

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
COMPLETE_FILE = "complete.json"
PREFIX = "checkpoint_"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the checkpoints it registered (and will delete past ``num_to_keep``)."""
SHARDED = "sharded"
"""``model.pt``'s flag of a sharded checkpoint (its weights are the folder's DCP shards)."""
TOKENIZER_FILES = {".json": "tokenizer.json", ".model": "tokenizer.model"}
"""A tokenizer's name inside a checkpoint, by the suffix of the file it came from."""


def tokenizer_payload(spec: str) -> dict[str, Any] | None:
    """``{"name", "data"}``: the bytes of the tokenizer file ``data.tokenizer`` names, to store in checkpoints;
    None for the built-in byte tokenizer."""
    if spec in ("", "byte"):
        return None
    suffix = os.path.splitext(spec)[1]
    return {"name": TOKENIZER_FILES[suffix], "data": storage.read_bytes(spec)}


LEASE_FILE = "lease.json"
"""The run folder's lease (:mod:`mirasol_ray.launch.lease` holds it): a worker marks a checkpoint complete only
while the lease's token is its run's (:func:`lease_token`), so a run that lost its folder stops writing."""


def read_lease(run_uri: str) -> dict[str, Any] | None:
    """The run folder's lease record, or None (no lease, or one cut short by a crash mid-write: nobody's)."""
    uri = storage.join(run_uri, LEASE_FILE)
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def lease_token(run_uri: str) -> str:
    """The token of the run folder's current lease holder ("" when none)."""
    lease = read_lease(run_uri)
    return str(lease.get("token", "")) if lease else ""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _full_options():
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimiser state dicts, keyed by parameter name, for plain, DDP and FSDP2
    models alike. A collective under FSDP2: every rank calls it, rank 0 writes."""

    m = unwrap(model)
    return (get_model_state_dict(m, options=_full_options()),
            get_optimizer_state_dict(m, optimizer, options=_full_options()))


def restore_state(model: torch.nn.Module, optimizer, model_sd: dict, optim_sd: dict,
                  source: str = "(model.pt)") -> None:
    """Load what :func:`gather_state` saved into a (possibly sharded) model and its optimiser. The model's tensors
    must be the checkpoint's (:func:`require_same_tensors`: ``source`` names the checkpoint in the error)."""

    m = unwrap(model)
    require_same_tensors(source, shapes_of(model_sd), shapes_of(get_model_state_dict(m)))
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
                     scheduler=None, *, step: int, epoch: int = 0, data_position: dict | None = None, stage: str = "",
                     metrics: dict | None = None, run_config: dict | None = None,
                     label_set: list[str] | None = None, tokenizer: dict[str, Any] | None = None,
                     sharded: bool = False, score: dict[str, str] | None = None) -> str:
    """Write a checkpoint into a local ``folder`` (Ray Train then uploads it). ``tokenizer``: see
    :func:`tokenizer_payload`. ``sharded``: the weights and optimiser state are in the folder's DCP shards
    (written by every rank, :func:`mirasol_ray.train.sharded.save`), not in ``model_sd``/``optim_sd``; the
    training state holds the scheduler and the data position. ``score``: ``{"metric", "mode"}`` of the run's
    checkpoint scoring (see :func:`best_checkpoint_dir`)."""
    os.makedirs(folder, exist_ok=True)
    state = {"config": unwrap(model).config.to_dict(), "model": {}, SHARDED: True} if sharded else {
        "config": unwrap(model).config.to_dict(), "model": model_sd}
    torch.save(state, os.path.join(folder, MODEL_FILE))
    if optim_sd is not None or sharded:
        torch.save({"optimizer": optim_sd, "scheduler": scheduler.state_dict() if scheduler else {},
                    "step": step, "epoch": epoch, "data_position": data_position or {}},
                   os.path.join(folder, STATE_FILE))
    if tokenizer is not None:
        with open(os.path.join(folder, tokenizer["name"]), "wb") as f:
            f.write(tokenizer["data"])
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump({"step": step, "epoch": epoch, "stage": stage, "metrics": metrics or {},
                   "run_config": run_config or {}, "label_set": label_set,
                   "tokenizer": tokenizer["name"] if tokenizer else None, "score": score or None}, f)
    return folder


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint_00000015_20260101-120000``: sorts by step, and unique, so a step checkpointed again after a
    resume never lands in (or is deleted as) the folder of an earlier attempt."""
    return f"{PREFIX}{step:08d}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid() % 10000:04d}"


def local_files(folder: str) -> dict[str, int]:
    """{relative path: bytes} of the files under a local checkpoint folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return out


def _stored_files(ckpt_uri: str) -> dict[str, int]:
    fs = storage.fsspec_fs(ckpt_uri)
    root = storage.strip_scheme(ckpt_uri).rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p.lstrip("/")[len(root.lstrip("/")) + 1:]: int(info.get("size") or 0) for p, info in found.items()}


def mark_complete(ckpt_uri: str, files: dict[str, int], step: int) -> bool:
    """Write ``complete.json`` into a stored checkpoint once every one of ``files`` is there at its size; False
    (nothing written) when one is missing or short."""
    stored = _stored_files(ckpt_uri)
    if any(stored.get(name) != size for name, size in files.items()):
        return False
    storage.write_text(storage.join(ckpt_uri, COMPLETE_FILE), json.dumps({"step": step, "files": files}))
    return True


def complete_step(ckpt_uri: str) -> int | None:
    """The step of a complete checkpoint folder, None if it is not complete (see the module docstring)."""
    try:
        marker = json.loads(storage.read_text(storage.join(ckpt_uri, COMPLETE_FILE)))
        files, step = dict(marker["files"]), int(marker["step"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    stored = _stored_files(ckpt_uri)
    if any(stored.get(name) != size for name, size in files.items()):
        return None
    return step


def checkpoint_dirs(run_uri: str) -> list[str]:
    """Names of the ``checkpoint_*`` folders of a run folder, newest name first."""
    return sorted((n for n in storage.listdir(run_uri, dirs_only=True) if n.startswith(PREFIX)),
                  reverse=True)


def latest_checkpoint_dir(run_uri: str) -> str | None:
    """The newest **complete** checkpoint folder of a run folder (highest step; the newest folder among equal
    steps), or None. Judged from the folder alone, not from Ray Train's record: a checkpoint a run wrote just
    before it was stopped is complete on disk though Ray Train never registered it."""
    best, best_step = None, -1
    for name in checkpoint_dirs(run_uri):
        uri = storage.join(run_uri, name)
        step = complete_step(uri)
        if step is not None and step > best_step:
            best, best_step = uri, step
    return best


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """The finite number a metrics dict holds at ``name`` (``val/qa`` names ``metrics["val"]["qa"]``), or None."""

    v = flatten(metrics).get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def better(a: float, b: float | None, mode: str) -> bool:
    """Whether ``a`` beats ``b`` (None: nothing yet) under ``mode`` (max | min)."""
    return b is None or (a > b if mode == "max" else a < b)


def scored_checkpoints(run_uri: str) -> tuple[dict[str, str] | None, list[dict[str, Any]]]:
    """The run's scoring (``{"metric", "mode"}`` from its newest complete checkpoint's meta.json, None when
    unscored) and its complete checkpoints, newest first: ``{"uri", "step", "value", "metrics"}`` each, ``value``
    the checkpoint's score (None when it was not evaluated at its step)."""
    found = []
    for name in checkpoint_dirs(run_uri):
        uri = storage.join(run_uri, name)
        step = complete_step(uri)
        if step is None:
            continue
        try:
            meta = json.loads(storage.read_text(storage.join(uri, META_FILE)))
        except (OSError, ValueError):
            continue
        found.append({"uri": uri, "step": step, "metrics": meta.get("metrics") or {}, "score": meta.get("score")})
    found.sort(key=lambda c: c["step"], reverse=True)  # stable: among equal steps the newest folder first
    score = next((c["score"] for c in found if isinstance(c.get("score"), dict)), None)
    for c in found:
        c["value"] = metric_value(c["metrics"], score["metric"]) if score else None
        c.pop("score")
    return score, found


def best_checkpoint_dir(run_uri: str) -> dict[str, Any] | None:
    """The run's best complete checkpoint by its score (the newest among equal values), as
    ``{"uri", "step", "value", "metric", "mode"}``; None when the run has no scored checkpoint."""
    score, found = scored_checkpoints(run_uri)
    best = None
    for c in found:
        if c["value"] is not None and (best is None or better(c["value"], best["value"], score["mode"])):
            best = c
    if best is None:
        return None
    return {"uri": best["uri"], "step": best["step"], "value": best["value"], **score}


CHOICES = ("best", "last")


def choose_checkpoint(run_uri: str, choice: str = "best") -> dict[str, Any] | None:
    """The checkpoint folder a run folder stands for: ``best`` (:func:`best_checkpoint_dir`; the newest when
    nothing is scored) or ``last`` (:func:`latest_checkpoint_dir`). ``{"uri", "step", "choice": what was taken,
    "metric", "mode", "value"}`` (the score of the taken checkpoint, None when unscored), or None when the folder
    holds no complete checkpoint. ``choice`` ``best`` is reported as ``last`` when the newest was taken for want of
    a score."""
    if choice not in CHOICES:
        raise ValueError(f"checkpoint choice must be {' or '.join(CHOICES)}, got {choice!r}")
    score, found = scored_checkpoints(run_uri)
    if not found:
        return None
    info = {"metric": score["metric"] if score else None, "mode": score["mode"] if score else None}
    best = best_checkpoint_dir(run_uri) if choice == "best" else None
    if best is not None:
        return {**best, "choice": "best"}
    newest = found[0]
    return {"uri": newest["uri"], "step": newest["step"], "value": newest["value"], "choice": "last", **info}


def describe_choice(chosen: dict[str, Any]) -> str:
    """``best checkpoint by val/qa (81.25%, max) at step 40: URI`` for the console."""
    what = f"{chosen['choice']} checkpoint"
    if chosen.get("metric") and chosen.get("value") is not None:
        what += f" by {chosen['metric']} ({show_value(chosen['metric'], chosen['value'])}, {chosen['mode']})"
    return f"{what} at step {chosen['step']}: {chosen['uri']}"


def _ray_registered(run_uri: str) -> set[str] | None:
    """Checkpoint folder names Ray Train's snapshot refers to; None when it cannot be read (then nothing may go)."""
    uri = storage.join(run_uri, RAY_SNAPSHOT)
    try:
        if not storage.exists(uri):
            return set()
        snapshot = json.loads(storage.read_text(uri))
    except (OSError, ValueError):
        return None
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "checkpoint_dir_name" and isinstance(v, str):
                    names.add(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(snapshot)
    return names


def prune_checkpoints(run_uri: str, keep: int) -> list[str]:
    """Delete the checkpoint folders Ray Train's retention can never reach: ones it never registered (written just
    before a run was stopped, or left half-uploaded), except the newest ``keep`` complete ones and the best one
    (:func:`best_checkpoint_dir`). Folders Ray Train registered stay for its own ``num_to_keep`` (it refuses to
    restore a run whose snapshot names a missing one). Only the run's lease holder may call this. Returns the
    deleted URIs."""
    registered = _ray_registered(run_uri)
    if registered is None:
        return []
    _, complete = scored_checkpoints(run_uri)
    best = best_checkpoint_dir(run_uri)
    kept = {c["uri"].rstrip("/").rsplit("/", 1)[-1] for c in complete[:keep]} | registered
    if best is not None:
        kept.add(best["uri"].rstrip("/").rsplit("/", 1)[-1])
    fs = storage.fsspec_fs(run_uri)
    deleted = []
    for name in checkpoint_dirs(run_uri):
        if name not in kept:
            uri = storage.join(run_uri, name)
            fs.rm(storage.strip_scheme(uri), recursive=True)
            deleted.append(uri)
    return deleted


def check_model_file(uri: str) -> None:
    """Raise naming ``uri`` when it is not a loadable torch checkpoint file: empty, truncated, or not torch's zip
    format. Reads only the zip's directory at the end of the file (a few KiB, also on S3), so a driver can check
    a checkpoint before it starts workers that would load it."""

    fs = storage.fsspec_fs(uri)
    path = storage.strip_scheme(uri)
    if not fs.exists(path):
        storage.check_bucket(uri)
        raise FileNotFoundError(f"checkpoint not found: {uri}")
    if fs.isdir(path):
        raise IsADirectoryError(f"checkpoint {uri} is a folder, not a model file")
    size = fs.size(path)
    if not size:
        raise ValueError(f"checkpoint file {uri} is empty (0 bytes)")
    with fs.open(path, "rb") as f:
        try:
            with zipfile.ZipFile(f) as z:
                end = max((i.header_offset + i.compress_size for i in z.infolist()), default=0)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ValueError(f"checkpoint file {uri} is truncated or not a torch checkpoint ({e})") from None
    if end > size:
        raise ValueError(f"checkpoint file {uri} is truncated ({size} bytes, its index needs {end})")


def load_torch(uri: str) -> Any:
    """``torch.load(weights_only=True)`` of a local file (memory-mapped: loading it again, or reading only its
    small entries, costs little) or of an object in storage; a file that is empty, cut short or not a checkpoint
    is a ValueError naming it."""
    local = not storage.is_remote(uri)
    if local:
        path = storage.strip_scheme(uri)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"not found: {uri}")
        empty = os.path.getsize(path) == 0
    else:
        data = storage.read_bytes(uri)
        empty = not data
    if empty:
        raise ValueError(f"checkpoint file {uri} is empty (0 bytes)")
    try:
        if local:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"checkpoint file {uri} cannot be loaded (truncated or not a torch checkpoint): "
                         f"{first[:200]}") from None


def resolve_checkpoint(uri: str, choice: str = "best") -> str:
    """The ``model.pt`` URI behind a file, checkpoint folder or run folder (its ``choice`` checkpoint:
    :func:`choose_checkpoint`); FileNotFoundError names the URI."""
    return resolve_choice(uri, choice)[0]


def resolve_choice(uri: str, choice: str = "best") -> tuple[str, dict[str, Any] | None]:
    """:func:`resolve_checkpoint`, and for a run folder which checkpoint it took (:func:`choose_checkpoint`'s
    dict; None for a file or a checkpoint folder, which name themselves)."""
    if choice not in CHOICES:
        raise ValueError(f"checkpoint choice must be {' or '.join(CHOICES)}, got {choice!r}")
    if uri.endswith(".pt"):
        if not storage.exists(uri):
            storage.check_bucket(uri)
            raise FileNotFoundError(f"checkpoint not found: {uri}")
        return uri, None
    direct = storage.join(uri, MODEL_FILE)
    if storage.exists(direct):
        return direct, None
    chosen = choose_checkpoint(uri, choice)
    if chosen is None:
        storage.check_bucket(uri)
        partial = checkpoint_dirs(uri)
        if partial:
            raise FileNotFoundError(f"no complete checkpoint at {uri} ({len(partial)} incomplete folder(s), "
                                    f"e.g. {partial[0]}: no {COMPLETE_FILE}, or files missing)")
        raise FileNotFoundError(f"no checkpoint at {uri}")
    return storage.join(chosen["uri"], MODEL_FILE), chosen


def is_sharded_state(state: dict[str, Any]) -> bool:
    """Whether a loaded ``model.pt`` is a sharded checkpoint's (config only; weights in the DCP shards)."""
    return bool(state.get(SHARDED))


def load_model_state(model_uri: str) -> dict[str, Any]:
    """``{"config", "model", ...}`` of a resolved ``model.pt`` with the whole model's weights, also for a sharded
    checkpoint (read from its shards in this process: the model's, not the optimiser's)."""
    state = load_torch(model_uri)
    if is_sharded_state(state):
        state = {**state, "model": sharded.model_weights(_folder(model_uri))}
        state.pop(SHARDED)
    return state


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """``model.pt``'s content for a whole model: {"config": plain-python config, "model": state_dict}, loadable with
    ``torch.load(weights_only=True)``."""
    model = unwrap(model)
    return {"config": model.config.to_dict(), "model": model.state_dict()}


def load_model(state: dict[str, Any]) -> Mirasol:
    """Rebuild a model from :func:`model_state`'s output (or :func:`load_model_state`'s) alone."""
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    return model


def load_model_from(uri: str) -> Mirasol:
    """Rebuild a model from a checkpoint alone (file, checkpoint folder or run folder; sharded or not)."""
    return load_model(load_model_state(resolve_checkpoint(uri)))


def load_weights_into(model: torch.nn.Module, uri: str, strict: bool = True) -> dict[str, list[str]]:
    """Initialise ``model`` from a checkpoint's weights (``train.init_from``: finetune from pretrain) and return
    ``{"missing", "unexpected"}``: the model's tensors left as initialised, the checkpoint's not loaded. The
    classification head may be absent or sized for another label set; any other difference is an error naming it
    when ``strict`` (``model.init_strict``), see :func:`init_plan`. From a sharded checkpoint every rank reads only
    what it holds (a collective under a process group)."""
    model_uri = resolve_checkpoint(uri)
    state = load_torch(model_uri)
    if is_sharded_state(state):
        return sharded.load_weights_into(model, _folder(model_uri), strict=strict)
    state = state["model"]
    plan = init_plan(model_uri, shapes_of(state), shapes_of(unwrap(model).state_dict()), strict)
    result = unwrap(model).load_state_dict({k: state[k] for k in plan["load"]}, strict=False)
    assert sorted(result.missing_keys) == plan["missing"], "init_plan and load_state_dict disagree"
    return {"missing": plan["missing"], "unexpected": plan["unexpected"]}



def _folder(uri: str) -> str:
    return posixpath.dirname(uri) if storage.is_remote(uri) else os.path.dirname(uri)


def read_meta(model_uri: str) -> dict[str, Any]:
    """meta.json beside a resolved ``model.pt``; an exported file's own ``meta``; {} if neither."""
    uri = storage.join(_folder(model_uri), META_FILE)
    if storage.exists(uri):
        return json.loads(storage.read_text(uri))
    if model_uri.endswith(".pt"):
        return load_torch(model_uri).get("meta") or {}
    return {}


def tokenizer_spec(model_uri: str, meta: dict[str, Any]) -> str:
    """A ``data.tokenizer`` value for the tokenizer a checkpoint carries: the file in its folder, or (an exported
    file) its bytes written to a temporary file that lives as long as this process; "byte" when it has none."""
    name = meta.get("tokenizer")
    if not name:
        return "byte"
    beside = storage.join(_folder(model_uri), name)
    if storage.exists(beside):
        return beside
    embedded = load_torch(model_uri).get("tokenizer")
    if not embedded:
        raise FileNotFoundError(f"checkpoint {model_uri} names tokenizer {name} but does not hold it")
    return _temporary_file(embedded["name"], embedded["data"])


def _temporary_file(name: str, data: bytes) -> str:
    d = tempfile.mkdtemp(prefix="mirasol-tokenizer-")
    atexit.register(shutil.rmtree, d, True)
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def export(checkpoint: str, out: str) -> dict[str, Any]:
    """One self-contained file (weights, model config, run config, label set, tokenizer bytes) from a checkpoint
    (file, checkpoint folder or run folder; local or ``s3://``), written to ``out`` (local or ``s3://``)."""
    model_uri = resolve_checkpoint(checkpoint)
    state = load_model_state(model_uri)
    meta = read_meta(model_uri)
    tok = tokenizer_spec(model_uri, meta)
    state = {"config": state["config"], "model": state["model"], "meta": meta,
             "tokenizer": None if tok == "byte" else {"name": meta["tokenizer"],
                                                      "data": storage.read_bytes(tok)}}
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(out, buf.getvalue())
    return {"checkpoint": model_uri, "out": out, "step": meta.get("step"), "bytes": buf.tell(),
            "parameters": sum(v.numel() for v in state["model"].values())}


def require_meta(model_uri: str) -> dict[str, Any]:
    """:func:`read_meta`, but a checkpoint without a readable meta.json (its run config, label set) is an error
    naming it: without them a model would run with a default config and answer nonsense."""
    folder = _folder(model_uri)
    uri = storage.join(folder, META_FILE)
    try:
        meta = read_meta(model_uri)
    except ValueError as e:
        raise ValueError(f"{uri} is not valid JSON: {e}") from None
    if not meta:
        raise FileNotFoundError(f"checkpoint {folder} has no {META_FILE} (not a mirasol checkpoint, or an "
                                "incomplete one)")
    if not isinstance(meta, dict) or not isinstance(meta.get("run_config"), dict):
        raise ValueError(f"{uri} holds no run_config (not a mirasol checkpoint's meta.json)")
    return meta
