"""Pretrained weight files: finding and reading the checkpoints ``model.video_init``, ``audio_init`` and
``text_init`` name, for the conversions of :mod:`mirasol_ray.model.pretrained`.

``video_init`` / ``audio_init`` name a timm ViT (a ``.safetensors`` or ``.pth`` state dict with timm's names, or a
folder with timm's ``config.json``); ``text_init`` a transformers folder (``config.json`` + ``model.safetensors`` or
its shards, and the LM's ``tokenizer.json``). Paths or ``s3://`` URIs; nothing is ever downloaded.

Two steps, one code path:

* :func:`resolve_pretrained` and :func:`rehearse_load` (the driver, in :func:`mirasol_ray.train.prepare.prepare`):
  each checkpoint's architecture replaces the matching ``model`` options, the LM's tokenizer becomes the run's,
  and the load is rehearsed on the meta device from the files' headers alone, so that a missing key or a shape
  that does not fit fails at once, naming the tensor. The resolved config is what checkpoints store: a model
  rebuilds from it without the pretrained files.
* :func:`load_pretrained` (each worker, on a fresh start): the tensors are read and handed to
  :func:`mirasol_ray.model.pretrained.load_part`.

Loaders are safe only: ``safetensors``, or ``torch.load(weights_only=True)``; a pickle that needs more is refused.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from mirasol_ray import storage
from mirasol_ray.config import (
    VOCAB_FIELDS,
    Config,
    DataConfig,
    ModelConfig,
    _build,
    is_byte_tokenizer,
)
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.model.pretrained import (
    PARTS,
    PartReport,
    PretrainedError,
    lm_arch,
    load_part,
    vit_arch,
    vit_fields,
)

# ----------------------------------------------------------------------------------------------------------------
# finding and reading checkpoint files

_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# a Hugging Face hub id ("org/name", "timm/vit_base_patch16_224.augreg_in21k", "hf-hub:org/name")
_HUB_NAME = re.compile(r"^(hf[-_]hub:)?[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass
class Checkpoint:
    """Where one pretrained part's files are."""

    setting: str
    uri: str
    weights: list[str]
    """Weight files (URIs): one, or the shards of an index."""
    config: dict[str, Any]
    """Its config.json ({} for a bare state dict)."""
    folder: str = ""


def _is_dir(uri: str) -> bool:
    return storage.fsspec_fs(uri).isdir(storage.strip_scheme(uri))


def locate(setting: str, uri: str) -> Checkpoint:
    """The weight files and config of ``uri`` (a file or a folder); a hub name or a missing path is refused."""
    if not storage.exists(uri):
        if not storage.is_remote(uri) and _HUB_NAME.match(uri) and not uri.startswith((".", "/")):
            name = re.sub(r"^hf[-_]hub:", "", uri)
            raise PretrainedError(
                f"model.{setting} {uri!r} is not a file or folder. mirasol-ray never downloads weights: download "
                f"it first (e.g. `hf download {name} --local-dir /weights/{name.split('/')[-1]}`) and pass that path")
        raise PretrainedError(f"model.{setting}: no such file or folder: {uri}")
    if not _is_dir(uri):
        if not uri.endswith((".safetensors", *_TORCH_SUFFIXES)):
            raise PretrainedError(f"model.{setting} {uri}: expected a .safetensors or .pth/.pt/.bin state dict, or a "
                                  "folder holding one")
        return Checkpoint(setting, uri, [uri], {})
    cfg_uri = storage.join(uri, "config.json")
    config = json.loads(storage.read_text(cfg_uri)) if storage.exists(cfg_uri) else {}
    for name in _WEIGHT_FILES:
        f = storage.join(uri, name)
        if storage.exists(f):
            if name.endswith(".index.json"):
                weight_map = json.loads(storage.read_text(f))["weight_map"]
                return Checkpoint(setting, uri, [storage.join(uri, s) for s in sorted(set(weight_map.values()))],
                                  config, uri)
            return Checkpoint(setting, uri, [f], config, uri)
    raise PretrainedError(f"model.{setting} {uri}: no weights in the folder (looked for {', '.join(_WEIGHT_FILES)})")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_header(uri: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} from a safetensors file's header, without reading its data."""
    fs = storage.fsspec_fs(uri)
    with fs.open(storage.strip_scheme(uri), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (tuple(v["shape"]), _ST_DTYPES.get(v["dtype"], torch.float32))
            for k, v in header.items() if k != "__metadata__"}


def _torch_state(setting: str, uri: str) -> dict[str, torch.Tensor]:
    """A pickled state dict through ``torch.load(weights_only=True)``: tensors and plain containers only."""

    try:
        if storage.is_remote(uri):
            obj = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu",
                             weights_only=True)
        else:
            path = storage.strip_scheme(uri)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # a file in torch's legacy (pre-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PretrainedError(
            f"model.{setting} {uri}: refused: this pickle needs torch.load(weights_only=False), which can run "
            f"arbitrary code ({str(e).splitlines()[-1][:120].strip()}). Save its state dict as safetensors with "
            "code you trust, and pass that") from None
    for key in ("state_dict", "model", "module"):  # training checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not torch.is_tensor(obj.get(key)):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise PretrainedError(f"model.{setting} {uri}: not a state dict (name -> tensor)")
    return obj


