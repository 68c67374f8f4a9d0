"""Task metrics (pure), each benchmark's evaluation protocol, and the training throughput meter.

Task metrics work on per-row prediction records, so the same code scores ``mirasol eval`` (Ray Data batch
inference), evaluation during training, and a test with known predictions::

    {"key": str, "task": "qa"|"mcqa"|"cls"|"caption", "qtype": str, "pred": str, "target": str, "correct": bool,
     "rank": int (0-based rank of the right answer among scored candidates, -1: not ranked),
     "refs": [str] (a question's accepted answers when it has several)}

:func:`aggregate` is the quick per-task view used during training; :func:`benchmark_results` scores a benchmark
as its own papers do (see :data:`BENCHMARKS` and each protocol's docstring for the source it follows).
"""

from __future__ import annotations

import functools
import io
import os
import re
import string
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.stem import PorterStemmer
from nltk.tokenize import NLTKWordTokenizer

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"val": {"qa": 1}}`` -> ``{"val/qa": 1}``, as Ray Train and Tune name nested metrics."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


SCORES = ("caption", "qa", "mcqa", "cls")
"""Validation metrics that are scores (accuracy, token F1): stored as fractions (metrics.jsonl, meta.json), shown
to a person in percent, the scale of ``mirasol eval``'s table and of the paper."""


def is_score(metric: str) -> bool:
    """``val/qa``, ``train_eval/qa/what``, ``val/caption``, ``val/<set>/qa`` (a set scored apart): a score;
    ``val/loss`` and the training metrics (``cls`` unprefixed is a loss part) are not."""
    for split in ("val/", "train_eval/"):
        if metric.startswith(split):
            parts = metric[len(split):].split("/")
            return parts[0] in SCORES or (len(parts) > 1 and parts[0] not in SCORES and parts[1] in SCORES)
    return False


def show_value(metric: str, value: float | None) -> str:
    """How a person reads a value of ``metric``: a score in percent with two decimals (``81.25%``), anything else
    with four significant digits; ``-`` for none."""
    if value is None:
        return "-"
    if is_score(metric):
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def metric_key(task: str, qtype: str) -> str:
    """Where a record is scored: ``qa/<qtype>`` for questions, ``caption/segment`` for timestamped captions (a
    clip's caption is ``caption``), otherwise the task's name."""
    if task == "caption" and qtype == "segment":
        return "caption/segment"
    return f"qa/{qtype}" if task == "qa" else task


def aggregate(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric key: ``{"metric": "accuracy"|"token_f1", "value": float, "count": int}``.

    QA is also reported over all questions as ``qa``."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        task = r["task"]
        score = token_f1(r["pred"], r["target"]) if task == "caption" else float(bool(r["correct"]))
        own = metric_key(task, r.get("qtype", "other"))
        for key in {own, own if own == "caption/segment" else task}:  # a segment's caption is not the clip's
            sums[key] += score
            counts[key] += 1
    return {k: {"metric": "token_f1" if k.startswith("caption") else "accuracy", "value": sums[k] / counts[k],
                "count": counts[k]} for k in sorted(counts)}


# ----------------------------------------------------------------------------------------------------------------
# Open-ended answers: normalisation before exact match


_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!")
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_vqa(text: str) -> str:
    """The VQA v2 answer normalisation (GT-Vision-Lab/VQA, ``vqaEval.py``: ``processPunctuation`` then
    ``processDigitArticle``), the usual one for open-ended generative VideoQA.

    Line breaks and tabs become spaces; each punctuation mark of VQA's list is deleted where it touches a space
    (or the text has a digit-comma-digit), else replaced by a space; a period not followed by a digit is deleted;
    lower case; number words zero-ten (and "none") become digits; articles a/an/the are dropped. VQA's contraction
    table (``dont`` -> ``don't``) is not applied: these benchmarks' answers hold no contractions.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or _VQA_DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in ("a", "an", "the"))


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "vqa": normalize_vqa,
    "exact": lambda text: text.strip(),
    "squad": normalize_answer,
}
"""``vqa`` (the open-ended benchmarks' default): :func:`normalize_vqa` on both sides. ``exact``: the strings as the
benchmarks' own scripts compare them (ActivityNet-QA ``evaluation/eval.py``: ``pred == answer``; MSRVTT-QA's
answers are single lower-case words), only surrounding spaces removed. ``squad``: :func:`normalize_answer` (lower
case, no punctuation or articles), what validation during training uses, so the default for data that is not a
benchmark: ``mirasol eval`` then reproduces the run's own ``val/qa``."""

TASK_NAMES = {"qa": "Video QA", "mcqa": "Video QA (multiple choice)", "cls": "Audio-video classification",
              "caption": "Captioning"}
"""The Task column of a dataset that is not a benchmark, by the rows' task."""


def qa_correct(record: dict[str, Any], normalize: Callable[[str], str]) -> bool:
    """Exact match of a record's prediction against its target (or any of its accepted answers)."""
    pred = normalize(record["pred"])
    return any(pred == normalize(ref) for ref in record.get("refs") or [record["target"]])


# ----------------------------------------------------------------------------------------------------------------
# WUPS (NExT-OE)

WORDNET_DIR = "/usr/share/wordnet"
"""Where Debian's ``wordnet-base`` package installs the WordNet 3.0 database (``MIRASOL_WORDNET`` overrides)."""

_LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
             "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
             "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
             "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
             "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
             "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
             "adj.ppl").split()
