"""`mirasol sweep --resume-or-start`: the decision between starting and continuing a sweep, the check that the
sweep found is the one asked for, and the command line's one-line errors (no Ray started)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from mirasol_ray.cli import main
from mirasol_ray.launch.sweep import SWEEP_FILE, check_same_sweep, sweep_mode

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("exists, flags, mode", [
    (False, {}, "start"),
    (False, {"resume_or_start": True}, "start"),
    (True, {"resume_or_start": True}, "resume"),
    (True, {"resume": True}, "resume"),
])
def test_sweep_mode(exists, flags, mode):
    assert sweep_mode(exists, **flags) == mode


@pytest.mark.parametrize("exists, flags, error, says", [
    (True, {}, ValueError, "a sweep already exists at s3://b/s/ft: --resume it"),  # never overwrites one
    (False, {"resume": True}, FileNotFoundError, r"no sweep to resume at s3://b/s/ft \(sweep.json not found\)"),
    (True, {"resume": True, "resume_or_start": True}, ValueError, "not both"),
])
def test_sweep_mode_refuses(exists, flags, error, says):
    with pytest.raises(error, match=says):
        sweep_mode(exists, "s3://b/s/ft", **flags)


def test_the_sweep_found_must_be_the_one_asked_for():
    spec = {"uri": "s3://b/sweeps/ft", "space": {"train.lr": {"kind": "loguniform", "args": [1e-5, 3e-4]}},
            "metric": "val/qa", "mode": "max", "scheduler": "asha"}
    stored = json.loads(json.dumps(spec))  # as sweep.json holds it
    check_same_sweep(stored, spec)
    other = {**spec, "space": {"train.lr": {"kind": "loguniform", "args": [1e-5, 1e-3]}}}
    with pytest.raises(ValueError, match="started with another space"):
        check_same_sweep(stored, other)
    with pytest.raises(ValueError, match="started with another metric"):
        check_same_sweep(stored, {**spec, "metric": "val/loss"})


@pytest.mark.parametrize("argv, says", [
    (["--resume", "--resume-or-start", "--name", "x"], "not both"),
    (["--resume-or-start", "--config", "tiny", "--space", "s.yaml"], "--resume-or-start needs --name"),
])
def test_resume_or_start_one_line_errors(argv, says, capsys):
    assert main(["sweep", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_resume_or_start_refuses_another_sweep_under_the_same_name(tmp_path, capsys):
    """A sweep folder whose sweep.json was written for another space: --resume-or-start stops before any Ray."""
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {loguniform: [1.0e-5, 3.0e-4]}\n")
    root = tmp_path / "sweeps"
    (root / "ft").mkdir(parents=True)
    (root / "ft" / SWEEP_FILE).write_text(json.dumps({
        "name": "ft", "space": {"train.lr": {"kind": "choice", "args": [1e-4]}}, "metric": "loss", "mode": "min",
        "scheduler": "fifo", "trials": {}}))
    data = tmp_path / "shards"
    data.mkdir()
    with tarfile.open(data / "train-000000.tar", "w"):  # the inputs check only finds the shards
        pass
    argv = ["sweep", "--config", "tiny", "--space", str(space), "--storage", str(root), "--name", "ft",
            "--resume-or-start", "--metric", "loss", "--mode", "min", "--scheduler", "fifo",
            "--set", f"data.train={data}", "--set", "train.stage=finetune", "--set", "train.finetune_from_scratch=true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "started with another space" in err, err