class TensorSource:
    """A checkpoint's tensors by name (a :class:`mirasol_ray.model.pretrained.Tensors`), read on first use. With ``meta``, only their shapes and dtypes (from the
    safetensors headers: no data is read) as meta tensors, enough to rehearse a load."""

    def __init__(self, ckpt: Checkpoint, meta: bool = False):
        self.ckpt, self.meta = ckpt, meta
        self._where: dict[str, str] = {}  # raw name -> file
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}
        for f in ckpt.weights:
            if f.endswith(".safetensors"):
                info = _safetensors_header(f)
            else:
                self._loaded[f] = _torch_state(ckpt.setting, f)
                info = {k: (tuple(v.shape), v.dtype) for k, v in self._loaded[f].items()}
            self._info.update(info)
            self._where.update({k: f for k in info})
        self.names = {self._normal(k): k for k in self._info}  # our view of a name -> the file's
        self.prefix = ""

    @staticmethod
    def _normal(name: str) -> str:
        return name.removeprefix("module.")

    def keys(self) -> list[str]:
        return list(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[self.names[name]][0]

    def get(self, name: str) -> torch.Tensor:
        raw = self.names[name]
        shape, dtype = self._info[raw]
        if self.meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        f = self._where[raw]
        if f not in self._loaded:
            self._loaded[f] = (load_safetensors_bytes(storage.read_bytes(f)) if storage.is_remote(f)
                               else load_file(storage.strip_scheme(f)))
        return self._loaded[f][raw]

    def strip_prefix(self, *prefixes: str) -> None:
        """Drop the first of ``prefixes`` that the names carry (transformers' ``model.`` / ``transformer.``)."""
        for prefix in prefixes:
            if any(k.startswith(prefix) for k in self.names):
                self.names = {k.removeprefix(prefix): v for k, v in self.names.items()}
                self.prefix = prefix
                return

    def file_name(self, name: str) -> str:
        """The name as the file spells it (also for a name it lacks)."""
        return self.names.get(name) or self.prefix + name


# ----------------------------------------------------------------------------------------------------------------
# loading into a model (each worker) and resolving a config (the driver's prepare step)


def load_pretrained(model: torch.nn.Module, cfg: ModelConfig, meta: bool = False) -> list[PartReport]:
    """Load every ``*_init`` checkpoint of ``cfg`` into ``model`` (built from the resolved ``cfg``). With ``meta``
    nothing is read but the files' headers and nothing is copied: a rehearsal that raises what the load would."""
    reports = []
    for setting in PARTS:
        uri = getattr(cfg, setting)
        if uri:
            ckpt = locate(setting, uri)
            reports.append(load_part(model, cfg, setting, uri, ckpt.config, TensorSource(ckpt, meta=meta), meta))
    return reports


def _tokenizer_in(folder: str) -> str:
    """The tokenizer file beside an LM's weights ("" when none)."""
    for name in ("tokenizer.json", "tokenizer.model"):
        uri = storage.join(folder, name)
        if storage.exists(uri):
            return uri
    return ""


def resolve_pretrained(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw config (YAML + overrides, as :func:`mirasol_ray.config.read_config` gives it) whose ``model`` options
    follow its ``*_init`` checkpoints, and whose ``data.tokenizer`` is the LM's unless one was set (the vocabulary
    fields that followed the old tokenizer are dropped: the new one's are read next). Works on the raw dict,
    before the config is built and validated, because a preset's sizes (patch size, heads) may only fit once the
    checkpoint's replace them."""
    model = dict(raw.get("model") or {})
    data = _build(DataConfig, raw.get("data") or {}, "data.")
    defaults = ModelConfig()
    out = {**raw, "model": model, "data": dict(raw.get("data") or {})}
    for setting, part in PARTS.items():
        uri = model.get(setting)
        if not uri:
            continue
        uri = str(uri)
        ckpt = locate(setting, uri)
        if part == "text_decoder":
            model.update(lm_arch(setting, uri, ckpt.config, data.max_prompt_len + data.max_target_len).fields)
            if is_byte_tokenizer(data.tokenizer):
                tok = _tokenizer_in(ckpt.folder) if ckpt.folder else ""
                if not tok:
                    raise PretrainedError(f"model.text_init {uri}: no tokenizer.json (or tokenizer.model) in the "
                                          "folder: set data.tokenizer to the LM's tokenizer")
                out["data"]["tokenizer"] = tok
                for key in VOCAB_FIELDS:
                    model.pop(key, None)
            continue
        kind = part.split("_")[0]
        heads = int(model.get(f"{kind}_heads", getattr(defaults, f"{kind}_heads")))
        arch = vit_arch(setting, uri, ckpt.config, TensorSource(ckpt, meta=True), heads)
        sides = (data.height, data.width) if kind == "video" else (data.n_mels, data.mel_frames)
        if any(side % arch.patch for side in sides):
            what = "data.height x data.width" if kind == "video" else "data.n_mels x data.mel_frames"
            raise PretrainedError(f"model.{setting}: its {arch.patch}-pixel patches do not divide {what} "
                                  f"{sides[0]}x{sides[1]}: use multiples of {arch.patch}")
        model.update({k: list(v) if isinstance(v, tuple) else v for k, v in vit_fields(kind, arch).items()})
    return out


def rehearse_load(cfg: Config) -> None:
    """The load of ``cfg``'s checkpoints on the meta device, from the files' headers: raises now what the workers'
    load would (a missing key, a shape that does not fit), naming the tensor."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    load_pretrained(model, cfg.model, meta=True)
