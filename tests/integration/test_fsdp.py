"""FSDP2 and DDP on Ray Train with two CPU workers: training, validation on every rank, self-contained checkpoints.

The training set is one still clip (a uniform colour and a steady tone) repeated: every row decodes to the same
tensors whatever frames are sampled, so every batch is the same batch whichever worker Ray Data hands it to, and
runs can be compared step by step. The validation set is a shard of the varied synthetic clips, every task.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mirasol_ray.launch.train import read_metrics, run_training
from mirasol_ray.train.prepare import load_prepared

RUN = ["train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "train.min_lr_ratio=1.0",
       "train.checkpoint_every=2", "data.decode_cpus=0.25", "data.decode_batch_size=2", "scaling.num_workers=2",
       "scaling.cpus_per_worker=0.5", "data.task=all", "data.max_prompt_len=16", "data.max_target_len=16"]
"""Two workers; the learning rate constant after its one warm-up step, so a run stopped at step 2 and resumed
with more steps follows the same schedule as one that ran straight through."""
LOSS_TOL = 1e-4
"""Relative tolerance between the losses of runs that see the same batches (fp32 on the CPU; the gradient
reductions of DDP and FSDP2 add in different orders)."""


@pytest.fixture(scope="module")
def data(synth_shards, tmp_path_factory):
    """The still-clip training shards, the validation shard, and a copy of the synthetic tokenizer."""
    from mirasol_ray.data.encode import encode_av
    from mirasol_ray.data.shards import ShardWriter

    root = tmp_path_factory.mktemp("fsdp-data")
    frames = np.zeros((50, 64, 64, 3), np.uint8)
    frames[..., 0] = 200
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)
    mp4 = encode_av(frames, 25, tone, 16000)
    writer = ShardWriter(str(root / "still"), 4)
    for i in range(8):
        writer.write(f"still{i:03d}", {"mp4": mp4, "json": {"caption": "a red square; low"}})
    writer.close({"label_set": synth_shards["manifest"]["label_set"]})
    (root / "tok").mkdir()
    shutil.copy(os.path.join(synth_shards["dir"], "tokenizer.json"), root / "tok" / "tokenizer.json")
    val = os.path.join(synth_shards["dir"], sorted(n for n in os.listdir(synth_shards["dir"]) if n.endswith(".tar"))[0])
    return {"root": root, "train": str(root / "still"), "val": val, "tokenizer": str(root / "tok" / "tokenizer.json")}


def _cfg(data, name, *extra, root=None):
    return load_prepared("tiny", [f"data.train={data['train']}", f"data.val={data['val']}",
                                  f"data.tokenizer={data['tokenizer']}",
                                  f"storage.root={root or data['root'] / 'runs'}", f"storage.name={name}", *RUN, *extra])


SHARDS = [".metadata", "__0_0.distcp", "__1_0.distcp"]
"""What torch.distributed.checkpoint writes for two ranks: the index (rank 0), and one shard per rank."""


@pytest.fixture(scope="module")
def runs(_ray_session, data):
    """DDP for 4 steps straight through. FSDP2 for 2 steps (a sharded checkpoint at step 2, written by two
    workers), then the same run continued to step 4 on two workers, and a copy of its step-2 checkpoint continued
    on one worker (resharding). Every run validates at its end and checkpoints every 2 steps."""
    import ray

    if not ray.is_initialized():  # as tests/conftest.py's ray_local, which is per test
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {}
    ddp = run_training(_cfg(data, "ddp", "train.steps=4", "train.fsdp=false"))
    out["ddp"] = {"summary": ddp, "records": read_metrics(ddp["run"])}
    first = run_training(_cfg(data, "fsdp", "train.steps=2", "train.fsdp=true"))
    out["fsdp_step2"] = {"summary": first, "files": sorted(os.listdir(first["checkpoint"])),
                         "complete": json.loads((Path(first["checkpoint"]) / "complete.json").read_text())}
    alone = data["root"] / "runs" / "fsdp-on-one"
    shutil.copytree(first["checkpoint"], alone / os.path.basename(first["checkpoint"]))
    for kind, extra in (("fsdp", []), ("fsdp-on-one", ["scaling.num_workers=1"])):
        summary = run_training(_cfg(data, kind, "train.steps=4", "train.fsdp=true", *extra))
        out[kind] = {"summary": summary, "records": read_metrics(summary["run"])}
    return out


def test_fsdp2_and_ddp_train_alike_and_validate_on_every_rank(runs):
    ddp, fsdp = runs["ddp"]["records"], runs["fsdp"]["records"]
    assert [r["step"] for r in ddp] == [1, 2, 3, 4] and [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(ddp, fsdp):  # the same batches (one clip repeated): the same losses, step by step
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_TOL)
    for kind in ("ddp", "fsdp"):
        last = runs[kind]["records"][-1]
        rows = last["val_rows"]  # 4 clips (each a row with its 11 texts)
        assert len(rows) == 2 and min(rows) > 0 and sum(rows) == 4
        assert {"caption", "qa", "mcqa", "cls"} <= set(last["val"])
        assert runs[kind]["summary"]["val"] == last["val"]


def test_fsdp2_checkpoints_are_sharded_and_resume_on_two_and_on_one_worker(runs):
    """Under FSDP2 every worker writes its own shard (no full state on any rank); the run continued from its
    step-2 checkpoint on two workers, and on one, takes steps 3 and 4 with the losses of the DDP run that never
    stopped (every batch is the same clip: one worker's batch of 2 is the two workers' global batch)."""
    first = runs["fsdp_step2"]
    assert first["summary"]["steps"] == 2
    assert set(SHARDS) <= set(first["files"]) and "model.pt" in first["files"]
    # complete.json, written last, lists every worker's shard: the checkpoint counts once all of them are stored
    assert first["complete"]["step"] == 2 and set(SHARDS) | {"model.pt"} <= set(first["complete"]["files"])
    assert set(SHARDS) <= set(os.listdir(runs["fsdp"]["summary"]["checkpoint"]))
    ddp = [r["loss"] for r in runs["ddp"]["records"]]
    for kind in ("fsdp", "fsdp-on-one"):  # the copy's run folder began with the checkpoint alone (no metrics)
        resumed = [r for r in runs[kind]["records"] if r["step"] > 2]
        assert [r["step"] for r in resumed] == [3, 4]
        assert [r["loss"] for r in resumed] == pytest.approx(ddp[2:], rel=LOSS_TOL)
    # written by one worker: one shard, loadable on two again
    assert {n for n in os.listdir(runs["fsdp-on-one"]["summary"]["checkpoint"]) if n.endswith(".distcp")} == {
        "__0_0.distcp"}


def test_validation_equals_one_evaluation_of_the_checkpoint(runs, data):
    """DDP's checkpoint here; FSDP2's, copied elsewhere, in the next test."""
    from mirasol_ray.launch.evaluate import evaluate

    summary = runs["ddp"]["summary"]
    res = evaluate(summary["checkpoint"], data["val"], batch_size=4)
    assert res["rows"] == 4 * 11  # 4 clips: a caption, 4 timestamped captions, 4 questions, multiple choice, label
    val = dict(summary["val"])
    # the validation loss (sweeps' val/loss), summed over both workers' shares: training's loss, which eval omits
    assert 0 < val.pop("loss") < 20
    assert {k: m["value"] for k, m in res["metrics"].items()} == pytest.approx(val, abs=1e-12)


def test_eval_predict_and_export_from_a_copied_checkpoint_alone(runs, data, tmp_path):
    """The checkpoint copied elsewhere, the training data and the tokenizer it was trained with gone: evaluation
    equals the run's validation, and prediction gives what it gave before (the checkpoint carries the tokenizer,
    config and label set)."""
    from mirasol_ray.launch.evaluate import evaluate, predict
    from mirasol_ray.train.checkpoint import export

    original = runs["fsdp"]["summary"]["checkpoint"]
    clip = tmp_path / "clip.mp4"
    import tarfile

    with tarfile.open(data["val"]) as t:
        clip.write_bytes(t.extractfile(next(m for m in t.getmembers() if m.name.endswith(".mp4"))).read())
    questions = [dict(question="what colour is the first shape?"),
                 dict(question="which colour?", options=["red", "green", "blue"])]
    before = [predict(original, str(clip), **q) for q in questions]
    copy = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(original, copy)
    hidden = data["root"] / "hidden"
    hidden.mkdir()
    moved = [(data["tokenizer"], hidden / "tokenizer.json"), (data["train"], hidden / "still")]
    for src, dst in moved:
        shutil.move(src, dst)
    try:
        assert not os.path.exists(data["tokenizer"])
        assert [predict(str(copy), str(clip), **q) for q in questions] == before
        res = evaluate(str(copy), data["val"], batch_size=4)
        assert res["rows"] == 4 * 11
        val = dict(runs["fsdp"]["summary"]["val"])
        assert 0 < val.pop("loss") < 20  # eval reports no loss
        assert {k: m["value"] for k, m in res["metrics"].items()} == pytest.approx(val, abs=1e-12)
        info = export(str(copy), str(tmp_path / "model.pt"))
        assert info["parameters"] > 0
        shutil.rmtree(copy)  # the exported file is all there is now
        assert [predict(str(tmp_path / "model.pt"), str(clip), **q) for q in questions] == before
    finally:
        for src, dst in moved:
            shutil.move(dst, src)
    assert json.loads(json.dumps(before))[1]["answer"] in ("red", "green", "blue")
