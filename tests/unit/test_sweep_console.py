"""Issue 34: what ``mirasol sweep`` says before its trials start (its trial lines: tests/integration/test_sweep.py)."""

from __future__ import annotations

from mirasol_ray.config import Config
from mirasol_ray.launch.sweep import sweep_header


def test_sweep_header_names_the_trials_and_the_concurrency():
    spec = {"name": "lr", "uri": "/tmp/sweeps/lr", "num_samples": 6, "space": {"train.lr": {}, "train.seed": {}},
            "metric": "val/loss", "mode": "min", "scheduler": "asha"}
    cfg = Config()
    text = sweep_header(spec, cfg, 2, False, "/tmp/d.log", "/tmp/ray/logs")
    lines = text.splitlines()
    assert lines[0] == "sweep lr -> /tmp/sweeps/lr"
    assert lines[1].startswith("  starting 6 trial(s), up to 2 at once: 2 swept key(s) (train.lr, train.seed), "
                               "metric val/loss (min), scheduler asha (a trial: ")
    assert lines[2] == "  logs: this driver's /tmp/d.log; the trials' (Ray's workers) /tmp/ray/logs"
    assert "resuming 6 trial(s)" in sweep_header(spec, cfg, 2, True, "d", "l")
