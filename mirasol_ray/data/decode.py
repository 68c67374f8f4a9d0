"""Bytes -> frames and audio: pure functions, no Ray.

Video goes through decord (resized in the decoder, one thread), audio through PyAV. Every failure becomes a
:class:`DecodeError` whose ``reason`` is one of :data:`DECODE_REASONS`, so callers can skip and count.

Time origin: t = 0 is the start of the first video frame. Audio is cut on the same clock (stream timestamps), so a
window [a, b) of frames and of samples covers the same moment even when a stream starts late.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import TypeVar

import av
import decord
import numpy as np

T = TypeVar("T")

DECODE_REASONS = {
    "empty": "the member is present but holds zero bytes",
    "corrupt": "the container cannot be opened or parsed (truncated, random bytes, not a media file)",
    "no_video": "the container opens but has no video stream",
    "undecodable": "the container parses but the decoder yields no frames (or fails reading them)",
    "timeout": "the sample's decode ran longer than data.decode_timeout_s",
    "bad_shape": "the decoder returned frames of an unexpected shape",
}
"""reason -> meaning, for the reasons raised by this module (rows.py adds its own, see ``rows.SKIP_REASONS``)."""

_MAX_MESSAGE = 200

_DECORD_BAD_WIDTHS = {2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 72, 96, 144}
"""Output widths at which decord2 3.4's resize fails for any source ("DECORDArrayCopyFromTo: The size must exactly
match"). The set depends on the CPU (swscale picks SIMD paths by CPU): {2..24, 48, 72} on one x86-64 machine,
{2..24, 32, 48, 96, 144} on an AMD EPYC (widths 2-300 measured). Seeded with both, and grown at run time by
:meth:`Video.read` whenever a width fails; :func:`decoder_width` steers around them."""


def decoder_width(width: int) -> tuple[int, int]:
    """(width to ask decord for, horizontal pooling factor k): k = 1 unless ``width`` is a bad width, then the
    smallest k >= 2 whose k * width is not known to fail; averaging k adjacent columns is an exact area resize
    back."""
    if width not in _DECORD_BAD_WIDTHS:
        return width, 1
    k = next(k for k in range(2, 64) if k * width not in _DECORD_BAD_WIDTHS)
    return k * width, k


def cut_message(message: object, limit: int = _MAX_MESSAGE) -> str:
    """One printable line of at most ``limit`` chars: decord can put the whole input buffer in its error."""
    text = "".join(c if c.isprintable() else " " for c in str(message))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DecodeError(Exception):
    """A sample that cannot be decoded; ``reason`` is a short key for counting, the message is cut to 200 chars."""

    def __init__(self, reason: str, detail: object = ""):
        self.reason = reason
        self.detail = cut_message(detail, _MAX_MESSAGE - len(reason) - 2)
        super().__init__(f"{reason}: {self.detail}" if self.detail else reason)


def call_with_timeout(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn()`` in a daemon thread and wait at most ``timeout_s`` seconds (<= 0: run inline, no bound).

    Why a thread: ``signal.alarm`` only works in the main thread (Ray runs tasks and actor methods in others) and
    cannot interrupt a decoder stuck in C; a subprocess per sample would copy the bytes and cost a fork. A thread
    works everywhere. The trade-off: a decoder that truly hangs cannot be killed, so its thread is abandoned (it
    keeps its memory, and its CPU if it spins) until the process ends; being a daemon it does not block exit.
    Exceptions raised by ``fn`` propagate unchanged.
    """
    if timeout_s <= 0:
        return fn()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=target, name="mirasol-decode", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise DecodeError("timeout", f"decode took more than {timeout_s:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _probe(data: bytes) -> tuple[float | None, float | None]:
    """Check with PyAV that ``data`` is a media file with a video stream; return its duration and the stream time
    of its first frame (s) where known.

    Probing first keeps garbage away from decord, whose open error echoes the whole buffer to stderr.
    """
    if not data:
        raise DecodeError("empty")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise DecodeError("no_video")
            stream = container.streams.video[0]
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None and \
                stream.time_base is not None else None
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base), start
            return (container.duration / av.time_base if container.duration else None), start
    except DecodeError:
        raise
    except Exception as e:  # PyAV raises FFmpegError subclasses, and ValueError/OSError variants
        raise DecodeError("corrupt", e) from None


