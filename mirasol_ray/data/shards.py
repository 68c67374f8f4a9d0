"""Writing WebDataset shards + ``manifest.json`` (the one writer behind ``shards synth`` and ``shards build``).

Layout under ``out`` (a local path, ``file://`` or ``s3://``)::

    shard-000000.tar ...  manifest.json                      (one split)
    train/shard-000000.tar ...  train/manifest.json
    val/shard-000000.tar ...    val/manifest.json  manifest.json   (named splits)

A sample's members are adjacent in its tar and share a key without dots (``clip000001.mp4``,
``clip000001.json``), the WebDataset convention Ray's ``read_webdataset`` needs (FIELD_NOTES). Tar headers carry
no time or owner, so the same samples give byte-identical shards. The manifest (open_clip's ``sizes.json`` idea)
is what readers go by (:mod:`mirasol_ray.data.index`): its shard list, sample counts, the byte offset of every
sample in its tar (``offsets``: one ranged read fetches a sample) and the label set. Each split folder gets its
own manifest too, so ``data.train = out/train`` is self-describing.

A folder that already holds a build is refused (``FileExistsError``) unless ``overwrite`` is given; then the new
build replaces it: shards and manifests of the old build that the new one does not rewrite are deleted when the
new manifest is written, so nothing stale stays behind (readers would ignore it anyway: the manifest decides).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from typing import IO, Any

import av
import numpy as np
import ray
from av.video.reformatter import Interpolation

from mirasol_ray import storage
from mirasol_ray.config import DataConfig
from mirasol_ray.data.formats import FORMATS, Record, Source, VideoRoot
from mirasol_ray.data.rows import sample_texts
from mirasol_ray.data.text import train_bpe_tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MAX_SKIPPED_ITEMS = 1000
DEFAULT_GOP = 32
"""Keyframe interval of re-encoded clips. Measured (decord, 10 s 25 fps clip at 128 px, 1 core): 4 / 16 / 64
sampled frames cost 12 / 26 / 32 ms at GOP 32 against 8 / 34 / 61 ms at GOP 8 and 24 / 24 / 26 ms at GOP 250. At
training resolution a seek costs more than decoding a few small frames, so a mid-length GOP is the best default."""
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
TOKENIZER_FILE = "tokenizer.json"
"""A tokenizer learnt from the samples' text (``shards synth``, ``shards build --tokenizer learn``): beside the root
manifest, which names it (``"tokenizer"``; a split folder's manifest names it relative to that folder)."""
DEFAULT_VOCAB_SIZE = 512
MIN_VOCAB_SIZE = 260


def _add_sample(tar: tarfile.TarFile, key: str, members: Mapping[str, bytes | dict]) -> str | None:
    """Append one sample's members to ``tar`` (a dict is stored as JSON); no time or owner in the headers, so the
    same samples give the same bytes. Returns the sample's string ``label``, if its json has one."""
    label = None
    for ext, value in members.items():
        if isinstance(value, dict):
            if isinstance(value.get("label"), str):
                label = value["label"]
            value = json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mode, info.mtime = len(value), 0o644, 0
        tar.addfile(info, io.BytesIO(value))
    return label


@dataclass
class _Split:
    """Writing state of one split folder."""

    uri: str
    path: str  # relative to the writer's ``out``; "" for the root
    tar: tarfile.TarFile | None = None
    local: str = ""  # the tar being written (a temp file for remote outputs)
    count: int = 0  # samples in the open tar
    offsets: list[int] = field(default_factory=list)  # where each sample of the open tar starts
    shards: list[dict[str, Any]] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards) + self.count


