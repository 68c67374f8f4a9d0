"""A second synthetic audio-visual task, unlike the demo's, written as a user's own data: MP4 files + JSONL.

``python -m benchmarks.recipe`` trains on it with the README's recipe for "Your own data" to see whether that recipe
learns a task nobody tuned it on. Nothing here is shared with :mod:`mirasol_ray.data.synthetic` (the demo's clips)
but the encoder: other pictures, other sounds, other questions, other answers, other clip lengths and sizes.

A clip lasts 2.4-3.6 s (15, 20 or 25 fps; 96x96 to 240x135) and has two **halves**. The picture: vertical
stripes of two greys drifting sideways, and one bright horizontal **bar** that moves steadily up or down the whole
clip. During one half (the first or the second, evenly) the **screen is dark**: everything is dimmed to 20%, the
bar too (it stays the brightest thing on screen). The sound: each half has one of three **sounds**, different in
the two halves: a ``chord`` (a major triad, ~220-330 Hz, with harmonics), a ``buzz`` (a ~120 Hz sawtooth, low
passed) or a ``sweep`` (a tone gliding up from ~400 to ~1,300 Hz); over them 1-4 short **beeps** (70 ms pips
at ~3 kHz) at random times anywhere in the clip, at least 0.25 s apart.

Every clip has one question of each type (its wording drawn from a few templates), and a caption:

==============  =================================================================  ==============  =======
type            question (templates)                                              answers         chance
==============  =================================================================  ==============  =======
``number``      how many beeps do you hear? (audio alone)                          one..four       1/4
``motion``      does the bar move up or down? (video alone, over time)             up, down        1/2
``av_aligned``  which sound plays while the screen is dark? (audio and video)      chord/buzz/     1/3
                                                                                   sweep
``yes_no``      is there a {sound} while the screen is dark? (audio and video)     yes, no         1/2
==============  =================================================================  ==============  =======

The types are names of :data:`~mirasol_ray.data.schema.QTYPES`, as the benchmarks use them; a dataset's own
names would be scored under their own keys too (see :func:`~mirasol_ray.data.schema.qtype_index`).

The two audio-video types (which sound plays while the screen is dark, and the yes/no question about it) need both modalities **aligned in time**: which half is dark is only in the picture,
which sound plays in which half only in the sound. Given the audio alone, the open question's answer is one of the
clip's two sounds (1/2); the yes/no one asks about the dark half's sound or the lit half's, evenly, and both are heard in
the clip, so the audio alone says nothing (1/2), nor does the picture alone. The manifest-style ``chance`` of
:func:`chance_levels` is the larger of these and the majority answer's rate in the clips written.

Every clip is a pure function of ``(seed, index)``; a split is a range of indices, so splits never share a clip.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from fractions import Fraction
from functools import partial
from typing import Any

import numpy as np
from tqdm import tqdm

from mirasol_ray.data.encode import encode_av

SAMPLE_RATE = 16000
FPS_CHOICES = (Fraction(15), Fraction(20), Fraction(25))
SIZES = ((96, 96), (128, 96), (144, 108), (160, 160), (200, 150), (240, 135))
"""(width, height)."""
SOUNDS = ("chord", "buzz", "sweep")
NUMBERS = ("one", "two", "three", "four")
BEEP_HZ = 3000.0
BEEP_SECONDS = 0.07
DARK_GAIN = 0.2
BAR_COLOURS = ((250, 250, 250), (255, 230, 120), (255, 170, 200), (150, 240, 255))
QUESTIONS = {
    "number": ("how many beeps do you hear?", "how many beeps are there?", "count the beeps."),
    "motion": ("does the bar move up or down?", "which way does the bar go, up or down?",
               "is the bar going up or down?"),
    "av_aligned": ("which sound plays while the screen is dark?", "what do you hear when the picture goes dark?",
                   "while it is dark, which sound is playing?"),
    "yes_no": ("is there a {sound} while the screen is dark?", "does the {sound} play in the dark part?",
                   "while the screen is dark, is the sound a {sound}?"),
}
CHANCE_BY_ANSWER_SPACE = {"qa/number": 1 / 4, "qa/motion": 1 / 2, "qa/av_aligned": 1 / 3, "qa/yes_no": 1 / 2}
AUDIO_VIDEO_TYPES = ("av_aligned", "yes_no")
"""The question types whose answer needs the picture and the sound together, in time."""


def _stripes(rng: np.random.Generator, width: int) -> tuple[np.ndarray, float, float]:
    """A column profile float [width + pad] of two-grey square-ish stripes, and its drift (px/frame) and pad."""
    period = rng.uniform(8, 20)
    a, b = rng.uniform(50, 90), rng.uniform(120, 165)
    drift = rng.uniform(0.5, 2.0) * (1 if rng.integers(2) else -1)
    pad = 200.0
    x = np.arange(width + int(pad))
    profile = np.where(np.sin(2 * np.pi * x / period) > 0, a, b) + rng.normal(0, 3, x.shape)
    return profile.astype(np.float32), drift, pad


def render_video(rng: np.random.Generator, plan: dict[str, Any], n_frames: int, width: int, height: int
                 ) -> np.ndarray:
    """uint8 [n_frames, height, width, 3]: drifting stripes, a bar moving up or down, one half dimmed."""
    profile, drift, pad = _stripes(rng, width)
    tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)  # a faint colour cast of the stripes
    colour = np.asarray(BAR_COLOURS[int(rng.integers(len(BAR_COLOURS)))], np.float32)
    thick = max(3, round(height * rng.uniform(0.08, 0.14)))
    y_from, y_to = plan["_bar_from"] * height, plan["_bar_to"] * height
    half = n_frames / 2
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    for i in range(n_frames):
        off = int((i * drift) % pad)
        row = profile[off:off + width]  # [W]
        img = np.broadcast_to(row[None, :, None] * tint, (height, width, 3)).copy()
        p = i / max(n_frames - 1, 1)
        y = round((1 - p) * y_from + p * y_to)
        y0, y1 = max(y - thick // 2, 0), min(y + (thick + 1) // 2, height)
        img[y0:y1] = colour
        dark = (i < half) if plan["dark_half"] == 0 else (i >= half)
        if dark:
            img *= DARK_GAIN
        frames[i] = np.clip(img, 0, 255)
    return frames


def _sound(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """float [n]: one of :data:`SOUNDS`, unit-ish amplitude."""
    t = np.arange(n) / SAMPLE_RATE
    if kind == "chord":
        root = rng.uniform(200, 240)
        wave = sum(np.sin(2 * np.pi * root * r * t) + 0.3 * np.sin(4 * np.pi * root * r * t) for r in (1, 1.26, 1.5))
        return wave / 3
    if kind == "buzz":
        f0 = rng.uniform(105, 135)
        saw = 2 * ((f0 * t) % 1.0) - 1
        kernel = np.ones(9) / 9  # a gentle low-pass: the sawtooth's harmonics fade out by ~2 kHz
        return np.convolve(saw, kernel, mode="same")
    if kind == "sweep":
        f = np.geomspace(rng.uniform(350, 450), rng.uniform(1200, 1400), n)
        return np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE)
    raise ValueError(f"unknown sound {kind!r}")


def _envelope(n: int, ramp_s: float = 0.01) -> np.ndarray:
    ramp = min(round(ramp_s * SAMPLE_RATE), n // 2)
    env = np.ones(n)
    if ramp:
        env[:ramp] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[n - ramp:] = env[:ramp][::-1]
    return env


def render_audio(rng: np.random.Generator, plan: dict[str, Any], duration: float) -> np.ndarray:
    """float32 [round(duration * SAMPLE_RATE)] mono: a sound per half, the beeps over them, a little hiss."""
    n = round(duration * SAMPLE_RATE)
    audio = rng.normal(0, rng.uniform(0.005, 0.02), n)
    for k, kind in enumerate(plan["sounds"]):
        a, b = (round(x * SAMPLE_RATE) for x in plan["_sound_spans"][k])
        audio[a:b] += rng.uniform(0.2, 0.35) * _envelope(b - a) * _sound(rng, kind, b - a)
    for start in plan["beeps"]:
        a = round(start * SAMPLE_RATE)
        m = min(round(BEEP_SECONDS * SAMPLE_RATE), n - a)
        hz = BEEP_HZ * rng.uniform(0.95, 1.05)
        audio[a:a + m] += 0.3 * _envelope(m, 0.005) * np.sin(2 * np.pi * hz * np.arange(m) / SAMPLE_RATE)
    return np.clip(audio, -1, 1).astype(np.float32)


def _beep_times(rng: np.random.Generator, count: int, duration: float) -> list[float]:
    """``count`` onsets in [0.1, duration - 0.15] s, at least 0.25 s apart (redrawn until they are)."""
    while True:
        times = np.sort(rng.uniform(0.1, duration - 0.15, count))
        if count == 1 or np.diff(times).min() >= 0.25:
            return [round(float(x), 4) for x in times]


def plan_clip(rng: np.random.Generator, duration: float) -> dict[str, Any]:
    """What a clip holds (``_``-prefixed keys only drive rendering)."""
    half = duration / 2
    sounds = [SOUNDS[i] for i in rng.permutation(len(SOUNDS))[:2]]
    direction = "up" if rng.integers(2) else "down"
    lo, hi = rng.uniform(0.12, 0.35), rng.uniform(0.65, 0.88)  # fractions of the height, top = 0
    spans = [(round(k * half + rng.uniform(0.03, 0.1) * half, 4), round((k + 1) * half - rng.uniform(0.03, 0.1) * half, 4))
             for k in range(2)]
    return {
        "duration": round(duration, 4), "dark_half": int(rng.integers(2)), "sounds": sounds,
        "direction": direction, "beeps": _beep_times(rng, int(rng.integers(1, 5)), duration),
        "_bar_from": hi if direction == "up" else lo, "_bar_to": lo if direction == "up" else hi,
        "_sound_spans": spans,
    }


def questions(rng: np.random.Generator, plan: dict[str, Any]) -> list[dict[str, str]]:
    """One question of each type in :data:`QUESTIONS`, its wording drawn from the templates."""
    def pick(kind: str) -> str:
        return QUESTIONS[kind][int(rng.integers(len(QUESTIONS[kind])))]

    dark_sound = plan["sounds"][plan["dark_half"]]
    lit_sound = plan["sounds"][1 - plan["dark_half"]]
    asked = dark_sound if rng.integers(2) else lit_sound
    return [
        {"question": pick("number"), "answer": NUMBERS[len(plan["beeps"]) - 1], "type": "number"},
        {"question": pick("motion"), "answer": plan["direction"], "type": "motion"},
        {"question": pick("av_aligned"), "answer": dark_sound, "type": "av_aligned"},
        {"question": pick("yes_no").format(sound=asked), "answer": "yes" if asked == dark_sound else "no",
         "type": "yes_no"},
    ]


def caption(plan: dict[str, Any]) -> str:
    """e.g. ``the bar moves up. dark, then light. a chord, then a sweep. three beeps.``"""
    n = len(plan["beeps"])
    light = "dark, then light" if plan["dark_half"] == 0 else "light, then dark"
    return (f"the bar moves {plan['direction']}. {light}. a {plan['sounds'][0]}, then a {plan['sounds'][1]}. "
            f"{NUMBERS[n - 1]} beep{'s' if n > 1 else ''}.")


def _draw(seed: int, index: int) -> tuple[np.random.Generator, Fraction, int, int, int, dict[str, Any], dict]:
    rng = np.random.default_rng([seed, index, 11])
    fps = FPS_CHOICES[int(rng.integers(len(FPS_CHOICES)))]
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    n_frames = round(rng.uniform(2.4, 3.6) * fps)
    plan = plan_clip(rng, float(n_frames / fps))
    meta = {"task": "qa", "caption": caption(plan), "qas": questions(rng, plan),
            "events": {k: v for k, v in plan.items() if not k.startswith("_")},
            "fps": round(float(fps), 4), "width": width, "height": height}
    return rng, fps, width, height, n_frames, plan, meta


def clip_annotation(seed: int, index: int) -> dict[str, Any]:
    """The annotation :func:`generate_clip` gives, without drawing or encoding the clip."""
    return _draw(seed, index)[-1]


def generate_clip(seed: int, index: int) -> tuple[bytes, dict[str, Any]]:
    """One clip: (MP4 bytes, its annotation without ``video``); a pure function of ``(seed, index)``."""
    rng, fps, width, height, n_frames, plan, meta = _draw(seed, index)
    frames = render_video(rng, plan, n_frames, width, height)
    audio = render_audio(rng, plan, float(n_frames / fps))
    return encode_av(frames, fps, audio, sample_rate=SAMPLE_RATE, container="mp4",
                     preset="ultrafast"), meta


def chance_levels(metas: list[dict[str, Any]]) -> dict[str, float]:
    """Chance per ``qa/<type>``: 1 / answers (:data:`CHANCE_BY_ANSWER_SPACE`), or the majority answer's rate in
    ``metas`` when that is higher."""
    answers: dict[str, list[str]] = {k: [] for k in CHANCE_BY_ANSWER_SPACE}
    for m in metas:
        for qa in m["qas"]:
            answers[f"qa/{qa['type']}"].append(qa["answer"])
    out = {}
    for key, prior in CHANCE_BY_ANSWER_SPACE.items():
        majority = Counter(answers[key]).most_common(1)[0][1] / len(answers[key]) if answers[key] else 0.0
        out[key] = round(max(prior, majority), 4)
    return out


def write_dataset(out: str, splits: dict[str, int], seed: int = 0, workers: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Write ``splits`` (name -> clips, in that order of indices) as a user's data: ``out/videos/<split>/*.mp4``
    and ``out/<split>.jsonl`` (``video`` relative to ``out/videos``). Returns each split's file, clip count and
    :func:`chance_levels`. ``workers`` processes encode (default: the CPU count); the files are the same for any."""
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    total = sum(splits.values())
    workers = max(1, min(workers or os.cpu_count() or 1, total))
    make = partial(generate_clip, seed)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    info: dict[str, Any] = {}
    try:
        clips = iter(pool.imap(make, range(total), chunksize=2) if pool else map(make, range(total)))
        bar = tqdm(total=total, desc="clips", disable=not progress)
        for name, count in splits.items():
            os.makedirs(os.path.join(out, "videos", name), exist_ok=True)
            metas = []
            path = os.path.join(out, f"{name}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for i in range(count):
                    mp4, meta = next(clips)
                    rel = f"{name}/clip{i:05d}.mp4"
                    with open(os.path.join(out, "videos", rel), "wb") as v:
                        v.write(mp4)
                    f.write(json.dumps({"video": rel, **meta}) + "\n")
                    metas.append(meta)
                    bar.update()
            info[name] = {"annotations": path, "clips": count, "chance": chance_levels(metas)}
        bar.close()
    finally:
        if pool:
            pool.terminate()
    return info
