"""A real multi-node Ray cluster on this machine (`mirasol cluster up`: a head and a worker node, token auth on),
jobs submitted to it with `ray job submit` and `mirasol submit`, storage on the SeaweedFS S3 server.

One cluster serves the whole module (nodes are expensive to start); each job is a few steps of the tiny preset.
The nodes get the S3 credentials from the environment they start in, as a cluster's machines get theirs from an
instance role or a Kubernetes Secret; the jobs carry none.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirasol_ray import storage
from mirasol_ray.launch import cluster
from mirasol_ray.launch.train import read_metrics
from mirasol_ray.train.checkpoint import complete_step, latest_checkpoint_dir, read_meta, resolve_checkpoint

REPO = Path(__file__).resolve().parents[2]
MIRASOL = [sys.executable, "-m", "mirasol_ray.cli"]
JOB_TIMEOUT_S = 600

JOB_STEPS = 2
"""Each fine-tuning job's steps: one checkpoint, at the last (the node-lost job takes more, to be killed mid-run)."""
FINETUNE = [f"train.steps={JOB_STEPS}", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2",
            "train.warmup_steps=1", "data.decode_cpus=0.25", "data.decode_batch_size=2", "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5", "scaling.placement_strategy=STRICT_SPREAD"]
"""Two train workers, one per node (STRICT_SPREAD), a few steps."""


def _sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def local_cluster(s3_server, synth_shards, tmp_path_factory):
    """Shards and a pretrained checkpoint in S3, and a head + 1 worker node; stopped at the end of the module."""
    import fsspec

    from mirasol_ray.config import load_config
    from mirasol_ray.model.mirasol import build_model
    from mirasol_ray.train.checkpoint import write_checkpoint

    shards = s3_server.url("cluster", "shards")
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.put(synth_shards["dir"] + "/", storage.strip_scheme(shards) + "/", recursive=True)
    # the pretrained weights a fine-tuning job starts from: a freshly built tiny model, in a real checkpoint
    cfg = load_config("tiny", [f"data.train={synth_shards['dir']}"])
    labels = synth_shards["manifest"].get("label_set")
    cfg.model.num_classes = len(labels) if labels else cfg.model.num_classes
    model = build_model(cfg.model)
    local = tmp_path_factory.mktemp("pretrained")
    write_checkpoint(str(local), model, model.state_dict(), step=0, stage="pretrain", run_config=cfg.to_dict(),
                     label_set=labels)
    pretrained = s3_server.url("cluster", "pretrained")
    fs.put(str(local) + "/", storage.strip_scheme(pretrained) + "/", recursive=True)

    d = tmp_path_factory.mktemp("cluster")
    # the nodes, and this side too, use the S3 identity whose secret is unique to the session: the tests look for it
    node_env = {**os.environ, **s3_server.env(sentinel=True)}
    up = subprocess.run([*MIRASOL, "cluster", "up", "--dir", str(d), "--workers", "1", "--head-cpus", "2",
                         "--worker-cpus", "2", "--object-store-memory", str(300 * 2**20), "--json"],
                        env=node_env, capture_output=True, text=True, timeout=400)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        state = json.loads(up.stdout)
        env = {**node_env, **cluster.client_env(state)}
        yield {"dir": str(d), "state": state, "env": env, "shards": shards, "pretrained": pretrained,
               "runs": s3_server.url("cluster", "runs"), "s3": s3_server}
    finally:
        subprocess.run([*MIRASOL, "cluster", "down", "--dir", str(d)], capture_output=True, timeout=300)


def _client(c):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(c["state"]["dashboard_url"], headers=cluster.auth_headers(c["state"]["token_path"]))


def _node_ids(c) -> dict[str, str]:
    """{"head": id, "worker": id} of the live nodes."""
    out = {}
    for n in cluster.nodes(c["state"]["dashboard_url"], c["state"]["token_path"]):
        if n["state"] == "ALIVE":
            out["head" if n["is_head"] else "worker"] = n["node_id"]
    return out


def _finetune_args(c, name, extra=()):
    return ["--config", "tiny", *_sets([f"data.train={c['shards']}", f"train.init_from={c['pretrained']}",
                                        f"storage.root={c['runs']}", f"storage.name={name}", *FINETUNE, *extra])]