class Video:
    """An opened video: timing known up front, frames read on demand at given times.

    Frames are resized to ``height`` x ``width`` by the decoder (aspect ratio not kept: every clip fills the
    frame). Use as a context manager, or call :meth:`close`, to free the decoder promptly.
    """

    def __init__(self, data: bytes, height: int, width: int, num_threads: int = 1):
        probed_duration, stream_start = _probe(data)
        self.height, self.width = height, width
        self._data, self._num_threads = data, num_threads
        try:
            self._open()
            n = len(self._reader)
            times = self._reader.get_frame_timestamp(np.arange(n)) if n else np.zeros((0, 2))  # [N, 2] s
            fps = float(self._reader.get_avg_fps())
        except Exception as e:
            raise DecodeError("undecodable", e) from None
        if n == 0:
            raise DecodeError("undecodable", "no frames")
        self.num_frames = n
        # decord counts frame times from the video stream's own start; the audio is cut on the container's clock,
        # where a video stream muxed to start after its audio (an edit list) starts later: PyAV's start time
        self.start_time = stream_start if stream_start is not None else float(times[0, 0])
        """Stream time (s) of the first frame on the container's clock: the origin of every time this class takes
        or returns (and where the clip's audio is cut from, so both stay aligned)."""
        self.frame_starts = np.maximum.accumulate(times[:, 0] - times[0, 0])  # [N] s from the first frame
        duration = float(times[-1, 1] - times[0, 0])
        if not np.isfinite(duration) or duration <= 0:  # broken timestamps: fall back to rate, then to PyAV
            duration = n / fps if fps > 0 else (probed_duration or 0.0)
        if duration <= 0:
            raise DecodeError("undecodable", "unknown duration")
        self.duration = duration
        """Seconds from the first frame's start to the last frame's end."""

    def indices(self, times: np.ndarray) -> np.ndarray:
        """Seconds (any shape) -> index of the frame shown at that time; clamped to the clip."""
        idx = np.searchsorted(self.frame_starts, times, side="right") - 1
        return np.clip(idx, 0, self.num_frames - 1)

    def read(self, times: np.ndarray) -> np.ndarray:
        """Frames shown at ``times`` (seconds, any shape [...]) -> uint8 [..., H, W, 3].

        Indices are decoded once each, in increasing order (decord is ~10x slower on unsorted indices), then put
        back in the requested order.
        """
        idx = self.indices(times)
        unique, inverse = np.unique(idx.reshape(-1), return_inverse=True)
        while True:
            try:
                batch = self._reader.get_batch(unique.tolist()).asnumpy()  # [U, H, k*W, 3]
                break
            except Exception as e:
                if "DECORDArrayCopyFromTo" not in str(e) or self._decode_width in _DECORD_BAD_WIDTHS:
                    raise DecodeError("undecodable", e) from None
                _DECORD_BAD_WIDTHS.add(self._decode_width)  # a width this CPU cannot resize to: go wider
                try:
                    self._open()
                except Exception as e2:
                    raise DecodeError("undecodable", e2) from None
        expected = (len(unique), self.height, self._decode_width, 3)
        if batch.shape != expected or batch.dtype != np.uint8:
            raise DecodeError("bad_shape", f"expected {expected} uint8, got {batch.shape} {batch.dtype}")
        if self._pool > 1:
            u, h = batch.shape[:2]
            pooled = batch.reshape(u, h, self.width, self._pool, 3).mean(axis=3, dtype=np.float32)
            batch = np.round(pooled).astype(np.uint8)  # [U, H, W, 3]
        return batch[inverse].reshape(*idx.shape, self.height, self.width, 3)

    def _open(self) -> None:
        self._decode_width, self._pool = decoder_width(self.width)
        self._reader = decord.VideoReader(io.BytesIO(self._data), width=self._decode_width, height=self.height,
                                          num_threads=self._num_threads)

    def close(self) -> None:
        self._reader = None
        self._data = b""

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_audio(data: bytes, sample_rate: int, start: float = 0.0, end: float | None = None
                 ) -> np.ndarray | None:
    """Audio of a media file between stream times ``start`` and ``end`` (s), mono float32 at ``sample_rate``.

    Returns [round((end - start) * sample_rate)] samples: zero-padded where the stream has none (AAC's padded tail
    is cropped the same way), or None when the file has no audio stream. ``end=None`` reads to the end of the
    stream. A stream that breaks mid-way keeps what decoded before the break (truncated files are common and
    their video may still be usable); a file that cannot be opened raises ``DecodeError("corrupt")``.
    """
    if not data:
        raise DecodeError("empty")
    chunks: list[np.ndarray] = []
    first_time: float | None = None
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:
        raise DecodeError("corrupt", e) from None
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        try:
            if start > 1.0 and stream.time_base:  # long files: skip ahead instead of decoding from 0
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if first_time is None:
                    first_time = float(frame.time) if frame.time is not None else 0.0
                if end is not None and frame.time is not None and frame.time > end:
                    break
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
        except Exception:  # a broken packet mid-stream (or a failed seek): keep the audio decoded so far
            pass
    pcm = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    first_time = first_time or 0.0
    if end is None:
        end = first_time + len(pcm) / sample_rate
    out = np.zeros(max(0, round((end - start) * sample_rate)), np.float32)
    offset = round((first_time - start) * sample_rate)  # where pcm[0] lands in out
    lo, hi = max(0, offset), min(len(out), offset + len(pcm))
    if hi > lo:
        out[lo:hi] = pcm[lo - offset: hi - offset]
    return out
