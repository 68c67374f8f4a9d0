"""`mirasol sweep` and `mirasol results` end to end: real Ray Tune over real Ray Train runs, SeaweedFS S3, the
driver killed and resumed, results read back with no Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from mirasol_ray import storage

# 1 worker of half a CPU and fractional data tasks: two trials fit on 2 CPUs at once; the trials fine-tune random
# weights on purpose (a pretraining run first would double the test's cost)
TINY_SWEEP = ["train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "train.eval_batches=1",
              "train.eval_every=2", "data.decode_cpus=0.25", "data.decode_batch_size=2", "scaling.num_workers=1",
              "scaling.cpus_per_worker=0.5", "data.task=qa", "train.stage=finetune",
              "train.finetune_from_scratch=true"]


def _sweep_cmd(synth_shards, storage_url, name, space, *extra, steps=4):
    sets = [f"data.train={synth_shards['dir']}", f"data.val={_val_shard(synth_shards)}", f"train.steps={steps}",
            *TINY_SWEEP]
    return [sys.executable, "-m", "mirasol_ray.cli", "sweep", "--config", "tiny", "--space", str(space),
            "--storage", storage_url, "--name", name, "--num-cpus", "2", "--table-every", "20",
            *[a for s in sets for a in ("--set", s)], *extra]


def _val_shard(synth_shards):
    return os.path.join(synth_shards["dir"], sorted(p for p in os.listdir(synth_shards["dir"])
                                                    if p.endswith(".tar"))[-1])


@pytest.fixture
def ray_tmp():
    """A Ray temp folder of our own (short: Unix socket paths are limited), so the test can see Ray's session
    folder, remove it, and tell whether a command started Ray."""
    d = tempfile.mkdtemp(prefix="mr16-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(ray_tmp):
    return {**os.environ, "RAY_TMPDIR": ray_tmp}


def _tune_rows(uri, trial_id):
    text = storage.read_text(storage.join(uri, f"tune_{trial_id}", "result.json"))
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def test_asha_sweep_on_s3_then_results_with_no_ray(synth_shards, s3_server, ray_tmp, tmp_path, capsys,
                                                    monkeypatch):
    # The S3 endpoint is given only in the config (--set storage.endpoint_url): no process here has it in its
    # environment (the credentials stay there), so a read or write that ignored the config would go to AWS and fail.
    ep = s3_server.endpoint
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    storage.configure(ep)  # this test's own reads
    # grid over both keys: 4 trials, 2 at once. A learning rate of 1e-6 leaves the model as it started, clearly worse
    # on the validation loss than 3e-3 after 2 steps; the last trial to start has it and meets recorded results of
    # better trials at the first rung, so ASHA stops it whatever the order the others arrived in. 4 steps, evaluated
    # every 2: one rung (step 2) before the end, all a stop needs.
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [3.0e-3, 1.0e-6]}\ntrain.weight_decay: {grid: [0.0, 0.1]}\n")
    root = s3_server.url("sweeps")
    uri = storage.join(root, "asha")
    cmd = _sweep_cmd(synth_shards, root, "asha", space, "--metric", "val/loss", "--set", f"storage.endpoint_url={ep}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(ray_tmp))
    out, err = proc.stdout, proc.stderr  # progress on stderr, the results on stdout
    assert proc.returncode == 0, (out + err)[-4000:]
    assert "up to 2 at once" in err
    # the console: our lines only; Ray's and Tune's own output went to the log files
    for noise in ("(RayTrainWorker", "(raylet)", "pid=", "Configuration for experiment", "Traceback"):
        assert noise not in out + err, noise
    started = [ln for ln in err.splitlines() if " started " in ln]
    assert len(started) == 4
    assert any("stopped early by ASHA" in ln for ln in err.splitlines())
    assert "-- " in err and "trials;" in err  # the periodic table
    assert "sweep done after " in out and "best: " in out and " started " not in out

    sweep = json.loads(storage.read_text(storage.join(uri, "sweep.json")))
    statuses = {tid: t["status"] for tid, t in sweep["trials"].items()}
    assert len(statuses) == 4 and set(statuses.values()) <= {"finished", "stopped"}
    assert "stopped" in statuses.values() and "finished" in statuses.values()
    for tid, t in sweep["trials"].items():
        rows = _tune_rows(uri, tid)  # Tune's own record of every report
        assert rows and all("checkpoint_path" in r for r in rows)
        assert (rows[-1]["step"] == 4) == (t["status"] == "finished")

    # a resume looks for the sweep's ledger in S3 with the config's endpoint too (one that ignored it would fail to
    # connect, not find nothing); the restore itself is the run above's code (a whole second run costs a minute)
    proc = subprocess.run(_sweep_cmd(synth_shards, root, "nope", space, "--set", f"storage.endpoint_url={ep}",
                                     "--resume"), capture_output=True, text=True, timeout=300, env=_env(ray_tmp))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"mirasol: error: no sweep to resume at {storage.join(root, 'nope')} (sweep.json not found)"), proc.stderr

    # Ray is gone (the driver shut it down at its end) and so is its session folder: read everything back
    shutil.rmtree(ray_tmp)
    res_dir = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "mirasol_ray.cli", "results", uri, "--json", "--out",
                           str(res_dir), "--set", f"storage.endpoint_url={ep}"], capture_output=True, text=True,
                          timeout=300, env=_env(ray_tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(ray_tmp), "mirasol results started Ray"
    res = json.loads(proc.stdout)
    assert res["kind"] == "sweep" and res["metric"] == "val/loss" and res["mode"] == "min"
    assert {t["trial_id"]: t["status"] for t in res["trials"]} == statuses
    for t in res["trials"]:
        assert set(t) >= {"trial_id", "config", "status", "steps", "best", "last", "checkpoint"}
        assert set(t["config"]) == {"train.lr", "train.weight_decay"}
        losses = [r["val"]["loss"] for r in _tune_rows(uri, t["trial_id"])]
        # what Tune saw: a stopped trial is read up to its stop (its workers may train a step or two more)
        assert t["best"] == pytest.approx(min(losses)) and t["last"] == pytest.approx(losses[-1]), t
        assert t["checkpoint"].startswith(storage.join(uri, "trials", t["trial_id"]) + "/checkpoint_")
        assert storage.exists(storage.join(t["checkpoint"], "model.pt"))  # its best checkpoint, in S3
    bests = [t["best"] for t in res["trials"]]
    assert bests == sorted(bests), "best trial first"
    best = res["trials"][0]
    assert res["best"] == {"trial_id": best["trial_id"], "metric": "val/loss", "value": best["best"],
                           "step": best["best_step"], "checkpoint": best["checkpoint"]}
    assert best["config"]["train.lr"] == pytest.approx(3e-3)
    assert res["eval_command"] == (f"mirasol eval --checkpoint {best['checkpoint']} --data {_val_shard(synth_shards)}"
                                   f" --set storage.endpoint_url={ep}")  # the runs' endpoint, from their config
    for png in ("learning_curves.png", "hyperparameters.png"):
        assert (res_dir / png).stat().st_size > 10_000

    # the table; without --out no PNG is written (not in the current folder, not in the storage read)
    from mirasol_ray.cli import main

    monkeypatch.chdir(tmp_path)
    storage.configure()  # as a new process starts: the endpoint comes from --set
    assert main(["results", uri, "--set", f"storage.endpoint_url={ep}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["trial", "train.lr"]
    assert lines[2].split()[0] == best["trial_id"]
    assert f"  {res['eval_command']}" in lines
    assert "plots: none written (give --out DIR)" in lines
    assert not (tmp_path / "asha-results").exists(), "no PNG where nobody asked (issue 34)"

    # and the command it printed evaluates the best checkpoint, straight from S3
    proc = subprocess.run([sys.executable, "-m", "mirasol_ray.cli", *res["eval_command"].split()[1:], "--json"],
                          capture_output=True, text=True, timeout=400, env=_env(ray_tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ev["rows"] > 0 and "qa" in ev["metrics"]


def _ledger(uri):
    path = os.path.join(uri, "sweep.json")
    return json.loads(open(path).read()) if os.path.exists(path) else {"trials": {}}


def _tune_status(uri):
    """Trial statuses in Tune's own experiment state (plain JSON: read, never unpickled)."""
    states = sorted(p for p in os.listdir(uri) if p.startswith("experiment_state")) if os.path.isdir(uri) else []
    if not states:
        return {}
    data = json.loads(open(os.path.join(uri, states[-1])).read())
    return {s["trial_id"]: s["status"] for s in (json.loads(t) for t, _ in data["trial_data"])}


