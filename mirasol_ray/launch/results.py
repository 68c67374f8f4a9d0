"""``mirasol results URL``: a run or a sweep read back from storage (local or ``s3://``), with no Ray.

Reads only small files: a sweep's ``sweep.json`` (written by :mod:`mirasol_ray.launch.sweep`), and per run its
``config.yaml``, ``metrics.jsonl`` and each complete checkpoint's ``complete.json`` and ``meta.json``; checkpoints
stay where they are, as URIs.
Never unpickles anything (Tune's own experiment state is pickle-bearing: it is not read here).

A metric is named as Tune names a reported value: nested dicts joined with ``/`` (``val/qa``, ``val/loss``,
``loss``). The default is the run's main validation metric, :func:`main_metric`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import yaml

from mirasol_ray import storage
from mirasol_ray.config import Config, from_dict
from mirasol_ray.launch.plots import plt, png_bytes
from mirasol_ray.train.checkpoint import better, metric_value, scored_checkpoints
from mirasol_ray.train.metrics import flatten, is_score, show_value

SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
"""A sweep folder holds ``sweep.json``, Tune's experiment state and trial folders, and ``trials/<trial_id>/``: each
trial's Ray Train run (the same layout as a ``mirasol train`` run folder)."""

TASK_METRIC = {"caption": "val/caption", "qa": "val/qa", "mcqa": "val/mcqa", "cls": "val/cls",
               "finetune": "val/qa", "all": "val/qa"}
"""The main validation metric of a run by the text its data carries (``data.task``): captioning (pretraining) is
scored by token F1, the fine-tuning tasks by accuracy; mixed fine-tuning data (``finetune``, ``all``) by its
open-ended QA accuracy."""

TRAIN_METRICS = ("loss", "text", "latent", "cls", "grad_norm", "lr", "samples_per_s", "tokens_per_s",
                 "data_wait_fraction", "step_time_s")
VAL_METRICS = ("loss", "caption", "qa", "mcqa", "cls")


def read_metrics(uri: str) -> list[dict[str, Any]]:
    path = storage.join(uri, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(ln) for ln in storage.read_text(path).splitlines() if ln.strip()]


def main_metric(cfg: Config) -> str:
    """The metric a sweep optimises and ``mirasol results`` ranks by unless told otherwise: the validation metric
    of the data's task (:data:`TASK_METRIC`), or the training loss when the run has no validation data."""
    return TASK_METRIC[cfg.data.task] if cfg.data.val else "loss"


def default_mode(metric: str) -> str:
    return "min" if metric.split("/")[-1].endswith("loss") else "max"


def checkpoint_score(cfg: Config) -> dict[str, str] | None:
    """What makes a checkpoint of a run the best (Ray Train's ``CheckpointConfig`` scoring, meta.json's
    ``score``): ``train.checkpoint_metric``, else the run's :func:`main_metric` when it has validation data;
    None (checkpoints unscored: the newest are kept) otherwise."""
    metric = cfg.train.checkpoint_metric or (main_metric(cfg) if cfg.data.val else "")
    return {"metric": metric, "mode": default_mode(metric)} if metric else None


def check_metric(metric: str) -> None:
    """A name the training loop reports, or a ValueError listing them (before anything starts)."""
    if metric in TRAIN_METRICS:
        return
    for split in ("val/", "train_eval/"):
        if metric.startswith(split):
            key = metric[len(split):]
            if key in VAL_METRICS or key.startswith("qa/"):
                return
            own = key.split("/", 1)[-1]  # <set>/<metric>: a set of data.val's list scored apart
            if "/" in key and key.split("/")[0] not in VAL_METRICS and (own in VAL_METRICS or own.startswith("qa/")):
                return
    raise ValueError(f"unknown metric {metric!r}: use {', '.join('val/' + k for k in VAL_METRICS)}, val/qa/<type>, "
                     "val/<set>/... (a set of data.val's list), the same under train_eval/, or a training metric "
                     f"({', '.join(TRAIN_METRICS)})")


