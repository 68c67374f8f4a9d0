"""Bad input and faults on a real local Ray: bad shards skipped by name, runs that can form no batch end with one
line, resume from the newest complete checkpoint, and every command's failure is one line naming the thing."""

from __future__ import annotations

import json
import os
import re

import pytest

from mirasol_ray import storage
from mirasol_ray.cli import main
from mirasol_ray.config import load_config
from mirasol_ray.data.pipeline import decoded_dataset, make_skip_counter, read_skips
from mirasol_ray.launch.train import read_metrics, run_training
from mirasol_ray.train import checkpoint as ckpt

ONE_WORKER = ["train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "data.decode_cpus=0.25",
              "data.decode_batch_size=2", "scaling.num_workers=1", "scaling.cpus_per_worker=1"]


def _one_line_error(capsys) -> str:
    """The failure's one line (the last on stderr; before it only the run's phase lines: the run, starting Ray,
    building the pipeline, starting the workers, where they run); stdout empty."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("mirasol: error: "), err[-3000:]
    phase = re.compile(r"run |decoding (\d+|the) clips of |starting Ray \(|building the data pipeline \("
                       r"|starting \d+ training worker\(s\) \(Ray Train\)\.\.\.$|\d+ worker\(s\) on \d+ node\(s\): ")
    assert len(lines) <= 6 and all(phase.match(ln) for ln in lines[:-1]), err[-3000:]
    assert out == ""
    return lines[-1]


def test_bad_shards_are_skipped_and_counted_by_file_name(ray_local, fault_shards):
    cfg = load_config("tiny", ["data.task=mcqa", "data.decode_cpus=0.5"]).data  # one row per clip
    counter, name = make_skip_counter()
    keys = [str(k) for b in decoded_dataset(fault_shards["mixed"], cfg, train=False, counter_name=name).iter_batches(
        batch_size=4, batch_format="numpy") for k in b["key"]]
    ray_local.get(counter.snapshot.remote())
    snap = read_skips(counter)
    ray_local.kill(counter)
    skipped, examples = snap["skipped"], snap["examples"]
    assert {k: skipped.get(k) for k in ("not_a_tar", "truncated_shard", "unreadable_shard")} == {
        "not_a_tar": 1, "truncated_shard": 1, "unreadable_shard": 1}
    assert examples["not_a_tar"][0].startswith(os.path.join(fault_shards["mixed"], "notatar.tar"))
    assert examples["truncated_shard"][0].startswith(os.path.join(fault_shards["mixed"], "truncated.tar"))
    assert examples["unreadable_shard"][0].startswith(os.path.join(fault_shards["mixed"], "gone.tar"))
    # the samples before the cut are kept; the good shard is read whole; the odd sample's error keeps its message
    assert keys.count(fault_shards["truncated_kept"]) == 2 and len(keys) == 4 + 1
    assert skipped["error"] == 1 and examples["error"][0].startswith("odd: TypeError: ")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("data, task, cause", [
    ("nodecode", "caption", "no clip of .*nodecode decoded; decoded 0 clips; skipped: corrupt 1 .*empty 1 .*"
                            "not_a_tar 1 \\(e.g. .*b.tar: invalid header\\)"),
    ("captions", "qa", "data.task=qa matches no text in .*captions; decoded 0 clips; skipped: no_text_for_task 2"),
])
def test_a_run_that_can_form_no_batch_ends_with_one_line(ray_local, fault_shards, tmp_path, capsys, data, task,
                                                         cause):
    """It used to loop over empty epochs forever. Now empty epochs end the run, naming the cause and the skipped
    samples by reason; nothing is left in the run folder but its config and logs. (A dataset with fewer rows than a
    batch is no longer such a case: the training stream runs on into the next epoch to fill the batch, see
    tests/unit/test_run_safety.py::test_a_dataset_smaller_than_a_batch_trains_and_one_that_never_decodes_ends.)"""
    rc = main(["train", "--config", "tiny", "--set", f"data.train={fault_shards[data]}", "--set",
               f"data.task={task}", "--set", f"storage.root={tmp_path}", "--set", "storage.name=r", "--set",
               "train.steps=3", *[a for s in ONE_WORKER for a in ("--set", s)]])
    line = _one_line_error(capsys)
    assert rc == 2
    assert re.search(f"no training batch can be formed: {cause}", line), line
    assert not [n for n in os.listdir(tmp_path / "r") if n.startswith("checkpoint_") or n == "lease.json"]


def test_resume_takes_the_newest_complete_checkpoint_not_ray_trains_record(ray_local, synth_shards, tmp_path):
    """Ctrl-C right after a checkpoint was stored leaves it complete on disk but missing from Ray Train's own
    record (its controller had not registered it yet); the re-run resumed from Ray Train's record, an earlier
    checkpoint, and recomputed (lost) the steps after it. It now resumes from the run folder's newest complete one."""
    def cfg(steps):
        return load_config("tiny", [f"data.train={synth_shards['dir']}", f"storage.root={tmp_path}",
                                    "storage.name=r", f"train.steps={steps}", "train.checkpoint_every=2",
                                    "data.task=caption", *ONE_WORKER])

    uri = str(tmp_path / "r")
    run_training(cfg(4))
    before = read_metrics(uri)
    latest = ckpt.latest_checkpoint_dir(uri)
    assert ckpt.complete_step(latest) == 4
    # the state a Ctrl-C leaves when it lands between the upload of step 4 and Ray Train registering it
    snap_path = tmp_path / "r" / ckpt.RAY_SNAPSHOT
    snap = json.loads(snap_path.read_text())
    assert snap["checkpoint_results"][-1]["checkpoint_dir_name"] == os.path.basename(latest)
    snap["checkpoint_results"].pop()
    snap["checkpoint_report_indices"].pop()
    snap["latest_checkpoint_result"] = snap["checkpoint_results"][-1]
    snap["current_report_index"] -= 1
    snap_path.write_text(json.dumps(snap))
    summary = run_training(cfg(6))
    after = read_metrics(uri)
    assert summary["steps"] == 6 and [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
    assert after[:4] == before, "steps 3-4 were recomputed: the run resumed from step 2, not 4"
    assert ckpt.complete_step(summary["checkpoint"]) == 6
    names = ckpt.checkpoint_dirs(uri)
    assert all(ckpt.complete_step(storage.join(uri, n)) for n in names)  # no half-written or orphaned folders


def _checkpoint_folder(tmp_path, meta=True):
    """A real checkpoint of the tiny model, written without Ray (as a run's rank 0 writes one)."""
    import torch

    from mirasol_ray.model.mirasol import build_model

    cfg = load_config("tiny")
    model = build_model(cfg.model)
    folder = tmp_path / "ckpt"
    ckpt.write_checkpoint(str(folder), model, model.state_dict(), step=1, run_config=cfg.to_dict())
    if not meta:
        (folder / ckpt.META_FILE).unlink()
    assert isinstance(torch.load(folder / ckpt.MODEL_FILE, weights_only=True), dict)
    return folder


def test_every_failure_is_one_line_naming_the_thing(tmp_path, capsys, synth_shards, s3_server):
    """Each of these ran into a traceback (on stdout, for eval), a wrong message, or lost work; each is now one line
    on stderr naming the file, folder, key or bucket, exit code 2, before any work (no Ray is started)."""
    folder = _checkpoint_folder(tmp_path)
    model = (folder / ckpt.MODEL_FILE).read_bytes()
    (tmp_path / "afile").write_text("x")
    video = next(p for p in os.listdir(synth_shards["dir"]) if p.endswith(".tar"))
    cases = []
    (tmp_path / "cut").mkdir()
    for name in (ckpt.META_FILE,):
        (tmp_path / "cut" / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "cut" / ckpt.MODEL_FILE).write_bytes(model[: len(model) // 2])
    cases.append((["eval", "--json", "--checkpoint", str(tmp_path / "cut"), "--data", synth_shards["dir"]],
                  r"checkpoint file .*cut/model.pt is truncated"))
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / ckpt.META_FILE).write_bytes((folder / ckpt.META_FILE).read_bytes())
    (tmp_path / "zero" / ckpt.MODEL_FILE).write_bytes(b"")
    cases.append((["eval", "--checkpoint", str(tmp_path / "zero"), "--data", synth_shards["dir"]],
                  r"checkpoint file .*zero/model.pt is empty \(0 bytes\)"))
    nometa = _checkpoint_folder(tmp_path / "n", meta=False)
    cases.append((["predict", "--checkpoint", str(nometa), os.path.join(synth_shards["dir"], video)],
                  r"checkpoint .*n/ckpt has no meta.json"))
    cases.append((["predict", "--checkpoint", str(folder), str(tmp_path)], r"is a folder, not a video file"))
    cases.append((["eval", "--checkpoint", str(folder), "--data", synth_shards["dir"], "--records",
                   str(tmp_path / "afile" / "records.jsonl")], r"cannot write to .*afile/records.jsonl"))
    cases.append((["eval", "--checkpoint", str(folder), "--data", synth_shards["dir"], "--out",
                   str(tmp_path / "afile")], r"afile is an existing file, not a folder"))
    cases.append((["data", "inspect", synth_shards["dir"], "--png", str(tmp_path / "afile" / "s.png")],
                  r"cannot write to .*afile/s.png"))
    cases.append((["shards", "build", "--format", "jsonl", "--annotations", str(tmp_path / "afile"), "--videos",
                   str(tmp_path), "--out", str(tmp_path / "afile")], r"afile is an existing file, not a folder"))
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    cases.append((["train", "--config", str(tmp_path / "loop.yaml")], r"cycle: .*loop.yaml -> .*loop.yaml"))
    cases.append((["data", "inspect", "s3://no-such-bucket-mirasol/shards"],
                  r"bucket 'no-such-bucket-mirasol' does not exist"))
    cases.append((["train", "--config", "tiny", "--set", f"data.train={synth_shards['dir']}", "--set",
                   "storage.root=s3://no-such-bucket-mirasol/runs"], r"bucket 'no-such-bucket-mirasol' does not exist"))

    for argv, needle in cases:
        assert main(argv) == 2, argv
        line = _one_line_error(capsys)
        assert re.search(needle, line), (argv, line)
    assert not (tmp_path / "afile").is_dir() and (tmp_path / "afile").read_text() == "x"


def test_inspect_exits_nonzero_when_no_clip_decodes_and_names_unreadable_shards(ray_local, fault_shards, tmp_path,
                                                                               capsys):
    rc = main(["data", "inspect", fault_shards["nodecode"], "--json"])
    out, err = capsys.readouterr()
    report = json.loads(out)  # --json: still only JSON on stdout
    assert rc == 1 and report["decoded"] == 0 and report["shards_skipped"] == {"not_a_tar": 1}
    lines = err.strip().splitlines()  # the phase line (what it decodes), then the error: nothing else
    assert len(lines) == 2 and re.match(r"decoding (\d+|the) clips of \d+ shard\(s\)", lines[0]), lines
    assert lines[1].startswith("mirasol: error")
    assert "no clip of" in err and "corrupt 1" in err
    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    (only_bad / "x.tar").write_bytes(b"plain text, not a tar" * 30)
    assert main(["data", "inspect", str(only_bad)]) == 2
    assert re.search(r"no shard of .*only-bad could be read: .*not_a_tar 1 \(e.g. .*x.tar: invalid header",
                     _one_line_error(capsys))
    assert not list(tmp_path.glob("*.png")) and not os.path.exists("contact_sheet.png")

