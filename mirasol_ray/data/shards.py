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

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from typing import IO, Any

import av
import numpy as np
from tqdm import tqdm

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
        self._old = self._previous_build()
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
        for ext, value in members.items():
            if isinstance(value, dict):
                if isinstance(value.get("label"), str):
                    s.labels[value["label"]] += 1
                value = json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(value), 0o644, 0
            s.tar.addfile(info, io.BytesIO(value))
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
        extra, split_extra = dict(extra or {}), dict(split_extra or {})
        for s in self._splits.values():
            if s.tar is not None:
                self._finish(s)
        labels = Counter()
        for s in self._splits.values():
            labels.update(s.labels)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        shards = [dict(sh, name=f"{s.path}/{sh['name']}" if s.path else sh["name"])
                  for s in self._splits.values() for sh in s.shards]
        manifest = {
            "format": "webdataset",
            "created": created,
            "num_samples": sum(sh["samples"] for sh in shards),
            "shards": shards,
            "label_set": sorted(labels),
            "skipped": dict(self.skipped),
            "skipped_items": self.skipped_items,
            "splits": {name or "all": {"path": s.path, "num_samples": s.num_samples, "num_shards": len(s.shards),
                                       "label_counts": dict(sorted(s.labels.items())),
                                       **split_extra.get(name, {})}
                       for name, s in self._splits.items()},
            **extra,
        }
        for name, s in self._splits.items():
            if name:
                per_split = dict(manifest, shards=s.shards, num_samples=s.num_samples,
                                 splits={name: manifest["splits"][name]}, split=name, **split_extra.get(name, {}))
                if "tokenizer" in extra:  # the same file, named from the split's folder
                    per_split["tokenizer"] = f"../{extra['tokenizer']}"
                storage.write_text(storage.join(s.uri, MANIFEST), json.dumps(per_split, indent=1))
        storage.write_text(storage.join(self.out, MANIFEST), json.dumps(manifest, indent=1))
        self._remove_stale({sh["name"] for sh in shards} | {f"{s.path}/{MANIFEST}" for s in self._splits.values()
                                                           if s.path} | {MANIFEST, extra.get("tokenizer")})
        self._cleanup()
        return manifest

    def _previous_build(self) -> list[str]:
        """Files of an earlier build under ``out``, relative to it: its manifests and shards (the manifest's list,
        and ``shard-*.tar`` in ``out`` and its split folders)."""
        root = storage.strip_scheme(self.out)
        if not self.fs.isdir(root):
            return []
        found: list[str] = []
        old = None
        if self.fs.exists(f"{root}/{MANIFEST}"):
            found.append(MANIFEST)
            try:
                old = json.loads(storage.read_text(storage.join(self.out, MANIFEST)))
            except (OSError, ValueError):
                old = None
        folders = {""}
        if isinstance(old, dict):
            found += [str(sh["name"]) for sh in old.get("shards", []) if isinstance(sh, dict) and "name" in sh]
            if old.get("tokenizer") == TOKENIZER_FILE and self.fs.exists(f"{root}/{TOKENIZER_FILE}"):
                found.append(TOKENIZER_FILE)
            folders |= {str(v.get("path") or "") for v in (old.get("splits") or {}).values() if isinstance(v, dict)}
        for folder in sorted(folders):
            base = f"{root}/{folder}" if folder else root
            for p in self.fs.glob(f"{base}/shard-*.tar") + ([f"{base}/{MANIFEST}"] if folder and self.fs.exists(
                    f"{base}/{MANIFEST}") else []):
                found.append(p.rstrip("/")[len(root.rstrip("/")) + 1:])
        return list(dict.fromkeys(found))

    def _remove_stale(self, keep: set[str]) -> None:
        """Delete what the previous build wrote that this one did not rewrite (``overwrite``)."""
        root = storage.strip_scheme(self.out)
        for rel in self._old:
            if rel not in keep and self.fs.exists(f"{root}/{rel}"):
                self.fs.rm(f"{root}/{rel}")

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
        ain = inp.streams.audio[0] if inp.streams.audio else None
        rate = Fraction(vin.average_rate or vin.guessed_rate or 25).limit_denominator(10_000)
        src_h, src_w = vin.codec_context.height, vin.codec_context.width
        out_h = _even(height or src_h)
        width = _even(src_w * out_h / src_h)
        if start is not None and start > SEEK_MARGIN_S and vin.time_base:
            inp.seek(int((start - SEEK_MARGIN_S) / vin.time_base), stream=vin, backward=True)
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4") as out:
            vout = out.add_stream("h264", rate=rate, options={"crf": "23", "preset": "veryfast"})
            vout.width, vout.height, vout.pix_fmt = width, out_h, "yuv420p"
            vout.codec_context.time_base = 1 / rate
            vout.codec_context.gop_size = gop
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
        img = frame.reformat(width=self.vout.width, height=self.vout.height, format="yuv420p", interpolation="AREA")
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


