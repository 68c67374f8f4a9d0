"""Audio and video stay aligned when the streams of a file start at different times, decoded as they are and after
``shards build --transcode``: the flash-and-tone clip's white frames and its tone open the same snippet."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest
from conftest import SR, STEP_AT, tone

from mirasol_ray.config import DataConfig
from mirasol_ray.data.decode import Video, decode_audio
from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.index import read_samples
from mirasol_ray.data.pipeline import sample_index
from mirasol_ray.data.rows import decode_sample
from mirasol_ray.data.shards import build_shards

FPS, SECONDS = 25, 4.0
OFFSETS = (0.5, -0.4)
"""Seconds by which the audio stream starts after the video's first frame: late, and early (the video is muxed to
start 0.4 s into the file)."""


def flash_and_tone(offset: float) -> bytes:
    """4 s of video, black until 2.0 s after its first frame, then white; the audio (starting ``offset`` s after
    the first frame) is silent until that same moment, then a 1 kHz tone, to the video's end."""
    frames = np.zeros((int(FPS * SECONDS), 48, 64, 3), np.uint8)
    frames[int(STEP_AT * FPS):] = 255
    audio = np.zeros(round((SECONDS - offset) * SR), np.float32)
    onset = round((STEP_AT - offset) * SR)
    audio[onset:] = tone(len(audio[onset:]) / SR)
    return encode_av(frames, FPS, audio, SR, gop=10, audio_offset=offset)


def onsets(data: bytes) -> tuple[float, float]:
    """(first white frame, tone onset), seconds after the first frame, as the decoder sees them."""
    with Video(data, 48, 64) as v:
        white = float(v.frame_starts[np.argmax(v.read(v.frame_starts).mean(axis=(1, 2, 3)) > 128)])
        start = v.start_time
    pcm = decode_audio(data, SR, start=start, end=start + SECONDS)
    return white, float(np.argmax(np.abs(pcm) > 0.2) / SR)


def cfg() -> DataConfig:
    return DataConfig(num_snippets=4, frames_per_snippet=2, height=32, width=32, n_mels=16, mel_frames=8,
                      max_prompt_len=16, max_target_len=16, task="caption")


def assert_snippets_aligned(video_bytes: bytes, train: bool) -> None:
    sample = {"__key__": "k", "mp4": video_bytes, "json": json.dumps({"caption": "a flash"}).encode()}
    (row,) = decode_sample(sample, cfg(), train=train, rng=np.random.default_rng(0))
    brightness = row["video"].mean(axis=(1, 2, 3, 4))  # [S]
    loudness = row["audio"].max(axis=(1, 2))  # [S]
    assert int(np.argmax(brightness > 128)) == int(np.argmax(loudness > loudness.min() + 5)) == int(STEP_AT)


@pytest.mark.parametrize("offset", OFFSETS)
def test_a_stream_starting_late_keeps_its_place_in_time(offset):
    data = flash_and_tone(offset)
    with av.open(io.BytesIO(data)) as c:  # the file really has streams starting apart
        starts = {s.type: float(s.start_time * s.time_base) for s in c.streams}
    assert starts["audio"] - starts["video"] == pytest.approx(offset, abs=0.07)  # AAC priming: 1024 samples
    white, sound = onsets(data)
    assert white == pytest.approx(STEP_AT, abs=1e-6) and sound == pytest.approx(STEP_AT, abs=1 / FPS)
    for train in (False, True):
        assert_snippets_aligned(data, train)


def test_transcoded_shards_keep_the_alignment(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    lines = []
    for i, offset in enumerate(OFFSETS):
        (videos / f"v{i}.mp4").write_bytes(flash_and_tone(offset))
        lines.append(json.dumps({"video": f"v{i}.mp4", "caption": "a flash"}))
    (tmp_path / "ann.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    build_shards("jsonl", str(tmp_path / "ann.jsonl"), str(videos), str(out), transcode=32, progress=False)
    index = sample_index(str(out))
    samples = read_samples(index.url, index.shards, index.refs(np.arange(len(index))))
    assert [s["__key__"] for s in samples] == ["v0", "v1"]
    for s in samples:
        with av.open(io.BytesIO(s["mp4"])) as c:
            assert c.streams.video[0].codec_context.height == 32
        white, sound = onsets(s["mp4"])
        assert white == pytest.approx(STEP_AT, abs=1e-6) and sound == pytest.approx(STEP_AT, abs=1 / FPS)
        for train in (False, True):
            assert_snippets_aligned(s["mp4"], train)