class ShardWriter:
    """Streams samples into ``shard-NNNNNN.tar`` files of ``shard_size`` samples; ``close()`` writes manifests.

    Local outputs are written in place (as ``.partial`` files renamed when complete); for ``s3://`` each tar is
    written to a local temporary file and uploaded when full, so memory holds one sample at a time. Nothing is
    written under ``out``'s parent or siblings. ``out`` is checked (writable, not an existing file) on creation.
    """

    def __init__(self, out: str, shard_size: int, overwrite: bool = False) -> None:
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        storage.check_output(out, "dir")  # before any sample is made
        self.out = out
        self.shard_size = shard_size
        self.fs = storage.fsspec_fs(out)
        self.remote = storage.is_remote(out)
        self._old = previous_build(self.fs, out)
        if self._old and not overwrite:
            raise FileExistsError(f"{out} already holds shards ({self._old[0]}): give an empty folder, or "
                                  "--overwrite to replace them")
        self._tmpdir = tempfile.mkdtemp(prefix="mirasol-shards-") if self.remote else ""
        self._splits: dict[str, _Split] = {}
        self._keys: set[str] = set()
        self.skipped: Counter = Counter()
        self.skipped_items: list[str] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.abort()

    def write(self, key: str, members: Mapping[str, bytes | dict], split: str = "") -> None:
        """Add one sample: ``members`` maps extension -> bytes (a dict is stored as JSON), in tar order."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key must be non-empty, without '.' or '/': {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        s = self._split(split)
        if s.tar is None:
            self._open(s)
        assert s.tar is not None
        s.offsets.append(s.tar.offset)
        label = _add_sample(s.tar, key, members)
        if label is not None:
            s.labels[label] += 1
        s.count += 1
        if s.count >= self.shard_size:
            self._finish(s)

    def skip(self, name: str, reason: str) -> None:
        """Count an input that could not become a sample; a warning line names it."""
        log.warning("skipped %s: %s", name, reason)
        self.skipped[reason] += 1
        if len(self.skipped_items) < MAX_SKIPPED_ITEMS:
            self.skipped_items.append(f"{name}: {reason}")

    def close(self, extra: Mapping[str, Any] | None = None,
              split_extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
        """Finish open shards, write ``manifest.json`` (root and per named split) and return the root manifest.

        ``extra`` is merged into every manifest (e.g. ``source``, ``chance``, a fixed ``label_set``);
        ``split_extra[split]`` overrides it in that split's manifest and summary.
        """
        for s in self._splits.values():
            if s.tar is not None:
                self._finish(s)
        manifest = write_manifests(self.out, self._splits, self.skipped, self.skipped_items, extra, split_extra)
        _remove_stale(self.fs, self.out, self._old, _manifest_files(manifest, self._splits))
        self._cleanup()
        return manifest

    def _split(self, name: str) -> _Split:
        if name not in self._splits:
            if name and not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"split name must be a plain folder name, got {name!r}")
            uri = storage.join(self.out, name) if name else self.out
            if not self.remote:
                os.makedirs(storage.strip_scheme(uri), exist_ok=True)
            self._splits[name] = _Split(uri=uri, path=name)
        return self._splits[name]

    def _shard_name(self, s: _Split) -> str:
        return f"shard-{len(s.shards):06d}.tar"

    def _open(self, s: _Split) -> None:
        name = self._shard_name(s)
        if self.remote:
            s.local = os.path.join(self._tmpdir, f"{s.path or 'root'}-{name}")
        else:
            s.local = os.path.join(storage.strip_scheme(s.uri), name + ".partial")
        s.tar = tarfile.open(s.local, "w", format=tarfile.PAX_FORMAT)

    def _finish(self, s: _Split) -> None:
        assert s.tar is not None
        end = s.tar.offset  # the end of the last sample, before the archive's closing blocks
        s.tar.close()
        name = self._shard_name(s)
        size = os.path.getsize(s.local)
        if self.remote:
            self.fs.put_file(s.local, storage.strip_scheme(storage.join(s.uri, name)))
            os.remove(s.local)
        else:
            os.replace(s.local, os.path.join(storage.strip_scheme(s.uri), name))
        s.shards.append({"name": name, "samples": s.count, "bytes": size, "offsets": [*s.offsets, end]})
        s.tar, s.local, s.count, s.offsets = None, "", 0, []

    def abort(self) -> None:
        """Drop the shard being written and the temporary folder (an error or an interrupt midway)."""
        for s in self._splits.values():
            if s.tar is not None:
                s.tar.close()
                os.remove(s.local)
                s.tar = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def write_manifests(out: str, splits: Mapping[str, _Split], skipped: Mapping[str, int], skipped_items: list[str],
                    extra: Mapping[str, Any] | None = None,
                    split_extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Write ``manifest.json`` under ``out`` (and in each named split's folder) for the finished ``splits``; returns
    the root manifest. ``extra`` is merged into every manifest, ``split_extra[split]`` into that split's."""
    extra, split_extra = dict(extra or {}), dict(split_extra or {})
    labels: Counter = Counter()
    for s in splits.values():
        labels.update(s.labels)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    shards = [dict(sh, name=f"{s.path}/{sh['name']}" if s.path else sh["name"])
              for s in splits.values() for sh in s.shards]
    manifest = {
        "format": "webdataset",
        "created": created,
        "num_samples": sum(sh["samples"] for sh in shards),
        "shards": shards,
        "label_set": sorted(labels),
        "skipped": dict(skipped),
        "skipped_items": list(skipped_items),
        "splits": {name or "all": {"path": s.path, "num_samples": s.num_samples, "num_shards": len(s.shards),
                                   "label_counts": dict(sorted(s.labels.items())),
                                   **split_extra.get(name, {})}
                   for name, s in splits.items()},
        **extra,
    }
    for name, s in splits.items():
        if name:
            per_split = dict(manifest, shards=s.shards, num_samples=s.num_samples,
                             splits={name: manifest["splits"][name]}, split=name, **split_extra.get(name, {}))
            if "tokenizer" in extra:  # the same file, named from the split's folder
                per_split["tokenizer"] = f"../{extra['tokenizer']}"
            storage.write_text(storage.join(s.uri, MANIFEST), json.dumps(per_split, indent=1))
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def _manifest_files(manifest: Mapping[str, Any], splits: Mapping[str, _Split]) -> set[str]:
    """What a build wrote under its ``out`` (relative paths), as its manifest names it."""
    return ({sh["name"] for sh in manifest["shards"]} | {f"{s.path}/{MANIFEST}" for s in splits.values() if s.path}
            | {MANIFEST, manifest.get("tokenizer")})


def previous_build(fs: Any, out: str) -> list[str]:
    """Files of an earlier build under ``out``, relative to it: its manifests and shards (the manifest's list,
    and ``shard-*.tar`` in ``out`` and its split folders)."""
    root = storage.strip_scheme(out)
    if not fs.isdir(root):
        return []
    found: list[str] = []
    old = None
    if fs.exists(f"{root}/{MANIFEST}"):
        found.append(MANIFEST)
        try:
            old = json.loads(storage.read_text(storage.join(out, MANIFEST)))
        except (OSError, ValueError):
            old = None
    folders = {""}
    if isinstance(old, dict):
        found += [str(sh["name"]) for sh in old.get("shards", []) if isinstance(sh, dict) and "name" in sh]
        if old.get("tokenizer") == TOKENIZER_FILE and fs.exists(f"{root}/{TOKENIZER_FILE}"):
            found.append(TOKENIZER_FILE)
        folders |= {str(v.get("path") or "") for v in (old.get("splits") or {}).values() if isinstance(v, dict)}
    for folder in sorted(folders):
        base = f"{root}/{folder}" if folder else root
        for p in fs.glob(f"{base}/shard-*.tar") + ([f"{base}/{MANIFEST}"] if folder and fs.exists(
                f"{base}/{MANIFEST}") else []):
            found.append(p.rstrip("/")[len(root.rstrip("/")) + 1:])
    return list(dict.fromkeys(found))


def _remove_stale(fs: Any, out: str, old: list[str], keep: set[str]) -> None:
    """Delete what the previous build wrote (``old``) that this one did not rewrite (``overwrite``)."""
    root = storage.strip_scheme(out)
    for rel in old:
        if rel not in keep and fs.exists(f"{root}/{rel}"):
            fs.rm(f"{root}/{rel}")


def write_tokenizer(out: str, metas: list[Mapping[str, Any]], vocab_size: int = DEFAULT_VOCAB_SIZE
                    ) -> dict[str, Any]:
    """Learn a byte-level BPE tokenizer (:func:`~mirasol_ray.data.text.train_bpe_tokenizer`) from every text of the
    samples ``metas`` (:func:`~mirasol_ray.data.rows.sample_texts`) and the default task prompts, and write it to
    ``out/tokenizer.json``; returns what the manifest records of it (pass it to :meth:`ShardWriter.close`).

    Callers pass the training samples only, so nothing of the held-out answers leaks into the vocabulary. Training
    with it: ``data.tokenizer=OUT/tokenizer.json``."""

    check_vocab_size(vocab_size)
    corpus = [t for m in metas for t in sample_texts(dict(m))] + [DataConfig.caption_prompt, DataConfig.cls_prompt]
    text = train_bpe_tokenizer(corpus, vocab_size)
    storage.write_text(storage.join(out, TOKENIZER_FILE), text)
    return {"tokenizer": TOKENIZER_FILE, "tokenizer_vocab_size": len(json.loads(text)["model"]["vocab"])}


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"tokenizer vocab size must be at least {MIN_VOCAB_SIZE} (the 256 bytes every text falls "
                         f"back on and 3 specials), got {vocab_size}")


def read_manifest(url: str) -> dict:
    """The manifest of a shard folder (or the ``manifest.json`` URI itself)."""
    uri = url if url.rstrip("/").endswith(".json") else storage.join(url, MANIFEST)
    return json.loads(storage.read_text(uri))


