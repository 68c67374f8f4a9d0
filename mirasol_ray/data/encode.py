"""In-memory audio-video encoding with PyAV: the inverse of :mod:`mirasol_ray.data.decode`.

Used by the synthetic dataset and by tests, which make real files (never mocks). Pixels are stored as
``yuv420p``, the format every decoder reads. 4:2:0 chroma needs even dimensions (H.264 refuses odd ones), so an
odd width or height is **padded by one pixel, replicating the last column/row** rather than scaled: the clip's
content is untouched, and the decoder resizes to the configured size anyway, so one extra edge pixel is harmless.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

_FORMATS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm", "avi": "avi"}
_DEFAULT_CODECS = {  # container -> (video codec, audio codec)
    "mp4": ("h264", "aac"),
    "mov": ("h264", "aac"),
    "mkv": ("h264", "aac"),
    "webm": ("libvpx-vp9", "libopus"),
    "avi": ("mpeg4", "pcm_s16le"),
}


def as_fraction(fps: float | Fraction) -> Fraction:
    """``29.97002997`` -> ``30000/1001``: NTSC-style rates must be exact for the container's time base."""
    return Fraction(fps).limit_denominator(10_000)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] -> [N, H + H%2, W + W%2, 3], replicating the last row/column (see module docstring)."""
    n, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _video_options(vcodec: str, crf: int | None, preset: str = "veryfast") -> dict[str, str]:
    if vcodec in ("h264", "libx264"):
        # Reproducible bytes: with x264's threads or its assembly the same frames gave different MP4 bytes in ~1
        # encode of 10 on an AMD EPYC, which broke "same seed, same shards". Costs ~2x in `shards synth`.
        return {"crf": str(23 if crf is None else crf), "preset": preset,
                "x264-params": "threads=1:lookahead-threads=1:asm=0"}
    if vcodec == "libvpx-vp9":
        # Constant quality (b:v 0) with the fastest realtime settings: test and synthetic clips stay cheap.
        return {"crf": str(32 if crf is None else crf), "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
    return {} if crf is None else {"qscale": str(crf)}


def encode_av(
    frames: np.ndarray,
    fps: float | Fraction,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    container: str = "mp4",
    vcodec: str | None = None,
    acodec: str | None = None,
    gop: int | None = None,
    crf: int | None = None,
    audio_offset: float = 0.0,
    preset: str = "veryfast",
) -> bytes:
    """Encode RGB frames (and optional mono audio) into one container file, returned as bytes.

    Args:
        frames: uint8 [N, H, W, 3] RGB; any H, W (odd sizes are edge-padded to even, see module docstring).
        fps: frame rate; fractional rates (``30000 / 1001``) are kept exact.
        audio: float32 [n] mono in [-1, 1] at ``sample_rate``, or None for a file without an audio stream.
        container: ``mp4`` | ``mov`` | ``mkv`` | ``webm`` | ``avi``.
        vcodec, acodec: default per container: H.264 + AAC (mp4/mov/mkv), VP9 + Opus (webm), MPEG-4 + PCM (avi).
        gop: keyframe interval in frames (None: the encoder's default). Short GOPs make sparse seeking cheap.
        crf: quality (lower is better); None uses a per-codec default.
        audio_offset: seconds by which the audio stream starts after the video stream (negative: the video
            starts later, by a whole number of frames), as in files cut or muxed from separate recordings.
        preset: x264's speed preset (H.264 only). ``ultrafast`` encodes ~2.5x faster than ``veryfast`` and writes
            ~3.5x the bytes at the same ``crf`` (CAVLC, no B-frames, no deblocking): what the synthetic data sets
            use, as their clips are generated, not stored for long.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    if container not in _FORMATS:
        raise ValueError(f"container must be one of {sorted(_FORMATS)}, got {container!r}")
    vcodec = vcodec or _DEFAULT_CODECS[container][0]
    acodec = acodec or _DEFAULT_CODECS[container][1]
    frames = pad_to_even(frames)
    rate = as_fraction(fps)

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=_FORMATS[container]) as out:
        vs = out.add_stream(vcodec, rate=rate, options=_video_options(vcodec, crf, preset))
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv420p"
        vs.codec_context.time_base = 1 / rate
        if gop is not None:
            vs.codec_context.gop_size = gop
        a_s = None
        if audio is not None:
            a_s = out.add_stream(acodec, rate=sample_rate, layout="mono")

        video_start = round(-audio_offset * rate) if audio_offset < 0 else 0  # in frames
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = video_start + i, 1 / rate
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))

        if a_s is not None:
            pcm = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)[None, :]  # [1, n] planar mono
            aframe = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="fltp", layout="mono")
            audio_start = round(audio_offset * sample_rate) if audio_offset > 0 else 0
            aframe.sample_rate, aframe.pts, aframe.time_base = sample_rate, audio_start, Fraction(1, sample_rate)
            out.mux(a_s.encode(aframe))
            out.mux(a_s.encode(None))
    return buf.getvalue()
