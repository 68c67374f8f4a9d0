"""Evaluation at length (issue 33): a 30 s real MP4, longer than the preset's 8 s span, scored by ``mirasol eval``
in consecutive windows (as many as the rule says, answers merged by averaging their scores) and in K views with the
one-view figure beside, and answered by ``mirasol predict`` the same ways. The checkpoint is written directly (an
untrained ``tiny``): no Ray Train run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mirasol_ray.config import load_config
from mirasol_ray.data.encode import encode_av

SECONDS, FPS, SPAN = 30, 8, 8.0


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """A 30 s video whose colour and tone change every 10 s, built into shards with a multiple-choice question and
    a class label; and an untrained tiny checkpoint over an 8 s span (``data.clip_seconds``)."""
    from mirasol_ray.cli import main
    from mirasol_ray.model.mirasol import build_model
    from mirasol_ray.train.checkpoint import write_checkpoint

    root = tmp_path_factory.mktemp("at_length")
    n = SECONDS * FPS
    frames = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):
        frames[i, ..., (i // (10 * FPS)) % 3] = 220
    sr = 16000
    t = np.arange(SECONDS * sr) / sr
    audio = (0.4 * np.sin(2 * np.pi * (300 + 200 * np.floor(t / 10)) * t)).astype(np.float32)
    videos = root / "videos"
    videos.mkdir()
    (videos / "long.mp4").write_bytes(encode_av(frames, FPS, audio, sr, gop=FPS))
    meta = {"video": "long.mp4", "mc_question": "which colour came last?", "options": ["red", "green", "blue"],
            "answer_idx": 2, "label": "blue"}
    ann = root / "ann.jsonl"
    ann.write_text(json.dumps(meta) + "\n")
    shards = root / "shards"
    assert main(["shards", "build", "--format", "jsonl", "--annotations", str(ann), "--videos", str(videos),
                 "--quiet", "--out", str(shards)]) == 0
    cfg = load_config("tiny", [f"data.clip_seconds={SPAN}", "data.task=finetune", "model.cls_mode=score",
                               "data.decode_cpus=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ckpt = root / "checkpoint_000000"
    write_checkpoint(str(ckpt), model, model.state_dict(), step=0, run_config=cfg.to_dict(), label_set=["blue"])
    return {"root": root, "shards": shards, "ckpt": ckpt, "video": videos / "long.mp4", "cfg": cfg}


def _eval(long_clip, capsys, *flags):
    from mirasol_ray.cli import main

    records = long_clip["root"] / f"records{'_'.join(flags)}.jsonl"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(long_clip["ckpt"]), "--data", str(long_clip["shards"]),
                 "--batch-size", "3", "--json", "--records", str(records), *flags]) == 0
    res = json.loads(capsys.readouterr().out)
    return res, [json.loads(line) for line in records.read_text().splitlines()]


def _direct_scores(long_clip, **looks):
    """Per-look scores of the multiple-choice question, decoded and scored without Ray."""
    import dataclasses

    from mirasol_ray.data.pipeline import stack_rows, to_torch
    from mirasol_ray.data.rows import decode_sample
    from mirasol_ray.data.text import get_tokenizer
    from mirasol_ray.train.checkpoint import load_model_from
    from mirasol_ray.train.step import predict_batch

    cfg = dataclasses.replace(long_clip["cfg"].data, task="mcqa", **looks)
    meta = {"mc_question": "which colour came last?", "options": ["red", "green", "blue"], "answer_idx": 2}
    sample = {"__key__": "long", "mp4": long_clip["video"].read_bytes(), "json": json.dumps(meta).encode()}
    rows = [r for r in decode_sample(sample, cfg, train=False, rng=np.random.default_rng(0))
            if not r["key"].endswith("@view-")]
    model = load_model_from(str(long_clip["ckpt"] / "model.pt"))
    recs = predict_batch(model, to_torch(stack_rows(rows, cfg)), get_tokenizer(cfg.tokenizer), torch.device("cpu"),
                         "fp32", with_scores=True)
    return np.array([r["scores"] for r in recs])


def test_eval_scores_a_long_video_in_windows_and_merges_by_the_mean_score(long_clip, ray_local, capsys):
    res, records = _eval(long_clip, capsys, "--windows")
    windows = math.ceil(SECONDS / SPAN)  # the rule: consecutive windows of the span, the last padded
    assert res["looks"]["mode"] == "windows" and res["looks"]["min"] == res["looks"]["max"] == windows == 4
    assert sorted(r["task"] for r in records) == ["cls", "mcqa"] and all(r["views"] == windows for r in records)
    mc = next(r for r in records if r["task"] == "mcqa")
    direct = _direct_scores(long_clip, eval_windows=True)  # [windows, options]
    assert direct.shape == (windows, 3)
    np.testing.assert_allclose(mc["scores"], direct.mean(0), atol=1e-4)  # the mean of the windows' scores
    assert mc["pred"] == ["red", "green", "blue"][int(np.argmax(mc["scores"]))]
    assert mc["correct"] == (mc["pred"] == "blue")
    assert "one_view" not in res["looks"]


def test_eval_with_3_views_reports_the_one_view_figure_beside(long_clip, ray_local, capsys):
    res, records = _eval(long_clip, capsys, "--views", "3")
    assert res["looks"]["min"] == res["looks"]["max"] == 3 and all(r["views"] == 3 for r in records)
    assert res["looks"]["one_view"]["metrics"]["mcqa"]["count"] == 1
    direct = _direct_scores(long_clip, eval_views=3)
    single = _direct_scores(long_clip)  # the one-view evaluation: the centred span, which is view 1 of 3
    np.testing.assert_allclose(direct[1], single[0], atol=1e-5)
    mc = next(r for r in records if r["task"] == "mcqa")
    np.testing.assert_allclose(mc["scores"], direct.mean(0), atol=1e-4)


def test_predict_answers_a_long_video_over_its_windows(long_clip, capsys):
    from mirasol_ray.cli import main

    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(long_clip["ckpt"]), str(long_clip["video"]), "--question",
                 "what colour came last?", "--windows", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["looks"] == 4 and out["merged_by"] == "mean log-likelihood"
    assert out["answer"] == max(out["candidates"], key=out["candidates"].get)  # best mean over the windows
    assert main(["predict", "--checkpoint", str(long_clip["ckpt"]), str(long_clip["video"]), "--question",
                 "which colour came last?", "--options", "red", "green", "blue", "--views", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["looks"] == 2 and out["merged_by"] == "mean score" and out["answer"] in ("red", "green", "blue")
