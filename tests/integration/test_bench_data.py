"""``mirasol bench data``: every variant does the same work (the same clips, the same unit, after a warm-up)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_data_variants_decode_the_same_clips(synth_shards, tmp_path):
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "bench", "data", synth_shards["dir"], "--cpus", "1", "--limit", "3",
         "--warmup", "1", "--skip", "ceiling", "--breakdown", "--json-out", str(out)],
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
    # where each variant's CPU went, by process: it adds up to the whole tree's; Ray's own processes are named
    for name, v in results.items():
        roles = res["cpu_ms_per_clip_by_role"][name]
        assert sum(roles.values()) == pytest.approx(v["cpu_ms_per_clip"], abs=1e-6)
    assert set(res["cpu_ms_per_clip_by_role"]["bare"]) == {"driver"}  # one process (its decode threads included)
    assert {"worker", "raylet", "gcs_server"} <= set(res["cpu_ms_per_clip_by_role"]["ray_1cpu"])
    assert res["cpu_ms_per_clip_by_role"]["ray_1cpu"]["worker"] > 0  # the decode ran in Ray's workers
    assert res["cpu_ms_per_clip_by_role"]["dataloader_1w"]["child"] > 0  # and in the DataLoader's worker
    assert "CPU ms per clip by process" in proc.stdout
