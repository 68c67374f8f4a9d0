"""``mirasol bench recipe``: the README's "Your own data" commands, each a ``mirasol`` process with its own local
Ray, end to end on a handful of bars-and-beeps clips and a few steps (a behaviour test: no accuracy asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.recipe import README_COMMANDS
from mirasol_ray.config import load_config

TYPES = ("qa/number", "qa/motion", "qa/av_aligned", "qa/yes_no")


def test_bench_recipe_runs_the_readme_commands_and_reports_per_type(tmp_path):
    out = tmp_path / "recipe"
    proc = subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "bench", "recipe", "--out", str(out), "--train-clips", "8",
         "--val-clips", "4", "--test-clips", "0", "--set", "train.steps=3", "--json"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res == json.loads((out / "recipe.json").read_text())
    assert (out / "recipe.png").stat().st_size > 0
    # the README's commands ran in --out as written, the departure said as one
    for line in README_COMMANDS:
        assert any(c == line or c.startswith(line + " --") for c in res["commands"]), line
    assert res["departures"] == {"both": ["train.steps=3"], "finetune": []}
    log = (out / "recipe.log").read_text()
    assert log.count("# exit 0,") == len(res["commands"])
    assert (out / "data/mine/train/tokenizer.json").exists() and (out / "runs/mine-ft/summary.json").exists()
    # fine-tuned from the pretraining run, scored per question type on training clips and held-out ones
    assert res["finetune"]["steps"] == 3 and res["pretrain"]["steps"] == 3
    assert res["evaluated"]["eval val"]["rows"] == 4 * 5 and res["evaluated"]["eval val"]["step"] == 3  # caption + 4 qs
    for key in TYPES:
        row = res["tasks"][key]
        assert 0.0 <= row["val"] <= 1.0 and 0.0 <= row["train_clips"] <= 1.0, key
        assert 0.0 < row["chance"] < 1.0 and row["test"] is None, key
        assert row["gap"] == round(row["train_clips"] - row["val"], 4), key
        assert sum(row["predicted"].values()) == 4, "each held-out answer counted, from eval's --records"
    assert res["clips"] == {"train": 8, "val": 4}
    assert not any(v["cut"] for v in res["finetune"]["truncation"].values()), "no text is cut"
    assert set(res["seconds"]) >= {"generate", "build train", "pretrain", "fine-tune", "eval val", "all"}
    assert "qa/other" not in res["finetune"]["val"], "every question type is one the metrics know"
    # 3 steps with the preset's freeze_av_steps: fine-tuning says the audio-video path never trains
    held = load_config("demo").train.freeze_av_steps
    assert f"train.freeze_av_steps={held} >= train.steps=3: the audio-video path is held still" in proc.stderr
