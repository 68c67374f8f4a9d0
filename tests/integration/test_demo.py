"""``mirasol demo`` (what ``make run`` runs), end to end on a few clips: synthesis, local Ray, pretraining,
fine-tuning from the pretraining checkpoint, Ray Data evaluation of held-out clips, and what it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

TASKS = ("qa/video", "qa/audio", "qa/av_aligned", "qa/temporal", "mcqa", "cls", "caption", "caption/segment")


def _demo(out: str, seed: int, pretrain: int, finetune: int, tmp: str) -> subprocess.CompletedProcess:
    """``mirasol demo`` on 20 clips (18 to train on, 2 held out), shrunk to a step or two, its Ray under ``tmp``."""
    return subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "demo", "--out", out, "--num-clips", "20", "--seed", str(seed),
         "--pretrain-steps", str(pretrain), "--finetune-steps", str(finetune), "--num-cpus", "2",
         "--set", "train.batch_size=4", "--set", "train.freeze_av_steps=1", "--set", "train.warmup_steps=1",
         "--set", "train.eval_batches=1", "--set", "data.decode_cpus=0.25"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "TMPDIR": tmp})


def test_demo_with_a_seed_runs_end_to_end(short_tmp):
    out = os.path.join(short_tmp, "demo")
    proc = _demo(out, 3, 1, 2, short_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(seed 3)" in proc.stdout

    # the seed drew the clips, the weights, the order and the frame positions
    manifest = json.loads(open(os.path.join(out, "data", "manifest.json")).read())
    assert manifest["seed"] == 3 and manifest["num_samples"] == 20
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["seed"] == 3
    for stage, steps in (("pretrain", 1), ("finetune", 2)):
        config = open(os.path.join(out, "runs", stage, "config.yaml")).read()
        assert "seed: 3" in config, stage
        assert summary[stage]["steps"] == steps
    # fine-tuning started from the pretraining run's last checkpoint
    assert summary["pretrain"]["checkpoint"] in open(os.path.join(out, "runs", "finetune", "config.yaml")).read()

    # every task of the held-out clips scored, with its chance level (captions have none); each clip has 4
    # timestamped captions, one per segment
    val_clips = manifest["splits"]["val"]["num_samples"]
    assert set(summary["tasks"]) == set(TASKS)
    for task, row in summary["tasks"].items():
        per_clip = 4 if task == "caption/segment" else 1
        assert row["count"] == per_clip * val_clips and 0.0 <= row["value"] <= 1.0, (task, row)
        assert (row["chance"] is None) == task.startswith("caption"), task
    with open(os.path.join(out, "predictions.jsonl")) as fh:
        assert len({json.loads(line)["key"].split("#")[0] for line in fh}) == val_clips
    for name in ("results.png", "learning_curve_pretrain.png", "learning_curve_finetune.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for task in TASKS:  # the table a person reads
        assert task in proc.stdout

    # the same folder with another seed: other clips, so the old runs go too (they would resume, not start over)
    again = _demo(out, 4, 1, 1, short_tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "runs were trained on other clips" in again.stdout
    assert json.loads(open(os.path.join(out, "data", "manifest.json")).read())["seed"] == 4
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["seed"] == 4 and summary["pretrain"]["steps"] == summary["finetune"]["steps"] == 1
    assert [n for n in os.listdir(os.path.join(out, "runs", "pretrain")) if n.startswith("checkpoint_0")] == \
        [os.path.basename(summary["pretrain"]["checkpoint"].rstrip("/"))]
