"""MSRVTT-QA (Xu et al. 2017): ``{train,val,test}_qa.json``, each a JSON array of
``{"question", "answer", "category_id", "video_id", "id"}``.

Videos are ``video<video_id>.mp4`` (found anywhere under ``--videos``: MSR-VTT copies hold them in
``TrainValVideo/``, ``TestVideo/`` or flat). The ~10 questions of a video become **one** sample with all of them
in ``qas``, so a clip is stored once, not once per question. ``category_id`` is the question word, the question
types of the MSRVTT-QA paper in its order: 0 what, 1 who, 2 how, 3 when, 4 where; each question keeps it as
``type`` (scored per type by ``mirasol eval``) and as ``category_id``.
"""

from __future__ import annotations

from typing import Any

from mirasol_ray.data.formats.qa import qa_meta
from mirasol_ray.data.formats.record import Converted, Record
from mirasol_ray.data.formats.source import Source, load_json, short, split_files

CATEGORIES = ("what", "who", "how", "when", "where")
SPLITS = ("train", "val", "test")


def convert(src: Source) -> Converted:
    """One record per video, in order of first appearance; malformed items are skipped records."""
    records: list[Record] = []
    for split, path in split_files(src, "{split}_qa.json", SPLITS):
        items = load_json(src, path)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON array of questions")
        by_video: dict[int, list[dict[str, Any]]] = {}
        for i, item in enumerate(items):
            try:
                vid = int(item["video_id"])
                cat = int(item["category_id"])
                qa = {"question": str(item["question"]).strip(), "answer": str(item["answer"]).strip(),
                      "type": CATEGORIES[cat], "category_id": cat}
            except (KeyError, TypeError, ValueError, IndexError):
                records.append(Record(f"{short(path)} item {i}", skip="malformed", split=split))
                continue
            if "id" in item:
                qa["id"] = item["id"]
            by_video.setdefault(vid, []).append(qa)
        for vid, qas in by_video.items():
            name = f"video{vid}"
            found = src.videos.find(name)
            meta = qa_meta(qas, "msrvtt-qa", video_id=vid)
            records.append(Record(f"{name}.mp4", found or "", meta, "" if found else "missing_video", split=split,
                                  key=name))
    return Converted(records, info={"qtypes": list(CATEGORIES)})
