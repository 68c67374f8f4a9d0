"""``mirasol bench train``: samples/s reaching the model through Ray Data + Ray Train and through a torch DataLoader
loop with the same decode and step, in one run."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_train_measures_ray_and_a_dataloader_loop(synth_shards, tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "bench", "train", synth_shards["dir"], "--steps", "10",
         "--batch-size", "2", "--workers", "1", "--json-out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    (r,) = res["rounds"]
    assert set(r) == {"ray", "torch_dataloader_1w"}
    for v in r.values():
        assert v["samples_per_s"] > 0 and 0 <= v["data_wait_fraction"] <= 1
        cpu = v["cpu"]  # the measured window's CPU, by process: it sums to the total, and the trainer used some
        assert cpu["window_s"] > 0 and cpu["window_samples"] > 0 and cpu["cpus_busy"] > 0
        assert abs(sum(cpu["cpu_ms_per_sample_by_group"].values()) - cpu["cpu_ms_per_sample"]) < 1e-6
        assert cpu["cpu_ms_per_sample_by_group"].get("trainer", 0) > 0
    # the DataLoader's workers decode; Ray's decode tasks run in Ray workers titled after decode_items
    assert r["torch_dataloader_1w"]["cpu"]["cpu_ms_per_sample_by_group"].get("decode", 0) > 0
    assert set(r["torch_dataloader_1w"]["cpu"]["cpu_ms_per_sample_by_group"]) <= {"trainer", "decode", "exited"}
    assert r["ray"]["cpu"]["window_steps"][0] >= 10 and r["ray"]["cpu"]["window_steps"][1] >= 20  # past the warm-up, to the end
    assert "CPU over the measured window" in proc.stdout
    ratio = res["ratios"]["ray / torch_dataloader_1w"]["median"]
    assert ratio == r["ray"]["samples_per_s"] / r["torch_dataloader_1w"]["samples_per_s"]
