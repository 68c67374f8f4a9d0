"""``mirasol bench rows``: the same decoded clips as clip rows and as one row per text, measured in one run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_rows_compares_clip_rows_with_one_row_per_text(synth_shards, tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "bench", "rows", synth_shards["dir"], "--set", "data.task=all",
         "--clips", "2", "--batch-size", "2", "--steps", "1", "--json-out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["clips"] == 2
    texts = res["texts_per_clip"]
    assert texts > 1, "data.task=all gives every synthetic clip several texts"
    # one row per text runs the audio-video path once per text, clip rows once per clip: the ratio is the number
    # of texts a clip has, exactly
    flops = res["flops_per_step"]
    assert res["ratios"]["AV-path FLOPs per step, text rows / clip rows"] == pytest.approx(texts, rel=1e-6)
    assert flops["text_rows"]["total_gflop"] > flops["clip_rows"]["total_gflop"] > flops["clip_rows"]["av_gflop"]
    # each text row carries its own copy of the clip's video and audio
    b = res["bytes_per_clip"]
    assert texts > b["text_rows"] / b["clip_rows"] > 1
    assert all(v["clips_per_s"] > 0 for v in res["throughput"].values())
    assert "text_rows" in proc.stdout and "clip_rows" in proc.stdout
