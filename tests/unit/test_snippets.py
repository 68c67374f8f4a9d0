import math

import numpy as np
import pytest
import torch
from conftest import SR, tone

from mirasol_ray.data.snippets import LOG_EPS, log_mel_snippets, mel_filterbank, plan_snippets


def plan(duration, S=4, F=2, train=False, seed=0, **kw):
    return plan_snippets(duration, S, F, train=train, rng=np.random.default_rng(seed), **kw)


def test_eval_frame_times_are_sub_interval_centres():
    p = plan(4.0)
    np.testing.assert_allclose(p.windows, [[0, 1], [1, 2], [2, 3], [3, 4]])
    np.testing.assert_allclose(p.frame_times, [[0.25, 0.75], [1.25, 1.75], [2.25, 2.75], [3.25, 3.75]])
    assert p.mask.all()
    np.testing.assert_array_equal(plan(4.0, seed=1).frame_times, p.frame_times)  # deterministic


def test_train_frame_times_are_random_inside_their_sub_interval():
    S, F = 4, 3
    a, b = plan(6.0, S, F, train=True, seed=0), plan(6.0, S, F, train=True, seed=1)
    assert not np.allclose(a.frame_times, b.frame_times)
    np.testing.assert_array_equal(plan(6.0, S, F, train=True, seed=0).frame_times, a.frame_times)  # seeded
    sub = 6.0 / (S * F)
    lower = np.arange(S * F).reshape(S, F) * sub
    for p in (a, b):
        assert (p.frame_times >= lower).all() and (p.frame_times < lower + sub).all()


def test_clip_seconds_window_is_centred_for_eval_and_random_inside_for_train():
    p = plan(10.0, clip_seconds=4.0)
    assert (p.start, p.end) == pytest.approx((3.0, 7.0))
    starts = {plan(10.0, clip_seconds=4.0, train=True, seed=s).start for s in range(5)}
    assert len(starts) == 5 and all(0.0 <= s <= 6.0 for s in starts)


def test_segment_limits_the_span():
    p = plan(10.0, segment=(2.0, 6.0))
    assert (p.start, p.end) == pytest.approx((2.0, 6.0))
    assert plan(10.0, segment=(8.0, 20.0)).end == pytest.approx(10.0)  # end past the clip: clip end


def test_short_clip_whole_clip_gives_valid_windows():
    p = plan(0.5, S=4, F=4)  # clip_seconds = 0: the whole 0.5 s in four 0.125 s windows
    assert p.mask.all() and p.end == pytest.approx(0.5)
    assert (p.frame_times < 0.5).all()


def test_clip_shorter_than_clip_seconds_is_padded_not_stretched():
    p = plan(1.5, S=4, F=2, clip_seconds=4.0)  # windows of 1 s from 0: [0,1) [1,2) valid, [2,3) [3,4) padding
    np.testing.assert_array_equal(p.mask, [True, True, False, False])
    assert p.frame_times.max() <= 1.5  # the partly covered window shows the last frame past the end


def test_mel_filterbank_shape_and_peaks():
    fb = mel_filterbank(SR, 400, 64)
    assert fb.shape == (64, 201) and fb.dtype == torch.float32
    assert fb.max() <= 1.0 and (fb.sum(dim=1) > 0).all()  # no empty filter at these settings


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0])
def test_log_mel_tone_peaks_at_its_mel_bin(freq):
    n_mels = 64
    mel = log_mel_snippets(tone(2.0, freq), np.array([[0.0, 1.0], [1.0, 2.0]]), SR, 400, n_mels, 8)
    assert mel.shape == (2, n_mels, 8) and mel.dtype == np.float32
    top = 2595 * math.log10(1 + SR / 2 / 700)
    expected = round(2595 * math.log10(1 + freq / 700) / top * (n_mels + 1)) - 1  # nearest filter centre (HTK)
    assert abs(int(np.bincount(mel.argmax(axis=1).ravel()).argmax()) - expected) <= 1


def test_log_mel_matches_a_direct_computation():
    audio = np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32)
    mel = log_mel_snippets(audio, np.array([[0.0, 0.5], [0.5, 1.0]]), SR, 400, 32, 4)
    centre = round((0.5 + 2.5 * 0.5 / 4) * SR)  # snippet 1, mel frame 2
    chunk = torch.from_numpy(audio[centre - 200: centre + 200]) * torch.hann_window(400)
    power = torch.fft.rfft(chunk).abs() ** 2
    direct = torch.log(mel_filterbank(SR, 400, 32) @ power + LOG_EPS)
    np.testing.assert_allclose(mel[1, :, 2], direct.numpy(), rtol=1e-4, atol=1e-4)


def test_log_mel_snippets_follow_the_audio_in_time():
    audio = np.zeros(4 * SR, np.float32)
    audio[2 * SR:] = tone(2.0)  # sound starts at the start of snippet 2
    energy = log_mel_snippets(audio, np.array([[0, 1], [1, 2], [2, 3], [3, 4]]), SR, 400, 32, 8).max(axis=(1, 2))
    assert energy[0] == energy[1] == pytest.approx(math.log(LOG_EPS))  # silence
    assert energy[2] > energy[1] + 5 and energy[3] > energy[1] + 5
    out_of_range = log_mel_snippets(audio, np.array([[4.0, 5.0]]), SR, 400, 32, 8)  # past the audio: silence
    assert out_of_range.max() == pytest.approx(math.log(LOG_EPS))
