"""Datasets made once per test session: synthetic shards (real MP4s) and a shard of broken samples."""

from __future__ import annotations

import io
import json
import os
import tarfile

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
