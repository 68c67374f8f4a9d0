"""Annotation-format converters for ``mirasol shards build``: ``iter_records(annotations, videos)`` each."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from mirasol_ray.data.formats import jsonl, msrvtt_qa
from mirasol_ray.data.formats.record import Record

FORMATS: dict[str, Callable[[str, str], Iterator[Record]]] = {
    "jsonl": jsonl.iter_records,
    "msrvtt-qa": msrvtt_qa.iter_records,
}

__all__ = ["FORMATS", "Record"]
