"""No credentials in pickled objects, output locations checked up front, the run folder's lease, scratch folders,
and the small pieces of the data path that used to warn or drop a message. Real files; no Ray."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from mirasol_ray import storage
from mirasol_ray.launch import lease as lease_mod
from mirasol_ray.launch.lease import LEASE_FILE, RunInUseError, RunLease, lease_token
from mirasol_ray.launch.scratch import PREFIX, process_gone, scratch_folder, sweep_stale


def test_the_s3_filesystem_ray_pickles_carries_no_credentials(monkeypatch):
    secret = "sentinel-" + os.urandom(8).hex()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-sentinel-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", secret + "-token")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.pyarrow_fs("s3://bucket/runs")
    blob = pickle.dumps(fs)
    assert path == "bucket/runs" and b"127.0.0.1:9" in blob
    assert secret.encode() not in blob and b"AKIA-sentinel-id" not in blob


def test_output_locations_are_checked_before_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError, match="adir is an existing folder"):
        storage.check_output(str(tmp_path / "adir"), "file")
    with pytest.raises(FileExistsError, match="afile is an existing file"):
        storage.check_output(str(tmp_path / "afile"), "dir")
    with pytest.raises(PermissionError, match="cannot write to .*afile/x.png"):
        storage.check_output(str(tmp_path / "afile" / "x.png"), "file")
    storage.check_output(str(tmp_path / "new" / "deeper" / "x.png"), "file")  # parents are made, probe removed
    assert os.listdir(tmp_path / "new" / "deeper") == []
    storage.check_output(str(tmp_path / "afile"), "file")  # overwriting a file is fine
    assert (tmp_path / "afile").read_text() == "x"


def _write_lease(run, **fields):
    run.mkdir(parents=True, exist_ok=True)
    (run / LEASE_FILE).write_text(json.dumps({"token": "other", "heartbeat": time.time(), **fields}))


def test_a_live_run_holds_its_folder_and_a_dead_one_is_taken_over(tmp_path):
    import psutil

    run = tmp_path / "run"
    me = psutil.Process()
    _write_lease(run, host=socket.gethostname(), pid=me.pid, started=me.create_time())  # alive: this process
    with pytest.raises(RunInUseError, match=r"run folder .*run is in use by another run \(pid \d+"):
        RunLease(str(run)).acquire()
    # a driver that was killed: same machine, its process gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(dead.pid).create_time() if not process_gone(dead.pid) else 0.0
    dead.wait()
    _write_lease(run, host=socket.gethostname(), pid=dead.pid, started=started)
    with RunLease(str(run), heartbeat_s=0.05) as held:
        assert held.taken_over["pid"] == dead.pid and lease_token(str(run)) == held.token
        first = json.loads((run / LEASE_FILE).read_text())["heartbeat"]
        while json.loads((run / LEASE_FILE).read_text())["heartbeat"] == first:  # the heartbeat moves on
            time.sleep(0.01)
        with pytest.raises(RunInUseError):
            RunLease(str(run)).acquire()
    assert not (run / LEASE_FILE).exists()  # released on exit


def test_a_holder_on_another_machine_is_judged_by_its_heartbeat(tmp_path):
    run = tmp_path / "run"
    _write_lease(run, host="elsewhere", pid=1, started=0)
    with pytest.raises(RunInUseError, match="elsewhere"):
        RunLease(str(run)).acquire()
    _write_lease(run, host="elsewhere", pid=1, started=0, heartbeat=time.time() - lease_mod.STALE_S - 1)
    lease = RunLease(str(run)).acquire()
    try:
        assert lease.taken_over["host"] == "elsewhere"
    finally:
        lease.release()


def test_scratch_folders_go_on_every_exit_and_a_dead_drivers_on_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{PREFIX}{dead.pid}-abc"
    (stale / "mirasol-ckpt-x").mkdir(parents=True)
    live = tmp_path / f"{PREFIX}{os.getpid()}-def"
    live.mkdir()
    with pytest.raises(KeyboardInterrupt), scratch_folder() as path:
        assert not stale.exists() and live.exists()
        os.makedirs(os.path.join(path, "mirasol-log-y"))
        raise KeyboardInterrupt
    assert not os.path.exists(path)
    assert sweep_stale(str(tmp_path)) == [] and live.exists()


def test_batches_handed_to_torch_are_writable_without_a_warning():
    from mirasol_ray.config import load_config
    from mirasol_ray.data.pipeline import to_torch
    from mirasol_ray.data.schema import TENSOR_COLUMNS, row_spec

    cfg = load_config("tiny").data
    batch = {k: np.zeros((2, *shape), dtype=dt) for k, (shape, dt) in row_spec(cfg).items()}
    for v in batch.values():
        v.flags.writeable = False  # as Ray's object store hands them out
    batch["key"] = np.array(["a", "b"], dtype=object)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_torch(batch)
    out["video"][0, 0, 0, 0, 0, 0] = 7  # its own memory
    assert all(k in out for k in TENSOR_COLUMNS) and batch["video"][0, 0, 0, 0, 0, 0] == 0


def test_an_unexpected_error_keeps_its_message(tmp_path):
    import io
    import tarfile
    from dataclasses import asdict

    import ray

    from mirasol_ray.config import load_config
    from mirasol_ray.data.index import build_index, resolve_shards
    from mirasol_ray.data.pipeline import decode_items
    from mirasol_ray.data.rows import decode_sample_safe

    cfg = load_config("tiny", ["data.task=all"]).data
    sample = {"__key__": "odd", "mp4": b"x", "json": json.dumps({"caption": "c", "options": 5}).encode()}
    rows, reason, detail = decode_sample_safe(sample, cfg, train=False, rng=np.random.default_rng(0))
    assert (rows, reason) == ([], "error") and detail.startswith("TypeError: ") and "int" in detail
    # a block in which every sample is skipped gives no batch at all (an empty one has no tensor shape to store)
    with tarfile.open(tmp_path / "odd.tar", "w") as t:
        for ext in ("mp4", "json"):
            info = tarfile.TarInfo(f"odd.{ext}")
            info.size = len(sample[ext])
            t.addfile(info, io.BytesIO(sample[ext]))
    index = build_index(resolve_shards(str(tmp_path)))
    items = {**index.refs(np.arange(1)), "pos": np.zeros(1, np.int64), "epoch": np.zeros(1, np.int64)}
    had_ray = ray.is_initialized()
    assert list(decode_items({"id": np.zeros(1, np.int64)}, items=items, shards=index.shards, url=index.url,
                             storage_settings=storage.settings(), data_cfg=asdict(cfg), train=False, label_set=None,
                             counter_name="none")) == []
    # outside Ray there is no skip counter to report to, and no Ray is started to look for one (a default Ray left
    # in the process by a bare call took every CPU and sent its workers' logs to the console of later runs)
    assert ray.is_initialized() == had_ray


class _Rows:
    """A training source of ``n`` samples in which only ``good`` decode, one row each (no Ray, no decode)."""

    def __init__(self, n: int, good: set[int]):
        from mirasol_ray.config import load_config

        self.n, self.good, self.cfg = n, good, load_config("tiny").data

    def __len__(self) -> int:
        return self.n

    def batches(self, positions, samples, epoch, batch_size, prefetch_batches):
        from mirasol_ray.data.pipeline import stack_rows
        from mirasol_ray.data.schema import row_spec

        rows = [{**{k: np.zeros(shape, dt) for k, (shape, dt) in row_spec(self.cfg).items()}, "key": f"s{s}",
                 "pos": int(g)} for g, s in zip(positions.tolist(), samples.tolist()) if s in self.good]
        if rows:
            yield stack_rows(rows, self.cfg)


def test_a_dataset_smaller_than_a_batch_trains_and_one_that_never_decodes_ends():
    """Issue 13 found runs looping over empty epochs forever. The training stream runs epoch after epoch without a
    gap, so one clip and a batch of 2 form batches from consecutive epochs (no worker is ever short of a batch
    while some clip decodes); when nothing decodes, one empty epoch ends it with NoRowsError (the loop turns it
    into the one-line NoBatchError naming the cause and the skip counts, each sample counted once)."""
    from mirasol_ray.data.index import ReadPosition
    from mirasol_ray.data.pipeline import NoRowsError, train_batches

    stream = train_batches(_Rows(1, {0}), ReadPosition().for_world(1), rank=0, batch_size=2, seed=0)
    first, second = next(stream), next(stream)
    assert first["key"] == ["s0", "s0"] and first["pos"].tolist() == [0, 1] and second["pos"].tolist() == [2, 3]
    assert (first["epoch"], first["last_pos"]) == (1, 1)
    seen: list[int] = []

    class Failing(_Rows):
        def batches(self, positions, samples, epoch, batch_size, prefetch_batches):
            seen.extend(positions.tolist())
            yield from ()

    with pytest.raises(NoRowsError):
        next(train_batches(Failing(3, set()), ReadPosition().for_world(1), rank=0, batch_size=2, seed=0))
    assert seen == [0, 1, 2]  # one epoch read, each sample once
    # resumed mid-epoch: the rest of that epoch alone is not proof enough, the next whole one is read too
    seen.clear()
    resumed = ReadPosition().for_world(1).advance([1])
    with pytest.raises(NoRowsError):
        next(train_batches(Failing(3, set()), resumed, rank=0, batch_size=2, seed=0))
    assert seen == [2, 3, 4, 5]


def test_a_source_read_several_epochs_a_pipeline_gives_the_same_stream():
    """DecodeSource starts a Ray Data pipeline per call, so train_batches gives it whole epochs until they hold
    ``span_samples`` of the worker's samples: the same batches (rows, order, epoch, last position) as one call an
    epoch, fresh or resumed mid-epoch, with two workers; and a span of samples that never decode still ends."""
    from mirasol_ray.data.index import ReadPosition
    from mirasol_ray.data.pipeline import NoRowsError, train_batches

    class Spanning(_Rows):
        span_samples = 10

        def __init__(self, n, good):
            super().__init__(n, good)
            self.calls: list[tuple[list[int], list[int]]] = []

        def batches(self, positions, samples, epochs, batch_size, prefetch_batches):
            assert epochs.shape == positions.shape and (epochs == positions // self.n).all()  # each sample's own
            self.calls.append((positions.tolist(), sorted(set(epochs.tolist()))))
            yield from super().batches(positions, samples, epochs, batch_size, prefetch_batches)

    def stream(source, position, rank, k):
        it = train_batches(source, position, rank=rank, batch_size=3, seed=4)
        return [(b["key"], b["pos"].tolist(), b["epoch"], b["last_pos"]) for b in (next(it) for _ in range(k))]

    fresh = ReadPosition().for_world(2)
    resumed = fresh.advance([6, 9])  # mid-epoch for both workers (7 samples an epoch, dealt to 2)
    for position in (fresh, resumed):
        for rank in (0, 1):
            spanning = Spanning(7, {0, 1, 2, 4, 5, 6})
            assert stream(spanning, position, rank, 12) == stream(_Rows(7, {0, 1, 2, 4, 5, 6}), position, rank, 12)
            assert len(spanning.calls[0][1]) == 1  # the first epoch alone, until a row has come
            positions, epochs = spanning.calls[1]
            assert len(epochs) >= 3 and len(positions) >= 10  # then one pipeline for several epochs
    never = Spanning(3, set())
    with pytest.raises(NoRowsError):
        next(train_batches(never, ReadPosition().for_world(1), rank=0, batch_size=2, seed=0))
    assert [c[0] for c in never.calls] == [[0, 1, 2]]  # one epoch read, each sample once
