"""The data <-> model contract: column names, shapes and dtypes of one decoded row.

A row is one **clip** with up to K of its texts (a caption, questions, multiple choice, its class label), so a
clip is decoded once and the model encodes it once, however many texts it has. Every row the pipeline emits
(and every batch a Train worker receives, with a leading batch dim B) has exactly these columns, with shapes
fixed by the :class:`~mirasol_ray.config.DataConfig` (K = ``max_texts``, O = ``max_options``):

=================  =========  =====================  ===========================================================
column             dtype      shape                  meaning
=================  =========  =====================  ===========================================================
``video``          uint8      [S, F, H, W, 3]        S snippets x F frames, RGB; stays uint8 until on device
``audio``          float32    [S, M, T]              log-mel per snippet, same time window as its frames
``audio_present``  bool       []                     False: no audio track (``audio`` is zeros)
``snippet_mask``   bool       [S]                    False: padded snippet (clip shorter than S windows)
``label``          int64      []                     class index in the manifest's label set, -1 if none
``num_texts``      int64      []                     texts of the clip in all (a clip with more than K gives
                                                     several rows, K texts each)
``text_mask``      bool       [K]                    False: padding (the clip has fewer texts)
``text_index``     int64      [K]                    which of the clip's texts an entry is (-1: padding)
``task``           int64      [K]                    TASKS index: caption, qa, mcqa, cls
``prompt_ids``     int32      [K, Lp]                question tokens, left-padded (task prompts for caption/cls)
``prompt_mask``    bool       [K, Lp]
``target_ids``     int32      [K, Lt]                BOS answer/caption/label EOS, right-padded
``target_mask``    bool       [K, Lt]
``option_ids``     int32      [K, O, Lt]             mcqa options; qa: its accepted answers if several
``option_mask``    bool       [K, O, Lt]             all False for absent options
``answer_idx``     int64      [K]                    correct option, -1 if not mcqa
``qtype``          int64      [K]                    the question's type code (:func:`qtype_index`; per-type metrics)
``text_span``      bool       [K, S]                 the snippets the text is about: all True, except for a
                                                     timestamped caption (``segments``), which the decoder reads
                                                     from its snippets alone
``key``            str        []                     the clip's sample key
=================  =========  =====================  ===========================================================

The model also takes a batch of one text per clip without the K axis (``prompt_ids`` [B, Lp], ...; no
``text_mask``): each row is then a clip with that one text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

TASKS = ("caption", "qa", "mcqa", "cls")
QTYPES = ("caption", "label", "other", "video", "audio", "temporal", "av_aligned", "mc",
          # MSRVTT-QA's question words (a question's first word)
          "what", "who", "how", "when", "where",
          # ActivityNet-QA's types 0-8 (8, "other", is above)
          "motion", "spatial_relation", "temporal_relation", "yes_no", "color", "object", "location", "number",
          # NExT-QA: causal why/how, temporal next/previous/current, descriptive count/location/other/binary
          "CW", "CH", "TN", "TP", "TC", "DC", "DL", "DO", "DB",
          # a timestamped caption (a sample's ``segments``)
          "segment")
"""Question types with a fixed code (their index here: rows carry it, so new names go at the end). Any other type
name a dataset uses is scored under its own name too: see :func:`qtype_index`."""

CLIP_COLUMNS = ("video", "audio", "audio_present", "snippet_mask", "label", "num_texts")
TEXT_COLUMNS = ("text_mask", "text_index", "task", "prompt_ids", "prompt_mask", "target_ids", "target_mask",
                "option_ids", "option_mask", "answer_idx", "qtype", "text_span")
"""Columns with the K axis: one entry per text of the clip."""
TENSOR_COLUMNS = CLIP_COLUMNS + TEXT_COLUMNS
COLUMNS = TENSOR_COLUMNS + ("key",)


def qtype_index(name: str | None) -> int:
    """The code a row carries for question type ``name``: its index in :data:`QTYPES`, else (a user's own name)
    ``len(QTYPES)`` plus a stable 56-bit hash of the name, so the decode needs no table and old shards keep their
    codes; :func:`qtype_table` maps codes back to names. No name is ``other``."""
    if not name:
        return QTYPES.index("other")
    if name in QTYPES:
        return QTYPES.index(name)
    return len(QTYPES) + int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "big")


def manifest_qtypes(manifest: dict[str, Any] | None) -> list[str]:
    """The question type names a shard manifest lists (``qtype_counts`` from ``shards build``, its own or its
    splits', and a converter's ``qtypes``), sorted."""
    manifest = manifest or {}
    names = set(manifest.get("qtype_counts") or {}) | set(manifest.get("qtypes") or [])
    for split in (manifest.get("splits") or {}).values():
        if isinstance(split, dict):
            names |= set(split.get("qtype_counts") or {})
    return sorted(str(n) for n in names)


def qtype_table(names: Iterable[str] | None = None) -> dict[int, str]:
    """Code -> name for :data:`QTYPES` and ``names`` (a dataset's own type names, :func:`manifest_qtypes`)."""
    table = {i: n for i, n in enumerate(QTYPES)}
    for n in names or ():
        table.setdefault(qtype_index(n), n)
    return table


def qtype_name(code: int, table: dict[int, str] | None = None) -> str:
    """The type name of a row's code; ``other`` for a code the table does not know."""
    return (table or _QTYPE_TABLE).get(int(code), "other")


_QTYPE_TABLE = qtype_table()


def row_spec(data_cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Column -> (shape, numpy dtype) for one row under this config."""
    d = data_cfg
    S, F, H, W, K = d.num_snippets, d.frames_per_snippet, d.height, d.width, d.max_texts
    return {
        "video": ((S, F, H, W, 3), np.uint8),
        "audio": ((S, d.n_mels, d.mel_frames), np.float32),
        "audio_present": ((), np.bool_),
        "snippet_mask": ((S,), np.bool_),
        "label": ((), np.int64),
        "num_texts": ((), np.int64),
        **{name: ((K, *shape), dtype) for name, (shape, dtype) in text_spec(d).items()},
    }


def text_spec(data_cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Column -> (shape, numpy dtype) of one text entry (without the K axis)."""
    d = data_cfg
    return {
        "text_mask": ((), np.bool_),
        "text_index": ((), np.int64),
        "task": ((), np.int64),
        "prompt_ids": ((d.max_prompt_len,), np.int32),
        "prompt_mask": ((d.max_prompt_len,), np.bool_),
        "target_ids": ((d.max_target_len,), np.int32),
        "target_mask": ((d.max_target_len,), np.bool_),
        "option_ids": ((d.max_options, d.max_target_len), np.int32),
        "option_mask": ((d.max_options, d.max_target_len), np.bool_),
        "answer_idx": ((), np.int64),
        "qtype": ((), np.int64),
        "text_span": ((d.num_snippets,), np.bool_),
    }


def check_row(row: dict[str, Any], data_cfg) -> None:
    """Raise ValueError naming the column if a row breaks the contract."""
    for name, (shape, dtype) in row_spec(data_cfg).items():
        if name not in row:
            raise ValueError(f"row lacks column {name!r}")
        a = np.asarray(row[name])
        if a.shape != shape or a.dtype != dtype:
            raise ValueError(f"column {name!r}: expected {shape} {np.dtype(dtype)}, got {a.shape} {a.dtype}")
