"""``mirasol bench data``: every variant does the same work (the same clips, the same unit, after a warm-up)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_data_variants_decode_the_same_clips(synth_shards, tmp_path):
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "bench", "data", synth_shards["dir"], "--cpus", "1", "--limit", "3",
         "--warmup", "1", "--skip", "ceiling", "--json-out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["shards"] == 1, "--limit rounds up to whole shards"
    results = res["results"]
    assert set(results) == {"bare", "dataloader_1w", "ray_1cpu"}
    # the same unit (clips decoded, not rows or frames), the same clips: the whole first shard, warm-up apart
    assert {v["clips"] for v in results.values()} == {4}
    assert results["ray_1cpu"]["rows"] == 4
    assert all(v["cpu_ms_per_clip"] > 0 for v in results.values())
    assert "ray_1cpu_per_cpu / bare" in res["ratios"] and "ray_1cpu / dataloader_1w" in res["ratios"]
