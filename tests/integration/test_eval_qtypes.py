"""A user's own question types: ``shards build --format jsonl`` with type names the project does not know, then
training's validation and ``mirasol eval`` scoring each under ``qa/<type>``."""

from __future__ import annotations

import json

import numpy as np

from mirasol_ray.data.encode import encode_av


def _clip(colour: int) -> bytes:
    frames = np.full((10, 32, 32, 3), colour, np.uint8)
    audio = (0.3 * np.sin(2 * np.pi * (300 + colour) * np.arange(16000) / 16000)).astype(np.float32)
    return encode_av(frames, 10, audio, 16000, gop=10)


def test_eval_scores_user_question_types(tmp_path, ray_local, capsys):
    from mirasol_ray.cli import main
    from mirasol_ray.config import load_config
    from mirasol_ray.launch.train import read_metrics, run_training

    videos = tmp_path / "videos"
    videos.mkdir()
    for name, colour in (("a", 200), ("b", 40)):
        (videos / f"{name}.mp4").write_bytes(_clip(colour))
    metas = [
        {"video": "a.mp4", "qas": [
            {"question": "how many kites?", "answer": "two", "type": "counting"},
            {"question": "what colour is the kite?", "answer": "red", "type": "colour_of_thing"},
            {"question": "what is shown?", "answer": "a kite", "type": "video"},
            {"question": "anything else?", "answer": "no"}]},
        {"video": "b.mp4", "qas": [
            {"question": "how many boats?", "answer": "one", "type": "counting"},
            {"question": "how many bells?", "answer": "three", "type": "counting"},
            {"question": "what colour is the boat?", "answer": "blue", "type": "colour_of_thing"}]},
    ]
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps(m) + "\n" for m in metas))
    shards = tmp_path / "shards"
    assert main(["shards", "build", "--format", "jsonl", "--annotations", str(ann), "--videos", str(videos),
                 "--quiet", "--out", str(shards)]) == 0

    cfg = load_config("tiny", [f"data.train={shards}", f"data.val={shards}", "data.task=qa",
                               f"storage.root={tmp_path}/runs", "storage.name=mine", "train.steps=1",
                               "train.eval_every=1", "train.batch_size=2", "train.warmup_steps=1",
                               "scaling.num_workers=1", "scaling.cpus_per_worker=1", "data.decode_cpus=0.25",
                               "data.decode_batch_size=2"])
    run_training(cfg)
    val = next(r["val"] for r in read_metrics(str(tmp_path / "runs" / "mine")) if "val" in r)
    assert {"qa/counting", "qa/colour_of_thing", "qa/video", "qa/other"} <= set(val)
    ckpt = tmp_path / "runs" / "mine"
    capsys.readouterr()
    records = tmp_path / "records.jsonl"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(shards), "--batch-size", "2", "--json",
                 "--records", str(records)]) == 0
    res = json.loads(capsys.readouterr().out)
    qtypes = {json.loads(line)["qtype"] for line in records.read_text().splitlines()}
    assert qtypes == {"counting", "colour_of_thing", "video", "other"}
    metrics = res["metrics"]
    assert metrics["qa/counting"]["count"] == 3 and metrics["qa/colour_of_thing"]["count"] == 2
    assert metrics["qa/video"]["count"] == 1 and metrics["qa/other"]["count"] == 1
    assert metrics["qa"]["count"] == 7
