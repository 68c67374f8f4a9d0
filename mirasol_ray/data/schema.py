"""The data <-> model contract: column names, shapes and dtypes of one decoded row.

Every row the pipeline emits (and every batch a Train worker receives, with a leading batch dim B) has exactly
these columns, with shapes fixed by the :class:`~mirasol_ray.config.DataConfig`:

=================  =========  =====================  ===========================================================
column             dtype      shape                  meaning
=================  =========  =====================  ===========================================================
``video``          uint8      [S, F, H, W, 3]        S snippets x F frames, RGB; stays uint8 until on device
``audio``          float32    [S, M, T]              log-mel per snippet, same time window as its frames
``audio_present``  bool       []                     False: no audio track (``audio`` is zeros)
``snippet_mask``   bool       [S]                    False: padded snippet (clip shorter than S windows)
``task``           int64      []                     TASKS index: caption, qa, mcqa, cls
``prompt_ids``     int32      [Lp]                   question tokens, left-padded (empty for caption/cls)
``prompt_mask``    bool       [Lp]
``target_ids``     int32      [Lt]                   BOS answer/caption/label EOS, right-padded
``target_mask``    bool       [Lt]
``option_ids``     int32      [K, Lt]                mcqa options; qa: its accepted answers if several
``option_mask``    bool       [K, Lt]                all False for absent options
``answer_idx``     int64      []                     correct option, -1 if not mcqa
``label``          int64      []                     class index in the manifest's label set, -1 if none
``qtype``          int64      []                     QTYPES index of the question (for per-type metrics)
``key``            str        []                     sample key (+ ``#n`` when one clip gives several rows)
=================  =========  =====================  ===========================================================
"""

from __future__ import annotations

from typing import Any

import numpy as np

TASKS = ("caption", "qa", "mcqa", "cls")
QTYPES = ("caption", "label", "other", "video", "audio", "temporal", "av_aligned", "mc",
          # MSRVTT-QA's question words (category_id 0-4)
          "what", "who", "how", "when", "where",
          # ActivityNet-QA's types 0-8 (8, "other", is above)
          "motion", "spatial_relation", "temporal_relation", "yes_no", "color", "object", "location", "number",
          # NExT-QA: causal why/how, temporal next/previous/current, descriptive count/location/other/binary
          "CW", "CH", "TN", "TP", "TC", "DC", "DL", "DO", "DB")
"""Question types a row can carry (per-type metrics). A type not listed here is scored as ``other``. New names
go at the end: the index is what rows carry."""

TENSOR_COLUMNS = ("video", "audio", "audio_present", "snippet_mask", "task", "prompt_ids", "prompt_mask",
                  "target_ids", "target_mask", "option_ids", "option_mask", "answer_idx", "label", "qtype")
COLUMNS = TENSOR_COLUMNS + ("key",)


def qtype_index(name: str | None) -> int:
    return QTYPES.index(name) if name in QTYPES else QTYPES.index("other")


def row_spec(data_cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Column -> (shape, numpy dtype) for one row under this config."""
    d = data_cfg
    S, F, H, W = d.num_snippets, d.frames_per_snippet, d.height, d.width
    return {
        "video": ((S, F, H, W, 3), np.uint8),
        "audio": ((S, d.n_mels, d.mel_frames), np.float32),
        "audio_present": ((), np.bool_),
        "snippet_mask": ((S,), np.bool_),
        "task": ((), np.int64),
        "prompt_ids": ((d.max_prompt_len,), np.int32),
        "prompt_mask": ((d.max_prompt_len,), np.bool_),
        "target_ids": ((d.max_target_len,), np.int32),
        "target_mask": ((d.max_target_len,), np.bool_),
        "option_ids": ((d.max_options, d.max_target_len), np.int32),
        "option_mask": ((d.max_options, d.max_target_len), np.bool_),
        "answer_idx": ((), np.int64),
        "label": ((), np.int64),
        "qtype": ((), np.int64),
    }


def check_row(row: dict[str, Any], data_cfg) -> None:
    """Raise ValueError naming the column if a row breaks the contract."""
    for name, (shape, dtype) in row_spec(data_cfg).items():
        if name not in row:
            raise ValueError(f"row lacks column {name!r}")
        a = np.asarray(row[name])
        if a.shape != shape or a.dtype != dtype:
            raise ValueError(f"column {name!r}: expected {shape} {np.dtype(dtype)}, got {a.shape} {a.dtype}")