def probe_video(src: bytes | IO[bytes]) -> None:
    """Raise if ``src`` has no decodable video stream (decodes the first frame only)."""
    with av.open(io.BytesIO(src) if isinstance(src, bytes) else src) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        next(c.decode(video=0))


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


SCALE_FLAGS = Interpolation.AREA | Interpolation.ACCURATE_RND | Interpolation.BITEXACT
"""How a re-encoded clip's frames are resized (libswscale): on one thread, bit-exact (not by the CPU's SIMD
flavour). Measured on a loaded 2-core machine: swscale's own threads (PyAV's default) cost 1.5x the CPU time a clip;
BITEXACT costs nothing here."""
SEEK_MARGIN_S = 2.0
"""A cut from a long video seeks to the keyframe before ``start - SEEK_MARGIN_S`` instead of decoding from 0 (the
margin covers audio packets muxed ahead of their video)."""


def rebase_segments(segments: list, start: float, end: float) -> list:
    """Timestamped captions (``segments``) of a video cut to seconds [start, end): on the cut's clock (0 = its first
    frame), clipped to it; those wholly outside it are dropped, malformed ones kept as they are (the decode ignores
    them)."""
    out = []
    for seg in segments:
        try:
            s, e = float(seg["start"]) - start, float(seg["end"]) - start
        except (TypeError, KeyError, ValueError):
            out.append(seg)
            continue
        s, e = max(s, 0.0), min(e, end - start)
        if s < e:
            out.append({**seg, "start": round(s, 6), "end": round(e, 6)})
    return out


def transcode_video(src: bytes | IO[bytes], height: int | None = None, gop: int = DEFAULT_GOP,
                    sample_rate: int = 16000, window: tuple[float, float] | None = None) -> bytes:
    """Re-encode a clip to H.264 at ``height`` (None: the source's; width keeps the aspect ratio, even) + AAC mono
    ``sample_rate``; with ``window=(start, end)`` (seconds of the source) keep only that part.

    A cut is exact to the frame: it keeps every frame shown during [start, end) (a frame shown from before
    ``start`` until after it included: a window shorter than one frame keeps that one frame), and the clip's
    t = 0 is the first kept frame's display time, at most one frame before ``start`` (0 when ``start`` lies on the
    frame grid). The audio is cut on the same clock, from the source streams' timestamps (an audio stream that
    starts late is padded with silence), so video and audio stay aligned; it ends at ``end`` (or the last frame).

    Streams packet by packet from ``src`` (a file object is read incrementally and, for a cut, seeked close to
    the window: an hour-long video is never decoded from its start); only the small re-encoded clip is built in
    memory. Frames keep their timestamps on the output rate's grid (variable-rate inputs become constant rate).
    Keyframes every ``gop`` frames make sparse frame sampling cheap to decode (FIELD_NOTES).
    Raises ValueError when the window holds no frame (it starts after the video ends).
    """
    start, end = window if window is not None else (None, None)
    if window is not None and not (0 <= start < end):
        raise ValueError(f"window must satisfy 0 <= start < end, got {window}")
    with av.open(io.BytesIO(src) if isinstance(src, bytes) else src) as inp:
        if not inp.streams.video:
            raise ValueError("no video stream")
        vin = inp.streams.video[0]
        vin.codec_context.thread_count = 1  # a build runs one clip per CPU
        ain = inp.streams.audio[0] if inp.streams.audio else None
        rate = Fraction(vin.average_rate or vin.guessed_rate or 25).limit_denominator(10_000)
        src_h, src_w = vin.codec_context.height, vin.codec_context.width
        out_h = _even(height or src_h)
        width = _even(src_w * out_h / src_h)
        if start is not None and start > SEEK_MARGIN_S and vin.time_base:
            inp.seek(int((start - SEEK_MARGIN_S) / vin.time_base), stream=vin, backward=True)
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4") as out:
            vout = out.add_stream("h264", rate=rate, options={"crf": "23", "preset": "veryfast",
                                                              "x264-params": "mbtree=0"})  # see make_clip
            vout.width, vout.height, vout.pix_fmt = width, out_h, "yuv420p"
            vout.codec_context.time_base = 1 / rate
            vout.codec_context.gop_size = gop
            vout.codec_context.thread_count = 1  # x264's output depends on its thread count: one, on every node
            audio = _AudioCut(out, sample_rate) if ain is not None else None
            video = _VideoCut(out, vout, rate, start, end)
            for packet in inp.demux(*([vin] + ([ain] if ain is not None else []))):
                if packet.stream is vin:
                    if video.done:
                        continue
                    for frame in packet.decode():
                        video.add(frame)
                        if video.t0 is not None and audio is not None and not audio.started:
                            audio.start(video.t0, end)
                elif audio is not None:
                    if video.done and packet.pts is not None and packet.time_base is not None and \
                            float(packet.pts * packet.time_base) > end + SEEK_MARGIN_S:
                        break  # past the window (this stream ends short of it)
                    for frame in packet.decode():
                        audio.add(frame)
                if video.done and (audio is None or audio.done or video.t0 is None):
                    break
            if video.pending is not None and video.written == 0:  # flush: the window ends inside the last frame
                video.finish()
            if video.written == 0:
                raise ValueError("the window starts after the video ends" if window else "no decodable video frames")
            if audio is not None:
                if not audio.started:
                    audio.start(video.t0, end)
                audio.finish(video.last_end if end is None else min(end, video.last_end))
            out.mux(vout.encode(None))
    return buf.getvalue()


class _VideoCut:
    """Picks the frames shown during [start, end) and encodes them on the output grid (t = 0: the first one)."""

    def __init__(self, out, vout, rate: Fraction, start: float | None, end: float | None):
        self.out, self.vout, self.rate, self.start, self.end = out, vout, rate, start, end
        self.t0: float | None = None
        self.pending = None  # the last frame before start: shown at start unless the next frame starts there
        self.pending_time = 0.0
        self.last_pts, self.written, self.last_end, self.done = -1, 0, 0.0, False
        self._index = 0

    def _time(self, frame) -> float:
        t = float(frame.time) if frame.time is not None else self._index / float(self.rate)
        self._index += 1
        return t

    def add(self, frame) -> None:
        if self.done:
            return
        t = self._time(frame)
        if self.start is not None and t < self.start:
            self.pending, self.pending_time = frame, t
            return
        if self.end is not None and t >= self.end:
            self.finish()
            self.done = True
            return
        if self.pending is not None and (self.start is None or t > self.start):
            self._encode(self.pending, self.pending_time)
        self.pending = None
        self._encode(frame, t)

    def finish(self) -> None:
        """A window inside one frame's display time: that frame alone, if it is shown at ``start``."""
        if self.written == 0 and self.pending is not None:
            if self.start is not None and self.start >= self.pending_time + 1 / float(self.rate):
                return  # the video ended before the window
            self._encode(self.pending, self.pending_time)
        self.pending = None

    def _encode(self, frame, t: float) -> None:
        if self.t0 is None:
            self.t0 = t
        pts = max(round((t - self.t0) * self.rate), self.last_pts + 1)
        img = frame.reformat(width=self.vout.width, height=self.vout.height, format="yuv420p",
                             interpolation=SCALE_FLAGS, threads=1)
        img.pts, img.time_base, self.last_pts = pts, 1 / self.rate, pts
        self.out.mux(self.vout.encode(img))
        self.written += 1
        self.last_end = t + 1 / float(self.rate)


