"""The driver's prepare step: what a config needs from files beyond its YAML, done once, before a run starts.

:func:`mirasol_ray.config.load_config` only parses and validates. Before a config trains, evaluates or builds a
model, the driver runs :func:`prepare` (or :func:`load_prepared`, from a preset name or YAML path), which

* resolves the pretrained checkpoints (``model.video_init``, ``audio_init``, ``text_init``): their architectures
  replace the matching ``model`` options, the LM's tokenizer becomes the run's (:mod:`mirasol_ray.train.weights`);
* reads ``data.tokenizer`` when it is a file: its vocabulary and special ids go into ``model.vocab_size``,
  ``pad_id``, ``bos_id``, ``eos_id`` (given ones must agree);
* rehearses the pretrained load on the meta device, from the files' headers, so that a missing or mis-shaped
  tensor fails now, naming it;
* checks that every ``train.freeze`` / ``train.lr_mult`` pattern matches a parameter of the model.

Each failure is a one-line error naming the setting. The result is a config that needs no file to build its
model: the workers get it as a plain dict (``Config.to_dict``) and rebuild it with
:func:`mirasol_ray.config.from_dict`, reading nothing; checkpoints store it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from mirasol_ray import storage
from mirasol_ray.config import (
    UNREAD,
    VOCAB_FIELDS,
    Config,
    ConfigError,
    from_dict,
    is_byte_tokenizer,
    read_config,
)
from mirasol_ray.data.index import find_manifest, manifest_tokenizer
from mirasol_ray.data.text import get_tokenizer
from mirasol_ray.train.step import check_patterns
from mirasol_ray.train.weights import rehearse_load, resolve_pretrained


def load_prepared(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """:func:`mirasol_ray.config.load_config`, then :func:`prepare`: the config a driver runs."""
    return prepare(read_config(name_or_path, overrides))


def prepare(cfg: Config | dict[str, Any]) -> Config:
    """The config ready to run: ``cfg`` (a :class:`Config`, or the raw mapping of a YAML with its overrides) with
    its pretrained architectures resolved, its tokenizer's vocabulary read and its patterns checked (see the module
    docstring). A prepared config passes through unchanged (the files are read again and must agree).

    From the raw mapping, a preset's sizes that only fit once a checkpoint's replace them (a ViT's patch size,
    say) are not an error: the mapping is validated after they are replaced."""
    raw = cfg.to_dict() if isinstance(cfg, Config) else cfg
    _configure_storage(raw)
    pretrained = any((raw.get("model") or {}).get(k) for k in ("video_init", "audio_init", "text_init"))
    if pretrained:
        raw = resolve_pretrained(raw)
    out = from_dict(raw)
    check_sets(out)
    read_vocabulary(out)
    if pretrained:
        rehearse_load(out)
    if out.train.freeze or out.train.lr_mult:
        check_patterns(out)
    return out


def _configure_storage(raw: dict[str, Any]) -> None:
    """This process's storage settings from the config's ``storage`` section, before any file it names is read
    (``s3://`` checkpoints and tokenizers)."""
    section = raw.get("storage") if isinstance(raw.get("storage"), dict) else {}
    storage.configure(**{k: str(v or "") for k, v in section.items() if k in ("endpoint_url", "region")})


def read_vocabulary(cfg: Config) -> None:
    """Fill ``cfg.model``'s vocabulary fields from the tokenizer file ``data.tokenizer`` names (nothing to do for the
    byte tokenizer: the config knows its vocabulary). A field already set must be the tokenizer's."""
    if is_byte_tokenizer(cfg.data.tokenizer):
        return

    tok = get_tokenizer(cfg.data.tokenizer)
    for key in VOCAB_FIELDS:
        value, given = getattr(tok, key), getattr(cfg.model, key)
        if given not in (UNREAD, value):
            raise ConfigError(f"model.{key}={given!r} cannot be set: it follows data.tokenizer ({value!r} here); set "
                              "data.tokenizer instead")
        setattr(cfg.model, key, value)
    dataclasses.replace(cfg.model, num_classes=max(cfg.model.num_classes, 1)).validate()  # the ids in the vocabulary


def check_sets(cfg: Config) -> None:
    """Shard sets given as lists (``data.train``'s mixture, ``data.val``'s sets) train and score one model: their
    manifests must agree on the label set (where they give one) and on the tokenizer (by its file's bytes, where they
    name one). A ValueError in one line names the first two sets that differ. Question types may differ. Single paths
    read nothing here; a set without a manifest has nothing to disagree with. The label set the sets agree on is
    the run's (:func:`mixture_label_set`). A set whose manifest cannot be read here (``mirasol config show`` with
    no credentials) is passed over: a run checks every set's access before this (``launch.train.check_inputs``)."""
    if not (cfg.data.mixture or isinstance(cfg.data.val, list)):
        return
    sets = [s.path for s in cfg.data.train_sets + cfg.data.val_sets]
    labels: tuple[str, list[str]] | None = None
    tokens: tuple[str, str, str] | None = None
    for path in dict.fromkeys(sets):
        try:
            manifest = find_manifest(path) or {}
            tok = manifest_tokenizer(path) if manifest.get("tokenizer") else None
            digest = hashlib.sha256(storage.read_bytes(tok)).hexdigest() if tok else ""
        except Exception:  # noqa: BLE001 - not readable from here (no credentials yet, say): the run's access checks name it
            continue
        label_set = manifest.get("label_set") or None
        if label_set is not None:
            if labels is not None and list(labels[1]) != list(label_set):
                raise ValueError(f"the shard sets {labels[0]} and {path} have different label sets ({len(labels[1])} "
                                 f"and {len(label_set)} labels): a run's sets must share one")
            labels = labels or (path, label_set)
        if tok is not None:
            if tokens is not None and tokens[2] != digest:
                raise ValueError(f"the shard sets {tokens[0]} and {path} were built with different tokenizers "
                                 f"({tokens[1]}, {tok}): a run's sets must share one")
            tokens = tokens or (path, tok, digest)


def mixture_label_set(paths: list[str]) -> list[str] | None:
    """The label set of a run's training sets: the first that one of their manifests gives (:func:`check_sets`
    has made sure they agree), None when none does."""
    for path in paths:
        label_set = (find_manifest(path) or {}).get("label_set")
        if label_set:
            return label_set
    return None
