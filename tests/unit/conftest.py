"""Real media files made at test time with :func:`mirasol_ray.data.encode.encode_av` (no mocks, no downloads)."""

from __future__ import annotations

import io
import wave
from collections.abc import Callable

import numpy as np
import pytest

from mirasol_ray.data.encode import encode_av

SR = 16000
STEP_AT = 2.0
"""The alignment clip turns white and starts a 1 kHz tone at this second (the start of snippet 2 of 4 in 4 s)."""


def tone(seconds: float, freq: float = 1000.0, amplitude: float = 0.5, sr: int = SR) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def index_frames(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """uint8 [N, H, W, 3]: frame i is uniform colour R = 16 + 8 (i % 28), G = 16 + 8 (i // 28), so a decoded
    frame's colour tells its index (steps of 8 survive 4:2:0 and H.264/VP9 rounding)."""
    i = np.arange(num_frames)
    rgb = np.stack([16 + 8 * (i % 28), 16 + 8 * (i // 28), np.full_like(i, 128)], axis=1).astype(np.uint8)
    return np.broadcast_to(rgb[:, None, None, :], (num_frames, height, width, 3)).copy()


def frame_index(frames: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] decoded :func:`index_frames` -> [...] index of the frame shown."""
    mean = frames.mean(axis=(-3, -2), dtype=np.float64)  # [..., 3]
    return (np.round((mean[..., 0] - 16) / 8) + 28 * np.round((mean[..., 1] - 16) / 8)).astype(int)


def wav_bytes(pcm: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture
def make_clip() -> Callable[..., bytes]:
    """``make_clip(seconds, fps=25, size=(32, 32), container="mp4", audio=True)``: a index-colour clip with a tone."""

    def make(seconds: float = 2.0, fps: float = 25.0, size: tuple[int, int] = (32, 32), container: str = "mp4",
             audio: bool = True) -> bytes:
        frames = index_frames(max(1, int(round(seconds * fps))), *size)
        return encode_av(frames, fps, tone(seconds) if audio else None, SR, container=container)

    return make


@pytest.fixture(scope="session")
def step_clip() -> bytes:
    """4 s at 25 fps, 64x48: black and silent until 2.0 s, then white with a 1 kHz tone (both step at once)."""
    fps, seconds = 25, 4.0
    frames = np.zeros((int(fps * seconds), 48, 64, 3), np.uint8)
    frames[int(STEP_AT * fps):] = 255
    audio = np.zeros(round(seconds * SR), np.float32)
    audio[round(STEP_AT * SR):] = tone(seconds - STEP_AT)
    return encode_av(frames, fps, audio, SR, gop=10)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny models: a second thread only adds contention (10x slower on a
    busy 2-core box). A module takes it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

