"""A sentinel secret through `mirasol train` to S3 and `mirasol data inspect`: it appears nowhere (Ray's session
folder with its logs and runtime-env files, the run folder, any output), and the console shows a person's view.
The S3 endpoint is given only in the config: every read and write, the driver's and the workers', takes it from
there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mirasol_ray import storage

NOISE = ("INFO", "WARNING", "Execution plan", "core_worker", "PlacementGroupCleaner", "UserWarning",
         "Failed to convert column", "RayTrainWorker", "TrainController", "Traceback", "samples/s")
"""What used to reach the console: Ray's INFO lines and execution plans, core_worker "E" lines, the placement group
cleaner, numpy's not-writable warning, Arrow's conversion fallback, the workers' step lines ("... samples/s ...")."""


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "mirasol_ray.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _files(root):
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):  # sockets and pipes are not read
                yield path


def test_no_secret_anywhere_and_a_console_for_a_person(s3_server, synth_shards, fault_shards, short_tmp):
    secret = s3_server.sentinel_secret
    fs = storage.fsspec_fs("s3://x")
    base = f"{s3_server.bucket}/secrets"
    fs.put(synth_shards["dir"] + "/", f"{base}/shards/", recursive=True)
    for name in ("good.tar", "notatar.tar", "truncated.tar", "odd.tar"):  # a batch in which every sample fails too
        fs.put_file(os.path.join(fault_shards["mixed"], name), f"{base}/mixed/{name}")
    # the only credentials the commands get are the sentinel identity's: every write to S3 proves they were used.
    # The endpoint is not in their environment (nor their Ray workers'), only in --set storage.endpoint_url: a read
    # or write that ignored the config would go to AWS and fail.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_server.env(sentinel=True) | {
        "TMPDIR": short_tmp}
    del env["AWS_ENDPOINT_URL"]
    endpoint = ["--set", f"storage.endpoint_url={s3_server.endpoint}"]
    # the tokenizer too is read from the bucket: by the driver, and by the workers into the checkpoint
    train = _cli(["train", "--json", "--config", "tiny", *endpoint, "--set", f"data.train=s3://{base}/shards",
                  "--set", f"data.tokenizer=s3://{base}/shards/tokenizer.json",
                  "--set", f"storage.root=s3://{base}/runs", "--set", "storage.name=secret", "--set", "train.steps=2",
                  "--set", "train.checkpoint_every=2", "--set", "train.batch_size=2", "--set", "train.log_every=1",
                  "--set", "data.decode_cpus=0.25", "--set", "data.task=mcqa", "--set", "scaling.cpus_per_worker=1"],
                 env)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads(train.stdout)  # --json: one JSON object and nothing else on stdout
    assert summary["steps"] == 2 and summary["checkpoint"].startswith(f"s3://{base}/runs/secret/checkpoint_")
    inspect = _cli(["data", "inspect", f"s3://{base}/mixed", "--json", "--png", os.path.join(short_tmp, "s.png"),
                    "--set", "data.task=mcqa", *endpoint], env)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    report = json.loads(inspect.stdout)
    assert report["shards_skipped"] == {"not_a_tar": 1, "truncated_shard": 1} and report["decoded"] == 5
    # evaluation's actor pool: Ray's C++ core worker notes its constructor arguments (ray#53727) on fd 2
    evaluate = _cli(["eval", "--json", "--checkpoint", f"s3://{base}/runs/secret", "--data", f"s3://{base}/shards",
                     "--set", "data.task=mcqa", "--num-actors", "1", "--batch-size", "4", *endpoint], env)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads(evaluate.stdout)["rows"] == synth_shards["num_clips"]

    # the console: our phase and progress lines (issue 34: starting Ray, building the pipeline, starting the workers,
    # each step of two, the last checkpoint, the summary; decoding / scoring N clips), at most one line of Ray
    # banner, no noise
    for proc in (train, inspect, evaluate):
        lines = proc.stderr.strip().splitlines()
        assert sum("Token authentication" in ln for ln in lines) <= 1, proc.stderr
        assert not [ln for ln in lines if any(n in ln for n in NOISE)], proc.stderr
        assert len(lines) <= 10, proc.stderr
    assert train.stderr.startswith(f"run s3://{base}/runs/secret: pretrain, 2 steps")

    # nowhere: Ray's session folders (each command's Ray lived under TMPDIR), the run folder, all output
    sessions = [os.path.join(short_tmp, "ray", n) for n in os.listdir(os.path.join(short_tmp, "ray"))
                if n.startswith("session_2")]
    assert len(sessions) == 3
    local = [p for s in sessions for p in _files(s)]
    names = {os.path.basename(p) for p in local}
    assert {"runtime_env_agent.log", "raylet.out", "gcs_server.out"} <= names  # the logs the key used to reach
    # the core worker's note reached the driver's log file instead of the console
    assert [p for p in local if p.endswith("mirasol-driver.log") and b"core_worker" in open(p, "rb").read()]
    hits = [p for p in local if secret.encode() in open(p, "rb").read()]
    remote = fs.find(f"{base}/runs/secret")
    assert any("/checkpoint_" in k for k in remote) and any(k.endswith("config.yaml") for k in remote)
    hits += [k for k in remote if secret.encode() in fs.cat_file(k)]
    hits += [name for name, text in (("train stdout", train.stdout), ("train stderr", train.stderr),
                                     ("inspect stdout", inspect.stdout), ("inspect stderr", inspect.stderr),
                                     ("eval stdout", evaluate.stdout), ("eval stderr", evaluate.stderr))
             if secret in text]
    assert hits == []
    # the batch whose every sample failed was not stored as pickled objects (Arrow's fallback) in any worker
    assert not [p for p in local if b"Failed to convert column" in open(p, "rb").read()]