"""WordNet 3.0's lexicographer files, numbered 00-44 (lexnames(5WN)). Debian's package leaves out the
``lexnames`` file that NLTK's reader opens first; nothing WUPS uses depends on it."""


class WordNetMissing(RuntimeError):
    """WUPS was asked for and the WordNet database is not there."""


@functools.lru_cache(maxsize=2)
def wordnet(root: str = ""):
    """NLTK's WordNet reader over the WordNet 3.0 database at ``root`` (default :data:`WORDNET_DIR`); nothing is
    downloaded. Raises :class:`WordNetMissing` naming the package to install."""
    root = root or os.environ.get("MIRASOL_WORDNET") or WORDNET_DIR
    if not os.path.isfile(os.path.join(root, "data.noun")):
        raise WordNetMissing(f"WUPS needs WordNet 3.0 and {root} has none: install Debian's wordnet-base package "
                             "(apt-get install wordnet-base) or set MIRASOL_WORDNET to a WordNet dict folder")

    if root not in nltk.data.path:
        nltk.data.path.append(root)  # NLTK opens files only under its data roots

    class _Reader(WordNetCorpusReader):
        def open(self, fileid):
            if fileid == "lexnames" and not os.path.isfile(os.path.join(root, "lexnames")):
                return io.StringIO("".join(f"{i:02d}\t{name}\t0\n" for i, name in enumerate(_LEXNAMES)))
            return super().open(fileid)

        def map_wn(self, version="wordnet"):  # the mapping to other WordNet versions (multilingual data): unused
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not used here
        return _Reader(root, None)


NEXTQA_STOPWORDS = frozenset("""i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their theirs themselves what
which who whom this that that'll these those am is are was were be been being have has had having do does did doing
a an the and but if or because as until while to from of at for with about into through during again further then
here there when where why how all any each most other some such only own so than too very s t can will just don
don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't
hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn
wasn't weren weren't won won't wouldn wouldn't""".split())
"""NExT-OE's ``stopwords.txt`` (NLTK's English list), removed before WUPS."""


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return NLTKWordTokenizer()


def _lemma(word: str, wn) -> str:
    """A word's lemma as NExT-OE's ``remove_stop`` (pywsd ``lemmatize``) takes it: WordNet's base form if it has
    synsets, else the Porter stem if that has, else the word. pywsd picks the part of speech with NLTK's tagger,
    whose model is a download: here the first of noun, verb, adjective, adverb that WordNet knows the word as."""

    for pos in ("n", "v", "a", "r"):
        forms = wn._morphy(word, pos)
        if forms:
            lemma = min(forms, key=len)
            break
    else:
        lemma = word
    if wn.synsets(lemma):
        return lemma
    stem = PorterStemmer().stem(word)
    return stem if wn.synsets(stem) else word


