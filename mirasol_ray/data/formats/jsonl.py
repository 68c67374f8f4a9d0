"""The generic format: a JSONL file, one object per clip, ``video`` relative to the videos folder.

Every field except ``video`` goes into the sample's json as is, e.g.
``{"video": "a/b.mp4", "task": "qa", "question": "what is it?", "answer": "a dog"}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from mirasol_ray import storage
from mirasol_ray.data.formats.record import Record


def iter_records(annotations: str, videos: str) -> Iterator[Record]:
    """Records in file order; bad JSON and objects without a ``video`` string are skipped records, not errors."""
    fs = storage.fsspec_fs(annotations)
    with fs.open(storage.strip_scheme(annotations), "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield Record(f"line {lineno}", skip="bad_json")
                continue
            if not isinstance(obj, dict):
                yield Record(f"line {lineno}", skip="bad_json")
                continue
            video = obj.pop("video", None)
            if not isinstance(video, str) or not video:
                yield Record(f"line {lineno}", skip="no_video")
                continue
            yield Record(video, storage.join(videos, video), obj)