class _AudioCut:
    """Resamples the source audio to mono ``sample_rate`` and keeps the samples of [t0, end) on the source clock.

    Audio frames seen before the video's first kept frame (t0 unknown yet) wait in a small queue."""

    def __init__(self, out, sample_rate: int):
        self.stream = out.add_stream("aac", rate=sample_rate, layout="mono")
        self.out, self.sr = out, sample_rate
        self.resampler = av.AudioResampler(format="fltp", layout="mono", rate=sample_rate)
        self.t0, self.end = 0.0, None
        self.started, self.done = False, False
        self.queue: list = []
        self.first_time: float | None = None  # source time of resampled sample 0
        self.consumed = 0  # resampled samples seen
        self.written = 0  # output samples written

    def start(self, t0: float, end: float | None) -> None:
        self.t0, self.end, self.started = t0, end, True
        for frame in self.queue:
            self._take(frame)
        self.queue = []

    def add(self, frame) -> None:
        if self.done:
            return
        if self.first_time is None:
            self.first_time = float(frame.time) if frame.time is not None else 0.0
        if not self.started:
            self.queue.append(frame)
            if len(self.queue) > 4096:  # no video frame for a long time: keep memory bounded
                self.queue.pop(0)
            return
        self._take(frame)

    def _take(self, frame) -> None:
        for rf in self.resampler.resample(frame):
            self._samples(rf.to_ndarray().reshape(-1))

    def _samples(self, x) -> None:
        """Place resampled samples x (source samples consumed .. consumed + len) into the output."""
        offset = round((self.first_time - self.t0) * self.sr)  # output index of resampled sample 0
        lo = offset + self.consumed  # output index of x[0]
        self.consumed += len(x)
        total = None if self.end is None else round((self.end - self.t0) * self.sr)
        if total is not None and self.written >= total:
            self.done = True
            return
        if lo > self.written:  # the audio starts late (or has a gap): silence up to it
            self._write(np.zeros(lo - self.written, np.float32))
        keep = x[max(0, self.written - lo):]
        if total is not None:
            keep = keep[: max(0, total - self.written)]
        if len(keep):
            self._write(np.ascontiguousarray(keep, dtype=np.float32))
        if total is not None and self.written >= total:
            self.done = True

    def _write(self, pcm) -> None:
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.sr, self.written, Fraction(1, self.sr)
        self.written += len(pcm)
        self.out.mux(self.stream.encode(frame))

    def finish(self, end: float) -> None:
        """Flush the resampler and pad with silence to ``end`` (source seconds)."""
        if not self.done:
            for rf in self.resampler.resample(None):
                if self.first_time is not None:
                    self._samples(rf.to_ndarray().reshape(-1))
        total = round((end - self.t0) * self.sr)
        if total > self.written:
            self._write(np.zeros(total - self.written, np.float32))
        self.out.mux(self.stream.encode(None))


def _sample_key(name: str, used: set[str]) -> str:
    """A WebDataset key from a video's relative path: ``a/b.c.mp4`` -> ``a_b_c`` (+ ``_N`` if already used)."""
    stem = name.rsplit(".", 1)[0] if "." in os.path.basename(name) else name
    base = key = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "clip"
    n = 0
    while key in used:
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


BUILD_DIR = ".build"
"""Under ``out``: what a build needs to be resumed: its parameters (``state.json``, written before any work) and
one record per complete shard (``done/<shard>.json``, written once the shard's tar is whole in place). A re-run of
the same command keeps the shards these records name; a different command is refused, naming what differs."""
BUILD_STATE = "state.json"
DECODE_RESOURCE = "decode"
"""The custom resource of a cluster's decode nodes (see :data:`mirasol_ray.data.pipeline.DECODE_RESOURCE`): where
the cluster defines it, a build's per-clip tasks ask for one unit each, so transcoding lands on those nodes."""
TASK_RETRIES = 3
"""Ray retries of a clip or shard task whose worker or node was lost (a clip that fails to decode is a skip, not
a failure)."""
_PARAM_FLAGS = {"format": "--format", "annotations": "--annotations", "videos": "--videos", "split": "--split",
                "labels": "--labels", "answer_vocab": "--answer-vocab", "shard_size": "--shard-size",
                "transcode": "--transcode", "gop": "--gop", "sample_rate": "sample rate", "tokenizer": "--tokenizer",
                "vocab_size": "--vocab-size", "plan": "the annotations' records (a file changed since)"}


@dataclass(frozen=True)
class ClipJob:
    """One clip of a build, fixed before any work starts."""

    index: int  # the record's position in the converter's output: skips are reported in this order
    name: str  # how reports name it
    video: str  # full path or URI of the video
    key: str  # the sample key in its shard
    meta: dict[str, Any]  # the sample's json (a cut's clock already applied)
    window: tuple[float, float] | None  # seconds of the video to cut, or None: the whole file
    split: str  # the dataset's split (a learnt tokenizer reads the train split's text)


@dataclass(frozen=True)
class ShardJob:
    """One shard: a split folder's ``shard-NNNNNN.tar`` and the clips it holds, in order."""

    folder: str  # "" (``out`` itself) or the split's folder
    number: int
    clips: tuple[ClipJob, ...]

    @property
    def rel(self) -> str:
        name = f"shard-{self.number:06d}.tar"
        return f"{self.folder}/{name}" if self.folder else name


@dataclass(frozen=True)
class ClipOptions:
    """How every clip is made: ``transcode`` height (None: stored as is unless cut), keyframe interval, audio rate."""

    transcode: int | None
    gop: int
    sample_rate: int


@dataclass
class Build:
    """What :func:`run_build` did: the root manifest, and how it got there (not in the manifest, which does not
    depend on how it was made)."""

    manifest: dict[str, Any]
    clips: int  # clips (made or skipped) by this run's tasks
    kept_shards: int  # complete shards of an earlier run of the same command, kept
    built_shards: int  # shards written by this run
    nodes: dict[str, int]  # node (address and id) -> clips it did
    seconds: float


