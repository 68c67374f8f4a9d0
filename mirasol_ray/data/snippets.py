"""Time geometry of a sample: snippet windows, frame times and per-snippet log-mel. Pure numpy/torch, no decoding.

A clip's used span [start, end) is cut into S equal consecutive windows. Video snippet s holds F frames taken
inside window s, and audio snippet s holds T log-mel frames centred inside the *same* window, so the two
modalities of a snippet always describe the same moment (the alignment Mirasol's Combiner relies on).

Padding rule (short clips): windows always cover the clip. With ``clip_seconds = 0`` the whole clip is split
into S windows however short it is (a 0.5 s clip with S = 4 gives four 0.125 s windows; frames repeat when there
are fewer distinct frames than needed) and every snippet is valid. With ``clip_seconds > 0`` the window length is
fixed at ``clip_seconds / S``, so a clip shorter than ``clip_seconds`` gets windows laid from its start: a window
that begins at or after the clip's end is padding (``snippet_mask`` False, zero video and audio); a window that
is only partly covered stays valid (its frame times past the end show the last frame, its audio is zero-padded).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

LOG_EPS = 1e-6
"""log(mel + LOG_EPS): silence maps to log(1e-6) ~ -13.8 instead of -inf."""


@dataclass(frozen=True)
class SnippetPlan:
    """Where a sample's snippets lie, in seconds on the video's clock (0 = first frame)."""

    windows: np.ndarray
    """float64 [S, 2]: (start, end) of each snippet's window."""
    frame_times: np.ndarray
    """float64 [S, F]: when each sampled frame is shown."""
    mask: np.ndarray
    """bool [S]: False for padding windows that begin after the clip ends."""

    @property
    def start(self) -> float:
        return float(self.windows[0, 0])

    @property
    def end(self) -> float:
        return float(self.windows[-1, 1])


def plan_snippets(
    duration: float,
    num_snippets: int,
    frames_per_snippet: int,
    *,
    train: bool,
    rng: np.random.Generator,
    clip_seconds: float = 0.0,
    segment: tuple[float, float | None] = (0.0, None),
    offset: float = 0.5,
) -> SnippetPlan:
    """Choose the span, cut it into S windows and pick F frame times per window.

    Args:
        duration: seconds of video available.
        segment: (start, end) seconds of the video to use (e.g. an annotation's ``start``/``end``); end None or
            past the clip means to the end of the clip.
        clip_seconds: length of the span to use inside the segment; 0 = all of it. A longer segment gets a
            random span for training and the centred one for eval (see the module docstring for shorter ones).
        train: random frame position inside each of the F sub-intervals of a window (augmentation); eval takes
            the point ``offset`` of the way through each (0.5: the centres), so eval rows are deterministic.
    """
    S, F = num_snippets, frames_per_snippet
    seg_start = min(max(0.0, segment[0]), duration)
    seg_end = duration if segment[1] is None else min(max(segment[1], seg_start), duration)
    if seg_end - seg_start <= 0:  # an empty segment: fall back to the whole clip rather than lose the sample
        seg_start, seg_end = 0.0, duration
    available = seg_end - seg_start

    if clip_seconds <= 0:
        start, length = seg_start, available
    elif available > clip_seconds:
        slack = available - clip_seconds
        start, length = seg_start + (rng.uniform(0.0, slack) if train else slack / 2), clip_seconds
    else:
        start, length = seg_start, clip_seconds

    bounds = start + length * np.arange(S + 1) / S  # [S + 1]
    windows = np.stack([bounds[:-1], bounds[1:]], axis=1)  # [S, 2]
    mask = windows[:, 0] < seg_end
    mask[0] = True  # the first window always starts inside the clip (guards float round-off on tiny clips)

    offsets = rng.uniform(0.0, 1.0, size=(S, F)) if train else np.full((S, F), offset)
    sub = (windows[:, 1:] - windows[:, :1]) / F  # [S, 1] sub-interval length
    frame_times = windows[:, :1] + (np.arange(F)[None, :] + offsets) * sub  # [S, F]
    frame_times = np.minimum(frame_times, seg_end)  # partly covered windows repeat the segment's last frame
    return SnippetPlan(windows=windows, frame_times=frame_times, mask=mask)


@dataclass(frozen=True)
class EvalView:
    """One of several looks at a video in evaluation: the segment :func:`plan_snippets` gets and its frame offset."""

    segment: tuple[float, float | None]
    offset: float = 0.5
    merged: bool = True
    """False for the centred view added beside an even number of views: scored for the one-view figure only."""


