"""What every annotation-format converter gives: the clips to store (or the items it had to skip) and what the
manifest should say about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Record:
    """One sample-to-be.

    ``name`` identifies it in reports (the video's path relative to the videos folder, the file name the dataset
    gives the clip, or ``FILE:LINE`` / ``FILE item N`` when there is no usable video). ``video`` is the full path or
    URI of the file on disk, ``meta`` the sample's json (schema fields: task, caption, question, answer, options,
    answer_idx, label, qas, ...). A non-empty ``skip`` is the reason the converter could not make a sample
    (``malformed``, ``missing_video``, ...); the builder counts it in the manifest and goes on.

    ``window`` (seconds of the file, start and end) asks the builder to cut that part out of an untrimmed video and
    store only it; ``None`` stores the file whole. ``split`` is the dataset's split the clip belongs to (``train``,
    ``val``, ...; empty for a single unnamed split). ``key`` is the sample key (default: made from ``name``).
    """

    name: str
    video: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    skip: str = ""
    window: tuple[float, float] | None = None
    split: str = ""
    key: str = ""


@dataclass
class Converted:
    """A converter's whole output. ``label_set`` is the dataset's class list in its official order (fixed, so a
    class missing from one split keeps its index); ``info`` is merged into every manifest (e.g. ``qtypes``)."""

    records: list[Record]
    label_set: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
