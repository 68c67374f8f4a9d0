"""tiny_long (128 snippets of 4 frames) through the real path: Ray Data decode, Ray Train, a checkpoint, a resume,
and an evaluation of the checkpoint (issue 33)."""

from __future__ import annotations

from mirasol_ray.launch.evaluate import evaluate
from mirasol_ray.launch.train import read_metrics, run_training
from mirasol_ray.train.checkpoint import latest_checkpoint_dir, read_meta, resolve_checkpoint
from mirasol_ray.train.prepare import load_prepared


def test_tiny_long_trains_checkpoints_resumes_and_evaluates(ray_local, synth_shards, tmp_path):
    sets = [f"data.train={synth_shards['dir']}", f"storage.root={tmp_path / 'runs'}", "storage.name=long",
            "train.checkpoint_every=2", "train.batch_size=2", "train.log_every=1", "data.decode_cpus=0.25",
            "data.decode_batch_size=2", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "data.task=qa"]
    first = run_training(load_prepared("tiny_long", [*sets, "train.steps=2"]))
    uri = first["run"]
    assert read_meta(resolve_checkpoint(latest_checkpoint_dir(uri)))["step"] == 2
    again = run_training(load_prepared("tiny_long", [*sets, "train.steps=3"]))  # the same run: resumes at 2
    assert again["steps"] == 3 and [r["step"] for r in read_metrics(uri)] == [1, 2, 3]
    meta = read_meta(resolve_checkpoint(latest_checkpoint_dir(uri)))
    assert meta["step"] == 3 and meta["run_config"]["data"]["num_snippets"] == 128
    res = evaluate(uri, synth_shards["dir"], batch_size=4, choice="last")
    assert res["step"] == 3 and res["rows"] == 4 * synth_shards["num_clips"]  # 4 questions a clip, all scored
    assert res["skipped"] == {}