def _check_finetune_run(c, name, nodes, steps=JOB_STEPS):
    uri = storage.join(c["runs"], name)
    records = read_metrics(uri)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert set(records[0]["nodes"]) == {nodes["head"], nodes["worker"]}, "one train worker on each node"
    meta = read_meta(resolve_checkpoint(latest_checkpoint_dir(uri)))
    assert meta["step"] == steps and meta["stage"] == "finetune"
    assert meta["run_config"]["data"]["task"] == "finetune"  # QA, multiple choice, labels: not captions
    assert meta["run_config"]["train"]["init_from"].startswith(c["pretrained"])
    # the run folder in S3 holds what a local one does (a DDP run on S3 storage is tested here, not twice)
    for part in ("summary.json", "config.yaml", "plots/learning_curve.png"):
        assert storage.exists(storage.join(uri, part)), part
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(storage.join(uri, "tensorboard")))
    return records


def _complete_checkpoint_step(uri) -> int:
    """The step of the run's newest complete checkpoint (complete.json written after all its files), 0 if none."""
    last = latest_checkpoint_dir(uri)
    return (complete_step(last) or 0) if last else 0


def test_cluster_has_two_nodes_and_token_auth(local_cluster):
    import requests

    st = json.loads(subprocess.run([*MIRASOL, "cluster", "status", "--dir", local_cluster["dir"], "--json"],
                                   capture_output=True, text=True, timeout=120).stdout)
    assert st["running"] and st["head"]["alive"] and [w["alive"] for w in st["workers"]] == [True]
    alive = [n for n in st["ray_nodes"] if n["state"] == "ALIVE"]
    assert sorted(n["is_head"] for n in alive) == [False, True]
    assert any(n["resources"].get("worker_node") == 1 for n in alive)
    url = st["dashboard_url"]
    assert url.startswith("http://127.0.0.1:")
    # bound to loopback only: the machine's own address (Ray's node address) does not answer on that port
    port = int(url.rsplit(":", 1)[1])
    for ip in {n["ip"] for n in alive} - {"127.0.0.1"}:
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.settimeout(30)
            s.connect((ip, port))
    assert requests.get(f"{url}/api/jobs/", timeout=30).status_code == 401  # no token, no jobs API
    token = cluster.auth_headers(st["token_path"])
    assert requests.get(f"{url}/api/jobs/", headers=token, timeout=30).status_code == 200
    assert os.stat(st["token_path"]).st_mode & 0o077 == 0