def eval_views(duration: float, clip_seconds: float, segment: tuple[float, float | None] = (0.0, None), *,
               windows: bool = False, views: int = 1) -> list[EvalView]:
    """Where evaluation looks at a video, when it looks more than once; a pure function of the video's length.

    ``windows`` (long videos): consecutive, non-overlapping windows of ``clip_seconds`` (the span the preset's S
    snippets cover) from the segment's start to its end, ``ceil(length / clip_seconds)`` of them, the last one
    padded (its snippets past the end masked); one window spanning the whole segment when it fits in one
    (``clip_seconds`` 0: the snippets always spread over the whole video).

    ``views`` K (classification, as MMAction2's multi-view testing): K spans of ``clip_seconds`` whose starts are
    spread evenly over the segment, view v starting ``(v + 0.5) / K`` of the way through the slack (K = 1 is
    the centred span of a single-view evaluation); when the segment is no longer than ``clip_seconds`` (or it is
    0), the K views share the span and take their frames ``(v + 0.5) / K`` of the way through each frame's
    sub-interval instead. For an even K, the centred view is added, unmerged, for the one-view figure.
    """
    if windows and views > 1:
        raise ValueError("windows and views are two ways to evaluate at length: choose one")
    seg_start = min(max(0.0, segment[0]), duration)
    seg_end = duration if segment[1] is None else min(max(segment[1], seg_start), duration)
    if seg_end - seg_start <= 0:
        seg_start, seg_end = 0.0, duration
    length = seg_end - seg_start
    if windows:
        if clip_seconds <= 0 or length <= clip_seconds:
            return [EvalView((seg_start, seg_end))]
        n = max(1, math.ceil(length / clip_seconds - 1e-6))
        return [EvalView((seg_start + i * clip_seconds, seg_start + (i + 1) * clip_seconds)) for i in range(n)]
    K = max(1, views)
    out = []
    for v in range(K):
        if clip_seconds > 0 and length > clip_seconds:
            start = seg_start + (v + 0.5) / K * (length - clip_seconds)
            out.append(EvalView((start, start + clip_seconds)))
        else:
            out.append(EvalView((seg_start, seg_end), offset=(v + 0.5) / K))
    if K % 2 == 0:
        out.append(EvalView(segment, merged=False))
    return out


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """HTK-scale triangular filters (mel = 2595 log10(1 + f / 700)), 0 Hz to Nyquist, unnormalised peaks of 1.

    The same filters as ``torchaudio.functional.melscale_fbanks(..., norm=None, mel_scale="htk")``.
    Returns float32 [n_mels, n_fft // 2 + 1].
    """
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # [K] bin centres
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))  # [M + 2]
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [M, 1] each
    up = (freqs[None, :] - lower) / (centre - lower)
    down = (upper - freqs[None, :]) / (upper - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down)).astype(np.float32))  # [M, K]


def log_mel_snippets(
    audio: np.ndarray,
    windows: np.ndarray,
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    mel_frames: int,
) -> np.ndarray:
    """Log-mel spectrogram of each snippet window, T frames whose centres are uniform inside the window.

    Args:
        audio: float32 [n] mono; sample 0 is time 0 of ``windows``.
        windows: [S, 2] seconds (start, end), relative to the audio's first sample.
    Returns:
        float32 [S, n_mels, mel_frames] = log(mel power + 1e-6). The hop is window length / T, so it adapts to
        the snippet's duration; each frame is an ``n_fft``-sample Hann-windowed FFT centred on its time, with
        zeros where the audio does not reach.
    """
    S, T = len(windows), mel_frames
    w = torch.as_tensor(np.asarray(windows, dtype=np.float64))  # [S, 2]
    centres = w[:, :1] + (torch.arange(T, dtype=torch.float64)[None, :] + 0.5) * (w[:, 1:] - w[:, :1]) / T  # [S, T]
    first = torch.round(centres * sample_rate).long() - n_fft // 2  # [S, T] first sample of each FFT frame
    idx = first.reshape(-1, 1) + torch.arange(n_fft)[None, :]  # [S*T, n_fft]

    x = torch.as_tensor(np.asarray(audio, dtype=np.float32))  # [n]
    x = torch.cat([x, x.new_zeros(1)])  # index n is a zero: out-of-range samples read it
    idx = torch.where((idx >= 0) & (idx < len(x) - 1), idx, len(x) - 1)
    frames = x[idx] * torch.hann_window(n_fft, dtype=torch.float32)[None, :]  # [S*T, n_fft]
    power = torch.fft.rfft(frames, dim=-1).abs().square()  # [S*T, K]
    mel = power @ mel_filterbank(sample_rate, n_fft, n_mels).T  # [S*T, M]
    out = torch.log(mel + LOG_EPS).reshape(S, T, n_mels).transpose(1, 2)  # [S, M, T]
    return out.contiguous().numpy()