def _node() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def make_clip(job: ClipJob, opts: ClipOptions) -> tuple[dict[str, str], bytes]:
    """The per-clip work of a build: read the video straight from storage, then cut and re-encode it
    (:func:`transcode_video`) or check that it decodes (:func:`probe_video`).

    Returns ``({"ext": EXT, "node": ID}, bytes)``, or ``({"skip": REASON, "node": ID}, b"")`` for a clip that
    cannot be a sample (``missing_video``, ``unreadable_video``, ``window_outside_video``): a decoder error never
    stops a build. The decoder, the scaler (bit-exact) and x264 (whose output depends on its thread count) run one
    thread each, and x264 without macroblock-tree rate control (with it, ``mirasol bench build`` saw 1-3 clips of
    every 48-96 come out with other bytes in Ray's workers than in a Pool's processes; none since, in 576), so that
    a job gives the same bytes wherever it runs."""
    node = _node()
    try:
        with storage.fsspec_fs(job.video).open(storage.strip_scheme(job.video), "rb") as f:
            if opts.transcode is not None or job.window is not None:
                data, ext = transcode_video(f, opts.transcode, opts.gop, opts.sample_rate, window=job.window), "mp4"
            else:
                data, ext = f.read(), job.video.rsplit(".", 1)[-1].lower()
                probe_video(data)
    except FileNotFoundError:
        return {"skip": "missing_video", "node": node}, b""
    except ValueError as e:
        return {"skip": "window_outside_video" if "window" in str(e) else "unreadable_video", "node": node}, b""
    except Exception:  # any decoder error means the clip is unusable; the builder never stops for one
        return {"skip": "unreadable_video", "node": node}, b""
    return {"ext": ext if ext in VIDEO_EXTS else "mp4", "node": node}, data


def pack_shard(out: str, shard: ShardJob, clips: Iterable[tuple[dict[str, str], bytes]]) -> dict[str, Any] | None:
    """Write one shard's tar (its clips that made a sample, in order) whole into ``out``; returns its manifest entry
    (name, samples, bytes, sample offsets), or None when none of its clips made a sample (nothing is written).

    The tar is written to a temporary file and then renamed into place (local) or uploaded as one object
    (``s3://``), so a half-written shard is never in ``out`` under its name. ``clips`` is consumed one at a time."""
    uri = storage.join(out, shard.rel)
    name = posixpath.basename(shard.rel)
    remote = storage.is_remote(out)
    folder = None if remote else os.path.dirname(storage.strip_scheme(uri))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    try:
        offsets: list[int] = []
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for job, (status, data) in zip(shard.clips, clips, strict=True):
                if "skip" not in status:
                    offsets.append(tar.offset)
                    _add_sample(tar, job.key, {status["ext"]: data, "json": job.meta})
            end = tar.offset  # the end of the last sample, before the archive's closing blocks
        if not offsets:
            return None
        size = os.path.getsize(tmp)
        if remote:
            storage.fsspec_fs(out).put_file(tmp, storage.strip_scheme(uri))
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, storage.strip_scheme(uri))
        return {"name": name, "samples": len(offsets), "bytes": size, "offsets": [*offsets, end]}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _pack_task(out: str, shard: ShardJob, *results: Any) -> dict[str, Any] | None:
    """:func:`pack_shard` as a Ray task: ``results`` are the shard's clip statuses, then their bytes (Ray resolves
    top-level arguments on the task's node: the driver never holds a clip)."""
    n = len(shard.clips)
    return pack_shard(out, shard, zip(results[:n], results[n:], strict=True))


_clip_remote = ray.remote(num_returns=2, max_retries=TASK_RETRIES)(make_clip)
_pack_remote = ray.remote(max_retries=TASK_RETRIES)(_pack_task)


def _ensure_ray(num_cpus: int | None, address: str | None) -> bool:
    """Join the running Ray, ``address`` (or ``RAY_ADDRESS``), or start a local one with ``num_cpus``; True when
    this call started or joined it (and the build shuts it down after). Nothing of the driver's environment goes
    into a runtime env: local workers inherit it, a cluster's workers have their own."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=False, configure_logging=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def _run_ray(out: str, shards: list[ShardJob], opts: ClipOptions, num_cpus: int | None, address: str | None,
             on_clip: Callable[[dict[str, str]], None],
             on_shard: Callable[[ShardJob, list[dict[str, str]], dict | None], None]) -> dict[str, str]:
    """Every clip of ``shards`` as a Ray task (asking for the ``decode`` resource where the cluster has it, else a
    CPU), each shard packed by a task that takes its clips' outputs; at most ``num_cpus`` clips in flight on a
    cluster (a local Ray is started with that many CPUs). Shards are reported as they complete, in any order.
    Returns the cluster's node addresses by node id (for the summary)."""
    started = _ensure_ray(num_cpus, address)
    pending: dict[Any, Any] = {}
    try:
        cluster = ray.cluster_resources()
        decode = cluster.get(DECODE_RESOURCE, 0) > 0
        clip_opts = {"num_cpus": 1, "resources": {DECODE_RESOURCE: 1.0} if decode else None}
        # a shard task takes what a clip task takes: packing is short, and the build then needs no more worker
        # processes than CPUs (a zero-CPU task beside busy workers starts a new one: seconds of imports)
        pack_opts = clip_opts
        slots = int(cluster.get(DECODE_RESOURCE if decode else "CPU", 1))
        # a cap on a cluster is the clips in flight; a local Ray of num_cpus CPUs runs that many at once, and a few
        # queued keep its workers busy between the driver's rounds
        window = num_cpus if num_cpus and not started else 2 * max(1, min(slots, num_cpus or slots))
        clips = [(i, k) for i, sh in enumerate(shards) for k in range(len(sh.clips))]
        next_clip = 0
        in_flight = 0
        status_refs: dict[int, list[Any]] = {}
        data_refs: dict[int, list[Any]] = {}
        while next_clip < len(clips) or pending:
            while next_clip < len(clips) and in_flight < window:
                i, k = clips[next_clip]
                next_clip += 1
                status, data = _clip_remote.options(**clip_opts).remote(shards[i].clips[k], opts)
                status_refs.setdefault(i, []).append(status)
                data_refs.setdefault(i, []).append(data)
                pending[status] = ("clip", i)
                in_flight += 1
                if k == len(shards[i].clips) - 1:  # the shard's last clip: its pack task waits for them all
                    pack = _pack_remote.options(**pack_opts).remote(out, shards[i], *status_refs[i],
                                                                    *data_refs.pop(i))
                    pending[pack] = ("pack", i)
            refs = list(pending)
            ready, rest = ray.wait(refs, num_returns=1)  # the first to finish, then whatever else has
            if rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                kind, i = pending.pop(ref)
                if kind == "clip":
                    in_flight -= 1
                    on_clip(ray.get(ref))
                else:
                    entry = ray.get(ref)
                    on_shard(shards[i], ray.get(status_refs.pop(i)), entry)
        return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if started:
            ray.shutdown()


