"""ActivityNet-QA (Yu et al. 2019): ``{train,val,test}_q.json`` + ``{split}_a.json``, JSON arrays aligned by
``question_id``.

Questions: ``{"video_name": "<YouTube id>", "question", "question_id": "v_<id>_<n>"}``; answers:
``{"answer", "type": 0-8, "question_id"}``. ``type`` is the question type of the dataset's README and its
``evaluation/eval.py``: 0 motion, 1 spatial relation, 2 temporal relation, and the "free" questions by answer
type: 3 yes/no, 4 color, 5 object, 6 location, 7 number, 8 other. A question and its answer pair by
``question_id``, as ``eval.py`` pairs predictions with answers (in the released files the two arrays are also in
the same order, with no duplicate or unpaired id). A ``type`` outside 0-8 or missing (none in the released files) is
not dropped: the question keeps it as its own type name (``unknown`` when missing), scored in no ActivityNet type.

``video_name`` is the YouTube id *as is* (the README: ``https://www.youtube.com/watch?v=<video_name>``), and an
id may itself begin with ``v_`` (``train_q.json``: ``"video_name": "v_UmAH95xls"``, ``question_id``
``"v_v_UmAH95xls_4"``): the prefix is never stripped from it. Videos are the untrimmed ActivityNet v1.3 files named
``v_<video_name>.mp4`` (also ``.mkv``/``.webm``; some copies drop the ``v_``, so ``<video_name>.mp4`` is looked up
next): the questions are about the whole video, so nothing is cut.

Checked against MILVLG/activitynet-qa: ``dataset/README.md``, ``evaluation/eval.py`` and the released
``dataset/{train,val,test}_{q,a}.json``. ``--annotations`` is a ``*_q.json`` file (its ``*_a.json`` beside it) or the
folder holding both.
"""

from __future__ import annotations

from typing import Any

from mirasol_ray.data.formats.qa import qa_meta
from mirasol_ray.data.formats.record import Converted, Record
from mirasol_ray.data.formats.source import Source, beside, exists, load_json, short, split_files

TYPES = ("motion", "spatial_relation", "temporal_relation", "yes_no", "color", "object", "location", "number",
         "other")
SPLITS = ("train", "val", "test")


def question_type(value: Any) -> dict[str, Any]:
    """``{"type", "type_id"}`` of an answer's ``type``: 0-8 named by :data:`TYPES`; any other value is kept as its
    own type name (with ``type_id`` when it is a whole number); a missing or empty one is ``unknown`` (not ``other``,
    which is type 8, one of the "free" types)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return {"type": TYPES[value] if 0 <= value < len(TYPES) else str(value), "type_id": value}
    text = "" if value is None else str(value).strip()
    return {"type": text or "unknown"}


def convert(src: Source) -> Converted:
    records: list[Record] = []
    for split, qpath in split_files(src, "{split}_q.json", SPLITS):
        apath = beside(qpath, short(qpath)[: -len("_q.json")] + "_a.json")
        if not exists(src, apath):
            raise FileNotFoundError(f"answers file not found: {apath} (ActivityNet-QA keeps them beside {short(qpath)})")
        questions, answers = load_json(src, qpath), load_json(src, apath)
        if not isinstance(questions, list) or not isinstance(answers, list):
            raise ValueError(f"{qpath}, {apath}: expected JSON arrays")
        by_id: dict[str, dict[str, Any]] = {}
        for i, a in enumerate(answers):
            if isinstance(a, dict) and isinstance(a.get("question_id"), str):
                by_id[a["question_id"]] = a
            else:
                records.append(Record(f"{short(apath)} item {i}", skip="malformed", split=split))
        by_video: dict[str, list[dict[str, Any]]] = {}
        for i, q in enumerate(questions):
            try:
                qid, video = str(q["question_id"]), str(q["video_name"])
                a = by_id.get(qid)
                if a is None:
                    records.append(Record(f"{short(qpath)} item {i} ({qid})", skip="no_answer", split=split))
                    continue
                qa = {"question": str(q["question"]).strip(), "answer": str(a["answer"]).strip(),
                      **question_type(a.get("type")), "question_id": qid}
            except (KeyError, TypeError, ValueError):
                records.append(Record(f"{short(qpath)} item {i}", skip="malformed", split=split))
                continue
            by_video.setdefault(video, []).append(qa)
        for ytid, qas in by_video.items():
            name = f"v_{ytid}"
            found = src.videos.find(name, ytid)
            records.append(Record(f"{name}.mp4", found or "", qa_meta(qas, "activitynet-qa", video_id=ytid),
                                  "" if found else "missing_video", split=split, key=name))
    return Converted(records, info={"qtypes": list(TYPES)})
