"""``mirasol bench build`` runs end to end on a few clips and writes its figures as JSON."""

from __future__ import annotations

import json

from mirasol_ray.cli import main


def test_bench_build_writes_its_json(no_local_ray, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "build", "--clips", "3", "--cpus", "1", "--transcode", "32", "--shard-size", "2",
                 "--json-out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["clips"] == 3 and res["transcode"] == 32
    assert res["clips_per_s"]["ray"]["1"] > 0 and res["clips_per_s"]["pool"]["1"] > 0
    assert res["ray_vs_pool"]["1"] == res["clips_per_s"]["ray"]["1"] / res["clips_per_s"]["pool"]["1"]
    assert "1 CPU: build (Ray)" in capsys.readouterr().out
