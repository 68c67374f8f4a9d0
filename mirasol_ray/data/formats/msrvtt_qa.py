"""MSRVTT-QA (Xu et al. 2017): ``{train,val,test}_qa.json``, each a JSON array of
``{"question", "answer", "category_id", "video_id", "id"}``.

Videos are ``video<video_id>.mp4`` (found anywhere under ``--videos``: MSR-VTT copies hold them in
``TrainValVideo/``, ``TestVideo/`` or flat). The ~10 questions of a video become **one** sample with all of them
in ``qas``, so a clip is stored once, not once per question.

``category_id`` is the MSR-VTT *video* category (0-19: music, people, gaming, ...), not the question type: it is
kept in each question's metadata as it is, whatever its value. The question type (``type``, scored per type by
``mirasol eval``) is one of the MSRVTT-QA paper's five, read from the question's first word (``what``, ``who``,
``how``, ``when``, ``where``), as public preprocessing code does (antoyang/just-ask,
``preproc/preproc_msrvttqa.py``, ``get_type``). That code also files every question holding the word "color"
under a sixth type; the paper has no such type, so here those questions keep the type of their first word. A
question whose first word is none of the five (just-ask raises on it) is kept, with the type ``other``.
"""

from __future__ import annotations

from typing import Any

from mirasol_ray.data.formats.qa import qa_meta
from mirasol_ray.data.formats.record import Converted, Record
from mirasol_ray.data.formats.source import Source, load_json, short, split_files

QTYPES = ("what", "who", "how", "when", "where")
"""The question types of the MSRVTT-QA paper, from a question's first word."""
OTHER = "other"
SPLITS = ("train", "val", "test")


def question_type(question: str) -> str:
    """``"what is shown?"`` -> ``what``: the first word when it is one of :data:`QTYPES`, else ``other``."""
    words = question.strip().lower().split()
    return words[0] if words and words[0] in QTYPES else OTHER


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
                question = str(item["question"]).strip()
                qa = {"question": question, "answer": str(item["answer"]).strip(), "type": question_type(question)}
            except (KeyError, TypeError, ValueError):
                records.append(Record(f"{short(path)} item {i}", skip="malformed", split=split))
                continue
            for field in ("category_id", "id"):
                if field in item:
                    qa[field] = item[field]
            by_video.setdefault(vid, []).append(qa)
        for vid, qas in by_video.items():
            name = f"video{vid}"
            found = src.videos.find(name)
            meta = qa_meta(qas, "msrvtt-qa", video_id=vid)
            records.append(Record(f"{name}.mp4", found or "", meta, "" if found else "missing_video", split=split,
                                  key=name))
    return Converted(records, info={"qtypes": list(QTYPES)})
