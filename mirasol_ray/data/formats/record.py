"""What every annotation-format converter yields: one clip to store, or one item it had to skip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Record:
    """One sample-to-be.

    ``name`` identifies it in reports (the video's path relative to the videos folder, or ``line N`` /
    ``item N`` when there is no usable video). ``video`` is the full path or URI of the clip, ``meta`` the
    sample's json (schema fields: task, caption, question, answer, options, answer_idx, label, start, end, qas,
    ...). A non-empty ``skip`` is the reason the converter could not make a sample (``bad_json``, ``no_video``,
    ...); the builder counts it in the manifest and goes on.
    """

    name: str
    video: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    skip: str = ""
