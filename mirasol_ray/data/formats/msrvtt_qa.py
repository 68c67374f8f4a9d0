"""MSRVTT-QA: ``{train,val,test}_qa.json``, a JSON array of ``{question, answer, category_id, video_id, id}``.

Videos are ``video<video_id>.mp4`` in the videos folder. The ~10 questions of a video become **one** sample with
all of them in ``qas`` (the first also as ``question``/``answer``), so a clip is stored once, not once per
question. ``category_id`` (the question word: what, who, how, when, where) is kept per question.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from mirasol_ray import storage
from mirasol_ray.data.formats.record import Record


def iter_records(annotations: str, videos: str) -> Iterator[Record]:
    """One record per video, in order of first appearance; malformed items are skipped records."""
    items = json.loads(storage.read_text(annotations))
    if not isinstance(items, list):
        raise ValueError(f"{annotations}: expected a JSON array of questions")
    by_video: dict[int, list[dict[str, Any]]] = {}
    for i, item in enumerate(items):
        try:
            vid = int(item["video_id"])
            qa = {"question": str(item["question"]), "answer": str(item["answer"]), "type": "other"}
        except (KeyError, TypeError, ValueError):
            yield Record(f"item {i}", skip="bad_record")
            continue
        if "category_id" in item:
            qa["category_id"] = item["category_id"]
        by_video.setdefault(vid, []).append(qa)
    for vid, qas in by_video.items():
        name = f"video{vid}.mp4"
        meta = {"task": "qa", "question": qas[0]["question"], "answer": qas[0]["answer"], "qas": qas,
                "source": "msrvtt-qa", "video_id": vid}
        yield Record(name, storage.join(videos, name), meta)
