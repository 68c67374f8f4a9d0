import time

import numpy as np
import pytest
from conftest import SR, frame_index, index_frames, tone

from mirasol_ray.data.decode import DecodeError, Video, call_with_timeout, cut_message, decode_audio
from mirasol_ray.data.encode import encode_av


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_video_and_audio_decode(make_clip, container):
    data = make_clip(2.0, fps=25, container=container)  # mp4: H.264 + AAC; webm: VP9 + Opus
    with Video(data, height=24, width=40) as video:
        assert video.num_frames == 50
        assert video.duration == pytest.approx(2.0, abs=1e-3)
        times = np.array([[1.99, 0.0], [0.5, 1.01]])  # unsorted on purpose: order must come back
        frames = video.read(times)
    assert frames.shape == (2, 2, 24, 40, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frame_index(frames), [[49, 0], [12, 25]])

    audio = decode_audio(data, SR, 0.0, 2.0)
    assert audio.shape == (2 * SR,) and audio.dtype == np.float32  # AAC's padded tail cropped away
    expected = tone(2.0)
    assert np.corrcoef(audio[4000:28000], expected[4000:28000])[0, 1] > 0.95  # same samples, same place


def test_clip_without_audio(make_clip):
    assert decode_audio(make_clip(1.0, audio=False), SR) is None


def test_odd_size_and_ntsc_rate():
    fps = 30000 / 1001
    data = encode_av(index_frames(60, 61, 97), fps)  # 97x61: padded to 98x62 by the encoder
    with Video(data, height=32, width=32) as video:
        assert video.num_frames == 60
        assert video.duration == pytest.approx(60 / fps, abs=1e-3)
        np.testing.assert_array_equal(frame_index(video.read(np.array([0.0, 1.0, 1.99]))), [0, 29, 59])


@pytest.mark.parametrize("width", [16, 24, 48, 50])
def test_widths_decord_cannot_resize_to(make_clip, width):
    with Video(make_clip(0.4, fps=10, size=(40, 60)), height=12, width=width) as video:
        frames = video.read(np.array([0.0, 0.35]))
    assert frames.shape == (2, 12, width, 3)
    np.testing.assert_array_equal(frame_index(frames), [0, 3])


def test_every_output_width_decodes(make_clip, monkeypatch):
    """Which widths decord cannot resize to depends on the CPU: starting from no knowledge at all, every width
    still decodes, the ones that fail here are learnt on the way."""
    from mirasol_ray.data import decode

    monkeypatch.setattr(decode, "_DECORD_BAD_WIDTHS", set())
    data = make_clip(0.4, fps=10, size=(40, 60))
    for width in range(2, 160):
        with Video(data, height=12, width=width) as video:
            frames = video.read(np.array([0.0, 0.35]))
        assert frames.shape == (2, 12, width, 3)
        np.testing.assert_array_equal(frame_index(frames), [0, 3])


def test_short_clip_reads_repeated_frames(make_clip):
    with Video(make_clip(0.5, fps=10), height=16, width=16) as video:
        assert video.num_frames == 5 and video.duration == pytest.approx(0.5, abs=1e-3)
        np.testing.assert_array_equal(frame_index(video.read(np.linspace(0, 0.49, 16))),
                                      np.repeat(np.arange(5), [4, 3, 3, 3, 3]))


def test_audio_window_and_padding(make_clip):
    data = make_clip(2.0)
    audio = decode_audio(data, SR, 1.5, 2.5)
    assert audio.shape == (SR,)
    assert np.abs(audio[: SR // 2 - 800]).max() > 0.3  # inside the stream
    assert np.abs(audio[SR // 2 + 100:]).max() < 0.01  # past its end: AAC's faint padded tail, then zeros
    assert np.abs(audio[-SR // 4:]).max() == 0.0


@pytest.mark.parametrize(("make", "reason"), [
    (lambda clip: clip[: len(clip) // 2], "corrupt"),  # truncated MP4: its index (moov) is at the end
    (lambda clip: np.random.default_rng(0).bytes(4096), "corrupt"),
    (lambda clip: b"<html>" + b"x" * 5000, "corrupt"),
    (lambda clip: b"", "empty"),
])
def test_bad_inputs(make_clip, make, reason):
    data = make(make_clip(1.0))
    with pytest.raises(DecodeError) as info:
        Video(data, 16, 16)
    assert info.value.reason == reason
    assert len(str(info.value)) <= 200


def test_audio_only_file_has_no_video():
    from conftest import wav_bytes

    with pytest.raises(DecodeError) as info:
        Video(wav_bytes(tone(0.5)), 16, 16)
    assert info.value.reason == "no_video"


def test_messages_are_cut():
    msg = cut_message("ERROR opening: " + "\x00\xff" * 5000 + "\nsecond line")
    assert len(msg) <= 200 and "\n" not in msg and msg.isprintable()
    assert len(str(DecodeError("corrupt", "x" * 1000))) <= 200


def test_timeout_bounds_a_hung_decode():
    t0 = time.monotonic()
    with pytest.raises(DecodeError) as info:
        call_with_timeout(lambda: time.sleep(5), 0.2)
    assert info.value.reason == "timeout" and time.monotonic() - t0 < 1.0
    assert call_with_timeout(lambda: 7, 1.0) == 7
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0, 1.0)
