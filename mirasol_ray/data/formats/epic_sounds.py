"""EPIC-Sounds (Huh et al. 2023): ``EPIC_Sounds_{train,validation}.csv`` with a header
``annotation_id,participant_id,video_id,start_timestamp,stop_timestamp,start_sample,stop_sample,description,
class,class_id``.

Each row is a segment of an untrimmed EPIC-KITCHENS-100 video (``P01/videos/P01_11.MP4``, upper-case extension,
found anywhere under ``--videos``), so every segment is **cut** from its video. Its window comes from
``start_sample``/``stop_sample`` (samples at 24 kHz of the video's audio: exact) when present, else from the
``HH:MM:SS.mmm`` timestamps (to the millisecond). Segments run from a few tenths of a second to minutes: the
cut keeps every frame shown in the window and the audio over it, and the decoder spreads the snippets over the
whole stored segment (``data.clip_seconds: 0``, the preset): a 0.3 s segment in 4 snippets gives 75 ms
snippets (frames repeat where there are fewer frames than slots), a 3-minute one 45 s snippets (frames sampled
across each). The label set is ``class`` ordered by ``class_id`` (44 classes), the same in every split.

Checked against epic-kitchens/epic-sounds-annotations: ``README.md`` (the columns: timestamps ``HH:mm:ss.SSS``,
``start_sample``/``stop_sample`` indices at 24 kHz of the untrimmed audio, ``class_id`` the class's number) and
``src/slowfast/datasets/epicsounds_record.py`` (the official loader takes the window from the timestamps, times
24000; in the released ``EPIC_Sounds_validation.csv`` the sample indices agree with them to within one sample,
every segment is at least 0.2 s and each ``class_id`` names one class). ``EPIC_Sounds_recognition_test_timestamps
.csv`` (no ``class``/``class_id``: the labels are held back) and ``sound_events_not_categorised.csv`` are not
converted. A row whose ``class_id`` names another class than elsewhere is skipped (the label order would be
ambiguous); none does in the released files.
"""

from __future__ import annotations

import re

from mirasol_ray.data.formats.record import Converted, Record
from mirasol_ray.data.formats.source import Source, as_int, csv_rows, short, split_files

SPLITS = ("train", "validation")
SAMPLE_RATE = 24000
COLUMNS = ("annotation_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp", "start_sample",
           "stop_sample", "description", "class", "class_id")
_TIME = re.compile(r"^(\d+):(\d{2}):(\d{2}(?:\.\d+)?)$")


def parse_timestamp(text: str) -> float:
    """``"00:01:02.345"`` -> 62.345 seconds."""
    m = _TIME.match(text.strip())
    if not m:
        raise ValueError(f"not HH:MM:SS.mmm: {text!r}")
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def window(row: dict[str, str]) -> tuple[float, float]:
    """(start, end) seconds of a segment: from the 24 kHz sample indices if they parse, else the timestamps."""
    try:
        start, stop = as_int(row["start_sample"]) / SAMPLE_RATE, as_int(row["stop_sample"]) / SAMPLE_RATE
    except ValueError:
        start, stop = parse_timestamp(row["start_timestamp"]), parse_timestamp(row["stop_timestamp"])
    if not 0 <= start < stop:
        raise ValueError(f"empty or negative segment {start:.3f}-{stop:.3f} s")
    return start, stop


def convert(src: Source) -> Converted:
    records: list[Record] = []
    classes: dict[int, str] = {}
    for split, path in split_files(src, "EPIC_Sounds_{split}.csv", SPLITS):
        for lineno, row in csv_rows(src, path, COLUMNS, header=True):
            where = f"{short(path)}:{lineno}"
            if isinstance(row, str):
                records.append(Record(f"{where} ({row})", skip="malformed", split=split))
                continue
            try:
                start, end = window(row)
                class_id = as_int(row["class_id"])
                if not row["video_id"] or not row["class"] or not row["annotation_id"]:
                    raise ValueError("empty video_id, class or annotation_id")
            except ValueError as e:
                records.append(Record(f"{where} ({e})", skip="malformed", split=split))
                continue
            if classes.setdefault(class_id, row["class"]) != row["class"]:
                records.append(Record(f"{where} (class_id {class_id} is {classes[class_id]!r} elsewhere)",
                                      skip="malformed", split=split))
                continue
            found = src.videos.find(row["video_id"])
            meta = {"task": "cls", "label": row["class"], "class_id": class_id, "source": "epic-sounds",
                    "annotation_id": row["annotation_id"], "video_id": row["video_id"],
                    "description": row["description"], "start_seconds": start, "stop_seconds": end}
            records.append(Record(f"{row['annotation_id']} ({row['video_id']} {start:.3f}-{end:.3f} s)",
                                  found or "", meta, "" if found else "missing_video", window=(start, end),
                                  split=split, key=row["annotation_id"]))
    return Converted(records, label_set=[classes[k] for k in sorted(classes)])
