"""``mirasol bench train``: samples/s reaching the model through Ray Data + Ray Train and through a torch DataLoader
loop with the same decode and step, in one run."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_train_measures_ray_and_a_dataloader_loop(synth_shards, tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "bench", "train", synth_shards["dir"], "--steps", "2",
         "--batch-size", "2", "--workers", "1", "--json-out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    (r,) = res["rounds"]
    assert set(r) == {"ray", "torch_dataloader_1w"}
    for v in r.values():
        assert v["samples_per_s"] > 0 and 0 <= v["data_wait_fraction"] <= 1 and v["cpu_s_whole_run"] > 0
    ratio = res["ratios"]["ray / torch_dataloader_1w"]["median"]
    assert ratio == r["ray"]["samples_per_s"] / r["torch_dataloader_1w"]["samples_per_s"]
