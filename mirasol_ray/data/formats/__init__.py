"""Annotation-format converters for ``mirasol shards build``: ``convert(Source) -> Converted`` each.

Each reads the benchmark's official annotation files exactly as distributed and finds the videos as the dataset
names them under ``--videos`` (see each module's docstring for the files, fields and quirks).
"""

from __future__ import annotations

from collections.abc import Callable

from mirasol_ray.data.formats import (
    activitynet_captions,
    activitynet_qa,
    av_classes,
    epic_sounds,
    jsonl,
    msrvtt_qa,
    nextqa,
)
from mirasol_ray.data.formats.record import Converted, Record
from mirasol_ray.data.formats.source import Source, VideoRoot

FORMATS: dict[str, Callable[[Source], Converted]] = {
    "jsonl": jsonl.convert,
    "msrvtt-qa": msrvtt_qa.convert,
    "activitynet-qa": activitynet_qa.convert,
    "activitynet-captions": activitynet_captions.convert,
    "nextqa-mc": nextqa.convert_mc,
    "nextqa-oe": nextqa.convert_oe,
    "kinetics-sounds": av_classes.convert_kinetics_sounds,
    "vggsound": av_classes.convert_vggsound,
    "epic-sounds": epic_sounds.convert,
}

__all__ = ["FORMATS", "Converted", "Record", "Source", "VideoRoot"]
