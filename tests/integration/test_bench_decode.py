"""``mirasol bench decode``: long videos made at test time, every (encoding, frame count) measured, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_decode_measures_each_frame_count_against_every_frame(tmp_path):
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "bench", "decode", str(tmp_path / "videos"), "--minutes", "0.1",
         "--clips", "1", "--size", "160x96", "--frames", "8", "--json-out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["videos"]["frames"] == 180 and report["geometry"]["frames_per_snippet"] == 4
    for enc in ("delivered", "transcoded"):
        rows = report["results"][enc]
        assert [r["frames"] for r in rows] == [8, 0]  # 0: every frame
        assert all(r["clips"] == 1 and r["cpu_ms_per_clip"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert "within the linear bound" in proc.stdout or "OVER the linear bound" in proc.stdout
    assert (tmp_path / "decode.png").stat().st_size > 0
    # a frame count the preset's snippets cannot hold is one line, before any video is made
    bad = subprocess.run([sys.executable, "-m", "mirasol_ray.cli", "bench", "decode", str(tmp_path / "none"),
                          "--frames", "30"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "multiple of data.frames_per_snippet=4" in bad.stderr
    assert not (tmp_path / "none").exists()
