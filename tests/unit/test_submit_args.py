"""`mirasol submit`'s submission, as built from its command line: what reaches `JobSubmissionClient.submit_job`
(entrypoint, runtime env, entrypoint resources, submission id, metadata), with no cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirasol_ray.cli import build_parser
from mirasol_ray.launch import submit

REPO = Path(__file__).resolve().parents[2]


def _kwargs(argv: list[str]) -> dict:
    """The submit_job keyword arguments `mirasol submit ARGV` would send (the same mapping as the CLI's)."""
    a = build_parser().parse_args(["submit", *argv])
    return submit.submission(a.job, a.args, working_dir=a.working_dir, storage_env=a.storage_env,
                             entrypoint_num_cpus=a.entrypoint_num_cpus, entrypoint_num_gpus=a.entrypoint_num_gpus,
                             entrypoint_memory=a.entrypoint_memory, entrypoint_resources=a.entrypoint_resources,
                             submission_id=a.submission_id, metadata=a.metadata_json)


def test_a_plain_submission_sends_the_entrypoint_and_working_dir_only(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")   # a laptop pointed at a local S3
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    kw = _kwargs(["--working-dir", str(REPO), "finetune", "--config", "tiny"])
    assert set(kw) == {"entrypoint", "runtime_env"}, kw
    assert kw["entrypoint"] == "python jobs/finetune.py --config tiny"
    assert "env_vars" not in kw["runtime_env"] and kw["runtime_env"]["working_dir"] == str(REPO)


def test_ray_job_submit_options_reach_submit_job(monkeypatch):
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):  # the S3 fixture's, earlier in a session
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.us-west-2.amazonaws.com")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    kw = _kwargs(["--working-dir", str(REPO), "--storage-env", "--entrypoint-num-cpus", "1",
                  "--entrypoint-num-gpus", "0.5", "--entrypoint-memory", "2000000000",
                  "--entrypoint-resources", '{"decode": 1}', "--submission-id", "ft-lr-1",
                  "--metadata-json", '{"sweep": "ft-lr", "owner": "me"}', "sweep", "--name", "ft-lr"])
    assert kw["entrypoint"] == "python jobs/sweep.py --name ft-lr"
    assert kw["runtime_env"]["env_vars"] == {"AWS_ENDPOINT_URL": "https://s3.us-west-2.amazonaws.com"}
    assert (kw["entrypoint_num_cpus"], kw["entrypoint_num_gpus"], kw["entrypoint_memory"]) == (1.0, 0.5, 2000000000)
    assert kw["entrypoint_resources"] == {"decode": 1}
    assert kw["submission_id"] == "ft-lr-1" and kw["metadata"] == {"sweep": "ft-lr", "owner": "me"}
    assert "s3cr3t-value" not in repr(kw)
    # every key is a parameter of Ray's own submit_job
    import inspect

    from ray.job_submission import JobSubmissionClient
    assert set(kw) <= set(inspect.signature(JobSubmissionClient.submit_job).parameters)


@pytest.mark.parametrize("argv, says", [
    (["--entrypoint-num-cpus", "-1"], "--entrypoint-num-cpus must be >= 0"),
    (["--entrypoint-resources", '{"GPU": 1}'], "custom resources only"),
    (["--entrypoint-resources", '{"decode": "one"}'], "--entrypoint-resources must be a JSON object"),
    (["--metadata-json", '{"n": 1}'], "--metadata-json must be a JSON object of strings"),
    (["--metadata-json", '["a"]'], "--metadata-json must be a JSON object of strings"),
])
def test_bad_submission_options_are_one_line_errors(argv, says):
    with pytest.raises(submit.SubmitError, match=says):
        _kwargs(["--working-dir", str(REPO), *argv, "finetune"])


def test_bad_json_in_an_option_exits_2_before_any_cluster_is_asked(monkeypatch, capsys):
    from mirasol_ray.cli import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(["submit", "--metadata-json", "{not json", "finetune"])
    assert e.value.code == 2
