"""``shards build`` as Ray work: the same bytes however it runs (1 or 2 CPUs, in this process, from and to S3, after
an interruption), complete shards kept by a re-run, another command on the same --out refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mirasol_ray import storage
from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.shards import run_build

NUM_CLIPS = 30
SHARD_SIZE = 4
TRANSCODE = 32


def _clip(i: int) -> bytes:
    """0.8 s at 10 fps, 48x64, a colour of its own with a bar, a tone of its own: each clip different bytes."""
    frames = np.empty((8, 48, 64, 3), np.uint8)
    frames[:] = np.random.default_rng(i).integers(0, 256, 3, dtype=np.uint8)
    for k in range(8):
        frames[k, :, k * 8:k * 8 + 8] = 255
    t = np.arange(12800) / 16000
    return encode_av(frames, 10, (0.3 * np.sin(2 * np.pi * (300 + 20 * i) * t)).astype(np.float32), gop=8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """30 clips (one corrupt, one missing) in jsonl, and the reference: a build in this process, without Ray."""
    root = tmp_path_factory.mktemp("build")
    videos = root / "videos"
    videos.mkdir()
    lines = []
    for i in range(NUM_CLIPS):
        name = f"c{i:02d}.mp4"
        if i == 7:
            (videos / name).write_bytes(b"<html>not a video</html>" * 40)
        elif i != 11:  # c11 is missing
            (videos / name).write_bytes(_clip(i))
        lines.append(json.dumps({"video": name, "task": "cls", "label": "ab"[i % 2]}))
    ann = root / "ann.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    ref = root / "ref"
    build = run_build("jsonl", str(ann), str(videos), str(ref), shard_size=SHARD_SIZE, transcode=TRANSCODE,
                      progress=False)
    assert build.manifest["skipped"] == {"unreadable_video": 1, "missing_video": 1}
    return {"root": root, "ann": str(ann), "videos": str(videos), "ref": ref, "manifest": build.manifest}


def _build(dataset: dict, out: str, **kw):
    return run_build("jsonl", dataset["ann"], kw.pop("videos", dataset["videos"]), out, shard_size=SHARD_SIZE,
                     transcode=TRANSCODE, progress=False, **kw)


def test_same_bytes_with_one_and_two_cpus(dataset, ray_local, tmp_path, build_files):
    ref = build_files(str(dataset["ref"]))
    assert sum(name.endswith(".tar") for name in ref) == 8  # 30 records, 1 missing: 29 clips in shards of 4
    for cpus in (1, 2):
        build = _build(dataset, str(tmp_path / f"cpus{cpus}"), use_ray=True, num_cpus=cpus)
        assert build_files(str(tmp_path / f"cpus{cpus}")) == ref, cpus
        assert build.clips == NUM_CLIPS - 1 and sum(build.nodes.values()) == NUM_CLIPS - 1
        assert all(node != "this process" for node in build.nodes)  # the work ran in Ray's workers
    assert build.manifest["num_samples"] == NUM_CLIPS - 2
    assert [s["samples"] for s in build.manifest["shards"]][:2] == [4, 3]  # c07's shard is one short


def test_interrupted_build_resumes_keeping_complete_shards(dataset, ray_local, tmp_path, build_files):
    out = tmp_path / "out"
    finished: list[str] = []

    def stop_after_two(shard, entry):
        finished.append(shard.rel)
        if len(finished) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(dataset, str(out), use_ray=True, num_cpus=2, on_shard=stop_after_two)
    assert not (out / "manifest.json").exists()  # the manifest comes last
    stamps = {name: (out / name).stat().st_mtime_ns for name in finished}
    build = _build(dataset, str(out), use_ray=True, num_cpus=2)
    assert build.kept_shards >= 2 and build.kept_shards + build.built_shards == 8
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == stamps  # not rebuilt
    assert build_files(str(out)) == build_files(str(dataset["ref"]))
    assert not list(out.glob(".shard-*"))
    again = _build(dataset, str(out))  # the same command once more: nothing left to make
    assert again.kept_shards == 8 and again.built_shards == 0 and again.clips == 0


def test_another_command_on_the_same_out_is_refused(dataset, tmp_path):
    out = tmp_path / "out"
    _build(dataset, str(out))
    with pytest.raises(FileExistsError, match=r"--transcode 32 there, 48 here"):
        run_build("jsonl", dataset["ann"], dataset["videos"], str(out), shard_size=SHARD_SIZE, transcode=48,
                  progress=False)
    with pytest.raises(FileExistsError, match=r"--shard-size 4 there, 5 here"):
        run_build("jsonl", dataset["ann"], dataset["videos"], str(out), shard_size=5, transcode=TRANSCODE,
                  progress=False)
    build = run_build("jsonl", dataset["ann"], dataset["videos"], str(out), shard_size=5, transcode=TRANSCODE,
                      progress=False, overwrite=True)
    assert build.kept_shards == 0 and len(build.manifest["shards"]) == 6
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [f"shard-{i:06d}.tar" for i in range(6)]


def test_s3_videos_to_s3_shards(dataset, ray_local, s3_server, build_files):
    fs = storage.fsspec_fs("s3://x")
    videos = f"s3://{s3_server.bucket}/build/videos"
    for p in sorted(Path(dataset["videos"]).iterdir()):
        fs.put_file(str(p), f"{storage.strip_scheme(videos)}/{p.name}")
    out = f"s3://{s3_server.bucket}/build/shards"
    build = _build(dataset, out, videos=videos, use_ray=True, num_cpus=2)
    assert build.manifest["skipped"] == dataset["manifest"]["skipped"]
    assert build_files(out) == build_files(str(dataset["ref"]))
