"""Task metrics (pure) and the training throughput meter.

Task metrics work on per-row prediction records, so the same code scores ``mirasol eval`` (Ray Data batch
inference), evaluation during training, and a test with known predictions::

    {"key": str, "task": "qa"|"mcqa"|"cls"|"caption", "qtype": str, "pred": str, "target": str, "correct": bool}
"""

from __future__ import annotations

import re
import string
import time
from collections import defaultdict
from typing import Any, Iterable

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces: the usual VideoQA exact-match normalisation."""
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, target: str) -> bool:
    return normalize_answer(pred) == normalize_answer(target)


def token_f1(pred: str, target: str) -> float:
    """Unigram F1 between normalised texts (for captions, where exact match is too strict)."""
    p, t = normalize_answer(pred).split(), normalize_answer(target).split()
    if not p or not t:
        return float(p == t)
    common: dict[str, int] = defaultdict(int)
    for w in t:
        common[w] += 1
    hits = 0
    for w in p:
        if common[w] > 0:
            hits += 1
            common[w] -= 1
    if hits == 0:
        return 0.0
    prec, rec = hits / len(p), hits / len(t)
    return 2 * prec * rec / (prec + rec)


def metric_key(task: str, qtype: str) -> str:
    """Where a record is scored: ``qa/<qtype>`` for questions, otherwise the task's name."""
    return f"qa/{qtype}" if task == "qa" else task


def aggregate(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric key: ``{"metric": "accuracy"|"token_f1", "value": float, "count": int}``.

    QA is also reported over all questions as ``qa``."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        task = r["task"]
        score = token_f1(r["pred"], r["target"]) if task == "caption" else float(bool(r["correct"]))
        for key in {metric_key(task, r.get("qtype", "other")), task}:
            sums[key] += score
            counts[key] += 1
    return {k: {"metric": "token_f1" if k == "caption" else "accuracy", "value": sums[k] / counts[k],
                "count": counts[k]} for k in sorted(counts)}


class Throughput:
    """Samples/s, text tokens/s and the data-wait fraction over a logging window.

    data-wait fraction = time blocked on the next batch / wall time of the window (0: the input pipeline keeps
    up; near 1: training starves for data)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.wait = 0.0
        self.samples = 0
        self.tokens = 0
        self.steps = 0

    def add(self, samples: int, tokens: int, wait_s: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.wait += wait_s

    def step(self) -> None:
        self.steps += 1

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"samples_per_s": self.samples / dt, "tokens_per_s": self.tokens / dt,
               "data_wait_fraction": min(1.0, self.wait / dt), "step_time_s": dt / max(self.steps, 1)}
        self.reset()
        return out
