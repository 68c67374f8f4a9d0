"""A benchmark end to end: VGGSound's official CSV -> shards -> a (tiny) fine-tuning run classifying by scoring the
label set -> ``mirasol eval`` writing results.json / results.csv and printing the paper's table."""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from mirasol_ray.config import load_config
from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.shards import build_shards
from mirasol_ray.launch.train import run_training


def _clip(colour: int, seconds: float = 1.0) -> bytes:
    frames = np.full((int(seconds * 10), 32, 32, 3), colour, np.uint8)
    audio = (0.3 * np.sin(2 * np.pi * (300 + colour) * np.arange(int(seconds * 16000)) / 16000)).astype(np.float32)
    return encode_av(frames, 10, audio, 16000, gop=10)


def test_vggsound_build_finetune_eval_table(tmp_path, capsys):
    import ray

    rows = [["red1", 0, "siren, wailing", "train"], ["red2", 0, "siren, wailing", "train"],
            ["blue1", 0, "dog barking", "train"], ["blue2", 0, "dog barking", "train"],
            ["red3", 2, "siren, wailing", "test"], ["blue3", 0, "dog barking", "test"], ["gone", 0, "dog barking", "test"]]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    (tmp_path / "vggsound.csv").write_text(buf.getvalue())
    videos = tmp_path / "video"
    videos.mkdir()
    for ytid, start, label, _ in rows[:-1]:
        if ytid != "red3":
            (videos / f"{ytid}_{start:06d}.mp4").write_bytes(_clip(200 if label.startswith("siren") else 40))
    (videos / "red3.mp4").write_bytes(_clip(200, seconds=13.0))  # untrimmed: [2 s, 12 s) is cut
    shards = tmp_path / "shards"
    m = build_shards("vggsound", str(tmp_path / "vggsound.csv"), str(videos), str(shards), progress=False)
    assert m["splits"]["train"]["num_samples"] == 4 and m["splits"]["test"]["num_samples"] == 2 and m["cut"] == 1

    from mirasol_ray.cli import main

    out = tmp_path / "results"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        cfg = load_config("tiny", [f"data.train={shards}/train", f"storage.root={tmp_path}/runs", "storage.name=vgg",
                                   "train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "data.task=cls",
                                   "model.cls_mode=score", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
                                   "data.decode_cpus=0.25", "data.decode_batch_size=2"])
        run_training(cfg)
        capsys.readouterr()
        rc = main(["eval", "--checkpoint", f"{tmp_path}/runs/vgg", "--data", f"{shards}/test", "--out", str(out),
                   "--batch-size", "2"])
    finally:
        if started:
            ray.shutdown()
    assert rc == 0
    table = capsys.readouterr().out
    assert "Audio-video classification" in table and "VGGSound" in table and "vgg (step 2)" in table
    top1_line = next(line for line in table.splitlines() if " top-1 " in line)
    assert "69.80" in top1_line  # the paper's figure beside ours
    res = json.loads((out / "results.json").read_text())
    assert res["cls_mode"] == "score" and res["rows"] == 2
    metrics = {x["name"]: x for x in res["benchmark"]["metrics"]}
    assert set(metrics) == {"top-1", "top-5"} and metrics["top-1"]["count"] == 2
    assert metrics["top-5"]["value"] == 100.0  # two classes: the right one is always in the top 5
    assert metrics["top-1"]["value"] in (0.0, 50.0, 100.0)
    with (out / "results.csv").open() as f:
        rows_out = list(csv.DictReader(f))
    assert rows_out[0]["dataset"] == "VGGSound" and rows_out[0]["metric"] == "top-1" and rows_out[0]["paper"] == "69.8"
