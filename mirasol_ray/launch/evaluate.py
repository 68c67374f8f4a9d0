"""``mirasol eval`` (Ray Data batch inference) and ``mirasol predict`` (one video, no Ray).

Evaluation is the decode pipeline feeding ``map_batches`` over an actor pool whose actors each hold the model
(on a GPU each when the cluster has them), so scoring a large benchmark scales with the cluster like training.
The decode geometry comes from the checkpoint's own run config, so a checkpoint is all it needs. The shards'
manifest says which benchmark they hold (``source``), and :func:`~mirasol_ray.train.metrics.benchmark_results`
scores it by that benchmark's protocol; ``results.json`` and ``results.csv`` hold the paper's table layout.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import posixpath
from typing import Any

import numpy as np
import ray
import torch

from mirasol_ray import storage
from mirasol_ray.config import Config, DataConfig, _deep_update, from_dict, parse_overrides, set_name
from mirasol_ray.data.decode import DecodeError
from mirasol_ray.data.index import SampleIndex
from mirasol_ray.data.pipeline import (
    count_bad_shards,
    decoded_dataset,
    expand_shard_urls,
    find_manifest,
    make_skip_counter,
    read_skips,
    sample_index,
    samples_seen,
    split_by_set,
    stack_rows,
    to_torch,
)
from mirasol_ray.data.rows import VIEW_MARK, decode_sample, truncation_warning
from mirasol_ray.data.schema import manifest_qtypes, qtype_table
from mirasol_ray.data.text import get_tokenizer
from mirasol_ray.launch import configure_storage, console
from mirasol_ray.launch.train import ensure_ray
from mirasol_ray.train.checkpoint import (
    check_model_file,
    describe_choice,
    load_model_from,
    metric_value,
    read_meta,
    require_meta,
    resolve_choice,
    tokenizer_spec,
)
from mirasol_ray.train.metrics import aggregate, benchmark_results, table_rows
from mirasol_ray.train.step import predict_batch
from mirasol_ray.train.views import merge_view_records, predict_views

RECORD_COLUMNS = ("key", "task", "qtype", "pred", "target", "correct", "rank", "refs", "set")
CSV_COLUMNS = ("task", "dataset", "model", "metric", "value", "count", "paper")
VIEW_FIELDS = ("scores", "choices", "answer_idx", "label")
"""Record fields only merging several looks at a clip reads (:mod:`mirasol_ray.train.views`); not written out."""


def checkpoint_config(checkpoint: str, overrides: list[str] | None = None,
                      choice: str = "best") -> tuple[str, Config, list[str] | None]:
    """(model.pt URI, the run's Config with ``--set`` overrides, label set) for a checkpoint URI (a run folder: its
    ``choice`` checkpoint, best or last, named on the console). A checkpoint whose model file is empty or cut
    short, or that has no meta.json, is an error naming it: checked here, in the driver, before any worker would
    load it.

    The tokenizer is the checkpoint's own copy (see :mod:`mirasol_ray.train.checkpoint`), not the path the run was
    trained with, which need not exist here. The checkpoint is read with the overrides' ``storage.endpoint_url``
    (:func:`~mirasol_ray.launch.configure_storage`): the run's own config is inside what is read."""

    configure_storage(overrides)
    storage.check_access(checkpoint)
    model_uri, chosen = resolve_choice(checkpoint, choice)
    if chosen is not None:
        console.say(f"{checkpoint}: its {describe_choice(chosen)}")
    check_model_file(model_uri)
    meta = require_meta(model_uri)
    raw = meta["run_config"]
    raw = json.loads(json.dumps(raw))  # a deep copy
    if "tokenizer" in meta:  # checkpoints from before tokenizers travelled with them keep the run's path
        raw.setdefault("data", {})["tokenizer"] = tokenizer_spec(model_uri, meta)
    _deep_update(raw, parse_overrides(overrides))
    return model_uri, from_dict(raw), meta.get("label_set")


