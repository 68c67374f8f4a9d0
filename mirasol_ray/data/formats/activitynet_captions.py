"""ActivityNet Captions (Krishna et al. 2017, dense-captioning events): ``train.json``, ``val_1.json``,
``val_2.json`` (the two validation annotations of the same videos), each one JSON object keyed by video id.

A video: ``{"v_<YouTube id>": {"duration": s, "timestamps": [[start, end], ...], "sentences": [...]}}``, one
sentence per timestamped event, in the file's order (events overlap, and some run past ``duration``). Videos are the
untrimmed ActivityNet v1.3 files named ``v_<id>.mp4`` (also ``.mkv``/``.webm``; some copies drop the ``v_``), as
for ActivityNet-QA, stored whole. Each video becomes one sample: its events as timestamped captions
(``segments``: the decoder reads each from the snippets its span covers, ``data.segment_captions``) and, as its
caption, the sentences in order of their start. ``--annotations`` is one of the files or the folder holding them.

Timestamps are seconds of the video, kept as the file gives them: the official evaluation (ranjaykrishna/
densevid_eval, ``evaluate.py``) pairs ``timestamps[i]`` with ``sentences[i]`` by index and uses every reference
interval as it is, without clipping it to ``duration`` or checking its order. So an event is kept whatever its span
(past ``duration``, zero-length, end before start): the decoder leaves out of segment training the ones it cannot
place on the video (it reads only ``0 <= start < end``), and their sentences stay in the caption. Only an event
with no sentence text or a timestamp that is not a finite number is left out; a video whose ``timestamps`` and
``sentences`` differ in length (they could not be paired) or that has no event left is skipped as malformed.
"""

from __future__ import annotations

import math

from mirasol_ray.data.formats.record import Converted, Record
from mirasol_ray.data.formats.source import Source, load_json, short, split_files

SPLITS = ("train", "val_1", "val_2")


def _events(entry: dict) -> list[dict]:
    """The events of one video (spans as given), sorted by start; raises on a malformed entry."""
    stamps, sentences = entry["timestamps"], entry["sentences"]
    if not isinstance(stamps, list) or not isinstance(sentences, list) or len(stamps) != len(sentences):
        raise ValueError("timestamps and sentences differ")
    events = []
    for stamp, text in zip(stamps, sentences):
        try:
            start, end = (float(t) for t in stamp)
        except (TypeError, ValueError):  # not a pair of numbers: this event only is left out
            continue
        text = str(text).strip()
        if text and math.isfinite(start) and math.isfinite(end):
            events.append({"start": round(start, 3), "end": round(end, 3), "caption": text})
    if not events:
        raise ValueError("no event")
    return sorted(events, key=lambda e: (e["start"], e["end"]))


def convert(src: Source) -> Converted:
    records: list[Record] = []
    for split, path in split_files(src, "{split}.json", SPLITS):
        data = load_json(src, path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object keyed by video id")
        for video_id, entry in data.items():
            name = f"v_{str(video_id).removeprefix('v_')}"
            try:
                events = _events(entry)
            except (KeyError, TypeError, ValueError):
                records.append(Record(f"{short(path)} {video_id}", skip="malformed", split=split))
                continue
            ytid = name.removeprefix("v_")
            meta = {"task": "caption", "caption": " ".join(e["caption"] for e in events), "segments": events,
                    "source": "activitynet-captions", "video_id": ytid}
            if isinstance(entry.get("duration"), (int, float)):
                meta["duration"] = float(entry["duration"])
            found = src.videos.find(name, ytid)
            records.append(Record(f"{name}.mp4", found or "", meta, "" if found else "missing_video", split=split,
                                  key=name))
    return Converted(records)
