"""Kinetics-Sounds and VGGSound: audio-visual classification of 10 s windows of YouTube videos.

Files as distributed:

- Kinetics (``kinetics-sounds``): the Kinetics CSVs (``train.csv``, ``validate.csv``, ``test.csv``) with a header
  ``label,youtube_id,time_start,time_end,split[,is_cc]``; ``--annotations`` is one CSV or their folder.
  Kinetics-Sounds is not a file of its own but a subset of Kinetics classes (Arandjelović & Zisserman 2017;
  later papers, AVTS and XDC among them, use 31-34 of them; the lists differ between papers and no official
  annotation file ships one, so none is built in; which list each paper used was not verified here): pass the
  class list you compare against with ``--labels FILE`` (one class a line), or a CSV already filtered to them. A row of another class is left out
  (it is not Kinetics-Sounds), silently; a CSV without a ``label`` column (the early Kinetics-400 ``test.csv``)
  is refused.
- VGGSound (``vggsound``): ``vggsound.csv``, no header: ``ytid,start_seconds,label,split`` (``train``/``test``),
  labels with commas quoted (``"male speech, man speaking"``); the window is [start, start + 10 s) (hche11/
  VGGSound, ``README.md``: "YouTube ID, start seconds, label, train/test split"; its clips are named
  ``<ytid>_<start:06d>``, e.g. ``example_audio/FwVYUHKoLtQ_000034.wav``). The repository's own ``data/train.csv``
  / ``data/test.csv`` (``<ytid>_<start:06d>.mp4,label``, read by its ``datasets/dataloader.py`` with the class
  list of ``data/stat.csv`` sorted) are a different format, not read here: pass ``vggsound.csv``. Its label set
  here is the file's classes sorted, as that loader sorts them.

Videos: the usual downloads are already trimmed to the window and named with it, ``<ytid>_<start:06d>_<end:06d>``
(Kinetics) or ``<ytid>_<start:06d>`` (VGGSound), flat or in ``<split>/<label>/`` folders: such a file is stored
whole, never cut again. A file named by the YouTube id alone is the untrimmed video: the annotation's window is
cut from it (exact to the frame, audio with it). The label set is every class of the annotation files (or of
``--labels``), in sorted order, whatever splits are built: a class index means the same in every split.
"""

from __future__ import annotations

import posixpath

from mirasol_ray import storage
from mirasol_ray.data.formats.record import Converted, Record
from mirasol_ray.data.formats.source import Source, as_int, csv_rows, is_dir, short

VGGSOUND_SECONDS = 10
KINETICS_SPLITS = {"validate": "val", "valid": "val", "validation": "val"}


def _windowed(src: Source, ytid: str, start: int, end: int) -> tuple[str | None, tuple[float, float] | None]:
    """(path, window to cut or None): the trimmed clip if present, else the untrimmed video and the window."""
    trimmed = src.videos.find(f"{ytid}_{start:06d}_{end:06d}", f"{ytid}_{start:06d}")
    if trimmed:
        return trimmed, None
    full = src.videos.find(ytid)
    return (full, (float(start), float(end))) if full else (None, None)


def _split_name(value: str) -> str:
    return KINETICS_SPLITS.get(value.lower(), value.lower())


def _records(src: Source, rows: list[tuple[str, int, int, str, str]], fmt: str) -> Converted:
    """rows: (label, start, end, split, ytid) -> records, label set, wanted split filter applied."""
    labels = list(src.labels) if src.labels else sorted({r[0] for r in rows})
    wanted = set(labels)
    split = _split_name(src.split) if src.split else ""
    records: list[Record] = []
    for label, start, end, row_split, ytid in rows:
        if split and row_split != split:
            continue
        if label not in wanted:
            continue
        name = f"{ytid}_{start:06d}_{end:06d}"
        path, window = _windowed(src, ytid, start, end)
        meta = {"task": "cls", "label": label, "source": fmt, "youtube_id": ytid, "time_start": start,
                "time_end": end}
        records.append(Record(f"{name}.mp4", path or "", meta, "" if path else "missing_video", window=window,
                              split=row_split, key=name))
    return Converted(records, label_set=labels)


def convert_kinetics_sounds(src: Source) -> Converted:
    paths = [src.annotations]
    if is_dir(src, src.annotations):
        fs = storage.fsspec_fs(src.annotations)
        base = storage.strip_scheme(src.annotations)
        paths = [storage.join(src.annotations, posixpath.basename(p)) for p in sorted(fs.ls(base, detail=False))
                 if str(p).endswith(".csv")]
        if not paths:
            raise FileNotFoundError(f"no Kinetics .csv files in {src.annotations}")
    rows, bad = [], []
    for path in paths:
        for lineno, row in csv_rows(src, path, ("label", "youtube_id", "time_start", "time_end", "split"), header=True):
            where = f"{short(path)}:{lineno}"
            if isinstance(row, str):
                bad.append(Record(f"{where} ({row})", skip="malformed"))
                continue
            try:
                start, end = as_int(row["time_start"]), as_int(row["time_end"])
                if end <= start or not row["youtube_id"] or not row["label"]:
                    raise ValueError("empty id/label or end <= start")
            except ValueError as e:
                bad.append(Record(f"{where} ({e})", skip="malformed"))
                continue
            rows.append((row["label"], start, end, _split_name(row["split"]), row["youtube_id"]))
    conv = _records(src, rows, "kinetics-sounds")
    conv.records[:0] = bad
    return conv


def convert_vggsound(src: Source) -> Converted:
    rows, bad = [], []
    for lineno, row in csv_rows(src, src.annotations, ("ytid", "start_seconds", "label", "split"), header=False):
        where = f"{short(src.annotations)}:{lineno}"
        if isinstance(row, str):
            bad.append(Record(f"{where} ({row})", skip="malformed"))
            continue
        try:
            start = as_int(row["start_seconds"])
            if not row["ytid"] or not row["label"] or start < 0:
                raise ValueError("empty id/label or negative start")
        except ValueError as e:
            bad.append(Record(f"{where} ({e})", skip="malformed"))
            continue
        rows.append((row["label"], start, start + VGGSOUND_SECONDS, row["split"].lower(), row["ytid"]))
    conv = _records(src, rows, "vggsound")
    conv.records[:0] = bad
    return conv