def test_ray_job_submit_and_mirasol_submit_finetune_on_both_nodes(local_cluster):
    """Two fine-tuning jobs at once, one through Ray's own CLI (`ray job submit`, with RAY_AUTH_MODE=token in the
    client's environment) and one through `mirasol submit`: both succeed, each trains with one worker per node,
    and neither the jobs' records nor their logs hold the secret key."""
    c = local_cluster
    env = {**c["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    ray_cli = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
                                c["state"]["dashboard_url"], "--working-dir", ".", "--", "python", "jobs/finetune.py",
                                *_finetune_args(c, "ray-cli")],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ours = subprocess.Popen([*MIRASOL, "submit", "--address", c["state"]["dashboard_url"], "--storage-env",
                             "--metadata-json", '{"test": "two-nodes"}', "finetune",
                             *_finetune_args(c, "mirasol-submit")],
                            cwd=REPO, env=c["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours_out, ours_err = ours.communicate(timeout=JOB_TIMEOUT_S)
    cli_out, _ = ray_cli.communicate(timeout=JOB_TIMEOUT_S)
    client = _client(c)
    nodes = _node_ids(c)

    cli_job = re.search(r"raysubmit_\w+", cli_out).group(0)
    assert str(client.get_job_status(cli_job)) == "SUCCEEDED", cli_out[-3000:]
    assert "initialised from" in cli_out  # fine-tuned from the pretrained checkpoint
    _check_finetune_run(c, "ray-cli", nodes)

    assert ours.returncode == 0, (ours_out + ours_err)[-3000:]
    last = ours_out.strip().splitlines()[-1]
    assert last.endswith("SUCCEEDED")
    our_job = re.search(r"raysubmit_\w+", last).group(0)
    _check_finetune_run(c, "mirasol-submit", nodes)
    info = client.get_job_info(our_job)
    # with --storage-env the non-secret settings travel (without it, none: the unit tests check that)
    assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == c["s3"].endpoint
    assert info.metadata == {"test": "two-nodes"}

    secret = c["s3"].sentinel_secret
    everything = ours_out + ours_err + cli_out
    for job in (cli_job, our_job):
        everything += json.dumps(client.get_job_info(job).dict(), default=str) + client.get_job_logs(job)
    assert everything.count(secret) == 0
    assert "AWS_SECRET_ACCESS_KEY" not in everything and "AWS_ACCESS_KEY_ID" not in everything
    # nor in anything Ray wrote on the nodes: session logs, runtime-env records, the jobs' driver logs
    for path in Path(c["state"]["temp_dir"]).rglob("*"):
        if path.is_file() and not path.is_socket():
            with open(path, "rb") as f:
                assert secret.encode() not in f.read(), path


def test_bad_config_key_fails_the_job_and_names_the_key(local_cluster):
    c = local_cluster
    proc = subprocess.run([*MIRASOL, "submit", "--address", c["state"]["dashboard_url"], "finetune",
                           *_finetune_args(c, "bad-key", extra=["train.stepz=3"])],
                          cwd=REPO, env=c["env"], capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "FAILED" in last and "train.stepz" in last, last
    job_id = re.search(r"raysubmit_\w+", last).group(0)
    client = _client(c)
    assert str(client.get_job_status(job_id)) == "FAILED"
    assert "unknown config key 'train.stepz'" in client.get_job_logs(job_id)
    status = subprocess.run([*MIRASOL, "submit", "--address", c["state"]["dashboard_url"], "--status", job_id],
                            env=c["env"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 1 and "FAILED" in status.stdout


def test_submit_a_script_then_logs_stop_and_status(local_cluster, tmp_path):
    """`mirasol submit --no-follow SCRIPT` from another working directory, then `--logs ID`, `--stop ID` and
    `--status ID` (exit code 3 once the job is STOPPED)."""
    c = local_cluster
    script = tmp_path / "block.py"
    script.write_text("import threading\nprint('block: waiting to be stopped', flush=True)\n"
                      "threading.Event().wait()\n")
    url = c["state"]["dashboard_url"]
    sub = subprocess.run([*MIRASOL, "submit", "--address", url, "--working-dir", str(tmp_path), "--no-follow",
                          str(script)], env=c["env"], capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", sub.stdout).group(0)
    assert "python block.py" in sub.stdout
    client = _client(c)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while "block: waiting" not in client.get_job_logs(job_id):  # the event: the script is running
        assert str(client.get_job_status(job_id)) in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[-3000:]
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    logs = subprocess.run([*MIRASOL, "submit", "--address", url, "--logs", job_id], env=c["env"],
                          capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "block: waiting to be stopped" in logs.stdout
    stop = subprocess.run([*MIRASOL, "submit", "--address", url, "--stop", job_id], env=c["env"],
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    while not client.get_job_status(job_id).is_terminal():
        assert time.monotonic() < deadline, "the job did not stop"
        time.sleep(0.5)
    status = subprocess.run([*MIRASOL, "submit", "--address", url, "--status", job_id], env=c["env"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 3 and f"{job_id} STOPPED" in status.stdout, status.stdout + status.stderr


def test_submit_build_shards_runs_on_both_nodes_and_equals_a_local_build(local_cluster, tmp_path, build_files):
    """Issue 31: `mirasol submit build_shards` from s3:// videos and annotations to s3:// shards: the per-clip work
    runs on both nodes (the summary names them), and the shards and manifest are the bytes of a build made here in
    one process without Ray."""
    import numpy as np

    from mirasol_ray.data.encode import encode_av
    from mirasol_ray.data.shards import run_build

    c = local_cluster
    videos = tmp_path / "videos"
    videos.mkdir()
    lines = []
    for i in range(12):
        frames = np.empty((8, 48, 64, 3), np.uint8)
        frames[:] = np.random.default_rng(i).integers(0, 256, 3, dtype=np.uint8)
        tone = (0.3 * np.sin(2 * np.pi * (300 + 20 * i) * np.arange(12800) / 16000)).astype(np.float32)
        (videos / f"v{i:02d}.mp4").write_bytes(encode_av(frames, 10, tone, 16000, gop=8))
        lines.append(json.dumps({"video": f"v{i:02d}.mp4", "task": "cls", "label": "ab"[i % 2]}))
    (tmp_path / "ann.jsonl").write_text("\n".join(lines) + "\n")
    fs = storage.fsspec_fs("s3://x")
    base = storage.strip_scheme(c["s3"].url("cluster", "build"))
    fs.put(str(videos) + "/", base + "/videos/", recursive=True)
    fs.put_file(str(tmp_path / "ann.jsonl"), base + "/ann.jsonl")
    ref = run_build("jsonl", str(tmp_path / "ann.jsonl"), str(videos), str(tmp_path / "ref"), shard_size=4,
                    transcode=32, progress=False)
    out = c["s3"].url("cluster", "build", "shards")
    proc = subprocess.run([*MIRASOL, "submit", "--address", c["state"]["dashboard_url"], "build_shards", "--format",
                           "jsonl", "--annotations", f"s3://{base}/ann.jsonl", "--videos", f"s3://{base}/videos",
                           "--out", out, "--shard-size", "4", "--transcode", "32"],
                          cwd=REPO, env=c["env"], capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].endswith("SUCCEEDED"), \
        (proc.stdout + proc.stderr)[-3000:]
    (summary,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("built 3 shards from 12 clips")]
    nodes = _node_ids(c)
    assert f"({nodes['head'][:8]})" in summary and f"({nodes['worker'][:8]})" in summary, summary

    assert ref.manifest["num_samples"] == 12 and build_files(out) == build_files(str(tmp_path / "ref"))


def test_worker_node_lost_mid_job_resumes_from_checkpoint(local_cluster):
    """Kill every process of the worker node after the first checkpoint; bring a worker node back. With
    scaling.max_failures=1 the job waits for two nodes again (STRICT_SPREAD), restarts both workers from the
    last checkpoint in S3, and finishes."""
    c = local_cluster
    name = "node-lost"
    steps = 6
    proc = subprocess.run([*MIRASOL, "submit", "--address", c["state"]["dashboard_url"], "--no-follow", "finetune",
                           *_finetune_args(c, name, extra=[f"train.steps={steps}", "scaling.max_failures=1"])],
                          cwd=REPO, env=c["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", proc.stdout).group(0)
    client = _client(c)
    before = _node_ids(c)
    uri = storage.join(c["runs"], name)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:  # the event: a whole checkpoint in S3 (all its files uploaded)
        killed_at = _complete_checkpoint_step(uri)
        if killed_at >= 2:
            break
        status = str(client.get_job_status(job_id))
        assert status in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    state = cluster.load_state(c["dir"])
    cluster.kill_node(state["workers"][0])
    assert killed_at < steps and str(client.get_job_status(job_id)) == "RUNNING"
    up = subprocess.run([*MIRASOL, "cluster", "up", "--dir", c["dir"], "--workers", "1", "--worker-cpus", "2",
                         "--object-store-memory", str(300 * 2**20)], env=c["env"], capture_output=True, text=True,
                        timeout=400)
    assert up.returncode == 0, up.stderr[-3000:]
    status = subprocess.run([*MIRASOL, "submit", "--logs", job_id, "--follow"], env=c["env"], capture_output=True,
                            text=True, timeout=JOB_TIMEOUT_S)
    logs = client.get_job_logs(job_id)
    assert status.returncode == 0 and str(client.get_job_status(job_id)) == "SUCCEEDED", logs[-3000:]
    assert re.search(r"resumed at step [2-9]", logs), logs[-3000:]
    after = _node_ids(c)
    assert after["worker"] != before["worker"]
    records = read_metrics(uri)
    assert [r["step"] for r in records] == list(range(1, steps + 1)), "no step lost or repeated"
    groups = [r["nodes"] for r in records if "nodes" in r]
    assert set(groups[0]) == {before["head"], before["worker"]}
    assert set(groups[-1]) == {after["head"], after["worker"]}, "the restarted workers ran on both nodes"
    assert read_meta(resolve_checkpoint(latest_checkpoint_dir(uri)))["step"] == steps


def test_results_read_back_with_the_cluster_down(local_cluster):
    from mirasol_ray.train.checkpoint import load_model_from

    c = local_cluster
    down = subprocess.run([*MIRASOL, "cluster", "down", "--dir", c["dir"]], capture_output=True, text=True,
                          timeout=300)
    assert down.returncode == 0 and "stopped" in down.stdout
    st = subprocess.run([*MIRASOL, "cluster", "status", "--dir", c["dir"]], capture_output=True, text=True,
                        timeout=60)
    assert st.returncode == 1 and "no local cluster" in st.stdout
    for name in ("ray-cli", "mirasol-submit"):
        uri = storage.join(c["runs"], name)
        summary = json.loads(storage.read_text(storage.join(uri, "summary.json")))
        assert summary["steps"] == JOB_STEPS and summary["stage"] == "finetune"
        model = load_model_from(uri)
        assert sum(p.numel() for p in model.parameters()) > 0
        assert storage.exists(storage.join(uri, "plots", "learning_curve.png"))
