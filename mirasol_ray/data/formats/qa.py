"""What the question-answering converters share: one sample per clip holding all its questions."""

from __future__ import annotations

from typing import Any


def qa_meta(qas: list[dict[str, Any]], source: str, **extra: Any) -> dict[str, Any]:
    """The json of a clip's sample: every question in ``qas`` (with its type), the first one also as
    ``question``/``answer`` (readers that know one question per clip see that one)."""
    meta: dict[str, Any] = {"task": "qa", "qas": qas, "source": source, **extra}
    first = qas[0]
    if "options" in first:
        meta["task"] = "mcqa"
    else:
        meta.update(question=first["question"], answer=first["answer"])
    return meta
