"""Rank 0's run log (metrics.jsonl + TensorBoard) as the training loop uses it."""

from __future__ import annotations

import json

from mirasol_ray.train.loop import RunLog


def test_a_checkpoint_before_the_first_record_copies_an_empty_log(tmp_path):
    """train.checkpoint_every below train.log_every: the step-2 checkpoint syncs a log with no record yet (it
    failed the run with FileNotFoundError on metrics.jsonl)."""
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    scratch.mkdir()  # the driver's scratch folder (launch/scratch.py)
    log = RunLog(str(run), 0, scratch=str(scratch))
    log.sync()
    assert (run / "metrics.jsonl").read_text() == ""
    log.write({"step": 10, "loss": 1.5})
    log.close()
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [10]