def train_counterpart(metric: str) -> str | None:
    """``val/qa`` -> ``train_eval/qa``: the same metric on the training clips (``train.eval_train_batches``)."""
    return "train_eval/" + metric[4:] if metric.startswith("val/") else None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_run(uri: str, metric: str, mode: str, until: int | None = None) -> dict[str, Any]:
    """One run folder: its curve of ``metric`` over steps, steps done, best and last value (and the last value of
    the same metric on training clips, ``train_last``), the complete checkpoint holding the best value
    (``checkpoint``: the newest one when no checkpoint carries the metric) and the newest complete checkpoint
    (``last_checkpoint``). ``until``: read it up to that step only (a trial ASHA stopped: its workers may train a
    few steps more before they are gone)."""

    records = [r for r in read_metrics(uri) if until is None or r.get("step", 0) <= until]
    curve = [(r["step"], v) for r in records if (v := _number(flatten(r).get(metric))) is not None]
    peak_step, peak = None, None
    for step, v in curve:  # the newest of equal values, as among checkpoints
        if peak is None or better(v, peak, mode) or v == peak:
            peak_step, peak = step, v
    twin = train_counterpart(metric)
    train_curve = [(r["step"], v) for r in records if twin and (v := _number(flatten(r).get(twin))) is not None]
    loss_curve = [(r["step"], v) for r in records if (v := _number(r.get("loss"))) is not None]
    # the same metric of each set of data.val's list (val/<set>/qa beside val/qa), at the last validation
    split, _, own = metric.partition("/")
    scored = next((r for r in reversed(records) if isinstance(r.get(split), dict)), None) if own else None
    sets = {k[:-len(own) - 1]: v for k, v in (scored or {}).get(split, {}).items()
            if k.endswith("/" + own) and k.count("/") == own.count("/") + 1 and k.split("/")[0] not in VAL_METRICS
            and _number(v) is not None}
    _, found = scored_checkpoints(uri)
    # up to the stop when one is still there (Ray Train keeps the best few and the latest: later ones may have won)
    checkpoints = [c for c in found if until is None or c["step"] <= until] or found
    pick = None
    for c in checkpoints:  # newest first: the newest of equal values wins
        v = metric_value(c["metrics"], metric)
        if v is not None and (pick is None or better(v, pick[1], mode)):
            pick = (c, v)
    chosen = pick[0] if pick else (checkpoints[0] if checkpoints else None)
    last = checkpoints[0] if checkpoints else None
    # one truth: the best is the best-scoring evaluation that has a checkpoint (what mirasol eval loads from the run
    # folder); the curve's own extreme (``peak``) is the best only when no kept checkpoint carries the metric
    best, best_step = (pick[1], pick[0]["step"]) if pick else (peak, peak_step)
    return {
        "steps": max([r.get("step", 0) for r in records], default=0),
        "best": best, "best_step": best_step, "peak": peak, "peak_step": peak_step,
        "last": curve[-1][1] if curve else None,
        "train_last": train_curve[-1][1] if train_curve else None,
        "checkpoint": chosen["uri"] if chosen else None, "checkpoint_step": chosen["step"] if chosen else None,
        "checkpoint_value": pick[1] if pick else None,
        "last_checkpoint": last["uri"] if last else None, "last_checkpoint_step": last["step"] if last else None,
        "curve": curve, "train_curve": train_curve, "loss_curve": loss_curve, "run": uri, "sets": sets,
    }


def _run_config(uri: str) -> Config | None:
    path = storage.join(uri, "config.yaml")
    if not storage.exists(path):
        return None
    return from_dict(yaml.safe_load(storage.read_text(path)))


def read_results(url: str, metric: str = "", mode: str = "") -> dict[str, Any]:
    """A sweep folder (it has ``sweep.json``) or a single run folder (``metrics.jsonl``/``config.yaml``), local or
    ``s3://``, as one dict: trials best first, the best trial, the command that evaluates its checkpoint."""
    if not storage.is_remote(url) and not url.startswith("file://"):
        url = os.path.abspath(url)
    storage.check_access(url)
    storage.fsspec_fs(url).invalidate_cache()  # a long-lived process sees files written since
    sweep_path = storage.join(url, SWEEP_FILE)
    if storage.exists(sweep_path):
        sweep = json.loads(storage.read_text(sweep_path))
        metric = metric or sweep["metric"]
        mode = mode or (sweep["mode"] if metric == sweep["metric"] else default_mode(metric))
        trials = []
        for tid, t in sweep.get("trials", {}).items():
            until = t.get("steps") if t.get("status") == "stopped" else None
            run = read_run(storage.join(url, TRIALS_DIR, tid), metric, mode, until)
            trials.append({"trial_id": tid, "config": t.get("config", {}), "status": t.get("status", "unknown"),
                           **run})
        kind, name, space = "sweep", sweep.get("name", ""), sweep.get("space", {})
        max_steps = sweep.get("max_steps")
    elif storage.exists(storage.join(url, "config.yaml")) or storage.exists(
            storage.join(url, "metrics.jsonl")):
        cfg = _run_config(url)
        metric = metric or ((cfg.train.checkpoint_metric or main_metric(cfg)) if cfg else "loss")
        mode = mode or default_mode(metric)
        run = read_run(url, metric, mode)
        max_steps = cfg.train.steps if cfg else None
        finished = run["steps"] >= max_steps if max_steps else storage.exists(
            storage.join(url, "summary.json"))
        name = url.rstrip("/").rsplit("/", 1)[-1]
        trials = [{"trial_id": name, "config": {}, "status": "finished" if finished else "incomplete", **run}]
        kind, space = "run", {}
    else:
        raise FileNotFoundError(f"no sweep ({SWEEP_FILE}) or run (config.yaml, metrics.jsonl) at {url}")

    sign = -1.0 if mode == "max" else 1.0
    trials.sort(key=lambda t: (t["best"] is None, sign * (t["best"] or 0.0), t["trial_id"]))
    best = trials[0] if trials and trials[0]["best"] is not None else None
    command = None
    if best and best["checkpoint"]:
        cfg = _run_config(best["run"])
        sets = (cfg.data.val_sets or cfg.data.train_sets) if cfg else []
        data = " --data ".join(s.path for s in sets) or "SHARDS"  # several sets: scored together and each apart
        command = f"mirasol eval --checkpoint {best['checkpoint']} --data {data}"
        if cfg and cfg.storage.endpoint_url:  # the run's own S3 endpoint, which the environment may not give
            command += f" --set storage.endpoint_url={cfg.storage.endpoint_url}"
    return {
        "kind": kind, "url": url, "name": name, "metric": metric, "mode": mode, "space": space,
        "max_steps": max_steps,
        "trials": trials,
        "best": {"trial_id": best["trial_id"], "metric": metric, "value": best["best"], "step": best["best_step"],
                 "checkpoint": best["checkpoint"]} if best else None,
        "eval_command": command,
    }


