"""``mirasol bench learn``: the demo's recipe in plain torch, end to end on a handful of synthesised clips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mirasol_ray.cli import main

TASKS = ("qa/video", "qa/audio", "qa/av_aligned", "qa/temporal", "mcqa", "cls", "caption")


def _bench_learn(capsys, *argv: str) -> tuple[int, str]:
    """``mirasol bench learn ARGV`` through the command's own ``main`` in this process (a process costs a torch
    import; the recipe's run is one, the probes' are not): its exit status and stdout. The tool's ``--threads`` is
    put back afterwards."""
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", "learn", *argv])
    finally:
        torch.set_num_threads(threads)
    return rc, capsys.readouterr().out


def test_bench_learn_runs_the_recipe_and_scores_every_task_and_kind(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "learn.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "bench", "learn", "--data", str(data), "--clips", "10",
         "--pretrain-steps", "2", "--finetune-steps", "6", "--eval-every", "3", "--set", "train.batch_size=3",
         "--set", "train.freeze_av_steps=4", "--set", "train.warmup_steps=1", "--json-out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert (data / "manifest.json").exists(), "an empty --data folder gets the demo's synthetic clips"
    res = json.loads(out.read_text())
    assert (res["train_clips"], res["val_clips"]) == (9, 1)
    assert [len(res["pretrain_log"]), len(res["finetune_log"])] == [2, 6]
    assert [h["step"] for h in res["history"]] == [3, 6]
    # pretraining sees the captions alone (its rows' other texts are masked out), fine-tuning every text
    final = res["final"]
    for split, clips in (("val", 1), ("train", 9)):
        for task in TASKS:
            assert final[split][task]["count"] == clips, (split, task)
            assert 0.0 <= final[split][task]["value"] <= 1.0
        # the colour/shape (tone/shape) split covers each question once
        for task in ("qa/video", "qa/av_aligned", "qa/temporal"):
            kinds = [k for k in final[split] if k.startswith(task + ":")]
            assert kinds and sum(final[split][k]["count"] for k in kinds) == clips, (split, task, kinds)
    assert res["finetune_log"][-1]["text"] < res["finetune_log"][0]["text"], "6 steps on 9 clips lower the loss"
    for row in ("qa/video:", "qa/temporal", "caption", "held-out", "train"):
        assert row in proc.stdout, row

    # the encoder probe, read through the model's own Combiner, on the same clips
    probe = tmp_path / "probe.json"
    rc, _ = _bench_learn(capsys, "--data", str(data), "--probe-encoder", "2", "--probe-read", "combiner",
                         "--set", "model.video_stem=conv", "--set", "train.batch_size=3", "--json-out", str(probe))
    assert rc == 0
    res = json.loads(probe.read_text())
    assert res["probe_read"] == "combiner" and res["overrides"] == ["model.video_stem=conv", "train.batch_size=3"]
    final = res["probe_encoder"]["final"]
    assert final["step"] == 2 and all(0.0 <= final[s][k] <= 1.0 for s in ("val", "train") for k in ("colour", "shape"))

    # the answer probe: the audio path trained directly on one question type's answers, on the same clips
    probe = tmp_path / "answers.json"
    rc, _ = _bench_learn(capsys, "--data", str(data), "--probe-answers", "audio", "--probe-steps", "2",
                         "--set", "train.batch_size=3", "--json-out", str(probe))
    assert rc == 0
    res = json.loads(probe.read_text())["probe_answers"]
    assert res["qtype"] == "audio" and len(res["classes"]) >= 2 and 0.0 < res["val_majority"] <= 1.0
    assert res["final"]["step"] == 2 and all(0.0 <= res["final"][s] <= 1.0 for s in ("val", "train"))
    # the audio encoder trained alone first, then frozen under the Combiner: both stages run and are reported
    probe = tmp_path / "answers_first.json"
    rc, out = _bench_learn(capsys, "--data", str(data), "--probe-answers", "audio", "--probe-read", "combiner",
                           "--probe-audio-first", "2", "--probe-steps", "1", "--set", "train.batch_size=3",
                           "--json-out", str(probe))
    assert rc == 0
    res = json.loads(probe.read_text())["probe_answers"]
    assert [h["step"] for h in res["audio_first"]] == [1, 2] and res["final"]["step"] == 1
    assert "audio encoder frozen" in out and "audio encoder alone" in out
    # a question type these clips do not ask: the command ends with one line that names it (a non-zero exit)
    with pytest.raises(SystemExit, match="--probe-answers number") as e:
        _bench_learn(capsys, "--data", str(data), "--probe-answers", "number", "--probe-steps", "2")
    assert len(str(e.value.code).splitlines()) == 1