class Predictor:
    """Actor for ``map_batches``: loads the model once, turns decoded rows into prediction records."""

    def __init__(self, model_uri: str, storage_settings: dict[str, str], data_cfg: dict[str, Any], precision: str,
                 label_set: list[str] | None, beam_size: int = 1, qtypes: list[str] | None = None,
                 sets: list | None = None):

        storage.configure(**storage_settings)  # the driver's: this actor reads the model and the tokenizer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model_from(model_uri).to(self.device).eval()
        self.tok = get_tokenizer(data_cfg["tokenizer"])

        self.precision, self.label_set, self.beam_size = precision, label_set, beam_size
        self.qtypes = qtype_table(qtypes)
        self.sets = sets  # [name, first row] of each of several --data sets: each record says its set
        self.looks = bool(data_cfg.get("eval_windows")) or int(data_cfg.get("eval_views", 1)) > 1

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(batch["key"]) == 0:
            return {c: np.zeros((0,), dtype=object) for c in (*RECORD_COLUMNS, "view")}
        recs = [dict(r, set=name or "") for name, part in split_by_set(to_torch(batch), self.sets)
                for r in predict_batch(self.model, part, self.tok, self.device, self.precision,
                                       beam_size=self.beam_size, label_set=self.label_set, qtypes=self.qtypes,
                                       with_scores=self.looks)]
        view = [json.dumps({k: r[k] for k in VIEW_FIELDS if k in r}) for r in recs]  # what merging looks needs
        return {**{c: _column([r[c] for r in recs], c) for c in RECORD_COLUMNS}, "view": np.array(view, dtype=object)}


def _column(values: list[Any], name: str) -> np.ndarray:
    """One record field as a Ray Data column (lists travel as JSON text)."""
    if name == "correct":
        return np.array(values, dtype=bool)
    if name == "rank":
        return np.array(values, dtype=np.int64)
    if name == "refs":
        return np.array([json.dumps(v) for v in values], dtype=object)
    return np.array(values, dtype=object)


