"""Datasets made once per test session (synthetic shards of real MP4s, broken samples and shards), and helpers for
tests that run `mirasol` in subprocesses."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time

import pytest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """12 synthetic clips in 3 shards of 4, plus one shard holding 4 bad samples and 1 good one."""
    from mirasol_ray.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("synth")
    out = root / "shards"
    manifest = synthesize(str(out), 12, seed=3, shard_size=4, progress=False)
    good_tar = sorted(p for p in os.listdir(out) if p.endswith(".tar"))[0]
    with tarfile.open(out / good_tar) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    key = sorted(members)[0].split(".")[0]
    mp4, meta = members[f"{key}.mp4"], members[f"{key}.json"]
    bad = root / "bad"
    bad.mkdir()
    with tarfile.open(bad / "bad-000000.tar", "w") as t:
        _add(t, "corrupt.mp4", os.urandom(5000))
        _add(t, "corrupt.json", meta)
        _add(t, "empty.mp4", b"")
        _add(t, "empty.json", meta)
        _add(t, "truncated.mp4", mp4[: len(mp4) // 3])
        _add(t, "truncated.json", meta)
        _add(t, "nojson.mp4", mp4)
        _add(t, "okclip.mp4", mp4)
        _add(t, "okclip.json", meta)
    return {"dir": str(out), "manifest": manifest, "bad_dir": str(bad), "num_clips": 12,
            "meta": json.loads(meta)}


@pytest.fixture(scope="session")
def fault_shards(synth_shards, tmp_path_factory):
    """Folders of shards a run cannot learn from, made from the synthetic clips:

    - ``nodecode``: no clip decodes (a tar of corrupt/empty clips, and a file that is not a tar);
    - ``captions``: two good clips whose json holds only a caption (``data.task=qa`` matches nothing);
    - ``mixed``: a good shard, a file that is not a tar, a truncated tar (its first sample intact), a link to a
      shard that is gone, and a tar holding a sample whose json makes the decoder raise (``options: 5``).
    """
    root = tmp_path_factory.mktemp("faults")
    src = sorted(p for p in os.listdir(synth_shards["dir"]) if p.endswith(".tar"))
    with tarfile.open(os.path.join(synth_shards["dir"], src[0])) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    clips = [(n, d) for n, d in members if n.endswith(".mp4")]
    meta = json.loads(dict(members)[clips[0][0].replace(".mp4", ".json")])

    def tar(path, entries):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as t:
            for name, data in entries:
                _add(t, name, data)

    tar(root / "nodecode" / "a.tar", [("corrupt.mp4", os.urandom(4000)), ("corrupt.json", json.dumps(meta).encode()),
                                      ("empty.mp4", b""), ("empty.json", json.dumps(meta).encode())])
    (root / "nodecode" / "b.tar").write_bytes(b"<html>not a tar</html>" * 40)
    caption_only = json.dumps({"task": "caption", "caption": "a clip"}).encode()
    tar(root / "captions" / "c.tar", [("c1.mp4", clips[0][1]), ("c1.json", caption_only),
                                      ("c2.mp4", clips[1][1]), ("c2.json", caption_only)])
    mixed = root / "mixed"
    mixed.mkdir()
    with open(os.path.join(synth_shards["dir"], src[0]), "rb") as f:
        good = f.read()
    (mixed / "good.tar").write_bytes(good)
    (mixed / "notatar.tar").write_bytes(b"GIF89a" + os.urandom(3000))
    first = sum(512 + -(-len(d) // 512) * 512 for _, d in members[:2])  # the first sample's two members
    (mixed / "truncated.tar").write_bytes(good[: first + 512 + 700])  # cut inside the second sample's video
    (mixed / "gone.tar").symlink_to(root / "no-such-file.tar")
    tar(mixed / "odd.tar", [("odd.mp4", clips[0][1]), ("odd.json", json.dumps({**meta, "options": 5}).encode())])
    return {name: str(root / name) for name in ("nodecode", "captions", "mixed")} | {
        "truncated_kept": members[0][0].split(".")[0]}


@pytest.fixture()
def short_tmp():
    """A fresh temporary folder with a short path, for a subprocess's TMPDIR: the Ray it starts puts its session
    there (sockets included, whose paths must stay under ~100 characters) and mirasol its temporary folders, so a
    test can look at exactly what one run left behind. Removed afterwards."""
    path = tempfile.mkdtemp(prefix="mr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _session_processes(sid: int) -> list:
    """Live (not zombie) processes of the session ``sid`` (a subprocess started with ``start_new_session``)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def _wait_for(condition, timeout_s: float, what: str) -> None:
    """Wait until ``condition()`` holds, polling; fail naming ``what`` after ``timeout_s`` (a guard, not a delay)."""
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture()
def session_processes():
    return _session_processes


@pytest.fixture()
def wait_for():
    return _wait_for


def _sample_log(run) -> dict[int, dict[int, list[tuple[int, str]]]]:
    """step -> rank -> (stream position, key) of its rows, over every segment of a run with train.sample_log."""
    out: dict[int, dict[int, list[tuple[int, str]]]] = {}
    for f in sorted((run / "samples").glob("*-rank*.jsonl")):
        rank = int(f.stem.split("rank")[1])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {})[rank] = list(zip(rec["pos"], rec["keys"]))
    return out


def _build_files(out: str) -> dict[str, bytes]:
    """Every file a shards build wrote under ``out`` (local or s3://), its resume state aside; the manifests without
    their creation time: what two builds of the same inputs must share byte for byte."""
    from mirasol_ray import storage
    from mirasol_ray.data.shards import BUILD_DIR

    fs = storage.fsspec_fs(out)
    base = storage.strip_scheme(out).rstrip("/")
    got = {}
    for p in sorted(fs.find(base)):
        rel = p.strip("/")[len(base.strip("/")) + 1:]
        if rel.startswith(BUILD_DIR + "/"):
            continue
        data = fs.cat_file(p)
        if rel.endswith(".json"):
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "created"}, sort_keys=True).encode()
        got[rel] = data
    return got


@pytest.fixture()
def sample_log():
    return _sample_log


@pytest.fixture()
def build_files():
    return _build_files
