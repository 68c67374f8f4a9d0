"""One WebDataset sample -> a fixed-shape clip row with its texts (see :mod:`mirasol_ray.data.schema`). Pure:
no Ray.

The same function serves the Ray pipeline, the bare-loop benchmark and the torch DataLoader baseline, so all
three decode identically. The text decides first which texts a sample gives under ``data.task``; only a sample
with at least one is decoded, once, into one row holding up to ``data.max_texts`` of them (a clip with more gives
several rows, sharing the decoded arrays).

Sample metadata (``json`` member) fields used: ``caption``; ``question`` + ``answer`` or ``qas`` (a list of
questions, one row each: ``{"question", "answer", "type"}`` open-ended, optionally ``"answers"``: every accepted
answer; ``{"question", "options", "answer_idx", "type"}`` multiple choice); ``options`` + ``answer_idx``
(+ ``mc_question``, else ``question``) when there is no ``qas``; ``label``; ``start``/``end`` (seconds of the
video to use). The ``task`` field is informative only: which rows come out is decided by ``data.task`` and by
which fields are present. An open-ended row carries its accepted answers (the target first) in ``option_ids``,
for scoring against several references; the model never reads them there.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from mirasol_ray.config import DataConfig
from mirasol_ray.data.decode import (
    DECODE_REASONS,
    DecodeError,
    Video,
    call_with_timeout,
    cut_message,
    decode_audio,
)
from mirasol_ray.data.schema import TASKS, qtype_index, text_spec
from mirasol_ray.data.snippets import EvalView, eval_views, log_mel_snippets, plan_snippets
from mirasol_ray.data.text import Tokenizer, get_tokenizer, prompt_arrays, target_arrays

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")
AUDIO_EXTENSIONS = ("wav", "flac")

SKIP_REASONS = {
    **DECODE_REASONS,
    "no_json": "the sample has no json member (metadata is required: it holds the text)",
    "bad_json": "the json member does not parse to an object",
    "no_video_member": "the sample has no mp4/webm/mkv/avi/mov member",
    "no_text_for_task": "the sample has no text for data.task (not an error: e.g. no caption when pretraining)",
    "error": "any other exception (a bug or an unexpected decoder failure): the message says which",
}
"""Every reason :func:`decode_sample_safe` can return."""

_TASKS_FOR = {
    "caption": ("caption",),
    "qa": ("qa",),
    "mcqa": ("mcqa",),
    "cls": ("cls",),
    "finetune": ("qa", "mcqa", "cls"),
    "all": ("caption", "qa", "mcqa", "cls"),
}


def _member(sample: dict[str, Any], extensions: tuple[str, ...]) -> bytes | None:
    """The first member present as bytes: from Ray's read_webdataset a missing one is None or NaN (FIELD_NOTES)."""
    for ext in extensions:
        value = sample.get(ext)
        if isinstance(value, bytes):
            return value
    return None