def _record(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    rec = {c: str(batch[c][i]) for c in RECORD_COLUMNS if c not in ("correct", "rank", "refs")}
    rec.update(correct=bool(batch["correct"][i]), rank=int(batch["rank"][i]), refs=json.loads(batch["refs"][i]))
    rec.update(json.loads(batch["view"][i]))
    return rec


def evaluate(checkpoint: str, data_url: str | list[str], *, overrides: list[str] | None = None, batch_size: int = 16,
             num_actors: int = 1, beam_size: int = 1, num_cpus: int | None = None, records_out: str = "",
             out: str = "", normalize: str = "", source: str = "", choice: str = "best") -> dict[str, Any]:
    """Task metrics of a checkpoint over the shards at ``data_url``, scored by the benchmark's protocol.
    ``checkpoint`` may be a run folder: its best checkpoint by the run's validation score, or with ``choice``
    ``last`` its newest (:func:`~mirasol_ray.train.checkpoint.choose_checkpoint`).

    ``source`` (default: the shards' manifest) names the benchmark (a ``shards build`` format). With ``out``
    (a folder, local or ``s3://``), writes ``results.json`` (everything returned) and ``results.csv`` (the table
    rows). ``records_out`` writes the per-row predictions as JSONL. Both are checked (writable, not the wrong
    kind of thing) before any work, so the metrics are never lost to a bad path.

    ``data_url`` may list several shard sets: they are scored together and each apart (``sets``: per set name, as
    the run's ``data.val`` names it or else derived from its path, its metrics).
    """

    model_uri, cfg, label_set = checkpoint_config(checkpoint, overrides, choice)  # configures storage first
    urls = [data_url] if isinstance(data_url, str) else list(data_url)
    for url in urls:
        storage.check_access(url)  # with the --set storage.endpoint_url it may give
        expand_shard_urls(url)
    if len({storage.is_s3(u) for u in urls}) > 1:  # one index reads them all (SampleIndex.concat)
        raise ValueError(f"--data: the sets are on different storage ({', '.join(urls)}): all local or all s3://")
    names = eval_set_names(urls, cfg) if len(urls) > 1 else []
    data_url = urls[0]
    if records_out:
        storage.check_output(records_out, "file")
    if out:
        storage.check_output(out, "dir")
    manifest = find_manifest(data_url) or {}
    source = source or str(manifest.get("source") or "")
    total = manifest.get("num_samples") if len(urls) == 1 else None
    with console.quiet_libraries() as logs:
        if not ray.is_initialized():
            console.say(f"starting Ray ({os.environ.get('RAY_ADDRESS') or 'a local instance'})...")
        started = ensure_ray(num_cpus)
        # Ray's C++ core worker prints its errors on fd 2 (ray#53727's note at every actor pool): into the log
        with console.native_stderr_to(console.attach_session_log(logs)):
            try:
                ray.data.DataContext.get_current().enable_progress_bars = False
                counter, name = make_skip_counter()
                index = sets = None
                if names:  # one pipeline over the sets, one after the other; each row's set by its position
                    indexes = [sample_index(u) for u in urls]
                    for i in indexes:
                        count_bad_shards(i, name)
                    index = SampleIndex.concat(indexes)
                    sets = [[n, int(s)] for n, s in zip(names, np.cumsum([0] + [len(i) for i in indexes[:-1]]))]
                ds = decoded_dataset(data_url, cfg.data, train=False, counter_name=name, label_set=label_set,
                                     index=index)
                use_gpu = ray.cluster_resources().get("GPU", 0) >= num_actors
                preds = ds.map_batches(
                    Predictor,
                    fn_constructor_kwargs={"model_uri": model_uri, "storage_settings": storage.settings(),
                                           "data_cfg": dataclasses.asdict(cfg.data),
                                           "precision": cfg.train.precision, "label_set": label_set,
                                           "beam_size": beam_size, "qtypes": manifest_qtypes(manifest),
                                           "sets": sets},
                    batch_size=batch_size, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=num_actors),
                    num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                )
                records = []
                console.say(f"scoring {total if total is not None else 'the'} clips of {', '.join(urls)} with "
                            f"{num_actors} model replica(s) on {'GPU' if use_gpu else 'CPU'} "
                            f"(each loads {model_uri})...")
                bar = console.Progress("evaluating", total, "clips")
                for b in preds.iter_batches(batch_size=256, batch_format="numpy"):
                    records += [_record(b, i) for i in range(len(b["key"]))]
                    bar.update(samples_seen(read_skips(counter)))
                bar.close()
                ray.get(counter.snapshot.remote())
                skips = read_skips(counter)
            finally:
                if started:
                    ray.shutdown()
    if truncation_warning(skips["truncation"], cfg.data.tokenizer):  # the scores are of cut references
        console.say(truncation_warning(skips["truncation"], cfg.data.tokenizer))
    console.say(f"scored {len(records)} rows (questions, captions, labels) of {skips['decoded']} decoded clips")
    looks = None
    if cfg.data.eval_windows or cfg.data.eval_views > 1:  # several looks at each clip: one answer per text
        records, one_view, looks = merge_view_records(records, label_set)
        looks["mode"] = "windows" if cfg.data.eval_windows else f"{cfg.data.eval_views} views"
        if one_view and not cfg.data.eval_windows:
            looks["one_view"] = {"metrics": aggregate(one_view),
                                 "benchmark": benchmark_results(one_view, source, normalize)}
        console.say(f"merged {looks['min']}-{looks['max']} looks per clip ({looks['mode']}) into {len(records)} "
                    "answers")
    else:
        records = [{k: v for k, v in r.items() if k not in VIEW_FIELDS} for r in records]
    if records_out:
        storage.write_text(records_out, "".join(json.dumps(r) + "\n" for r in records))
    meta = read_meta(model_uri)
    results = benchmark_results(records, source, normalize)
    model = model_name(model_uri, meta)
    score = meta.get("score") or {}  # the run's checkpoint scoring, and this checkpoint's value (None: unscored)
    res = {"checkpoint": model_uri, "model": model, "step": meta.get("step"),
           "checkpoint_score": {**score, "value": metric_value(meta.get("metrics") or {}, score["metric"])}
           if score else None,
           "data": data_url if len(urls) == 1 else urls, "rows": len(records),
           "benchmark": results, "table": table_rows(results, model), "metrics": aggregate(records),
           "cls_mode": cfg.model.cls_mode, "skipped": skips["skipped"], "truncation": skips["truncation"]}
    if looks is not None:
        res["looks"] = looks
    if names:  # each set apart, beside the whole
        res["sets"] = {n: aggregate(r for r in records if r["set"] == n) for n in names}
    if out:
        write_results(res, out)
    return res


def eval_set_names(urls: list[str], cfg: Config) -> list[str]:
    """What ``mirasol eval`` calls each of several ``--data`` sets: the name the run's ``data.val`` (or
    ``data.train``) gives that path, else one derived from the path (:func:`~mirasol_ray.config.set_name`)."""
    known = {s.path: s.name for s in cfg.data.train_sets + cfg.data.val_sets}
    names = [known.get(u) or set_name(u) for u in urls]
    for n in names:
        if names.count(n) > 1:
            raise ValueError(f"--data: two sets are called {n!r} ({', '.join(u for u, m in zip(urls, names) if m == n)})"
                             ": give sets in folders of different names")
    return names


def model_name(model_uri: str, meta: dict[str, Any]) -> str:
    """How the results table names a checkpoint: its run's name (else its folder) and step."""
    name = ((meta.get("run_config") or {}).get("storage") or {}).get("name") or ""
    if not name:
        parent = posixpath.dirname(posixpath.dirname(model_uri.rstrip("/")))
        name = posixpath.basename(parent) or posixpath.basename(posixpath.dirname(model_uri))
    step = meta.get("step")
    return f"{name} (step {step})" if step is not None else name


