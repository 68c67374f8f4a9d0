"""The Ray Data pipeline on real shards of real MP4 files: local, S3, bad samples, Train workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mirasol_ray.config import load_config
from mirasol_ray.data.pipeline import (
    METADATA_ENV,
    _complete_tasks_inline,
    decoded_dataset,
    expand_shard_urls,
    find_manifest,
    make_skip_counter,
    read_skips,
)
from mirasol_ray.data.schema import check_row

CFG = load_config("tiny", ["data.task=all", "data.decode_cpus=0.5"]).data


def _collect(ds):
    rows = []
    for batch in ds.iter_batches(batch_size=4, batch_format="numpy"):
        for i in range(len(batch["key"])):
            rows.append({k: batch[k][i] for k in batch})
    return rows


def _run(ray, url, train=False, cfg=CFG):
    counter, name = make_skip_counter()
    rows = _collect(decoded_dataset(url, cfg, train=train, counter_name=name))
    ray.get(counter.snapshot.remote())
    snap = read_skips(counter)
    ray.kill(counter)
    return rows, snap


def test_local_shards_decode_to_the_contract(ray_local, synth_shards):
    rows, snap = _run(ray_local, synth_shards["dir"])
    assert snap["decoded"] == synth_shards["num_clips"] and snap["skipped"] == {}
    # one row per clip, holding all its texts (task=all): its caption and each of its questions
    assert sorted(r["key"] for r in rows) == sorted({r["key"] for r in rows})
    assert len(rows) == snap["rows"] == synth_shards["num_clips"]
    for r in rows:
        check_row(r, CFG)
        tasks = r["task"][r["text_mask"]]
        # captions: the clip's and its 4 timestamped ones (segments)
        assert (tasks == 0).sum() == 1 + 4 and (tasks == 1).sum() >= 3 and int(r["num_texts"]) == len(tasks)
    assert all(r["audio_present"] for r in rows)
    assert all(r["video"].std() > 0 for r in rows)
    # the synthetic captions (93-112 bytes) do not fit tiny's 48 target tokens: cut, kept, counted; questions fit
    cut = snap["truncation"]
    assert cut["caption_target"]["texts"] == 12 * 5 and cut["caption_target"]["cut"] == 12  # the segments fit
    assert cut["caption_target"]["limit"] == 48 < cut["caption_target"]["longest"]
    assert cut["qa_prompt"]["texts"] == 48 and cut["qa_prompt"]["cut"] == 0
    # the clips' captions fill 48 tokens (their segments', shorter, do not)
    assert all(r["target_mask"][r["text_mask"] & (r["task"] == 0) & r["text_span"].all(1)].all() for r in rows)


def test_decode_tasks_hand_back_their_cpu_in_the_turn_their_block_arrives(ray_local, synth_shards, monkeypatch):
    """Building the pipeline switches Ray Data's executor in this process to the inline metadata fetch, so a
    finished decode task frees its CPU one scheduling turn (up to 0.1 s) sooner; a user's own setting stands."""
    from ray.data._internal.execution import metadata_fetcher as mf

    monkeypatch.delenv(METADATA_ENV, raising=False)
    monkeypatch.setattr(mf, "_PREFETCH_ON_THREAD", True)  # Ray's default; restored after the test
    counter, name = make_skip_counter()
    decoded_dataset(synth_shards["dir"], CFG, train=False, counter_name=name, limit=2)
    ray_local.kill(counter)
    assert isinstance(mf.make_metadata_fetcher(), mf.InlineMetadataFetcher)
    monkeypatch.setenv(METADATA_ENV, "1")
    monkeypatch.setattr(mf, "_PREFETCH_ON_THREAD", True)
    _complete_tasks_inline()
    assert isinstance(mf.make_metadata_fetcher(), mf.ThreadedMetadataFetcher)


def test_bad_samples_are_skipped_and_counted(ray_local, synth_shards):
    rows, snap = _run(ray_local, synth_shards["bad_dir"])
    assert snap["decoded"] == 1
    assert [r["key"] for r in rows] == ["okclip"]
    assert sum(snap["skipped"].values()) == 4, snap
    skipped_keys = {k for ex in snap["examples"].values() for k in ex}
    assert skipped_keys == {"corrupt", "empty", "truncated", "nojson"}


