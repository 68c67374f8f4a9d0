"""The pieces of job submission that need no cluster: entrypoints, the runtime env (no secrets), the failure line,
what train.stage implies, and the jobs/ scripts' --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mirasol_ray.config import ConfigError, load_config
from mirasol_ray.launch import submit

REPO = Path(__file__).resolve().parents[2]


def test_stage_sets_the_task_unless_given():
    assert load_config("tiny").data.task == "caption"
    ft = load_config("tiny", ["train.stage=finetune", "train.init_from=runs/pre"])
    assert ft.data.task == "finetune"  # QA, multiple choice, labels: not captions
    assert load_config("tiny", ["train.stage=finetune", "train.init_from=x", "data.task=all"]).data.task == "all"
    assert load_config("tiny", ["data.task=qa"]).data.task == "qa"


def test_finetune_needs_pretrained_weights_unless_asked_not_to():
    cfg = load_config("tiny", ["train.stage=finetune"])  # a finetune preset names no checkpoint: it loads
    with pytest.raises(ConfigError, match="train.init_from"):
        cfg.check_start()  # but a run cannot start from nothing
    load_config("tiny", ["train.stage=finetune", "train.init_from=runs/pre"]).check_start()
    cfg.model.text_init = "/weights/lm"  # pretrained parts are a start too (loading them is checked elsewhere)
    cfg.check_start()
    load_config("tiny", ["train.stage=finetune", "train.finetune_from_scratch=true"]).check_start()
    load_config("tiny").check_start()  # pretraining starts from scratch


def test_a_finetune_run_without_weights_fails_before_ray_starts(capsys):
    from mirasol_ray.cli import main

    assert main(["train", "--config", "tiny", "--set", "train.stage=finetune", "--set", "data.train=/nowhere"]) \
        in (2,)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.init_from" in err[0]


def test_placement_strategy_is_checked():
    assert load_config("tiny", ["scaling.placement_strategy=STRICT_SPREAD"]).scaling.placement_strategy == \
        "STRICT_SPREAD"
    with pytest.raises(ConfigError, match="scaling.placement_strategy"):
        load_config("tiny", ["scaling.placement_strategy=spread-out"])


def test_entrypoint_for_a_job_name_or_a_script():
    assert submit.entrypoint("finetune", ["--config", "base", "--set", "data.train=s3://b/x y"], str(REPO)) == \
        "python jobs/finetune.py --config base --set 'data.train=s3://b/x y'"
    assert submit.entrypoint("build-shards", [], str(REPO)) == "python jobs/build_shards.py"
    assert submit.entrypoint(str(REPO / "jobs" / "evaluate.py"), ["-h"], str(REPO)) == \
        "python jobs/evaluate.py -h"
    with pytest.raises(submit.SubmitError, match="unknown job 'dance'"):
        submit.entrypoint("dance", [], str(REPO))
    with pytest.raises(submit.SubmitError, match="not inside the working directory"):
        submit.entrypoint("/etc/x.py", [], str(REPO))
    with pytest.raises(submit.SubmitError, match="nothere.py not found"):
        submit.entrypoint("nothere.py", [], str(REPO))


def test_runtime_env_carries_storage_settings_only_when_asked_and_never_a_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0ken-value")
    # by default the cluster's own storage settings stand: the laptop's local endpoint must not override them
    env = submit.runtime_env(str(tmp_path))
    assert env["working_dir"] == str(tmp_path) and "env_vars" not in env
    env = submit.runtime_env(str(tmp_path), storage_env=True)
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert not {"AKIAEXAMPLE", "s3cr3t-value", "t0ken-value"} & set(str(env).split("'"))
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]


def test_failure_reason_is_our_one_line_error_else_rays_message():
    logs = "Running entrypoint\nsome output\nmirasol: error: unknown config key 'train.stepz'\n"
    assert submit.failure_reason(logs, "Job entrypoint command failed with exit code 2") == \
        "unknown config key 'train.stepz'"
    assert submit.failure_reason("no line of ours\n", "Job entrypoint command failed\nmore") == \
        "Job entrypoint command failed"
    assert submit.failure_reason("", "") == ""


def test_submit_without_a_cluster_says_how_to_give_one(monkeypatch):
    from mirasol_ray.cli import main

    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(REPO)
    assert main(["submit", "finetune", "--config", "tiny"]) == 2
    assert main(["submit", "--status", "x", "--stop", "y"]) == 2


@pytest.mark.parametrize("job, says", [
    ("pretrain", "train.stage=pretrain"), ("finetune", "train.init_from"),
    ("evaluate", "task metrics"), ("build_shards", "WebDataset shards"),
])
def test_job_scripts_say_what_they_do(job, says):
    proc = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert says in proc.stdout and "usage: mirasol" in proc.stdout


def test_a_job_refuses_to_be_told_its_own_stage():
    proc = subprocess.run([sys.executable, "jobs/finetune.py", "--config", "tiny", "--set", "train.stage=pretrain"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.stage" in proc.stderr.strip().splitlines()[-1]