def nextqa_clean(text: str, wn) -> list[str]:
    """NExT-OE's ``remove_stop``: tokens (NLTK's word tokenizer), lower-cased lemmas, stopwords removed."""
    words = [_lemma(w.lower(), wn) for w in _tokenizer().tokenize(text)]
    return [w for w in words if w not in NEXTQA_STOPWORDS]


def wup(word1: str, word2: str, alpha: float, wn) -> float:
    """Wu-Palmer similarity of two words' first synsets, scaled by 0.1 below ``alpha`` (NExT-OE ``metrics.py``;
    Malinowski & Fritz 2014 define WUPS with this threshold); 1 for equal words, 0 for a word WordNet lacks."""
    if word1 == word2:
        return 1.0
    s1, s2 = wn.synsets(word1), wn.synsets(word2)
    if not s1 or not s2:
        return 0.0
    sim = s1[0].wup_similarity(s2[0]) or 0.0
    return sim * 0.1 if sim < alpha else sim


def _wups_one_way(words1: list[str], words2: list[str], alpha: float, wn) -> float:
    sim, matched = 1.0, False
    for w1 in words1:
        best = max((wup(w1, w2, alpha, wn) for w2 in words2), default=0.0)
        if best == 0:
            continue
        sim *= best
        matched = True
    return sim if matched else 0.0


def wups(pred: str, truth: str, alpha: float, wn=None) -> float:
    """WUPS of two answers already cleaned by :func:`nextqa_clean` (space-joined), as NExT-OE's ``get_wups``:
    the smaller of the two directions' products of best word matches."""
    wn = wn or wordnet()
    p, t = _tokenizer().tokenize(pred), _tokenizer().tokenize(truth)
    return min(_wups_one_way(p, t, alpha, wn), _wups_one_way(t, p, alpha, wn))


def nextqa_oe_scores(record: dict[str, Any], wn) -> tuple[float, float]:
    """(WUPS@0, WUPS@0.9) of one NExT-OE prediction, as ``eval_oe.py``: answers cleaned; counting and binary
    questions (DC, DB) by exact match of the cleaned answers; the best over the accepted answers."""
    pred = " ".join(nextqa_clean(record["pred"], wn))
    best0 = best9 = 0.0
    for ref in record.get("refs") or [record["target"]]:
        gt = " ".join(nextqa_clean(ref, wn))
        if record.get("qtype") in ("DC", "DB"):
            s0 = s9 = float(pred == gt)
        else:
            s0, s9 = wups(pred, gt, 0.0, wn), wups(pred, gt, 0.9, wn)
        best0, best9 = max(best0, s0), max(best9, s9)
    return best0, best9


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark is reported: the paper's table line and the protocol that scores it."""

    dataset: str
    task: str
    metric: str
    """The headline metric's name (the one the paper's figure is)."""
    paper: float | None
    """Mirasol3B's figure (arXiv 2311.05698), percent; None where the paper reports no such number."""
    protocol: str


BENCHMARKS: dict[str, Benchmark] = {
    "msrvtt-qa": Benchmark("MSRVTT-QA", "Video QA", "accuracy", 50.42, "open_qa"),
    "activitynet-qa": Benchmark("ActivityNet-QA", "Video QA", "accuracy", 51.13, "activitynet_qa"),
    "nextqa-mc": Benchmark("NExT-QA", "Video QA", "accuracy", 72.0, "nextqa_mc"),
    "nextqa-oe": Benchmark("NExT-QA (open-ended)", "Video QA", "WUPS@0", None, "nextqa_oe"),
    "kinetics-sounds": Benchmark("Kinetics-Sounds", "Audio-video classification", "top-1", 90.1, "classification"),
    "vggsound": Benchmark("VGGSound", "Audio-video classification", "top-1", 69.8, "classification"),
    "epic-sounds": Benchmark("EPIC-Sounds", "Audio-video classification", "top-1", 78.2, "classification"),
}
"""By ``shards build`` format (the manifest's ``source``). The paper's NExT-QA figure (72.0) is shown beside the
multiple-choice accuracy: its protocol could not be checked against the paper's text here (see README)."""