# ----------------------------------------------------------------------------------------------------------------
# Showing


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _cell(metric: str, v: float | None) -> str:
    """A value of ``metric`` in a table whose header carries the unit (:func:`_label`): scores in percent."""
    if v is None:
        return "-"
    return f"{100 * v:.2f}" if is_score(metric) else _fmt(v)


def _label(metric: str) -> str:
    return f"{metric} (%)" if is_score(metric) else metric


def format_table(res: dict[str, Any], checkpoints: bool = True) -> str:
    """The trials in the given order: id, swept values, status, steps, best and last metric (and the last value of
    the same metric on training clips, when the runs scored them), checkpoint URI (the best)."""
    keys = list(res["space"]) or sorted({k for t in res["trials"] for k in t["config"]})
    m = res["metric"]
    twin = any(t.get("train_last") is not None for t in res["trials"])
    split, _, own = m.partition("/")
    sets = sorted({n for t in res["trials"] for n in t.get("sets") or {}})  # each set of data.val's list apart
    head = (["trial", *keys, "status", "steps", f"best {_label(m)}", f"last {_label(m)}"]
            + (["last on train clips"] if twin else [])
            + [f"last {_label(f'{split}/{n}/{own}')}" for n in sets]
            + (["best checkpoint"] if checkpoints else []))
    rows = []
    for t in res["trials"]:
        steps = f"{t['steps']}/{res['max_steps']}" if res.get("max_steps") else str(t["steps"])
        rows.append([t["trial_id"], *[_fmt(t["config"].get(k, "")) for k in keys], t["status"], steps,
                     _cell(m, t["best"]), _cell(m, t["last"])]
                    + ([_cell(m, t.get("train_last"))] if twin else [])
                    + [_cell(m, (t.get("sets") or {}).get(n)) for n in sets]
                    + ([t["checkpoint"] or "-"] if checkpoints else []))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)