def _run_inline(out: str, shards: list[ShardJob], opts: ClipOptions, on_clip: Callable[[dict[str, str]], None],
                on_shard: Callable[[ShardJob, list[dict[str, str]], dict | None], None]) -> None:
    """The same work in this process, one clip at a time (small builds, tests, debugging)."""
    for shard in shards:
        statuses: list[dict[str, str]] = []

        def made(shard: ShardJob = shard, statuses: list = statuses) -> Iterator[tuple[dict[str, str], bytes]]:
            for job in shard.clips:
                status, data = make_clip(job, opts)
                statuses.append(status)
                on_clip(status)
                yield status, data

        entry = pack_shard(out, shard, made())
        on_shard(shard, statuses, entry)


def plan_shards(records: list[Record], root: VideoRoot, videos: str, shard_size: int, folders: bool
          ) -> tuple[list[ShardJob], list[tuple[int, str, str]]]:
    """The build's shards, fixed before any work: the clips to make, in record order, cut into shards of
    ``shard_size`` per split folder; and the records skipped without opening anything ``(index, name, reason)``.

    A video outside ``videos`` is refused by name (``outside_videos``), a missing one is ``missing_video``
    (object storage: one listing of ``videos``, not a request per record). Sample keys come from the records'
    names, in record order."""
    skips: list[tuple[int, str, str]] = []
    listed: set[str] | None = None
    vfs = root.fs
    if storage.is_remote(videos):
        listed = {p.strip("/") for p in vfs.find(storage.strip_scheme(videos))}
    used: set[str] = set()
    by_folder: dict[str, list[ClipJob]] = {}
    for index, rec in enumerate(records):
        if rec.skip:
            skips.append((index, rec.name, rec.skip))
            continue
        if not root.contains(rec.video):  # refused by name, never opened
            skips.append((index, rec.name, "outside_videos"))
            continue
        path = storage.strip_scheme(rec.video)
        if not (path.strip("/") in listed if listed is not None else vfs.isfile(path)):
            skips.append((index, rec.name, "missing_video"))
            continue
        meta = rec.meta
        if rec.window is not None:
            meta = dict(meta, cut=[round(rec.window[0], 6), round(rec.window[1], 6)])
            if isinstance(meta.get("segments"), list):  # timestamped captions follow the cut's clock
                meta["segments"] = rebase_segments(meta["segments"], *rec.window)
        folder = rec.split if folders else ""
        by_folder.setdefault(folder, []).append(ClipJob(index, rec.name, rec.video, _sample_key(rec.key or rec.name,
                                                                                                  used),
                                                        meta, rec.window, rec.split))
    shards = [ShardJob(folder, n // shard_size, tuple(jobs[n:n + shard_size]))
              for folder, jobs in by_folder.items() for n in range(0, len(jobs), shard_size)]
    return shards, skips


def _plan_digest(shards: list[ShardJob], skips: list[tuple[int, str, str]]) -> str:
    text = json.dumps([[[sh.rel, [dataclasses.astuple(c) for c in sh.clips]] for sh in shards], skips],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _start_state(out: str, params: dict[str, Any], overwrite: bool) -> tuple[list[str], bool]:
    """Check ``out`` against the build about to run, before any work: returns (files of an earlier build that this
    one replaces, whether this is a resume of the same command). Writes the build's ``state.json``."""
    fs = storage.fsspec_fs(out)
    root = storage.strip_scheme(out)
    state_uri = storage.join(out, BUILD_DIR, BUILD_STATE)
    old = previous_build(fs, out)
    state = None
    if fs.exists(f"{root}/{BUILD_DIR}/{BUILD_STATE}"):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(storage.read_text(state_uri))
    resume = not overwrite and isinstance(state, dict) and state.get("params") == params
    if not resume and not overwrite:
        if isinstance(state, dict) and isinstance(state.get("params"), dict):
            differ = [k for k in params if state["params"].get(k) != params[k]]
            what = "; ".join(f"{_PARAM_FLAGS.get(k, k)}" + ("" if k == "plan" else
                                                             f" {state['params'].get(k)!r} there, {params[k]!r} here")
                             for k in differ)
            raise FileExistsError(f"{out} holds a build made by another command ({what}): re-run that command to "
                                  "finish it, give another --out, or --overwrite to replace it")
        if old:
            raise FileExistsError(f"{out} already holds shards ({old[0]}): give an empty folder, or --overwrite "
                                  "to replace them")
    if not resume and fs.exists(f"{root}/{BUILD_DIR}"):
        fs.rm(f"{root}/{BUILD_DIR}", recursive=True)
    storage.write_text(state_uri, json.dumps({"params": params}, indent=1, sort_keys=True))
    return ([] if resume else old), resume


def _kept_shards(out: str, shards: list[ShardJob]) -> dict[int, tuple[list[dict[str, str]], dict | None]]:
    """The shards an earlier run of the same command completed: a done record, and its tar in place, whole."""
    fs = storage.fsspec_fs(out)
    root = storage.strip_scheme(out)
    kept = {}
    for i, sh in enumerate(shards):
        rec_path = f"{root}/{BUILD_DIR}/done/{sh.rel}.json"
        if not fs.exists(rec_path):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            rec = json.loads(storage.read_text(storage.join(out, BUILD_DIR, "done", sh.rel + ".json")))
            entry, statuses = rec["entry"], rec["statuses"]
            if len(statuses) != len(sh.clips):
                continue
            if entry is not None and not (fs.exists(f"{root}/{sh.rel}")
                                          and fs.size(f"{root}/{sh.rel}") == entry["bytes"]):
                continue
            kept[i] = (statuses, entry)
    return kept


def _node_names(ids: Iterable[str], addresses: Mapping[str, str]) -> dict[str, str]:
    """Node id -> ``address (id[:8])`` for the summary (two nodes of a local cluster share an address)."""
    return {i: f"{addresses.get(i, '?')} ({i[:8]})" if i else "this process" for i in ids}


def build_shards(fmt: str, annotations: str, videos: str, out: str, shard_size: int = 100, **kwargs: Any) -> dict:
    """:func:`run_build`'s manifest."""
    return run_build(fmt, annotations, videos, out, shard_size, **kwargs).manifest


def run_build(fmt: str, annotations: str, videos: str, out: str, shard_size: int = 100,
              transcode: int | None = None, gop: int | None = None, progress: bool = True,
              sample_rate: int = 16000, split: str = "",
              labels: list[str] | None = None, answer_vocab: int = 0, overwrite: bool = False,
              tokenizer: str = "", vocab_size: int = DEFAULT_VOCAB_SIZE, use_ray: bool = False,
              num_cpus: int | None = None, address: str | None = None,
              on_shard: Callable[[ShardJob, dict | None], None] | None = None, report: Any = None) -> Build:
    """Convert a dataset on disk (or object storage) into shards under ``out``.

    ``fmt`` names a converter in :data:`~mirasol_ray.data.formats.FORMATS`; ``videos`` is the dataset's video
    folder as distributed. When the annotations hold several splits (and ``split`` picks none), each goes to its
    own folder under ``out`` (``train/``, ``val/``, ...); one split goes to ``out`` itself.

    The work: before any clip is read, the records are cut into shards (:func:`plan_shards`: record order and
    ``shard_size``, per split folder), so the output never depends on how it was made. Each clip is read straight
    from ``videos``, cut and re-encoded or checked (:func:`make_clip`), and each shard written whole into place
    (:func:`pack_shard`); the manifest is written last. ``use_ray``: the clips run as Ray tasks over the cluster
    (``address``, ``RAY_ADDRESS``, the Ray already running in this process, or a local one of ``num_cpus`` CPUs;
    on a cluster ``num_cpus`` caps the clips in flight); otherwise one at a time in this process. Same inputs,
    same bytes, either way.

    Progress: with ``progress`` and a ``report`` (an object with ``say(line)`` and ``Progress(title, total, unit)``:
    the CLI passes :mod:`mirasol_ray.launch.console`, a layer above this one), phase lines and a progress bar (plain
    lines away from a terminal); without a ``report``, nothing is printed.

    Resuming: ``out/.build/`` records the build's parameters and each complete shard. Run again with the same
    arguments, a build keeps the shards already complete and makes the rest; a different build on the same ``out``
    is refused naming what differs, and a folder holding shards of no recorded build is refused, unless
    ``overwrite`` (then the new build replaces the old; the old build's files it does not rewrite are deleted
    when the new manifest is written).

    ``out`` is checked (writable, not an existing file) before anything is read. Records the converter rejects,
    videos outside ``videos`` (``outside_videos``: refused by name, never opened, judged by
    :meth:`VideoRoot.contains`), and videos that are missing or undecodable, are skipped, named in a warning line
    and counted in the manifest; the build goes on (a clip that fails to decode leaves its shard one sample
    short). A record with a time window is cut from its (untrimmed) video and re-encoded (:func:`transcode_video`,
    at ``transcode`` height or the source's); ``transcode=H`` re-encodes every clip at height H with a keyframe
    every ``gop`` frames (default :data:`DEFAULT_GOP`); otherwise the original bytes are stored after a one-frame
    decode check.

    ``answer_vocab=K`` (open-ended QA) keeps in the ``train`` split only the questions whose answer is one of the
    K most frequent training answers (the answer vocabulary of the VideoQA literature); other splits stay whole,
    and the manifest lists the vocabulary and how much of each split it covers. ``labels`` keeps only these
    classes (Kinetics-Sounds).

    ``tokenizer="learn"`` also learns a BPE tokenizer of ``vocab_size`` entries from the text of the samples
    written (the ``train`` split's when the build has one, else all of them) into ``out/tokenizer.json``
    (:func:`write_tokenizer`), which the manifest names; train with ``data.tokenizer=OUT/tokenizer.json``.

    ``on_shard(shard, entry)`` is called in the driver as each shard completes (``entry``: its manifest entry,
    None when none of its clips made a sample).
    """
    t0 = time.monotonic()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose from {', '.join(sorted(FORMATS))}")
    if not storage.exists(annotations):
        raise FileNotFoundError(f"annotations not found: {annotations}")
    vfs = storage.fsspec_fs(videos)
    if not vfs.isdir(storage.strip_scheme(videos)):
        raise FileNotFoundError(f"videos folder not found: {videos}")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if gop is not None and transcode is None:
        raise ValueError("gop applies to re-encoded clips: pass transcode=HEIGHT too")
    if transcode is not None and transcode <= 0:
        raise ValueError(f"transcode height must be positive, got {transcode}")
    if answer_vocab < 0:
        raise ValueError(f"answer_vocab must be >= 0, got {answer_vocab}")
    if tokenizer not in ("", "learn"):
        raise ValueError(f"tokenizer must be 'learn' (or empty: none), got {tokenizer!r}")
    if num_cpus is not None and num_cpus <= 0:
        raise ValueError(f"num_cpus must be positive, got {num_cpus}")
    if tokenizer:
        check_vocab_size(vocab_size)
    gop = gop or DEFAULT_GOP
    storage.check_output(out, "dir")  # before any annotation or video is read
    root = VideoRoot(videos)
    conv = FORMATS[fmt](Source(annotations, root, split, labels))
    records = conv.records
    names = sorted({r.split for r in records if r.split})  # a malformed line may not know its split
    folders = len(names) > 1  # several splits: one folder each
    for name in names if folders else []:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"split name must be a plain folder name, got {name!r}")
    extra: dict[str, Any] = {"source": fmt, **conv.info}
    if conv.label_set is not None:
        extra["label_set"] = conv.label_set
    if not folders and names and names[0]:
        extra["split"] = names[0]
    vocab = None
    if answer_vocab:
        records, vocab, dropped = _apply_answer_vocab(records, answer_vocab)
        extra["answer_vocab"] = vocab
        extra["answer_vocab_size"] = answer_vocab
        extra["questions_outside_vocab"] = dropped
    shards, pre_skips = plan_shards(records, root, videos, shard_size, folders)
    for _, name, reason in pre_skips:
        log.warning("skipped %s: %s", name, reason)
    opts = ClipOptions(transcode, gop, sample_rate)
    params = {"format": fmt, "annotations": annotations, "videos": videos, "split": split, "labels": labels,
              "answer_vocab": answer_vocab, "shard_size": shard_size, "transcode": transcode, "gop": gop,
              "sample_rate": sample_rate, "tokenizer": tokenizer, "vocab_size": vocab_size if tokenizer else None,
              "plan": _plan_digest(shards, pre_skips)}
    old, resume = _start_state(out, params, overwrite)
    kept = _kept_shards(out, shards) if resume else {}
    fs = storage.fsspec_fs(out)
    if not storage.is_remote(out):  # temporary files of a run that was killed mid-write
        for sh in shards:
            for p in fs.glob(storage.strip_scheme(storage.join(out, sh.folder)) + "/.shard-*.partial"):
                fs.rm(p)

    done: dict[int, tuple[list[dict[str, str]], dict | None]] = dict(kept)
    index_of = {id(sh): i for i, sh in enumerate(shards)}
    total = sum(len(sh.clips) for sh in shards)
    nodes: Counter = Counter()
    skipped = [len(pre_skips) + sum(1 for st, _ in kept.values() for s in st if "skip" in s)]
    ui = report if progress else None  # the CLI's console (a layer above data): phase lines and the progress bar

    def say(message: str) -> None:
        if ui is not None:
            ui.say(f"build {fmt}: {message}")

    todo = [sh for i, sh in enumerate(shards) if i not in kept]
    say(f"{len(records)} records: {total} clips in {len(shards)} shards" + (f" ({len(kept)} complete already)"
                                                                            if kept else ""))
    say(f"building {len(todo)} shards ({sum(len(sh.clips) for sh in todo)} clips) "
        + ("in Ray tasks (starting or joining Ray)" if use_ray else "in this process") + "...")
    bar = ui.Progress(f"build {fmt}", total, "clips") if ui is not None else None
    count = [sum(len(shards[i].clips) for i in kept)]
    if bar is not None:
        bar.update(count[0], f"skipped {skipped[0]}")

    def clip_done(status: dict[str, str]) -> None:
        nodes[status.get("node", "")] += 1
        skipped[0] += "skip" in status
        count[0] += 1
        if bar is not None:
            bar.update(count[0], f"skipped {skipped[0]}")

    def shard_done(shard: ShardJob, statuses: list[dict[str, str]], entry: dict | None) -> None:
        for job, st in zip(shard.clips, statuses, strict=True):
            if "skip" in st:
                log.warning("skipped %s: %s", job.name, st["skip"])
        storage.write_text(storage.join(out, BUILD_DIR, "done", shard.rel + ".json"),
                           json.dumps({"entry": entry, "statuses": statuses}, sort_keys=True))
        done[index_of[id(shard)]] = (statuses, entry)
        if on_shard is not None:
            on_shard(shard, entry)

    try:
        addresses: dict[str, str] = {}
        if use_ray:
            addresses = _run_ray(out, todo, opts, num_cpus, address, clip_done, shard_done)
        else:
            _run_inline(out, todo, opts, clip_done, shard_done)
        node_names = _node_names(nodes, addresses)
    finally:
        if bar is not None:
            bar.close()

    splits: dict[str, _Split] = {}
    stats: dict[str, _QAStats] = {}
    written: dict[str, list[Mapping[str, Any]]] = {}  # split -> the metadata of its samples (for a tokenizer)
    skips = list(pre_skips)
    cut = 0
    for i, sh in enumerate(shards):
        statuses, entry = done[i]
        for job, st in zip(sh.clips, statuses, strict=True):
            if "skip" in st:
                skips.append((job.index, job.name, st["skip"]))
        if entry is None:
            continue
        s = splits.setdefault(sh.folder, _Split(uri=storage.join(out, sh.folder) if sh.folder else out,
                                                path=sh.folder))
        s.shards.append(entry)
        for job, st in zip(sh.clips, statuses, strict=True):
            if "skip" in st:
                continue
            if isinstance(job.meta.get("label"), str):
                s.labels[job.meta["label"]] += 1
            stats.setdefault(sh.folder, _QAStats()).add(job.meta)
            cut += job.window is not None
            if tokenizer:
                written.setdefault(job.split, []).append(job.meta)
    skips.sort()
    if tokenizer:
        texts_of = written.get("train") or [m for ms in written.values() for m in ms]
        say(f"learning a tokenizer ({vocab_size} entries) from {len(texts_of)} samples' texts...")
        extra.update(write_tokenizer(out, texts_of, vocab_size))
    say(f"writing the manifest ({sum(len(sp.shards) for sp in splits.values())} shards)...")
    transcoded = {"height": transcode, "gop": gop, "sample_rate": sample_rate} if transcode else None
    split_extra = {folder: st.summary(vocab) for folder, st in stats.items()}
    manifest = write_manifests(out, splits, Counter(reason for _, _, reason in skips),
                               [f"{name}: {reason}" for _, name, reason in skips[:MAX_SKIPPED_ITEMS]],
                               {**extra, "transcode": transcoded, "cut": cut}, split_extra)
    _remove_stale(fs, out, old, _manifest_files(manifest, splits))
    return Build(manifest=manifest, clips=sum(nodes.values()), kept_shards=len(kept), built_shards=len(todo),
                 nodes={node_names[k]: v for k, v in nodes.most_common()}, seconds=time.monotonic() - t0)


def _open_questions(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The open-ended questions of a sample's json (``qas`` entries without options)."""
    qas = meta.get("qas")
    return [q for q in qas if isinstance(q, dict) and "options" not in q] if isinstance(qas, list) else []


def _apply_answer_vocab(records: list[Record], k: int) -> tuple[list[Record], list[list[Any]], int]:
    """Keep in the ``train`` records only questions answered inside the K most frequent training answers.

    The vocabulary comes from the training annotations (a clip whose video is missing counts too: the same
    files give the same vocabulary). Returns (records, vocabulary as [answer, count] pairs, questions dropped
    from the clips kept). Ties at the K-th place are broken by the answer's text."""
    train = [r for r in records if r.split == "train" and r.meta]  # clips whose video is missing count too
    if not train:
        raise ValueError("--answer-vocab needs the training split (train) in this build: its answers make the "
                         "vocabulary")
    counts = Counter(q["answer"] for r in train for q in _open_questions(r.meta))
    if not counts:
        raise ValueError("--answer-vocab applies to open-ended questions; this format has none")
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    keep = {a for a, _ in top}
    out, dropped = [], 0
    for r in records:
        if r.split != "train" or r.skip or not _open_questions(r.meta):
            out.append(r)
            continue
        qas = [q for q in r.meta["qas"] if q.get("answer") in keep]
        dropped += len(r.meta["qas"]) - len(qas)
        if not qas:
            out.append(dataclasses.replace(r, skip="no_question_in_vocab"))
            continue
        meta = dict(r.meta, qas=qas, question=qas[0]["question"], answer=qas[0]["answer"])
        out.append(dataclasses.replace(r, meta=meta))
    return out, [[a, c] for a, c in top], dropped


@dataclass
class _QAStats:
    """Per split: questions, their types and answers (with counts) over the samples written."""

    questions: int = 0
    qtypes: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)

    def add(self, meta: Mapping[str, Any]) -> None:
        qas = meta.get("qas")
        for q in qas if isinstance(qas, list) else []:
            if isinstance(q, dict):
                self.questions += 1
                self.qtypes[str(q.get("type", "other"))] += 1
                if "options" not in q and isinstance(q.get("answer"), str):
                    self.answers[q["answer"]] += 1

    def summary(self, vocab: list[list[Any]] | None) -> dict[str, Any]:
        if not self.questions:
            return {}
        out: dict[str, Any] = {"num_questions": self.questions, "qtype_counts": dict(sorted(self.qtypes.items()))}
        if self.answers:
            out["answer_counts"] = dict(sorted(self.answers.items(), key=lambda kv: (-kv[1], kv[0])))
            if vocab is not None:
                inside = {a for a, _ in vocab}
                covered = sum(c for a, c in self.answers.items() if a in inside)
                out["answer_vocab_coverage"] = covered / sum(self.answers.values())
        return out
