"""The sweep's space file: every distribution, and each kind of mistake named by its key before anything runs."""

from __future__ import annotations

import pytest

from mirasol_ray.config import ConfigError, load_config
from mirasol_ray.launch.results import check_metric, default_mode, main_metric
from mirasol_ray.launch.sweep import apply_params, error_reason, parse_space, validate_space


@pytest.fixture(scope="module")
def base():
    return load_config("tiny").to_dict()


def _check(raw, base):
    params = parse_space(raw, "space.yaml")
    validate_space(params, base, "space.yaml")
    return params


def test_every_distribution_and_the_nested_form(base):
    params = _check({"train.lr": {"loguniform": ["1e-4", 3.0e-3]},  # YAML 1.1 reads 1e-4 as a string
                     "train": {"weight_decay": {"uniform": [0, 0.1]}, "warmup_steps": {"randint": [0, 20]}},
                     "data.task": {"choice": ["qa", "all"]}, "train.batch_size": {"grid": [2, 4]}}, base)
    kinds = {p.key: (p.kind, p.args) for p in params}
    assert kinds == {"train.lr": ("loguniform", (1e-4, 3e-3)), "train.weight_decay": ("uniform", (0.0, 0.1)),
                     "train.warmup_steps": ("randint", (0, 20)), "data.task": ("choice", ("qa", "all")),
                     "train.batch_size": ("grid", (2, 4))}
    import numpy as np

    cfg = apply_params(base, {"train.lr": np.float64(2e-4), "train.warmup_steps": np.int64(7)})  # Tune's samples
    assert cfg.train.lr == 2e-4 and cfg.train.warmup_steps == 7 and isinstance(cfg.train.warmup_steps, int)


@pytest.mark.parametrize("raw, words", [
    ({"train.lrr": {"loguniform": [1e-4, 1e-3]}}, ["train.lrr", "unknown config key"]),
    ({"trian.lr": {"loguniform": [1e-4, 1e-3]}}, ["trian.lr", "unknown config key"]),
    ({"train.lr": {"logunifrom": [1e-4, 1e-3]}}, ["train.lr", "unknown distribution 'logunifrom'"]),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, ["train.lr", "low > 0"]),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, ["train.lr", "low < high"]),
    ({"train.lr": {"uniform": [1e-3]}}, ["train.lr", "[low, high]"]),
    ({"train.lr": 1e-3}, ["train.lr", "expected one distribution"]),
    ({"train.batch_size": {"uniform": [2, 8]}}, ["train.batch_size", "takes int"]),
    ({"train.batch_size": {"choice": [2, "big"]}}, ["train.batch_size", "expected an integer"]),
    ({"train.batch_size": {"grid": [2, 0]}}, ["train.batch_size", "must be positive"]),
    ({"data.task": {"choice": ["qa", "trivia"]}}, ["data.task", "trivia"]),
    ({"train.warmup_steps": {"randint": [0.5, 3]}}, ["train.warmup_steps", "integers"]),
    ({"storage.root": {"choice": ["a", "b"]}}, ["storage.root", "the sweep's own"]),
    ({"lr": {"choice": [1e-3]}}, ["lr", "section.key"]),
])
def test_a_bad_space_names_the_key_in_one_line(base, raw, words):
    with pytest.raises(ConfigError) as e:
        _check(raw, base)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("space.yaml: ")
    for w in words:
        assert w in msg, msg


def test_the_main_metric_follows_the_data():
    assert main_metric(load_config("tiny", ["data.val=x", "data.task=qa"])) == "val/qa"
    assert main_metric(load_config("tiny", ["data.val=x", "data.task=cls"])) == "val/cls"
    assert main_metric(load_config("tiny", ["data.val=x", "data.task=caption"])) == "val/caption"
    assert main_metric(load_config("tiny", ["data.val=x", "data.task=finetune"])) == "val/qa"
    assert main_metric(load_config("tiny")) == "loss"  # no validation data
    assert default_mode("val/loss") == "min" and default_mode("val/qa") == "max" and default_mode("loss") == "min"
    for ok in ("val/qa", "val/qa/temporal", "val/loss", "loss", "val/cls"):
        check_metric(ok)
    with pytest.raises(ValueError, match="unknown metric 'val/acc'"):
        check_metric("val/acc")


def test_checkpoints_are_scored_by_the_main_metric_unless_told():
    from mirasol_ray.launch.results import checkpoint_score

    assert checkpoint_score(load_config("tiny", ["data.val=x", "data.task=all"])) == {"metric": "val/qa",
                                                                                      "mode": "max"}
    assert checkpoint_score(load_config("tiny", ["data.val=x", "train.checkpoint_metric=val/loss"])) == {
        "metric": "val/loss", "mode": "min"}
    assert checkpoint_score(load_config("tiny")) is None  # no validation: the newest checkpoints are kept
    check_metric("train_eval/qa")


def test_a_failed_trial_is_told_in_one_line():
    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
             "ray.train.WorkerGroupError: Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
             "ValueError: data.train: no shards\n")
    assert error_reason(trace) == "ValueError: data.train: no shards"
    assert error_reason("x\nWorkerGroupError: Training failed due to worker errors:\n[Rank 0]:\nboom\n") == \
        "WorkerGroupError: Training failed due to worker errors: [Rank 0]: boom"
    oom = "a\n3 worker(s) were killed due to the node running low on memory. Memory on the node was 23GB\nb"
    assert error_reason(oom).startswith("3 worker(s) were killed") and error_reason("") == ""


def test_the_ray_job_entrypoint_takes_the_sweep_arguments():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # as `ray job submit --working-dir . -- python jobs/sweep.py` runs it: the working dir on PYTHONPATH
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "jobs/sweep.py", "--help"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--space", "--num-samples", "--scheduler", "--max-concurrent", "--metric", "--storage", "--resume"):
        assert flag in proc.stdout, flag
