"""ActivityNet-QA (Yu et al. 2019): ``{train,val,test}_q.json`` + ``{split}_a.json``, JSON arrays aligned by
``question_id``.

Questions: ``{"video_name": "<YouTube id>", "question", "question_id": "v_<id>_<n>"}``; answers:
``{"answer", "type": 0-8, "question_id"}``. ``type`` is the question type of the dataset's README and its
``evaluation/eval.py``: 0 motion, 1 spatial relation, 2 temporal relation, and the "free" questions by answer
type: 3 yes/no, 4 color, 5 object, 6 location, 7 number, 8 other. Videos are the untrimmed ActivityNet v1.3
files named ``v_<id>.mp4`` (also ``.mkv``/``.webm``; some copies drop the ``v_``): the questions are about the
whole video, so nothing is cut. ``--annotations`` is a ``*_q.json`` file (its ``*_a.json`` beside it) or the
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
                t = int(a["type"])
                qa = {"question": str(q["question"]).strip(), "answer": str(a["answer"]).strip(),
                      "type": TYPES[t], "type_id": t, "question_id": qid}
            except (KeyError, TypeError, ValueError, IndexError):
                records.append(Record(f"{short(qpath)} item {i}", skip="malformed", split=split))
                continue
            by_video.setdefault(video.removeprefix("v_"), []).append(qa)
        for ytid, qas in by_video.items():
            name = f"v_{ytid}"
            found = src.videos.find(name, ytid)
            records.append(Record(f"{name}.mp4", found or "", qa_meta(qas, "activitynet-qa", video_id=ytid),
                                  "" if found else "missing_video", split=split, key=name))
    return Converted(records, info={"qtypes": list(TYPES)})