def test_shards_without_offsets_are_scanned_alike_in_threads_and_in_ray_tasks(ray_local, synth_shards, monkeypatch):
    """A union of folders has no manifest offsets: its few shards are scanned by threads of the driver, and past
    RAY_SCAN_MIN_SHARDS by Ray tasks (here from 2), to the same index, the bad shard's reason included."""
    import numpy as np

    from mirasol_ray.data import pipeline

    union = "{" + synth_shards["dir"] + "," + synth_shards["bad_dir"] + "}"
    threads = pipeline.sample_index(union)
    monkeypatch.setattr(pipeline, "RAY_SCAN_MIN_SHARDS", 2)
    tasks = pipeline.sample_index(union)
    assert len(threads) == 12 + 5 and threads.shards == tasks.shards and threads.bad_shards == tasks.bad_shards
    for a in ("shard", "start", "end"):
        assert np.array_equal(getattr(threads, a), getattr(tasks, a))


def test_globs_brace_lists_and_single_files(synth_shards):
    d = synth_shards["dir"]
    all_tars = expand_shard_urls(d)
    assert len(all_tars) == 3
    assert expand_shard_urls(os.path.join(d, "shard-*.tar")) == all_tars
    assert expand_shard_urls(os.path.join(d, "shard-{000000..000001}.tar")) == all_tars[:2]
    assert find_manifest(d)["num_samples"] == synth_shards["num_clips"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        expand_shard_urls(os.path.join(d, "nowhere"))


def test_the_pipeline_keeps_the_dataset_order_in_small_blocks(ray_local, synth_shards):
    cfg = load_config("tiny", ["data.task=caption", "data.seed=1", "data.decode_batch_size=2"]).data
    ray_local.data.DataContext.get_current().execution_options.preserve_order = True
    try:
        rows, _ = _run(ray_local, synth_shards["dir"], train=True, cfg=cfg)
    finally:
        ray_local.data.DataContext.get_current().execution_options.preserve_order = False
    assert [r["key"] for r in rows] == [f"clip{i:06d}" for i in range(12)]
    assert [int(r["pos"]) for r in rows] == list(range(12))


def test_s3_shards(ray_local, s3_server, synth_shards):
    from mirasol_ray import storage

    fs = storage.fsspec_fs("s3://x")
    dest = f"{s3_server.bucket}/pipeline-shards"
    fs.put(synth_shards["dir"] + "/", dest + "/", recursive=True)
    url = f"s3://{dest}"
    assert len(expand_shard_urls(url)) == 3
    rows, snap = _run(ray_local, url)
    assert snap["decoded"] == synth_shards["num_clips"]
    local_rows, _ = _run(ray_local, synth_shards["dir"])
    by_key = {r["key"]: r for r in local_rows}
    for r in rows:  # eval decoding is deterministic: same bytes -> same tensors
        np.testing.assert_array_equal(r["video"], by_key[r["key"]]["video"])


def test_inspect_cli_json_and_contact_sheet(synth_shards, tmp_path):
    png = tmp_path / "sheet.png"
    bad_and_good = "{" + synth_shards["dir"] + "," + synth_shards["bad_dir"] + "}"
    proc = subprocess.run(
        [sys.executable, "-m", "mirasol_ray.cli", "data", "inspect", bad_and_good, "--json", "--png", str(png),
         "--num-cpus", "2", "--limit", "0", "--set", "data.tokenizer=byte"],  # all, and bytes: the cut captions
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["samples"] == synth_shards["num_clips"] + 5
    assert report["decoded"] == synth_shards["num_clips"] + 1
    assert sum(report["skipped"].values()) == 4
    n = synth_shards["num_clips"] + 1
    assert report["truncation"]["caption_target"]["cut"] == n  # the clips' captions; their segments' fit
    texts = report["truncation"]["caption_target"]["texts"]
    assert texts > n and report["truncation_warning"].startswith(
        f"warning: {n} of {texts} caption targets longer than data.max_target_len=48 tokens")
    assert report["shapes"]["video"]["shape"] == [CFG.num_snippets, CFG.frames_per_snippet, CFG.height,
                                                  CFG.width, 3]
    assert report["shapes"]["video"]["dtype"] == "uint8"
    assert png.stat().st_size > 10_000


def test_inspect_missing_path_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mirasol_ray.cli", "data", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "missing" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_shards_synth_cli_to_s3_then_inspect(s3_server, tmp_path):
    env = dict(os.environ)
    url = s3_server.url("cli-synth")
    proc = subprocess.run([sys.executable, "-m", "mirasol_ray.cli", "shards", "synth", "--out", url,
                           "--num-clips", "3", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "mirasol_ray.cli", "data", "inspect", url, "--json", "--png",
                           str(tmp_path / "s.png"), "--num-cpus", "2"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["decoded"] == 3
    shutil.rmtree(tmp_path, ignore_errors=True)
