"""The sample index and the training order: shards as the manifest says, samples by byte range, exact resume."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from mirasol_ray.data.index import (
    ReadPosition,
    build_index,
    epoch_permutation,
    read_samples,
    resolve_shards,
    sample_rng,
    scan_tar,
)
from mirasol_ray.data.shards import ShardWriter


def _write(out, n, shard_size=3, split="", overwrite=False, tag="a"):
    w = ShardWriter(str(out), shard_size, overwrite=overwrite)
    for i in range(n):
        w.write(f"{tag}{i:03d}", {"mp4": f"video {tag}{i}".encode() * (i + 1), "json": {"caption": f"c{i}"}},
                split=split if not callable(split) else split(i))
    return w.close()


def _keys(url) -> list[str]:
    shards = resolve_shards(str(url))
    index = build_index(shards)
    samples = read_samples(str(url), index.shards, index.refs(np.arange(len(index))))
    return [s["__key__"] for s in samples]


def test_manifest_offsets_equal_a_scan_and_read_each_sample(tmp_path):
    _write(tmp_path / "d", 7)
    shards = resolve_shards(str(tmp_path / "d"))
    assert shards.sizes == [3, 3, 1] and shards.num_samples == 7
    for path, offsets in zip(shards.paths, shards.offsets):
        with open(path, "rb") as f:
            assert scan_tar(f) == offsets
    index = build_index(shards)
    samples = read_samples(str(tmp_path / "d"), index.shards, index.refs(np.array([5, 0, 6])))
    assert [s["__key__"] for s in samples] == ["a005", "a000", "a006"]
    assert samples[0]["mp4"] == b"video a5" * 6 and json.loads(samples[0]["json"]) == {"caption": "c5"}


def test_foreign_tars_are_scanned_and_bad_ones_left_out(tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    with tarfile.open(d / "x.tar", "w") as t:  # two members per sample, keys with dots in the extension
        for name in ("s1.mp4", "s1.json", "s2.000.mp4", "s2.000.json", "dir/s3.wav"):
            data = name.encode() * 100
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    (d / "y.tar").write_bytes(b"<html>not a tar</html>" * 40)
    shards = resolve_shards(str(d))
    assert shards.manifest is None and [p.rsplit("/", 1)[1] for p in shards.paths] == ["x.tar", "y.tar"]
    index = build_index(shards)
    assert len(index) == 3 and list(index.bad_shards) == [str(d / "y.tar")]
    samples = read_samples(str(d), index.shards, index.refs(np.arange(3)))
    assert [s["__key__"] for s in samples] == ["s1", "s2", "dir/s3"]
    assert set(samples[1]) == {"__key__", "000.mp4", "000.json"}


def test_a_shard_cut_or_broken_mid_file_keeps_the_complete_samples_before_the_break(tmp_path):
    """A truncated tar (cut inside a member's data, or inside a header) or one with a bad header mid-file keeps
    the samples that are whole before the break, the one in progress left out; a file that is not a tar or
    cannot be opened gives none. Each is named with its reason (the skip counter counts them by file name)."""
    d = tmp_path / "cut"
    d.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for key in ("s1", "s2", "s3"):
            for ext in ("mp4", "json"):
                data = f"{key}.{ext}".encode() * 300
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    whole = buf.getvalue()
    with open(d / "whole.tar", "wb") as f:
        f.write(whole)
    with open(d / "whole.tar", "rb") as f:
        bounds = scan_tar(f)
    s3_mp4_header = bounds[2]  # s3 starts with its mp4 member
    (d / "in_data.tar").write_bytes(whole[: s3_mp4_header + 512 + 100])  # inside s3's mp4 data
    (d / "in_json.tar").write_bytes(whole[: bounds[3] - 200])  # inside s3's json (its mp4 is whole)
    broken = bytearray(whole)
    broken[bounds[2]: bounds[2] + 512] = b"x" * 512  # s3's first header is garbage
    (d / "bad_header.tar").write_bytes(bytes(broken))
    (d / "empty.tar").write_bytes(b"")
    (d / "one_cut.tar").write_bytes(whole[:512 + 100])  # its only header whole, the data cut
    (d / "gone.tar").symlink_to(tmp_path / "nowhere.tar")
    index = build_index(resolve_shards(str(d)))
    name = {str(d / n): n for n in os.listdir(d)}
    reasons = {name[p]: r for p, (r, _) in index.bad_shards.items()}
    assert reasons == {"in_data.tar": "truncated_shard", "in_json.tar": "truncated_shard",
                       "bad_header.tar": "bad_shard", "empty.tar": "not_a_tar", "gone.tar": "unreadable_shard",
                       "one_cut.tar": "truncated_shard"}
    samples = read_samples(str(d), index.shards, index.refs(np.arange(len(index))))
    by_shard: dict[str, list[str]] = {}
    for s, sample in zip(index.shard, samples):
        by_shard.setdefault(name[index.shards[int(s)]], []).append(sample["__key__"])
        assert set(sample) == {"__key__", "mp4", "json"}  # every kept sample is whole
    assert by_shard == {"whole.tar": ["s1", "s2", "s3"], "in_data.tar": ["s1", "s2"], "in_json.tar": ["s1", "s2"],
                        "bad_header.tar": ["s1", "s2"]}


def test_a_split_folder_never_reads_its_sibling(tmp_path):
    out = tmp_path / "out"
    _write(out, 8, split=lambda i: "val" if i >= 6 else "train")
    assert _keys(out / "train") == [f"a{i:03d}" for i in range(6)]
    assert _keys(out / "val") == ["a006", "a007"]
    with pytest.raises(ValueError, match="holds the splits train/, val/"):
        resolve_shards(str(out))
    (out / "train" / "manifest.json").unlink()  # an older build: the parent's manifest names the split's shards
    assert _keys(out / "train") == [f"a{i:03d}" for i in range(6)]


def test_a_folder_without_manifest_reads_only_its_own_tars(tmp_path):
    out = tmp_path / "out"
    _write(out, 8, split=lambda i: "val" if i >= 6 else "train")
    for m in out.rglob("manifest.json"):
        m.unlink()
    with pytest.raises(FileNotFoundError, match="subfolders train/, val/ hold shards"):
        resolve_shards(str(out))
    assert _keys(out / "val") == ["a006", "a007"]


def test_a_rebuild_is_refused_or_replaces_the_old_shards(tmp_path):
    out = tmp_path / "out"
    _write(out, 10)
    assert len(list(out.glob("*.tar"))) == 4
    with pytest.raises(FileExistsError, match="--overwrite"):
        _write(out, 2, tag="b")
    _write(out, 2, overwrite=True, tag="b")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert _keys(out) == ["b000", "b001"]
    # a stale tar that something else left there is not read: the manifest decides
    (out / "shard-000007.tar").write_bytes((out / "shard-000000.tar").read_bytes())
    assert _keys(out) == ["b000", "b001"]
    # a split build over a one-split one: the old root shards go
    _write(out, 4, split=lambda i: "val" if i == 3 else "train", overwrite=True, tag="c")
    assert not list(out.glob("*.tar")) and _keys(out / "train") == ["c000", "c001", "c002"]


def test_order_and_frame_choices_are_functions_of_seed_epoch_and_key():
    a, b = epoch_permutation(100, 3, 0), epoch_permutation(100, 3, 1)
    assert sorted(a) == list(range(100)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_permutation(100, 3, 0))
    assert np.array_equal(epoch_permutation(5, 3, 0, shuffle=False), np.arange(5))
    x = sample_rng(3, 1, "clip7").uniform(size=4)
    assert np.array_equal(x, sample_rng(3, 1, "clip7").uniform(size=4))
    assert not np.array_equal(x, sample_rng(3, 2, "clip7").uniform(size=4))
    assert not np.array_equal(x, sample_rng(3, 1, "clip8").uniform(size=4))


def _consume(pos: ReadPosition, n: int, world: int, takes: list[int], fail: set[int]
             ) -> tuple[list[list[int]], ReadPosition]:
    """Each worker r takes ``takes[r]`` rows of the stream from ``pos`` (positions in ``fail`` give no row);
    returns each worker's positions consumed, in order, and the position after."""
    pos = pos.for_world(world)
    seen, last = [], []
    for r in range(world):
        got, lr, epoch = [], -1, pos.epoch(n)
        while len(got) < takes[r]:
            for g in pos.worker_positions(epoch, n, r).tolist():
                if len(got) == takes[r]:
                    break
                lr = g
                if g not in fail:
                    got.append(g)
            epoch += 1
        seen.append(got)
        last.append(lr)
    return seen, pos.advance(last)


@pytest.mark.parametrize("world_after", [1, 2, 3])
def test_resume_deals_out_exactly_the_positions_not_consumed(world_after):
    n, fail = 10, {3, 4, 12}
    pos, seen = ReadPosition(), []
    for world, takes in ((2, [4, 4]), (3, [3, 3, 3]), (world_after, [5] * world_after)):
        got, pos = _consume(pos, n, world, takes, fail)
        seen += [g for w in got for g in w]
        assert len(seen) == len(set(seen)), "a position seen twice"
        c = pos.consumed()
        consumed = set(range(c.prefix)) | set(c.extra)
        assert set(seen) | (fail & consumed) == consumed, "a position lost, or seen and not counted"
        assert all(e > c.prefix for e in c.extra) and len(c.extra) < 3 * world
        assert ReadPosition.from_dict(json.loads(json.dumps(pos.to_dict()))) == pos
    # what remains is dealt out in stream order: the next positions of two workers are the lowest not consumed
    two = pos.for_world(2)
    nxt = sorted(g for r in range(2) for e in (two.epoch(n), two.epoch(n) + 1)
                 for g in two.worker_positions(e, n, r).tolist())[:6]
    assert nxt == [g for g in range(c.prefix, c.prefix + 30) if g not in c.extra][:6]


def test_a_resume_with_the_same_workers_continues_each_worker_exactly():
    n, world, fail = 7, 2, {2}
    whole, _ = _consume(ReadPosition(), n, world, [9, 9], fail)
    first, pos = _consume(ReadPosition(), n, world, [4, 4], fail)
    rest, _ = _consume(pos, n, world, [5, 5], fail)
    assert [a + b for a, b in zip(first, rest)] == whole
    assert max(g for w in whole for g in w) >= 2 * n  # the run crossed two epoch boundaries