def write_results(res: dict[str, Any], out: str) -> None:
    """``results.json`` (all of ``res``) and ``results.csv`` (its table rows) in the folder ``out``."""
    storage.write_text(storage.join(out, "results.json"), json.dumps(res, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in res["table"]:
        w.writerow({k: ("" if row[k] is None else round(row[k], 4) if isinstance(row[k], float) else row[k])
                    for k in CSV_COLUMNS})
    storage.write_text(storage.join(out, "results.csv"), buf.getvalue())


def format_table(res: dict[str, Any]) -> str:
    """The results as the paper lays them out, our figure beside the paper's, both in percent (as ``mirasol
    results`` and the training summary show scores); the per-type breakdown under it."""
    rows = res["table"]
    head = ("Task", "Dataset", "Model", "Metric name", "Metric value (%)", "Paper (%)", "n")
    cells = [head] + [(r["task"], r["dataset"], r["model"], r["metric"], _fmt(r["value"]),
                       "" if r["paper"] is None else f"{r['paper']:.2f}", str(r["count"])) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    n_main = len(res["benchmark"]["metrics"])
    lines.insert(1, "-" * len(lines[0]))
    if len(rows) > n_main:
        lines.insert(2 + n_main, "  per type:")
    for name, metrics in (res.get("sets") or {}).items():  # several --data sets: each apart
        lines.append(f"  {name}: " + ", ".join(f"{k} {_fmt(100 * v['value'])}% (n={v['count']})"
                                              for k, v in metrics.items()))
    looks = res.get("looks")
    if looks:  # several looks at each clip, merged: say how, and the one-view figure beside
        lines.append(f"  {looks['mode']}: {looks['min']}-{looks['max']} looks per clip, scores averaged")
        if "one_view" in looks:
            lines.append("  one view (the centred clip): " + ", ".join(
                f"{k} {_fmt(100 * v['value'])}% (n={v['count']})" for k, v in looks["one_view"]["metrics"].items()))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def predict(checkpoint: str, video: str, question: str = "", options: list[str] | None = None,
            overrides: list[str] | None = None, windows: bool = False, views: int = 1) -> dict[str, Any]:
    """Answer (or caption, or pick an option) for one video file; no Ray. ``windows``/``views``: several looks at
    the video, answers merged (:mod:`mirasol_ray.train.views`)."""

    if os.path.isdir(video):
        raise IsADirectoryError(f"{video} is a folder, not a video file")
    if not os.path.isfile(video):
        raise FileNotFoundError(f"video not found: {video}")
    model_uri, cfg, label_set = checkpoint_config(checkpoint, overrides)
    ext = os.path.splitext(video)[1].lstrip(".").lower() or "mp4"
    meta: dict[str, Any] = {}
    if options:
        meta.update({"mc_question": question, "options": options, "answer_idx": 0})
        task = "mcqa"
    elif question:
        meta.update({"question": question, "answer": "?"})
        task = "qa"
    else:
        meta["caption"] = "?"
        task = "caption"
    data_cfg: DataConfig = dataclasses.replace(cfg.data, task=task, eval_windows=windows or cfg.data.eval_windows,
                                               eval_views=views if views > 1 else cfg.data.eval_views)
    with open(video, "rb") as f:
        sample = {"__key__": os.path.basename(video).split(".")[0], ext: f.read(), "json": json.dumps(meta).encode()}
    try:
        rows = decode_sample(sample, data_cfg, train=False, rng=np.random.default_rng(0))
    except DecodeError as e:
        raise ValueError(f"cannot decode {video}: {e}") from None
    model = load_model_from(model_uri)
    tok = get_tokenizer(data_cfg.tokenizer)
    looks = [r for r in rows if not r["key"].endswith(f"{VIEW_MARK}-")]  # the centred extra look: eval's only
    if len(looks) == 1:
        rec = predict_batch(model, to_torch(stack_rows(looks, data_cfg)), tok, torch.device("cpu"), "fp32",
                            label_set=label_set)[0]
        return {"video": video, "task": task, "question": question, "options": options or [], "answer": rec["pred"]}
    rec = predict_views(model, to_torch(stack_rows(looks, data_cfg)), tok, torch.device("cpu"), label_set)
    return {"video": video, "task": task, "question": question, "options": options or [], "answer": rec["pred"],
            "looks": rec["views"], "merged_by": "mean score" if rec.get("scores") else "mean log-likelihood",
            **({"candidates": rec["candidates"]} if "candidates" in rec else {})}
