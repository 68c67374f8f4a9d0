"""The generic format: a JSONL file, one object per clip, ``video`` relative to the videos folder.

Every field except ``video`` goes into the sample's json as is, e.g.
``{"video": "a/b.mp4", "task": "qa", "question": "what is it?", "answer": "a dog"}``. A ``start``/``end`` pair
(seconds) stays in the json: the decoder then uses only that part of the stored clip (nothing is cut).
"""

from __future__ import annotations

import json

from mirasol_ray import storage
from mirasol_ray.data.formats.record import Converted, Record
from mirasol_ray.data.formats.source import Source, short


def convert(src: Source) -> Converted:
    """Records in file order; bad JSON and objects without a ``video`` string are skipped records, not errors."""
    name = short(src.annotations)
    records = []
    fs = storage.fsspec_fs(src.annotations)
    with fs.open(storage.strip_scheme(src.annotations), "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                records.append(Record(f"{name}:{lineno}", skip="bad_json"))
                continue
            if not isinstance(obj, dict):
                records.append(Record(f"{name}:{lineno}", skip="bad_json"))
                continue
            video = obj.pop("video", None)
            if not isinstance(video, str) or not video:
                records.append(Record(f"{name}:{lineno}", skip="no_video"))
                continue
            records.append(Record(video, src.videos.join(video), obj))
    return Converted(records)