def _resumable_step(run):
    """The step of the run folder's newest complete checkpoint (the one a restart continues from), or None."""
    from mirasol_ray.train.checkpoint import complete_step, latest_checkpoint_dir

    last = latest_checkpoint_dir(run) if os.path.isdir(run) else None
    return complete_step(last) if last else None


def test_killed_sweep_resumes_without_rerunning_finished_trials(synth_shards, ray_tmp, tmp_path):
    # two trials one at a time, on the default metric (val/qa for QA data); the driver dies hard, with its local Ray,
    # once the first trial has finished and the second has a checkpoint
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [3.0e-3, 1.0e-3]}\n")
    root = str(tmp_path / "sweeps")
    uri = os.path.join(root, "resume")
    # the same command both times, as a retried or re-applied RayJob runs it (cluster/kuberay/rayjob-sweep.yaml):
    # --resume-or-start starts the sweep the first time and continues it the second
    cmd = _sweep_cmd(synth_shards, root, "resume", space, "--scheduler", "fifo", "--max-concurrent", "1",
                     "--resume-or-start", steps=4)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=_env(ray_tmp))
    deadline = time.time() + 600
    first = second = None
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            trials = _ledger(uri)["trials"]
            done = [tid for tid, t in trials.items() if t["status"] == "finished"]
            running = [tid for tid, t in trials.items() if t["status"] == "running"]
            if done and running and _tune_status(uri).get(done[0]) == "TERMINATED" and _resumable_step(
                    os.path.join(uri, "trials", running[0])):
                first, second = done[0], running[0]
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert first and second, "no finished trial and checkpointed second trial before the deadline"
    stopped_at = _resumable_step(os.path.join(uri, "trials", second))
    assert stopped_at < 4
    first_metrics = open(os.path.join(uri, "trials", first, "metrics.jsonl")).read()

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(ray_tmp))
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"sweep resume: continuing the sweep at {uri}" in resumed.stderr
    starts = [ln for ln in resumed.stderr.splitlines() if " started " in ln]
    assert len(starts) == 1 and f"trial {second} started" in starts[0] and "again" in starts[0]
    ledger = _ledger(uri)["trials"]
    assert ledger[first]["starts"] == 1 and ledger[second]["starts"] == 2
    assert {ledger[first]["status"], ledger[second]["status"]} == {"finished"}, resumed.stderr[-3000:]
    # the second trial continued from its checkpoint: its run said so (in the trial's log), no step trained twice
    logs = os.path.join(ray_tmp, "ray", "session_latest", "logs")
    said = "".join(open(os.path.join(logs, f), errors="replace").read() for f in os.listdir(logs)
                   if f.startswith("worker-") and f.endswith(".out"))
    assert f"resumed at step {stopped_at}" in said
    steps = [json.loads(ln)["step"] for ln in open(os.path.join(uri, "trials", second, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]
    assert open(os.path.join(uri, "trials", first, "metrics.jsonl")).read() == first_metrics

    res = json.loads(subprocess.run([sys.executable, "-m", "mirasol_ray.cli", "results", uri, "--json", "--out",
                                     str(tmp_path / "plots")], capture_output=True, text=True, timeout=300).stdout)
    assert res["metric"] == "val/qa" and {t["status"] for t in res["trials"]} == {"finished"}
    assert all(t["steps"] == 4 and t["best"] is not None for t in res["trials"])

    # a single run folder (a trial's Ray Train run is one) reads back as one trial
    from mirasol_ray.launch.results import results

    run = os.path.join(uri, "trials", second)
    one = results(run, out=str(tmp_path / "one"), metric="val/loss")
    assert one["kind"] == "run" and one["mode"] == "min" and len(one["trials"]) == 1
    t = one["trials"][0]
    assert t["trial_id"] == second and t["status"] == "finished" and t["steps"] == 4 and t["best"] > 0
    assert one["best"]["checkpoint"] == t["checkpoint"] and t["checkpoint"].startswith(run + "/checkpoint_")
    assert one["plots"] == [str(tmp_path / "one" / "learning_curves.png")]
    assert results(run, out=str(tmp_path / "one"))["metric"] == "val/qa"  # the run's main metric by default


@pytest.mark.parametrize("space_text, key", [
    ("train.lrr: {loguniform: [1.0e-4, 3.0e-3]}\n", "train.lrr"),
    ("train.lr: {logunifrom: [1.0e-4, 3.0e-3]}\n", "train.lr"),
])
def test_a_bad_space_fails_before_anything_starts(synth_shards, ray_tmp, tmp_path, space_text, key):
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    root = str(tmp_path / "sweeps")
    proc = subprocess.run(_sweep_cmd(synth_shards, root, "bad", space), capture_output=True, text=True,
                          timeout=300, env=_env(ray_tmp))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mirasol: error: ") and f"{space}: {key}: " in err[0], err
    assert not os.path.exists(root), "nothing written"
    assert not os.listdir(ray_tmp), "no Ray started"