def write_plots(res: dict[str, Any], out: str) -> list[str]:
    """``learning_curves.png`` (the metric against step: every trial of a sweep on one plot; for a single run, the
    held-out curve beside the same metric on training clips, and the training loss in a second panel) and, for a sweep,
    ``hyperparameters.png`` (each trial's best value against each swept hyperparameter, one panel each, a log axis
    for log-uniform ones)."""

    written = []
    m, best_id = res["metric"], (res["best"] or {}).get("trial_id")
    scale = 100.0 if is_score(m) else 1.0  # scores in percent, as every table shows them
    run = res["kind"] == "run"
    fig, axes = plt.subplots(1, 2 if run else 1, figsize=(12 if run else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    for t in res["trials"]:
        if not t["curve"]:
            continue
        steps, values = zip(*t["curve"])
        label = "held-out" if run else " ".join(
            [t["trial_id"]] + [f"{k.split('.')[-1]}={_fmt(v)}" for k, v in t["config"].items()]) + f" ({t['status']})"
        ax.plot(steps, [scale * v for v in values], marker="o", markersize=3,
                lw=2.5 if t["trial_id"] == best_id and not run else 1.5,
                ls="--" if t["status"] == "stopped" else "-", label=label)
        if run and t.get("train_curve"):  # the same metric on training clips: over- or under-fitting at a glance
            steps, values = zip(*t["train_curve"])
            ax.plot(steps, [scale * v for v in values], marker="s", markersize=3, lw=1.5, ls=":",
                    label="training clips")
    ax.set_xlabel("step")
    ax.set_ylabel(_label(m))
    ax.set_title(f"{res['name']}: {m} ({'higher' if res['mode'] == 'max' else 'lower'} is better)")
    if ax.lines:  # below the axes: a legend never covers a curve
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2 if run else 1, frameon=False)
    if run:
        loss = axes[0][1]
        for t in res["trials"]:
            if t.get("loss_curve"):
                steps, values = zip(*t["loss_curve"])
                loss.plot(steps, values, lw=1)
        loss.set_xlabel("step")
        loss.set_ylabel("training loss")
        loss.set_title(f"{res['name']}: training loss")
    fig.tight_layout()
    path = storage.join(out, "learning_curves.png")
    storage.write_bytes(path, png_bytes(fig))
    plt.close(fig)
    written.append(path)

    keys = list(res["space"])
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(t["config"].get(key), t["best"], t["status"]) for t in res["trials"] if t["best"] is not None]
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in pts)
            cats = sorted({json.dumps(x) for x, _, _ in pts})  # choices that are not numbers: one column each
            for status in sorted({s for _, _, s in pts}):
                xs = [x if numeric else cats.index(json.dumps(x)) for x, _, s in pts if s == status]
                ax.scatter(xs, [scale * y for _, y, s in pts if s == status], label=status,
                           marker="x" if status == "stopped" else "o")
            if pts and numeric:
                xs = [x for x, _, _ in pts]
                if res["space"][key].get("kind") == "loguniform" or (min(xs) > 0 and max(xs) / min(xs) >= 100):
                    ax.set_xscale("log")  # log-uniform, or a grid/choice over decades
            elif pts:
                ax.set_xticks(range(len(cats)), cats, fontsize=7)
            if pts:
                ax.legend(fontsize=7)
            ax.set_xlabel(key)
            ax.set_ylabel(f"best {_label(m)}")
        fig.tight_layout()
        path = storage.join(out, "hyperparameters.png")
        storage.write_bytes(path, png_bytes(fig))
        plt.close(fig)
        written.append(path)
    return written


def results(url: str, *, out: str = "", metric: str = "", mode: str = "") -> dict[str, Any]:
    """Everything ``mirasol results`` shows; the PNGs are written only when ``out`` names a folder (nothing is
    written where nobody asked: not the current folder, not the run's own)."""
    if metric:
        check_metric(metric)
    res = read_results(url, metric, mode)
    res["plots"] = write_plots(res, out) if out else []
    return res


def to_json(res: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` object: curves left out (they are in the runs' metrics.jsonl and the PNGs)."""
    return {**res, "trials": [{k: v for k, v in t.items() if k not in ("curve", "train_curve", "loss_curve")}
                              for t in res["trials"]]}


def print_results(res: dict[str, Any]) -> None:
    done = {}
    for t in res["trials"]:
        done[t["status"]] = done.get(t["status"], 0) + 1
    what = "sweep" if res["kind"] == "sweep" else "run"
    print(f"{what} {res['name']} ({res['url']}): {len(res['trials'])} trial(s), "
          + ", ".join(f"{n} {s}" for s, n in sorted(done.items())) + f"; ranked by {res['metric']} ({res['mode']})")
    print(format_table(res))
    if res["kind"] == "run" and res["trials"]:
        t = res["trials"][0]
        if t["checkpoint"]:
            value = "" if t["checkpoint_value"] is None else \
                f", {res['metric']}={show_value(res['metric'], t['checkpoint_value'])}"
            print(f"\nbest checkpoint (step {t['checkpoint_step']}{value}): {t['checkpoint']}")
        if t["last_checkpoint"]:
            print(f"last checkpoint (step {t['last_checkpoint_step']}): {t['last_checkpoint']}")
    if res["best"]:
        b = res["best"]
        print(f"\nbest: {b['trial_id']} {b['metric']}={show_value(b['metric'], b['value'])} at step {b['step']}"
              + (" (its checkpoint: the one mirasol eval takes from the run folder)" if b["checkpoint"] else ""))
        top = res["trials"][0]
        if top.get("peak") is not None and top.get("peak_step") != b["step"] and top["peak"] != b["value"]:
            print(f"  (the curve peaked at {show_value(b['metric'], top['peak'])} at step {top['peak_step']}, "
                  "which has no kept checkpoint)")
        if res["eval_command"]:
            print(f"evaluate its checkpoint:\n  {res['eval_command']}")
    else:
        print(f"\nno trial has reported {res['metric']} yet")
    print("plots: " + (", ".join(res["plots"]) if res.get("plots") else "none written (give --out DIR)"))
