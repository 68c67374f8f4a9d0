"""Exact resume, checked by sample keys: a run stopped at an awkward step and resumed, with the same or another
number of Train workers, sees exactly what the uninterrupted run would have seen, none twice and none lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mirasol_ray.config import load_config
from mirasol_ray.data.index import epoch_permutation, read_samples
from mirasol_ray.data.pipeline import sample_index
from mirasol_ray.launch.train import run_training

# 12 good clips + a shard of 5 samples of which 4 fail to decode: failures use positions and give no rows, so the
# two workers drift apart in the stream (what the resume must account for). Epochs of 17 positions; each step
# takes 2 rows per worker.
BATCH, STOP, END = 2, 4, 6
BAD = {"corrupt", "empty", "truncated", "nojson"}


def _cfg(data: str, root: Path, name: str, steps: int, workers: int):
    return load_config("tiny", [
        f"data.train='{data}'", f"storage.root={root}", f"storage.name={name}", f"train.steps={steps}",
        f"train.batch_size={BATCH}", "train.checkpoint_every=100", "train.log_every=100", "train.sample_log=true",
        "data.task=caption", "data.seed=5", "data.decode_cpus=0.25", "data.decode_batch_size=2",
        f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={1 / workers}"])


def _rows(steps, first: int, last: int) -> list[tuple[int, str]]:
    return [row for s in range(first, last + 1) for r in sorted(steps[s]) for row in steps[s][r]]


@pytest.fixture(scope="module")
def data(synth_shards):
    return "{" + synth_shards["dir"] + "," + synth_shards["bad_dir"] + "}"


def test_stopped_and_resumed_runs_see_exactly_the_uninterrupted_samples(ray_local, data, tmp_path, sample_log):
    index = sample_index(data)
    keys = [s["__key__"] for s in read_samples(index.url, index.shards, index.refs(np.arange(len(index))))]
    n = len(keys)
    assert n == 17
    failing = {p for p in range(4 * n) if keys[epoch_permutation(n, 5, p // n)[p % n]] in BAD}

    whole = sample_log(_run(data, tmp_path, "whole", END, 2))
    assert sorted(whole) == list(range(1, END + 1))
    rows = _rows(whole, 1, END)
    assert len({p for p, _ in rows}) == len(rows), "a stream position seen twice"
    for p, k in rows:  # position p is the epoch's permutation of the samples, as the pure functions say
        assert keys[epoch_permutation(n, 5, p // n)[p % n]] == k
    for e in range(2):  # each clip at most once an epoch
        in_epoch = [k for p, k in rows if p // n == e]
        assert len(in_epoch) == len(set(in_epoch))

    # stopped after step 4 (mid-epoch, the workers at different stream positions), resumed with 2 workers
    _run(data, tmp_path, "stopped", STOP, 2)
    shutil.copytree(tmp_path / "stopped", tmp_path / "one-worker")
    resumed = sample_log(_run(data, tmp_path, "stopped", END, 2))
    assert resumed == whole, "the same workers resume each on exactly its own next samples"

    # the same stop resumed by one worker: the rest of the stream, from the lowest position not consumed
    before = {p for p, _ in _rows(whole, 1, STOP)}
    steps_after = 2 * (END - STOP)
    one = sample_log(_run(data, tmp_path, "one-worker", STOP + steps_after, 1))
    after = [p for p, _ in _rows(one, STOP + 1, STOP + steps_after)]
    assert len(after) == len(set(after)) and not before & set(after), "a sample seen twice"
    assert after == sorted(after), "one worker reads the stream in order"
    covered = before | set(after) | {p for p in failing if p < max(after)}
    assert covered == set(range(max(after) + 1)), "a sample lost: the stream up to the last one read has a gap"


def _run(data: str, root: Path, name: str, steps: int, workers: int) -> Path:
    summary = run_training(_cfg(data, root, name, steps, workers))
    assert summary["steps"] == steps
    return root / name
