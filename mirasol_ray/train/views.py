"""Evaluation at length: a clip scored in several looks (windows over a long video, or K temporal views) and the
looks' answers merged into one (``mirasol eval/predict --windows | --views K``).

The looks are rows of their own, keyed ``<clip key>@view<i>`` (:data:`~mirasol_ray.data.rows.VIEW_MARK`; where
they lie: :func:`~mirasol_ray.data.snippets.eval_views`). Merging, per text of a clip:

- a ranked answer (multiple-choice options, class labels scored or from the head): the mean over the looks of
  each candidate's score (the option's or label's log-likelihood; the head's log-softmax), then its arg-max, as
  MMAction2's multi-view testing averages its clips' scores;
- a generated answer (open-ended QA, captions), when every look is at hand (:func:`predict_views`): each look
  generates its answer, every distinct answer is scored (log-likelihood) in every look, and the answer with the
  highest mean wins; from records alone (:func:`merge_view_records`, ``mirasol eval``, whose looks reach the driver
  as separate rows) the answer the most looks give, ties to the earliest look.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from mirasol_ray.data.text import Tokenizer, encode_target
from mirasol_ray.model.mirasol import texts_of
from mirasol_ray.train.metrics import exact_match
from mirasol_ray.train.step import move_batch, predict_batch

_VIEW_KEY = re.compile(r"^(?P<clip>.*)@view(?P<view>\d+|-)(?P<text>#\d+)?$")


def split_view_key(key: str) -> tuple[str, int | None]:
    """``clip@view3#1`` -> (``clip#1``, 3); the centred extra view -> (key, -1); a key without a view -> (key, None)."""
    m = _VIEW_KEY.match(key)
    if m is None:
        return key, None
    return m["clip"] + (m["text"] or ""), (-1 if m["view"] == "-" else int(m["view"]))


def _merge_ranked(recs: list[dict[str, Any]], label_set: list[str] | None) -> dict[str, Any]:
    scores = np.mean(np.array([r["scores"] for r in recs], dtype=np.float64), axis=0)  # [candidates]
    pick = int(scores.argmax())
    out = dict(recs[0])
    if recs[0]["task"] == "mcqa":
        right = int(recs[0]["answer_idx"])
        out["pred"] = recs[0]["choices"][pick]
    else:
        right = int(recs[0]["label"])
        out["pred"] = label_set[pick] if label_set and pick < len(label_set) else str(pick)
    out["correct"] = pick == right
    out["rank"] = int((scores > scores[right]).sum()) if 0 <= right < len(scores) else -1
    out["scores"] = scores.tolist()
    return out


def _merge_generated(recs: list[dict[str, Any]]) -> dict[str, Any]:
    votes: dict[str, int] = defaultdict(int)
    for r in recs:
        votes[r["pred"]] += 1
    best = max(votes.values())
    pred = next(r["pred"] for r in recs if votes[r["pred"]] == best)  # ties: the earliest look's
    out = dict(recs[0], pred=pred)
    out["correct"] = any(exact_match(pred, ref) for ref in recs[0]["refs"] or [recs[0]["target"]])
    return out


def merge_view_records(records: list[dict[str, Any]], label_set: list[str] | None = None
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Records of looks -> (one merged record per text, with ``views``: how many looks it merges; the one-view
    records: each text's centred look, the single-view evaluation's, where there is one (K views: the middle one
    for an odd K, the extra centred look for an even K; windows: none); a summary: looks per clip).

    Records without a view mark (a clip looked at once) pass through unchanged in both lists."""
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    order: list[str] = []
    plain: list[dict[str, Any]] = []
    for r in records:
        text_key, view = split_view_key(r["key"])
        if view is None:
            plain.append(r)
            continue
        if text_key not in groups:
            order.append(text_key)
        groups[text_key].append((view, dict(r, key=text_key)))
    merged, one_view = list(plain), list(plain)
    per_clip = {r["key"].split("#")[0]: 1 for r in plain}  # one look: the whole video fit in one window
    for text_key in order:
        looks = sorted(groups[text_key], key=lambda vr: vr[0])
        centre = [r for v, r in looks if v == -1]
        recs = [r for v, r in looks if v >= 0]
        ranked = all(r.get("scores") for r in recs)
        out = _merge_ranked(recs, label_set) if ranked else _merge_generated(recs)
        out["views"] = len(recs)
        merged.append(out)
        per_clip[text_key.split("#")[0]] = len(recs)
        if centre:
            one_view.append(centre[0])
        elif len(recs) % 2 == 1:
            one_view.append(recs[len(recs) // 2])
    counts = list(per_clip.values())
    summary = {"clips": len(per_clip), "looks_per_clip": per_clip,
               "min": min(counts, default=0), "max": max(counts, default=0)}
    return merged, one_view, summary


@torch.no_grad()
def predict_views(model: nn.Module, batch: dict[str, Any], tok: Tokenizer, device: torch.device,
                  label_set: list[str] | None = None, precision: str = "fp32") -> dict[str, Any]:
    """One text over the looks of one clip, all in ``batch`` (a row per look, the same text in each): the merged
    record (ranked answers: mean score; generated: every look's answer scored in every look, mean log-likelihood;
    see the module docstring), with ``views`` and, for a generated answer, ``candidates``: {answer: mean score}."""
    records = predict_batch(model, batch, tok, device, precision, label_set=label_set, with_scores=True)
    if all(r.get("scores") for r in records):
        out = _merge_ranked(records, label_set)
        out["views"] = len(records)
        return out
    core = getattr(model, "module", model)
    batch = move_batch(batch, device)
    t = texts_of(batch)
    candidates = list(dict.fromkeys(r["pred"] for r in records))  # each look's answer, first seen first
    length = int(t["target_ids"].shape[1])
    pairs = [encode_target(tok, c, length) for c in candidates]
    n = len(records)
    ids = torch.as_tensor(np.stack([p[0] for p in pairs]), device=device)[None].expand(n, -1, -1)
    mask = torch.as_tensor(np.stack([p[1] for p in pairs]), device=device)[None].expand(n, -1, -1)
    enc = core.encode(batch)
    scores = core.score_options_from(enc, t["prompt_ids"], t["prompt_mask"], ids, mask, t["clip"],
                                     t.get("text_span")).float().mean(0)  # [candidates]
    pick = int(scores.argmax())
    out = dict(records[0], pred=candidates[pick], views=n,
               candidates={c: float(s) for c, s in zip(candidates, scores)})
    out["correct"] = any(exact_match(out["pred"], ref) for ref in out["refs"] or [out["target"]])
    return out
