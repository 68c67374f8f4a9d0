"""``benchmarks.lucidrains``: our side of the comparison with lucidrains' mirasol-pytorch, theirs stood in for by
a script that records what it is handed (their package lives in a venv of its own, not here)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks.lucidrains import HERE, compare_lucidrains
from mirasol_ray.config import load_config


def _small():
    """The tiny preset one block deep everywhere: only the plumbing is under test."""
    return dataclasses.replace(load_config("tiny").model, video_depth=1, audio_depth=1, depth=1, text_depth=1,
                               combiner_depth=1)


def _fake_python(tmp_path, body: str):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    return fake


def test_ours_is_timed_and_theirs_is_handed_the_matched_dimensions(tmp_path):
    # called as: python -W ignore RUNNER DIMS_JSON
    fake = _fake_python(tmp_path, f'echo "$3" > {tmp_path}/runner; echo "$4" > {tmp_path}/dims.json\n'
                                  """echo '{"fwd_bwd_s": 1000.0, "times_s": [1000.0], "params": 5}'""")
    res = compare_lucidrains(_small(), repeats=1, batch_size=1, snippets=4, python=fake)
    assert (tmp_path / "runner").read_text().strip() == str(HERE / "_lucidrains_runner.py")
    dims = json.loads((tmp_path / "dims.json").read_text())
    assert dims == res["dims"]
    assert (dims["dim"], dims["snippets"], dims["mel_frames"], dims["batch"], dims["repeats"]) == (192, 4, 4, 1, 1)
    assert len(res["ours_times_s"]) == 1 and res["ours_fwd_bwd_s"] > 0
    assert res["ratio"] == pytest.approx(res["ours_fwd_bwd_s"] / 1000.0) and res["ok"]


def test_a_missing_venv_or_a_failing_peer_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="run bash benchmarks/lucidrains_venv.sh"):
        compare_lucidrains(_small(), 1, python=tmp_path / "absent")
    fake = _fake_python(tmp_path, "echo 'Traceback ...' >&2; echo 'ImportError: no x_transformers' >&2; exit 1")
    with pytest.raises(RuntimeError, match="^lucidrains' mirasol-pytorch failed: ImportError: no x_transformers$"):
        compare_lucidrains(_small(), 1, batch_size=1, snippets=4, python=fake)