NEXTQA_GROUPS = {"C": ("CW", "CH"), "T": ("TN", "TP", "TC"), "D": ("DC", "DL", "DO", "DB")}
"""NExT-QA's question groups (causal, temporal, descriptive) for Acc@C/T/D and WUPS_C/T/D."""


def _pct(hits: float, n: int) -> float | None:
    return 100.0 * hits / n if n else None


def _metric(name: str, hits: float, n: int, paper: float | None = None) -> dict[str, Any]:
    return {"name": name, "value": _pct(hits, n), "count": n, "paper": paper}


def _per_type(scores: list[tuple[str, float]], name: str, merge: dict[str, str] | None = None
              ) -> list[dict[str, Any]]:
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for qtype, score in scores:
        qtype = (merge or {}).get(qtype, qtype)
        sums[qtype] += score
        counts[qtype] += 1
    return [{"type": t, "name": name, "value": _pct(sums[t], counts[t]), "count": counts[t]} for t in sorted(counts)]


def benchmark_results(records: list[dict[str, Any]], source: str, normalize: str = "") -> dict[str, Any]:
    """A benchmark's metrics from prediction records, in percent, as its papers compute them.

    Returns ``{"dataset", "task", "source", "metrics": [{"name", "value", "count", "paper"}], "per_type":
    [{"type", "name", "value", "count"}], "normalization"}``; the first metric is the headline one. A source with
    no protocol here (``jsonl``, the synthetic set) gets accuracy (token F1 for captions) per task, each metric with
    its own ``task`` (:data:`TASK_NAMES`). ``normalize``: a :data:`NORMALIZERS` name for open-ended answers (default
    ``vqa`` for a benchmark, ``squad`` otherwise); ``normalization`` says which was applied (None: no open-ended
    answers are scored by this protocol).
    """
    if normalize and normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZERS)}, got {normalize!r}")
    bench = BENCHMARKS.get(source)
    if bench is None:
        normalize = normalize or "squad"
        norm = NORMALIZERS[normalize]
        records = [{**r, "correct": qa_correct(r, norm)} if r["task"] == "qa" else r for r in records]
        agg = aggregate(records)
        return {"dataset": source or "custom", "task": ", ".join(sorted({TASK_NAMES[k.split("/")[0]] for k in agg})),
                "source": source, "normalization": normalize if any(r["task"] == "qa" for r in records) else None,
                "metrics": [{"name": f"{m['metric']} [{k}]", "value": 100 * m["value"], "count": m["count"],
                             "paper": None, "task": TASK_NAMES[k.split("/")[0]]} for k, m in agg.items()],
                "per_type": []}
    normalize = normalize or "vqa"
    out = {"dataset": bench.dataset, "task": bench.task, "source": source, "normalization": None}
    out.update(_PROTOCOLS[bench.protocol](records, bench, NORMALIZERS[normalize]))
    if bench.protocol in ("open_qa", "activitynet_qa"):
        out["normalization"] = normalize
    return out


def _open_qa(records: list[dict[str, Any]], bench: Benchmark, norm: Callable[[str], str]) -> dict[str, Any]:
    """Exact-match accuracy over the open-ended questions, overall and per question type (MSRVTT-QA: the
    question word)."""
    scores = [(r.get("qtype", "other"), float(qa_correct(r, norm))) for r in records if r["task"] == "qa"]
    hits = sum(s for _, s in scores)
    return {"metrics": [_metric(bench.metric, hits, len(scores), bench.paper)],
            "per_type": _per_type(scores, "accuracy")}


def _activitynet_qa(records: list[dict[str, Any]], bench: Benchmark, norm: Callable[[str], str]
                    ) -> dict[str, Any]:
    """As ActivityNet-QA's ``evaluation/eval.py``: accuracy per type, "free" (types 3-8 together) and all."""
    out = _open_qa(records, bench, norm)
    free = ("yes_no", "color", "object", "location", "number", "other")
    scores = [float(qa_correct(r, norm)) for r in records if r["task"] == "qa" and r.get("qtype") in free]
    out["metrics"].append(_metric("accuracy (free)", sum(scores), len(scores)))
    return out


