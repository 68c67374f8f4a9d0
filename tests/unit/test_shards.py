"""Building shards from real MP4 files: tar layout, manifest counts, skipped inputs, transcoding."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest

from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.shards import ShardWriter, build_shards, read_manifest

FPS = 25


def _clip(seed: int, height: int = 96, width: int = 128, n: int = 50) -> bytes:
    """A 2 s clip: a flat colour with a bar sweeping across, a 440 Hz tone, one keyframe."""
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    frames[:] = np.random.default_rng(seed).integers(0, 256, 3, dtype=np.uint8)
    for i in range(n):
        frames[i, :, (i * 2) % width: (i * 2) % width + 8] = 255
    audio = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n * 16000 // FPS) / 16000)).astype(np.float32)
    return encode_av(frames, FPS, audio, gop=250)


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    for name, seed in (("a.mp4", 0), ("sub/b.mp4", 1), ("c.v2.mp4", 2)):
        (videos / name).write_bytes(_clip(seed))
    (videos / "corrupt.mp4").write_bytes(b"<html>not a video</html>" * 50)
    lines = [
        json.dumps({"video": "a.mp4", "task": "cls", "label": "dog"}),
        json.dumps({"video": "sub/b.mp4", "task": "qa", "question": "what?", "answer": "cat", "label": "cat"}),
        json.dumps({"video": "missing.mp4", "task": "cls", "label": "dog"}),
        "{not json",
        json.dumps({"task": "cls", "label": "dog"}),
        json.dumps({"video": "corrupt.mp4", "task": "cls", "label": "dog"}),
        json.dumps({"video": "c.v2.mp4", "task": "caption", "caption": "stripes", "start": 0.0, "end": 2.0}),
        json.dumps({"video": "a.mp4", "task": "qa", "question": "again?", "answer": "yes"}),
    ]
    ann = tmp_path / "ann.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    return ann, videos


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def test_build_round_trip(dataset, tmp_path, caplog):
    ann, videos = dataset
    out = tmp_path / "out"
    before = {p for p in tmp_path.rglob("*")}
    manifest = build_shards("jsonl", str(ann), str(videos), str(out), shard_size=2, progress=False)

    assert manifest["num_samples"] == 4
    assert manifest["skipped"] == {"missing_video": 1, "bad_json": 1, "no_video": 1, "unreadable_video": 1}
    assert any("missing.mp4" in s for s in manifest["skipped_items"])
    assert any("corrupt.mp4" in s for s in manifest["skipped_items"])
    assert "missing.mp4" in caplog.text and "corrupt.mp4" in caplog.text
    assert manifest["label_set"] == ["cat", "dog"]
    # shards are cut before any clip is read: the corrupt clip leaves its shard one sample short
    assert [s["samples"] for s in manifest["shards"]] == [2, 1, 1]
    assert read_manifest(str(out)) == manifest

    members = []
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        members += _members(path)
    names = [n for n, _ in members]
    assert names == ["a.mp4", "a.json", "sub_b.mp4", "sub_b.json", "c_v2.mp4", "c_v2.json", "a_1.mp4", "a_1.json"]
    blobs = dict(members)
    assert blobs["a.mp4"] == (videos / "a.mp4").read_bytes()  # stored as is without --transcode
    assert json.loads(blobs["sub_b.json"]) == {"task": "qa", "question": "what?", "answer": "cat", "label": "cat"}
    assert json.loads(blobs["c_v2.json"])["end"] == 2.0
    # nothing written outside out
    assert {p for p in tmp_path.rglob("*") if out not in (p, *p.parents)} == before
    assert sorted(p.name for p in out.iterdir()) == [".build", "manifest.json", "shard-000000.tar",
                                                     "shard-000001.tar", "shard-000002.tar"]


def test_transcode_height_and_gop(dataset, tmp_path):
    ann, videos = dataset
    out = tmp_path / "out"
    manifest = build_shards("jsonl", str(ann), str(videos), str(out), shard_size=10, transcode=48, gop=5,
                            progress=False)
    assert manifest["num_samples"] == 4 and manifest["transcode"]["gop"] == 5
    blobs = dict(_members(out / "shard-000000.tar"))
    with av.open(io.BytesIO(blobs["a.mp4"])) as c:
        v = c.streams.video[0]
        assert (v.codec_context.height, v.codec_context.width) == (48, 64)
        assert c.streams.audio and c.streams.audio[0].codec_context.name == "aac"
        keys = [p.is_keyframe for p in c.demux(v) if p.size]
    assert len(keys) == 50
    key_idx = np.flatnonzero(keys)
    assert key_idx[0] == 0 and np.diff(np.append(key_idx, len(keys))).max() <= 5
    with av.open(io.BytesIO(blobs["a.mp4"])) as c:
        audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    assert abs(len(audio) - 2 * 16000) < 2048  # 2 s (AAC pads the tail)


def test_errors_name_the_path(dataset, tmp_path):
    ann, videos = dataset
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_shards("jsonl", str(tmp_path / "nope.jsonl"), str(videos), str(tmp_path / "o"), progress=False)
    with pytest.raises(FileNotFoundError, match="novideos"):
        build_shards("jsonl", str(ann), str(tmp_path / "novideos"), str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="unknown format"):
        build_shards("nope", str(ann), str(videos), str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_writer_splits_and_keys(tmp_path):
    out = tmp_path / "out"
    writer = ShardWriter(str(out), shard_size=2)
    for i in range(5):
        writer.write(f"s{i}", {"mp4": b"x" * i, "json": {"label": "ab"[i % 2]}}, split="val" if i == 4 else "train")
    with pytest.raises(ValueError, match="without '.'"):
        writer.write("a.b", {"json": {}})
    with pytest.raises(ValueError, match="duplicate"):
        writer.write("s0", {"json": {}})
    manifest = writer.close({"source": "test"}, {"val": {"note": 1}})
    assert [s["name"] for s in manifest["shards"]] == [
        "train/shard-000000.tar", "train/shard-000001.tar", "val/shard-000000.tar"]
    assert manifest["splits"]["train"]["num_samples"] == 4 and manifest["splits"]["val"]["note"] == 1
    val = read_manifest(str(out / "val"))
    assert val["num_samples"] == 1 and val["shards"][0]["name"] == "shard-000000.tar" and val["note"] == 1
    assert not list(out.rglob("*.partial"))
    # shards are byte-identical for the same samples (no times or owners in tar headers)
    again = ShardWriter(str(tmp_path / "again"), shard_size=2)
    for i in range(4):
        again.write(f"s{i}", {"mp4": b"x" * i, "json": {"label": "ab"[i % 2]}}, split="train")
    again.close()
    assert (tmp_path / "again/train/shard-000001.tar").read_bytes() == (out / "train/shard-000001.tar").read_bytes()


def test_annotation_paths_outside_videos_are_refused_by_name(dataset, tmp_path):
    """``..``, absolute paths and symlinks that leave --videos are skipped as ``outside_videos``, judged by the
    resolved path before anything is opened: an outside file is neither packed nor reported as unreadable."""
    import os

    ann, videos = dataset
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.mp4").write_bytes((videos / "a.mp4").read_bytes())
    (outside / "secret.txt").write_text("not for the shards")
    os.mkfifo(outside / "pipe.mp4")  # opening it would block the build: it is judged by its name alone
    (videos / "link.mp4").symlink_to(outside / "x.mp4")
    (videos / "inner.mp4").symlink_to(videos / "a.mp4")  # a link that stays inside is fine
    lines = [{"video": "../outside/x.mp4"}, {"video": str(outside / "x.mp4")}, {"video": str(outside / "secret.txt")},
             {"video": "link.mp4"}, {"video": "sub/../../outside/pipe.mp4"}, {"video": "inner.mp4"},
             {"video": "sub/../a.mp4"}]
    ann2 = tmp_path / "escape.jsonl"
    ann2.write_text("".join(json.dumps({**d, "task": "caption", "caption": "c"}) + "\n" for d in lines))
    manifest = build_shards("jsonl", str(ann2), str(videos), str(tmp_path / "out"), progress=False)
    assert manifest["skipped"] == {"outside_videos": 5}
    refused = {s.split(": ")[0] for s in manifest["skipped_items"]}
    assert refused == {"../outside/x.mp4", str(outside / "x.mp4"), str(outside / "secret.txt"), "link.mp4",
                       "sub/../../outside/pipe.mp4"}
    assert manifest["num_samples"] == 2
    names = [n for shard in manifest["shards"] for n, _ in _members(tmp_path / "out" / shard["name"])]
    assert names == ["inner.mp4", "inner.json", "sub____a.mp4", "sub____a.json"]


def test_output_that_cannot_be_written_is_refused_before_any_input_is_read(dataset, tmp_path):
    ann, videos = dataset
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file is an existing file, not a folder"):
        build_shards("jsonl", str(ann), str(videos), str(tmp_path / "file"), progress=False)
    with pytest.raises(PermissionError, match="cannot write to .*file/below"):
        build_shards("jsonl", str(ann), str(videos), str(tmp_path / "file" / "below"), progress=False)
    assert (tmp_path / "file").read_text() == "x"


def test_build_learns_a_tokenizer_from_the_annotations_text(dataset, tmp_path, capsys):
    """``shards build --tokenizer learn``: a BPE tokenizer of the annotations' words beside the manifest, which
    ``data.tokenizer`` loads; every text round-trips, in far fewer tokens than bytes. A rebuild without it leaves
    no stale tokenizer behind."""
    from mirasol_ray.cli import main
    from mirasol_ray.config import load_config
    from mirasol_ray.data.rows import sample_texts
    from mirasol_ray.data.text import HFTokenizer, get_tokenizer

    _, videos = dataset
    metas = [
        {"caption": "a red kite climbs over the grey harbour wall while gulls circle and call above it",
         "qas": [{"question": "what climbs over the harbour wall?", "answer": "a red kite", "type": "video"},
                 {"question": "which birds call above the wall?", "options": ["gulls", "crows", "owls"],
                  "answer_idx": 0, "type": "audio"}], "label": "kite"},
        {"caption": "a grey boat leaves the harbour while a bell rings twice and gulls call above it",
         "question": "how many times does the bell ring?", "answer": "twice", "label": "boat"},
        {"caption": "gulls circle above the harbour wall and a red boat rings its bell",
         "mc_question": "what rings?", "options": ["a bell", "a phone"], "answer_idx": 0, "label": "boat"},
    ]
    ann = tmp_path / "words.jsonl"
    ann.write_text("".join(json.dumps({"video": v, **m}) + "\n" for v, m in zip(("a.mp4", "sub/b.mp4", "c.v2.mp4"),
                                                                                 metas)))
    out = tmp_path / "out"
    args = ["shards", "build", "--format", "jsonl", "--annotations", str(ann), "--videos", str(videos), "--quiet",
            "--out", str(out), "--in-process"]
    assert main([*args, "--tokenizer", "learn", "--vocab-size", "400"]) == 0
    path = str(out / "tokenizer.json")
    assert f"train with --set data.tokenizer={path}" in capsys.readouterr().out
    manifest = read_manifest(str(out))
    assert manifest["tokenizer"] == "tokenizer.json" and 260 <= manifest["tokenizer_vocab_size"] <= 400
    tok = get_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and load_config("tiny", [f"data.tokenizer={path}"]).data.tokenizer == path
    texts = [t for m in metas for t in sample_texts(m)]
    assert {"a red kite", "gulls", "how many times does the bell ring?", "kite", "what rings?"} <= set(texts)
    for text in texts + ["Ünseen wörds, 42!"]:  # byte fallback: any text still encodes
        assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id]) == text
    tokens, nbytes = sum(len(tok.encode(t)) for t in texts), sum(len(t.encode()) for t in texts)
    assert tokens * 3 < nbytes, (tokens, nbytes)
    for caption in (m["caption"] for m in metas):
        assert len(tok.encode(caption)) <= len(caption.split()) + 1  # about one token a word
    # bad uses are one-line errors before anything is written; a rebuild without a tokenizer removes the old one
    assert main([*args, "--vocab-size", "400", "--overwrite"]) == 2
    assert main([*args, "--tokenizer", "learn", "--vocab-size", "100", "--overwrite"]) == 2
    assert "at least 260" in capsys.readouterr().err and (out / "tokenizer.json").exists()
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "tokenizer.json").exists() and "tokenizer" not in read_manifest(str(out))


def test_build_says_what_it_is_doing_off_a_terminal(dataset, tmp_path, capsys):
    """Issue 34: ``shards build``'s phase lines and plain progress lines (stderr is no terminal here)."""
    ann, videos = dataset
    from mirasol_ray.launch import console

    build_shards("jsonl", str(ann), str(videos), str(tmp_path / "out"), shard_size=2, progress=True,
                 tokenizer="learn", vocab_size=300, report=console)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == "build jsonl: 8 records: 5 clips in 3 shards", err
    assert "build jsonl: building 3 shards (5 clips) in this process..." in err
    # plain progress lines, not a bar; the skips so far (3 records before any clip is read, then the corrupt clip)
    assert "build jsonl: 5/5 clips (100%)" in err and err.count("clips (") == 5 and "skipped 4" in err
    assert "\r" not in err
    assert "build jsonl: learning a tokenizer (300 entries)" in err
    assert lines[-1] == "build jsonl: writing the manifest (3 shards)...", err
