"""NExT-QA (Xiao et al. 2021), multiple choice (``nextqa-mc``) and open-ended (``nextqa-oe``).

Files as distributed (the NExT-QA and NExT-OE repositories, ``dataset/nextqa/``): ``{train,val,test}.csv`` with
a header, ``video,frame_count,width,height,question,answer,qid,type`` and, for multiple choice, ``a0..a4`` with
``answer`` the index of the right one (open-ended: ``answer`` is the text); ``map_vid_vidorID.json`` beside them
maps ``video`` to the VidOR path of the file (``"4010069381": "1025/4010069381"``), and the videos are
``NExTVideo/<that>.mp4`` (found under ``--videos`` whatever lies above ``<group>/<id>``). NExT-OE's
``add_reference_answer_{split}.json`` (``{video: {qid: answer}}``, test only), when beside the CSV, adds a second
accepted answer, as its ``eval_oe.py`` uses it.

``type`` is kept per question: CW/CH (causal why/how), TN/TP/TC (temporal next/previous/current), DC/DL/DO/DB
(descriptive count/location/other/binary); ``mirasol eval`` groups them into Acc@C/T/D (WUPS for open-ended)
as the official scripts do (TP merged into TN). The released multiple-choice files hold CW CH TN TP TC DC DL DO,
the open-ended ones DB too. A question of any other type is not dropped: it keeps its type as written (scored
under its own name and in no C/T/D group). The questions of one video make one sample; a question is the pair
(``video``, ``qid``), ``qid`` numbering the questions within a video, as the official loaders key them
(``video + '_' + qid``).

Checked against doc-doc/NExT-QA (``dataloader/sample_loader.py``: ``answer`` read as ``int``, options ``a0..a4``;
``eval_mc.py``; the released ``dataset/nextqa/{val,test}.csv`` and ``map_vid_vidorID.json``) and doc-doc/NExT-OE
(``eval_oe.py``: ``add_reference_answer_test.json`` read as ``add_ref[video][qid]``, DC/DB scored by exact match;
``dataset/nextqa/*.csv``). NExT-OE does not ship ``map_vid_vidorID.json``: copy NExT-QA's beside its CSVs.
"""

from __future__ import annotations

from typing import Any

from mirasol_ray.data.formats.qa import qa_meta
from mirasol_ray.data.formats.record import Converted, Record
from mirasol_ray.data.formats.source import Source, beside, csv_rows, exists, load_json, short, split_files

SPLITS = ("train", "val", "test")
TYPES = ("CW", "CH", "TN", "TP", "TC", "DC", "DL", "DO", "DB")
"""The types of the official files; a question of another type is kept with its own."""
BASE_COLUMNS = ("video", "frame_count", "width", "height", "question", "answer", "qid", "type")
OPTIONS = ("a0", "a1", "a2", "a3", "a4")


def convert_mc(src: Source) -> Converted:
    return _convert(src, mc=True)


def convert_oe(src: Source) -> Converted:
    return _convert(src, mc=False)


def _convert(src: Source, mc: bool) -> Converted:
    fmt = "nextqa-mc" if mc else "nextqa-oe"
    records: list[Record] = []
    for split, path in split_files(src, "{split}.csv", SPLITS):
        map_path = beside(path, "map_vid_vidorID.json")
        if not exists(src, map_path):
            raise FileNotFoundError(f"{map_path} not found (NExT-QA keeps it beside {short(path)}; NExT-OE does not "
                                    "ship it: copy NExT-QA's dataset/nextqa/map_vid_vidorID.json there)")
        vid_map = load_json(src, map_path)
        extra_path = beside(path, f"add_reference_answer_{split}.json")
        extra = load_json(src, extra_path) if not mc and split and exists(src, extra_path) else {}
        by_video: dict[str, list[dict[str, Any]]] = {}
        for lineno, row in csv_rows(src, path, BASE_COLUMNS + (OPTIONS if mc else ()), header=True):
            where = f"{short(path)}:{lineno}"
            if isinstance(row, str):
                records.append(Record(f"{where} ({row})", skip="malformed", split=split))
                continue
            qa: dict[str, Any] = {"question": row["question"], "type": row["type"], "qid": row["qid"]}
            if mc:
                try:
                    idx = int(row["answer"])
                except ValueError:
                    idx = -1
                if not 0 <= idx < len(OPTIONS):
                    records.append(Record(f"{where} (answer {row['answer']!r} is not 0-4)", skip="malformed",
                                          split=split))
                    continue
                qa.update(options=[row[o] for o in OPTIONS], answer_idx=idx, answer=row[OPTIONS[idx]])
            else:
                qa["answer"] = row["answer"]
                alt = extra.get(row["video"], {}).get(row["qid"]) if isinstance(extra, dict) else None
                if isinstance(alt, str) and alt.strip() and alt.strip() != row["answer"]:
                    qa["answers"] = [row["answer"], alt.strip()]
            if not row["question"] or not qa["answer"]:
                records.append(Record(f"{where} (empty question or answer)", skip="malformed", split=split))
                continue
            by_video.setdefault(row["video"], []).append(qa)
        for video, qas in by_video.items():
            rel = vid_map.get(video) if isinstance(vid_map, dict) else None
            if not isinstance(rel, str):
                records.append(Record(f"{video} (not in map_vid_vidorID.json)", skip="missing_video", split=split))
                continue
            found = src.videos.find(rel)
            records.append(Record(f"NExTVideo/{rel}.mp4", found or "", qa_meta(qas, fmt, video_id=video),
                                  "" if found else "missing_video", split=split, key=video))
    return Converted(records, info={"qtypes": list(TYPES)})