def _nextqa_mc(records: list[dict[str, Any]], bench: Benchmark, norm: Callable[[str], str]) -> dict[str, Any]:
    """As NExT-QA's ``eval_mc.py``: accuracy overall, Acc@C/T/D, and per type with TP merged into TN."""
    scores = [(r.get("qtype", "other"), float(bool(r["correct"]))) for r in records if r["task"] == "mcqa"]
    metrics = [_metric(bench.metric, sum(s for _, s in scores), len(scores), bench.paper)]
    for group, types in NEXTQA_GROUPS.items():
        g = [s for t, s in scores if t in types]
        metrics.append(_metric(f"Acc@{group}", sum(g), len(g)))
    return {"metrics": metrics, "per_type": _per_type(scores, "accuracy", {"TP": "TN"})}


def _nextqa_oe(records: list[dict[str, Any]], bench: Benchmark, norm: Callable[[str], str]) -> dict[str, Any]:
    """As NExT-OE's ``eval_oe.py``: WUPS@0 and WUPS@0.9 overall, WUPS_C/T/D (at 0), per type (TP into TN)."""
    wn = wordnet()
    rows = [(r.get("qtype", "other"), *nextqa_oe_scores(r, wn)) for r in records if r["task"] == "qa"]
    metrics = [_metric("WUPS@0", sum(r[1] for r in rows), len(rows), bench.paper),
               _metric("WUPS@0.9", sum(r[2] for r in rows), len(rows))]
    for group, types in NEXTQA_GROUPS.items():
        g = [r[1] for r in rows if r[0] in types]
        metrics.append(_metric(f"WUPS_{group}", sum(g), len(g)))
    return {"metrics": metrics, "per_type": _per_type([(t, s0) for t, s0, _ in rows], "WUPS@0", {"TP": "TN"})}


def _classification(records: list[dict[str, Any]], bench: Benchmark, norm: Callable[[str], str]
                    ) -> dict[str, Any]:
    """Top-1, top-5 (when predictions rank the label set: ``cls_mode`` score or head) and, for EPIC-Sounds, mean
    class accuracy (the mean of per-class top-1 over the classes present, EPIC-Sounds' own second metric)."""
    recs = [r for r in records if r["task"] == "cls"]
    metrics = [_metric(bench.metric, sum(bool(r["correct"]) for r in recs), len(recs), bench.paper)]
    if recs and all(int(r.get("rank", -1)) >= 0 for r in recs):
        metrics.append(_metric("top-5", sum(int(r["rank"]) < 5 for r in recs), len(recs)))
    per_class = _per_type([(r["target"], float(bool(r["correct"]))) for r in recs], "top-1")
    if bench.dataset == "EPIC-Sounds":
        values = [c["value"] for c in per_class]
        metrics.append({"name": "mean class accuracy", "value": sum(values) / len(values) if values else None,
                        "count": len(recs), "paper": None})
    return {"metrics": metrics, "per_type": per_class}


_PROTOCOLS = {"open_qa": _open_qa, "activitynet_qa": _activitynet_qa, "nextqa_mc": _nextqa_mc,
              "nextqa_oe": _nextqa_oe, "classification": _classification}


def table_rows(results: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """The paper's table layout: one row per metric (Task, Dataset, Model, Metric name, Metric value, Paper),
    then the per-type breakdown as rows whose metric name carries the type."""
    rows = [{"task": m.get("task") or results["task"], "dataset": results["dataset"], "model": model, "metric": m["name"],
             "value": m["value"], "count": m["count"], "paper": m["paper"]} for m in results["metrics"]]
    rows += [{"task": results["task"], "dataset": results["dataset"], "model": model,
              "metric": f"{t['name']} [{t['type']}]", "value": t["value"], "count": t["count"], "paper": None}
             for t in results["per_type"]]
    return rows


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