def _metadata(sample: dict[str, Any]) -> dict[str, Any]:
    value = sample.get("json")
    if isinstance(value, dict):
        return value
    if not isinstance(value, (bytes, str)):
        raise DecodeError("no_json")
    try:
        meta = json.loads(value)
    except ValueError as e:
        raise DecodeError("bad_json", e) from None
    if not isinstance(meta, dict):
        raise DecodeError("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


TEXT_KINDS = {
    "caption_prompt": "caption prompts (data.caption_prompt)",
    "caption_target": "caption targets",
    "qa_prompt": "questions",
    "qa_target": "answers",
    "qa_option": "accepted answers",
    "mcqa_prompt": "multiple-choice questions",
    "mcqa_target": "multiple-choice answers",
    "mcqa_option": "multiple-choice options",
    "cls_prompt": "class prompts (data.cls_prompt)",
    "cls_target": "class labels",
}
"""The kinds of text a row holds (``{task}_{prompt|target|option}``), as the truncation counts name them, and
what a person calls them."""


def _text_row(tok: Tokenizer, cfg: DataConfig, task: str, prompt: str, target: str, qtype: str,
              options: list[str] | None = None, answer_idx: int = -1) -> dict[str, Any]:
    """One text entry: its K-axis columns, and ``lengths``: (kind, tokens it needs) of each of its texts (a
    target or option needs its BOS and EOS too), for :func:`count_lengths`."""
    K, Lt = cfg.max_options, cfg.max_target_len
    p, t = (tok.encode(prompt) if prompt else []), tok.encode(target)
    prompt_ids, prompt_mask = prompt_arrays(p, cfg.max_prompt_len, tok)
    target_ids, target_mask = target_arrays(t, Lt, tok)
    lengths = [(f"{task}_prompt", len(p))] if prompt else []
    lengths.append((f"{task}_target", len(t) + 2))
    option_ids = np.full((K, Lt), tok.pad_id, np.int32)  # [K, Lt]
    option_mask = np.zeros((K, Lt), bool)
    for k, option in enumerate((options or [])[:K]):
        o = tok.encode(option)
        option_ids[k], option_mask[k] = target_arrays(o, Lt, tok)
        lengths.append((f"{task}_option", len(o) + 2))
    return {
        "text_mask": np.bool_(True),
        "task": np.int64(TASKS.index(task)),
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "target_ids": target_ids, "target_mask": target_mask,
        "option_ids": option_ids, "option_mask": option_mask,
        "answer_idx": np.int64(answer_idx),
        "qtype": np.int64(qtype_index(qtype)),
        "lengths": lengths,
    }


def count_lengths(lengths, cfg: DataConfig) -> dict[str, dict[str, int]]:
    """(kind, tokens needed) pairs -> per kind (:data:`TEXT_KINDS`): ``texts`` seen, how many were ``cut`` (they
    need more than ``limit``: ``data.max_prompt_len`` for prompts, ``data.max_target_len`` for targets and
    options), and the ``longest`` (tokens the longest needs). A cut text is kept, shortened: a question keeps its
    end, an answer or caption its start."""
    out: dict[str, dict[str, int]] = {}
    for kind, n in lengths:
        limit = cfg.max_prompt_len if kind.endswith("_prompt") else cfg.max_target_len
        c = out.setdefault(kind, {"texts": 0, "cut": 0, "longest": 0, "limit": limit})
        c["texts"] += 1
        c["cut"] += int(n > limit)
        c["longest"] = max(c["longest"], int(n))
    return out


def truncation_warning(counts: dict[str, dict[str, int]], tokenizer: str = "") -> str:
    """One line saying which texts were cut to fit (from :func:`count_lengths`), and what to raise; "" when none
    was. ``tokenizer``: ``data.tokenizer`` (with the byte tokenizer, learning one is the better fix)."""
    parts, raise_ = [], []
    for kind in [k for k in TEXT_KINDS if k in counts] + sorted(set(counts) - set(TEXT_KINDS)):
        c = counts[kind]
        if not c.get("cut"):
            continue
        prompt = kind.endswith("_prompt")
        field = "data.max_prompt_len" if prompt else "data.max_target_len"
        raise_ += [field] if field not in raise_ else []
        parts.append(f"{c['cut']} of {c['texts']} {TEXT_KINDS.get(kind, kind)} longer than {field}={c['limit']} "
                     f"tokens{'' if prompt else ' with BOS/EOS'} (longest {c['longest']})")
    if not parts:
        return ""
    hint = (" (or learn a tokenizer from the text: mirasol shards build --tokenizer learn)"
            if tokenizer in ("", "byte") else "")
    return f"warning: {'; '.join(parts)} were cut; raise {' and '.join(raise_)}{hint}"


def sample_texts(meta: dict[str, Any]) -> list[str]:
    """Every text rows can take from a sample's metadata, whatever ``data.task``: the caption, the open-ended
    questions and their answers (every accepted one), the multiple-choice questions and options, the class label.
    What a tokenizer for the data is learnt from (:func:`~mirasol_ray.data.shards.write_tokenizer`)."""
    qas = [q for q in meta["qas"] if isinstance(q, dict)] if isinstance(meta.get("qas"), list) else None
    out = [meta.get("caption"), meta.get("label"), *(s.get("caption") for s in _segments(meta))]
    for qa in [q for q in qas if "options" not in q] if qas is not None else [meta]:
        answers = qa.get("answers") if isinstance(qa.get("answers"), list) else []
        out += [qa.get("question"), qa.get("answer"), *answers]
    for qa in [q for q in qas if "options" in q] if qas is not None else []:
        options = qa.get("options") if isinstance(qa.get("options"), list) else []
        out += [qa.get("mc_question") or qa.get("question"), *options]
    if not (qas and any("options" in q for q in qas)) and isinstance(meta.get("options"), list):
        out += [meta.get("mc_question") or meta.get("question"), *meta["options"]]
    return [t for t in map(_text, out) if t]


def _segments(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The sample's timestamped captions (``segments``: ``{"start", "end", "caption"}`` in seconds of the video)
    that are well formed: a non-empty caption and 0 <= start < end; others are ignored."""
    out = []
    for seg in meta.get("segments") if isinstance(meta.get("segments"), list) else []:
        if not isinstance(seg, dict):
            continue
        start, end = _seconds(seg.get("start")), _seconds(seg.get("end"))
        if _text(seg.get("caption")) and start is not None and end is not None and 0 <= start < end:
            out.append({"start": start, "end": end, "caption": _text(seg["caption"])})
    return out


def text_rows(meta: dict[str, Any], cfg: DataConfig, label_set: list[str] | None = None) -> list[dict[str, Any]]:
    """The text entries ``meta`` gives under ``cfg.task`` (no video/audio yet), in a fixed order: caption, then
    questions, then multiple choice, then class label; each carries the clip's ``label`` too."""
    tok = get_tokenizer(cfg.tokenizer)
    label_text = _text(meta.get("label"))
    label = label_set.index(label_text) if label_set and label_text in label_set else -1
    qas = [q for q in meta["qas"] if isinstance(q, dict)] if isinstance(meta.get("qas"), list) else None
    rows: list[dict[str, Any]] = []
    for task in _TASKS_FOR[cfg.task]:
        if task == "caption":
            if _text(meta.get("caption")):
                rows.append(_text_row(tok, cfg, "caption", cfg.caption_prompt, _text(meta["caption"]), "caption"))
            if cfg.segment_captions:
                for seg in _segments(meta):
                    row = _text_row(tok, cfg, "caption", cfg.caption_prompt, seg["caption"], "segment")
                    row["seconds"] = (seg["start"], seg["end"])
                    rows.append(row)
        elif task == "qa":
            for qa in [q for q in qas if "options" not in q] if qas is not None else [meta]:
                if _text(qa.get("question")) and _text(qa.get("answer")):
                    answer = _text(qa["answer"])
                    refs = [a for a in (_text(x) for x in qa.get("answers") or [] if isinstance(x, str))
                            if a and a != answer]
                    rows.append(_text_row(tok, cfg, "qa", _text(qa["question"]), answer,
                                          _text(qa.get("type")) or "other", [answer, *refs] if refs else None))
        elif task == "mcqa":
            mc = [q for q in qas if "options" in q] if qas is not None else []
            for qa in mc or [meta]:
                options = [_text(o) for o in qa.get("options") or [] if isinstance(o, str)]
                idx = qa.get("answer_idx")
                if options and isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < min(
                        len(options), cfg.max_options):
                    question = _text(qa.get("mc_question")) or _text(qa.get("question"))
                    qtype = _text(qa.get("type")) if mc else "mc"
                    rows.append(_text_row(tok, cfg, "mcqa", question, options[idx], qtype or "mc", options, idx))
        elif task == "cls" and label_text:
            rows.append(_text_row(tok, cfg, "cls", cfg.cls_prompt, label_text, "label"))
    for row in rows:
        row["label"] = np.int64(label)
    return rows


def stack_texts(texts: list[dict[str, Any]], cfg: DataConfig, first: int = 0) -> dict[str, np.ndarray]:
    """Up to K text entries -> the K-axis columns of a row, padded (``text_mask`` False, ``text_index`` -1);
    ``first`` is the index of ``texts[0]`` among the clip's texts."""
    K = cfg.max_texts
    tok = get_tokenizer(cfg.tokenizer)
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in text_spec(cfg).items():
        fill = tok.pad_id if name.endswith("_ids") else (-1 if name in ("answer_idx", "text_index") else 0)
        out[name] = np.full((K, *shape), fill, dtype)
    out["text_span"][:] = True
    for k, text in enumerate(texts[:K]):
        for name, value in text.items():
            if name in out:
                out[name][k] = value
        out["text_index"][k] = first + k
    return out


def snippet_span(windows: np.ndarray, start: float, end: float) -> np.ndarray:
    """bool [S]: the snippets a text about seconds [start, end) of the video is about: those whose window lies at
    least half inside it, or, when none does, the one that overlaps it most; none when no window overlaps it."""
    overlap = np.clip(np.minimum(windows[:, 1], end) - np.maximum(windows[:, 0], start), 0, None)
    length = np.maximum(windows[:, 1] - windows[:, 0], 1e-9)
    span = overlap >= 0.5 * length
    if not span.any() and overlap.max(initial=0) > 0:
        span[int(overlap.argmax())] = True
    return span


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


VIEW_MARK = "@view"
"""A row of one of several evaluation views of a clip has key ``<clip key>@view<i>`` (``@view-`` for the centred
view scored only for the one-view figure): :func:`~mirasol_ray.train.views.merge_view_records` groups on it."""


def decode_av(video_bytes: bytes, audio_bytes: bytes | None, cfg: DataConfig, *, train: bool,
              rng: np.random.Generator, segment: tuple[float, float | None] = (0.0, None)) -> dict[str, Any]:
    """The time-aligned columns of a clip: video, audio, audio_present, snippet_mask; and ``windows`` (not a
    column): the snippets' (start, end) seconds on the video's clock, [S, 2].

    ``audio_bytes`` (a wav/flac member) replaces the container's audio track; its t = 0 is the video's t = 0.
    """
    columns = decode_av_views(video_bytes, audio_bytes, cfg, train=train, rng=rng, segment=segment)[0]
    columns.pop("merged")
    return columns


def decode_av_views(video_bytes: bytes, audio_bytes: bytes | None, cfg: DataConfig, *, train: bool,
                    rng: np.random.Generator, segment: tuple[float, float | None] = (0.0, None),
                    windows: bool = False, views: int = 1) -> list[dict[str, Any]]:
    """:func:`decode_av` for each evaluation view of the clip (:func:`~mirasol_ray.data.snippets.eval_views`;
    one, the usual plan, unless ``windows`` or ``views`` > 1), each with ``merged`` (not a column). The video is
    opened and the audio read once for all of them."""
    S, F = cfg.num_snippets, cfg.frames_per_snippet
    with Video(video_bytes, cfg.height, cfg.width, num_threads=cfg.decode_threads) as video:
        if train or (not windows and views <= 1):
            looks = [EvalView(segment)]
        else:
            looks = eval_views(video.duration, cfg.clip_seconds, segment, windows=windows, views=views)
        plans = [plan_snippets(video.duration, S, F, train=train, rng=rng, clip_seconds=cfg.clip_seconds,
                               segment=v.segment, offset=v.offset) for v in looks]
        frames = [video.read(plan.frame_times) for plan in plans]  # [S, F, H, W, 3] each
        audio_origin = 0.0 if audio_bytes is not None else video.start_time
    first, last = min(p.start for p in plans), max(p.end for p in plans)
    pcm = decode_audio(audio_bytes if audio_bytes is not None else video_bytes, cfg.sample_rate,
                       start=audio_origin + first, end=audio_origin + last)  # [n] or None
    out = []
    for look, plan, video_frames in zip(looks, plans, frames):
        video_frames[~plan.mask] = 0
        if pcm is None:
            mel = np.zeros((S, cfg.n_mels, cfg.mel_frames), np.float32)
        else:
            mel = log_mel_snippets(pcm, plan.windows - first, cfg.sample_rate, cfg.n_fft, cfg.n_mels,
                                   cfg.mel_frames)  # [S, M, T]
            mel[~plan.mask] = 0.0
        out.append({"video": video_frames, "audio": mel, "audio_present": np.bool_(pcm is not None),
                    "snippet_mask": plan.mask.copy(), "windows": plan.windows, "merged": look.merged})
    return out


def decode_sample(sample: dict[str, Any], cfg: DataConfig, *, train: bool, rng: np.random.Generator,
                  label_set: list[str] | None = None) -> list[dict[str, Any]]:
    """One WebDataset sample -> its clip row per the schema (several when it has more than ``cfg.max_texts``
    texts); [] when it has no text for ``cfg.task``. Each row also holds ``text_lengths``: (kind, tokens needed) of
    its texts, which :func:`count_lengths` turns into truncation counts.

    The rows of one sample share (do not copy) their video/audio arrays. Callers running many decodes per process
    should set ``torch.set_num_threads(1)``: the log-mel is tiny and torch's thread pool only adds contention.

    Raises :class:`DecodeError` (reason in :data:`SKIP_REASONS`). Decoding is bounded by
    ``cfg.decode_timeout_s`` (see :func:`~mirasol_ray.data.decode.call_with_timeout`).
    """
    meta = _metadata(sample)
    texts = text_rows(meta, cfg, label_set)
    if not texts:
        return []
    video_bytes = _member(sample, VIDEO_EXTENSIONS)
    if video_bytes is None:
        raise DecodeError("no_video_member")
    audio_bytes = _member(sample, AUDIO_EXTENSIONS)
    segment = (_seconds(meta.get("start")) or 0.0, _seconds(meta.get("end")))
    # The decode gets its own generator: an abandoned (timed-out) thread must not share the caller's.
    local_rng = np.random.default_rng(rng.integers(2**63))
    looks = call_with_timeout(
        lambda: decode_av_views(video_bytes, audio_bytes, cfg, train=train, rng=local_rng, segment=segment,
                                windows=cfg.eval_windows and not train, views=1 if train else cfg.eval_views),
        cfg.decode_timeout_s)
    key = str(sample.get("__key__", ""))
    rows = []
    for i, av_columns in enumerate(looks):  # one look unless evaluating in windows or views
        view_key = key if len(looks) == 1 else f"{key}{VIEW_MARK}{i if av_columns['merged'] else '-'}"
        rows += _clip_rows(texts if len(looks) == 1 else [dict(t) for t in texts], av_columns, view_key, cfg)
    return rows


def _clip_rows(texts: list[dict[str, Any]], av_columns: dict[str, Any], key: str, cfg: DataConfig
               ) -> list[dict[str, Any]]:
    """A decoded look at a clip with its texts -> its rows (several when it has more than ``cfg.max_texts``)."""
    windows = av_columns.pop("windows")
    av_columns.pop("merged")
    grounded = []
    for text in texts:  # a timestamped caption reads only its snippets; one outside the decoded span is dropped
        if "seconds" in text:
            text["text_span"] = snippet_span(windows, *text.pop("seconds")) & av_columns["snippet_mask"]
            if not text["text_span"].any():
                continue
        grounded.append(text)
    texts = grounded
    if not texts:
        return []
    K = cfg.max_texts
    clip = {**av_columns, "label": texts[0]["label"], "num_texts": np.int64(len(texts)), "key": key,
            "snippet_seconds": np.asarray(windows, np.float32)}  # [S, 2]: no tensor column; `data inspect` shows it
    return [{**clip, **stack_texts(texts[i:i + K], cfg, first=i),
             "text_lengths": [n for t in texts[i:i + K] for n in t["lengths"]]} for i in range(0, len(texts), K)]


def decode_sample_safe(sample: dict[str, Any], cfg: DataConfig, *, train: bool, rng: np.random.Generator,
                       label_set: list[str] | None = None) -> tuple[list[dict[str, Any]], str | None, str]:
    """:func:`decode_sample` that never raises: (rows, None, "") or ([], skip reason from :data:`SKIP_REASONS`,
    what went wrong in one cut line).

    Catches every ``Exception``: decoders raise many types (RuntimeError, ValueError, av errors, decord's own),
    and one bad clip must not stop an epoch. Unexpected ones are reported as ``error``, with their type and message.
    """
    try:
        rows = decode_sample(sample, cfg, train=train, rng=rng, label_set=label_set)
    except DecodeError as e:
        return [], e.reason, e.detail
    except Exception as e:
        return [], "error", cut_message(f"{type(e).__name__}: {e}")
    return rows, (None if rows else "no_text_for_task"), ""