def build_shards(fmt: str, annotations: str, videos: str, out: str, shard_size: int = 100,
                 transcode: int | None = None, gop: int | None = None, progress: bool = True,
                 sample_rate: int = 16000, split: str = "",
                 labels: list[str] | None = None, answer_vocab: int = 0, overwrite: bool = False,
                 tokenizer: str = "", vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict:
    """Convert a dataset on disk (or object storage) into shards under ``out``; returns the root manifest.

    ``fmt`` names a converter in :data:`~mirasol_ray.data.formats.FORMATS`; ``videos`` is the dataset's video
    folder as distributed. When the annotations hold several splits (and ``split`` picks none), each goes to its
    own folder under ``out`` (``train/``, ``val/``, ...); one split goes to ``out`` itself.

    ``out`` is checked (writable, not an existing file) before anything is read. Records the converter rejects,
    videos outside ``videos`` (``outside_videos``: refused by name, never opened, judged by
    :meth:`VideoRoot.contains`), and videos that are missing or undecodable, are skipped, named in a warning line
    and counted in the manifest; the build goes on. A record with a time window is cut from its (untrimmed)
    video and re-encoded (:func:`transcode_video`, at ``transcode`` height or the source's); ``transcode=H``
    re-encodes every clip at height H with a keyframe every ``gop`` frames (default :data:`DEFAULT_GOP`);
    otherwise the original bytes are stored after a one-frame decode check.

    ``answer_vocab=K`` (open-ended QA) keeps in the ``train`` split only the questions whose answer is one of the
    K most frequent training answers (the answer vocabulary of the VideoQA literature); other splits stay whole,
    and the manifest lists the vocabulary and how much of each split it covers. ``labels`` keeps only these
    classes (Kinetics-Sounds). A folder ``out`` that already holds shards is refused unless ``overwrite`` (then
    the new build replaces the old one, see :class:`ShardWriter`).

    ``tokenizer="learn"`` also learns a BPE tokenizer of ``vocab_size`` entries from the text of the samples
    written (the ``train`` split's when the build has one, else all of them) into ``out/tokenizer.json``
    (:func:`write_tokenizer`), which the manifest names; train with ``data.tokenizer=OUT/tokenizer.json``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose from {', '.join(sorted(FORMATS))}")
    if not storage.exists(annotations):
        raise FileNotFoundError(f"annotations not found: {annotations}")
    vfs = storage.fsspec_fs(videos)
    if not vfs.isdir(storage.strip_scheme(videos)):
        raise FileNotFoundError(f"videos folder not found: {videos}")
    if gop is not None and transcode is None:
        raise ValueError("gop applies to re-encoded clips: pass transcode=HEIGHT too")
    if transcode is not None and transcode <= 0:
        raise ValueError(f"transcode height must be positive, got {transcode}")
    if answer_vocab < 0:
        raise ValueError(f"answer_vocab must be >= 0, got {answer_vocab}")
    if tokenizer not in ("", "learn"):
        raise ValueError(f"tokenizer must be 'learn' (or empty: none), got {tokenizer!r}")
    if tokenizer:
        check_vocab_size(vocab_size)
    gop = gop or DEFAULT_GOP
    storage.check_output(out, "dir")  # before any annotation or video is read
    root = VideoRoot(videos)
    conv = FORMATS[fmt](Source(annotations, root, split, labels))
    records = conv.records
    names = sorted({r.split for r in records if r.split})  # a malformed line may not know its split
    folders = len(names) > 1  # several splits: one folder each
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
    stats: dict[str, _QAStats] = {}
    written: dict[str, list[Mapping[str, Any]]] = {}  # split -> the metadata of its samples (for a tokenizer)
    used: set[str] = set()
    cut = 0
    with ShardWriter(out, shard_size, overwrite=overwrite) as writer:
        for rec in tqdm(records, desc=f"build {fmt}", unit="clip", disable=not progress):
            if rec.skip:
                writer.skip(rec.name, rec.skip)
                continue
            if not root.contains(rec.video):  # refused by name, never opened
                writer.skip(rec.name, "outside_videos")
                continue
            path = storage.strip_scheme(rec.video)
            if not vfs.isfile(path):
                writer.skip(rec.name, "missing_video")
                continue
            meta = rec.meta
            try:
                with vfs.open(path, "rb") as f:
                    if transcode is not None or rec.window is not None:
                        data, ext = transcode_video(f, transcode, gop, sample_rate, window=rec.window), "mp4"
                    else:
                        data, ext = f.read(), rec.video.rsplit(".", 1)[-1].lower()
                        probe_video(data)
            except ValueError as e:
                writer.skip(rec.name, "window_outside_video" if "window" in str(e) else "unreadable_video")
                continue
            except Exception:  # any decoder error means the clip is unusable; the builder never stops for one
                writer.skip(rec.name, "unreadable_video")
                continue
            if rec.window is not None:
                meta = dict(meta, cut=[round(rec.window[0], 6), round(rec.window[1], 6)])
                if isinstance(meta.get("segments"), list):  # timestamped captions follow the cut's clock
                    meta["segments"] = rebase_segments(meta["segments"], *rec.window)
                cut += 1
            folder = rec.split if folders else ""
            writer.write(_sample_key(rec.key or rec.name, used),
                         {ext if ext in VIDEO_EXTS else "mp4": data, "json": meta}, split=folder)
            stats.setdefault(folder, _QAStats()).add(meta)
            if tokenizer:
                written.setdefault(rec.split, []).append(meta)
        if tokenizer:
            extra.update(write_tokenizer(out, written.get("train") or [m for ms in written.values() for m in ms],
                                         vocab_size))
        transcoded = {"height": transcode, "gop": gop, "sample_rate": sample_rate} if transcode else None
        split_extra = {folder: st.summary(vocab) for folder, st in stats.items()}
        return writer.close({**extra, "transcode": transcoded, "cut": cut}, split_extra)


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
