"""``mirasol demo``: the main job on the embedded default (local Ray, local storage, generated data).

Synthesises a dataset of real MP4 clips, pretrains (captions + latent prediction), fine-tunes (open-ended QA,
multiple choice, classification, with the captions kept in the mix) from the pretrain checkpoint, evaluates on
held-out clips with the Ray Data batch-inference path of ``mirasol eval``, and writes under ``--out``::

    data/            shards (train/, val/) + manifest.json
    runs/pretrain/   runs/finetune/   Ray Train runs: checkpoints, metrics.jsonl, TensorBoard, plots
    summary.json     per task: metric, value, chance level
    results.png      each task's value beside its chance level
    learning_curve_pretrain.png  learning_curve_finetune.png
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import ray

from mirasol_ray import storage
from mirasol_ray.data.synthetic import synthesize
from mirasol_ray.launch.evaluate import evaluate
from mirasol_ray.launch.plots import plot_curves, plt
from mirasol_ray.launch.results import read_metrics
from mirasol_ray.launch.train import ensure_ray, run_training
from mirasol_ray.train.prepare import load_prepared

TASK_ORDER = ("qa/video", "qa/audio", "qa/av_aligned", "qa/temporal", "mcqa", "cls", "caption",
              "caption/segment")


def results_plot(rows: list[dict[str, Any]], png: str, title: str = "mirasol demo: held-out clips",
                 series: dict[str, list[float]] | None = None) -> str:
    """Bars per task: each of ``series`` (label -> one value per row; default the rows' ``value`` as the
    fine-tuned model's) and the rows' chance level in grey."""

    series = series or {"fine-tuned model": [r["value"] for r in rows]}
    groups = [*series.items(), ("chance", [r["chance"] or 0 for r in rows])]
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    xs = range(len(rows))
    for g, (label, values) in enumerate(groups):
        offset = (g - (len(groups) - 1) / 2) * width
        ax.bar([x + offset for x in xs], values, width=width, label=label,
               **({"color": "grey"} if label == "chance" else {}))
    ax.set_xticks(list(xs), [r["task"] for r in rows], rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (caption: token F1)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def print_table(rows: list[dict[str, Any]]) -> None:
    """Scores in percent, the scale of ``mirasol eval`` and ``mirasol results``."""
    print(f"\n{'task':<16}{'metric':<11}{'value (%)':>10}{'chance (%)':>11}{'x chance':>10}{'n':>6}")
    for r in rows:
        ratio = f"{r['value'] / r['chance']:.2f}" if r["chance"] else "-"
        chance = f"{100 * r['chance']:.1f}" if r["chance"] is not None else "-"
        print(f"{r['task']:<16}{r['metric']:<11}{100 * r['value']:>10.2f}{chance:>11}{ratio:>10}{r['count']:>6}")


FINETUNE_PER_PRETRAIN_STEP = 6.5
"""The demo fine-tunes for this many times its pretraining steps (200 + 1,300 with the ``demo`` preset): with 5x
(1,000), one run of three missed 0.9 on the shape questions; with 6.5x all three pass (docs/HISTORY.md, "The
demo", point 11)."""


def run_demo(out: str, *, num_clips: int = 960, pretrain_steps: int | None = None,
             finetune_steps: int | None = None, config: str = "demo", overrides: list[str] | None = None,
             num_cpus: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The demo from ``out`` (reused when it holds the same clips). ``seed`` draws the clips (``shards synth``'s
    seed), the initial weights (``train.seed``) and the order and frame positions (``data.seed``): another seed
    is another run from scratch on other data."""

    if storage.is_remote(out):
        raise ValueError("mirasol demo writes to a local folder (--out DIR)")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    data = os.path.join(out, "data")
    print(f"[1/4] synthesising {num_clips} clips (seed {seed}) into {data}", flush=True)
    if os.path.exists(os.path.join(data, "manifest.json")):
        manifest = json.loads(storage.read_text(os.path.join(data, "manifest.json")))
        if (manifest.get("num_samples") != num_clips or "tokenizer" not in manifest
                or manifest.get("seed", 0) != seed):
            shutil.rmtree(data)
    if not os.path.exists(os.path.join(data, "manifest.json")):
        if os.path.isdir(os.path.join(out, "runs")):  # trained on other clips: they would resume, not start
            print(f"      removing {out}/runs: its runs were trained on other clips", flush=True)
            shutil.rmtree(os.path.join(out, "runs"))
        synthesize(data, num_clips, seed=seed, shard_size=16, val_fraction=0.1)
    manifest = json.loads(storage.read_text(os.path.join(data, "manifest.json")))
    chance = manifest.get("splits", {}).get("val", {}).get("chance") or manifest.get("chance", {})

    started = ensure_ray(num_cpus, dashboard=True)
    try:
        common = [f"data.train={data}/train", f"data.val={data}/val", f"storage.root={out}/runs",
                  f"data.tokenizer={data}/{manifest['tokenizer']}", f"train.seed={seed}", f"data.seed={seed}",
                  *(overrides or [])]
        pre = load_prepared(config, common + ["train.stage=pretrain", "data.task=caption", "storage.name=pretrain"]
                            + ([f"train.steps={pretrain_steps}"] if pretrain_steps else []))
        print(f"[2/4] pretraining ({pre.train.steps} steps: captions + latent prediction)", flush=True)
        pre_summary = run_training(pre, config)
        # Fine-tuning keeps the captions in the mix: they say what each snippet shows and sounds like, in order,
        # which teaches the per-snippet questions far faster than their own one answer per clip does
        # (docs/HISTORY.md, "The demo"), and the model still captions afterwards.
        # The demo's held-out clips are also its validation split, so it takes each run's last checkpoint, never
        # one picked by its score on them: the figures stay held out.
        pre_last = pre_summary["checkpoint"]  # the newest (summary.json: "checkpoint" last, "best_checkpoint")
        ft = load_prepared(config, common + ["train.stage=finetune", "data.task=all", "storage.name=finetune",
                                             f"train.init_from={pre_last}"]
                           + [f"train.steps={finetune_steps or round(FINETUNE_PER_PRETRAIN_STEP * pre.train.steps)}"])
        print(f"[3/4] fine-tuning ({ft.train.steps} steps: QA, multiple choice, classification, with captions)",
              flush=True)
        ft_summary = run_training(ft, config)
        print("[4/4] evaluating on held-out clips (Ray Data batch inference)", flush=True)
        ev = evaluate(f"{out}/runs/finetune", f"{data}/val", overrides=["data.task=all"],
                      records_out=os.path.join(out, "predictions.jsonl"), choice="last")
    finally:
        if started:
            ray.shutdown()

    rows = []
    for task in TASK_ORDER:
        if task in ev["metrics"]:
            m = ev["metrics"][task]
            rows.append({"task": task, "metric": m["metric"], "value": round(m["value"], 4), "count": m["count"],
                         "chance": chance.get(task)})
    for name in ("pretrain", "finetune"):
        plot_curves(read_metrics(os.path.join(out, "runs", name)), os.path.join(out, f"learning_curve_{name}.png"),
                    title=name)
    results_plot(rows, os.path.join(out, "results.png"))
    summary = {
        "tasks": {r["task"]: {k: r[k] for k in ("metric", "value", "chance", "count")} for r in rows},
        "pretrain": pre_summary, "finetune": ft_summary,
        "eval": {k: v for k, v in ev.items() if k != "metrics"},
        "num_clips": num_clips, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
    }
    storage.write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    print_table(rows)
    print(f"\nwrote {out}/summary.json, results.png, learning curves; {summary['seconds']:.0f} s in all")
    return summary

