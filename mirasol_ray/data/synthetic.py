"""Procedurally generated real MP4 clips (H.264 + AAC) with a task that needs both modalities, aligned in time.

A clip lasts 2-4 s (24, 25, 29.97 or 30 fps; 128x96 to 320x240) and is cut into 4 equal **segments** (events).
In each segment one large shape moves over a panning, grainy texture: its colour is one of red, green, blue,
yellow, each used exactly once per clip (a random permutation), and its shape one of circle, square, triangle,
cross (independent, repeats allowed). During each segment a tone sounds: low (~300 Hz), mid (~700 Hz), high
(~1500 Hz), or nothing; f0 is jittered, with vibrato, harmonics and a noise floor (the mid tone's 2nd harmonic
sits near the high tone). **Exactly one segment has the high tone** (at a uniform position); the other three are
low, mid or silence, uniformly, so every segment's sound is uniform over the 4 answers.

Why this needs both modalities *and* their alignment: every colour appears once, so "which colour is on screen
during the high tone" is uniform over 4 colours given the video alone (the tone's position is unknown) and given
the audio alone (the colours' order is unknown); only matching when the tone sounds to what is on screen then
answers it. Per-type questions isolate each skill:

==============  ============================================================  ========  =======
type            question (one template drawn per clip)                         answers   chance
==============  ============================================================  ========  =======
``video``       what colour / shape is the {first..fourth} shape?              4         1/4
``audio``       what do you hear in the {first..fourth} quarter?               4         1/4
``av_aligned``  what colour / shape is on screen during the high tone?         4         1/4
``temporal``    which came first: high tone or {colour shape}?                 2 named   1/2
``mcqa``        which colour is on screen during the high tone? (4 options)    4         1/4
``cls``         label = the colour on screen during the high tone              4         1/4
==============  ============================================================  ========  =======

The manifest's ``chance`` is the larger of this and the empirical majority-answer rate of the data written (small
datasets drift above 1/4). Every clip is a pure function of ``(seed, index)``: the same bytes every time.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from fractions import Fraction
from functools import partial
from typing import Any

import numpy as np
from tqdm import tqdm

from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.shards import ShardWriter, write_tokenizer

SAMPLE_RATE = 16000
NUM_SEGMENTS = 4
FPS_CHOICES = (Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30))
SIZES = ((128, 96), (160, 120), (176, 144), (192, 144), (224, 168), (256, 144), (256, 192), (320, 180), (320, 240))
"""(width, height): 4:3, CIF and 16:9 sizes small enough that 2 CPU cores decode a demo's worth quickly."""
COLOURS = {"red": (215, 45, 40), "green": (40, 175, 60), "blue": (45, 80, 220), "yellow": (230, 205, 45)}
SHAPES = ("circle", "square", "triangle", "cross")
TONES = {"low": 300.0, "mid": 700.0, "high": 1500.0}
SOUNDS = ("low", "mid", "high", "silence")
ORDINALS = ("first", "second", "third", "fourth")
MC_QUESTION = "which colour is on screen during the high tone?"
LABEL_SET = sorted(COLOURS)
CHANCE_BY_ANSWER_SPACE = {"qa/video": 1 / 4, "qa/audio": 1 / 4, "qa/av_aligned": 1 / 4, "qa/temporal": 1 / 2,
                          "mcqa": 1 / 4, "cls": 1 / len(LABEL_SET)}


def _smooth_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A low-saturation, blotchy float [h, w, 3] texture: coarse noise, bilinearly upsampled."""
    gh, gw = max(h // 24, 2) + 1, max(w // 24, 2) + 1
    grey = rng.uniform(70, 170) + rng.normal(0, 30, (gh, gw, 1)) + rng.normal(0, 10, (gh, gw, 3))
    ay = _interp_matrix(h, gh)  # [h, gh]
    ax = _interp_matrix(w, gw)  # [w, gw]
    return np.einsum("yg,ghc,xh->yxc", ay, grey, ax, optimize=True).astype(np.float32)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights from a coarse grid onto n_out pixels."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` of radius ``r`` given pixel offsets from its centre."""
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if shape == "triangle":  # apex up, base at 0.75 r
        return (dy >= -r) & (dy <= 0.75 * r) & (np.abs(dx) <= (dy + r) * 0.55)
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _render_video(rng: np.random.Generator, events: list[dict], n_frames: int, fps: Fraction,
                  width: int, height: int) -> np.ndarray:
    """uint8 [n_frames, height, width, 3]: a panning grainy texture with one moving shape per segment."""
    vel = rng.uniform(-1.0, 1.0, 2)  # texture pan, pixels per frame (y, x)
    span = np.ceil(np.abs(vel) * n_frames).astype(int) + 1
    tex = _smooth_texture(rng, height + span[0], width + span[1])
    grain = rng.normal(0, rng.uniform(3, 8), (3, height, width, 1)).astype(np.float32)
    start = np.where(vel < 0, span - 1, 0)
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for i in range(n_frames):
        oy, ox = (start + vel * i).astype(int)
        img = tex[oy:oy + height, ox:ox + width] + grain[i % 3]
        t = i / fps
        ev = events[min(int(t * NUM_SEGMENTS / events[-1]["end"]), NUM_SEGMENTS - 1)]
        p = (t - ev["start"]) / (ev["end"] - ev["start"])  # progress through the segment, 0..1
        r = ev["_radius"] * (1 + 0.1 * np.sin(2 * np.pi * p))
        cy, cx = (1 - p) * np.asarray(ev["_from"]) + p * np.asarray(ev["_to"])
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, height)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, width)
        dy = np.arange(y0, y1)[:, None] - cy
        dx = np.arange(x0, x1)[None, :] - cx
        mask = _shape_mask(ev["shape"], dy, dx, r)
        shade = 1.0 - 0.25 * np.sqrt(dy**2 + dx**2) / r  # light from the centre: not a flat patch
        patch = img[y0:y1, x0:x1]
        patch[mask] = (np.asarray(ev["_rgb"]) * shade[..., None])[mask]
        frames[i] = np.clip(img, 0, 255)
    return frames


def _render_audio(rng: np.random.Generator, events: list[dict], duration: float) -> np.ndarray:
    """float32 [round(duration * SAMPLE_RATE)] mono: one harmonic tone (or silence) per segment over noise."""
    n = round(duration * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    white = rng.normal(0, 1, n)
    brown = np.cumsum(rng.normal(0, 1, n))
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")  # drop the drift, keep a low rumble
    noise = rng.uniform(0.01, 0.04) * white + rng.uniform(0.01, 0.04) * brown / (np.std(brown) + 1e-9)
    audio = noise
    for ev in events:
        if ev["sound"] == "silence":
            continue
        a, b = round(ev["tone_start"] * SAMPLE_RATE), round(ev["tone_end"] * SAMPLE_RATE)
        tt = t[a:b] - t[a]
        vib = 1 + rng.uniform(0.005, 0.015) * np.sin(2 * np.pi * rng.uniform(4, 7) * tt)
        phase = 2 * np.pi * np.cumsum(ev["tone_hz"] * vib) / SAMPLE_RATE
        wave = np.sin(phase) + rng.uniform(0.1, 0.5) * np.sin(2 * phase) + rng.uniform(0.05, 0.3) * np.sin(3 * phase)
        ramp = min(round(0.015 * SAMPLE_RATE), (b - a) // 2)
        env = np.ones(b - a)
        env[:ramp] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[b - a - ramp:] = env[:ramp][::-1]
        audio[a:b] += rng.uniform(0.15, 0.35) * env * wave
    return np.clip(audio, -1, 1).astype(np.float32)


def _events(rng: np.random.Generator, duration: float, width: int, height: int) -> list[dict]:
    """The 4 segments: times, colour, shape, sound; ``_``-prefixed keys only drive rendering."""
    colours = [LABEL_SET[i] for i in rng.permutation(len(LABEL_SET))]
    high = int(rng.integers(NUM_SEGMENTS))
    events = []
    seg = duration / NUM_SEGMENTS
    for k in range(NUM_SEGMENTS):
        sound = "high" if k == high else ("low", "mid", "silence")[int(rng.integers(3))]
        r = rng.uniform(0.2, 0.28) * min(width, height)
        ev: dict[str, Any] = {
            "segment": k, "start": round(k * seg, 4), "end": round((k + 1) * seg, 4),
            "colour": colours[k], "shape": SHAPES[int(rng.integers(len(SHAPES)))], "sound": sound,
            "_radius": r, "_rgb": np.clip(np.asarray(COLOURS[colours[k]]) + rng.integers(-20, 21, 3), 0, 255),
            "_from": (rng.uniform(r, height - r), rng.uniform(r, width - r)),
            "_to": (rng.uniform(r, height - r), rng.uniform(r, width - r)),
        }
        if sound != "silence":
            ev["tone_hz"] = round(TONES[sound] * rng.uniform(0.96, 1.04), 1)
            ev["tone_start"] = round(k * seg + rng.uniform(0.05, 0.15) * seg, 4)
            ev["tone_end"] = round((k + 1) * seg - rng.uniform(0.05, 0.15) * seg, 4)
        events.append(ev)
    events[-1]["end"] = duration
    return events


def _questions(rng: np.random.Generator, events: list[dict]) -> tuple[list[dict], dict]:
    """One QA per type (video, audio, av_aligned, temporal) and the multiple-choice item."""
    high = next(e for e in events if e["sound"] == "high")
    k = int(rng.integers(NUM_SEGMENTS))
    attr = ("colour", "shape")[int(rng.integers(2))]
    video = {"question": f"what {attr} is the {ORDINALS[k]} shape?", "answer": events[k][attr], "type": "video"}
    k = int(rng.integers(NUM_SEGMENTS))
    audio = {"question": f"what do you hear in the {ORDINALS[k]} quarter?", "answer": events[k]["sound"],
             "type": "audio"}
    attr = ("colour", "shape")[int(rng.integers(2))]
    aligned = {"question": f"what {attr} is on screen during the high tone?", "answer": high[attr],
               "type": "av_aligned"}
    other = events[[e["segment"] for e in events if e is not high][int(rng.integers(NUM_SEGMENTS - 1))]]
    names = {high["segment"]: "high tone", other["segment"]: f"{other['colour']} {other['shape']}"}
    first, second = (high, other) if rng.integers(2) else (other, high)
    temporal = {"question": f"which came first: {names[first['segment']]} or {names[second['segment']]}?",
                "answer": names[min(names)], "type": "temporal"}
    options = [LABEL_SET[i] for i in rng.permutation(len(LABEL_SET))]
    mc = {"mc_question": MC_QUESTION, "options": options, "answer_idx": options.index(high["colour"])}
    return [video, audio, aligned, temporal], mc


def generate_clip(seed: int, index: int) -> tuple[bytes, dict]:
    """One synthetic clip (MP4 bytes, metadata json); a pure function of ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    fps = FPS_CHOICES[int(rng.integers(len(FPS_CHOICES)))]
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    n_frames = round(rng.uniform(2.0, 4.0) * fps)
    duration = float(n_frames / fps)
    events = _events(rng, duration, width, height)
    qas, mc = _questions(rng, events)
    frames = _render_video(rng, events, n_frames, fps, width, height)
    audio = _render_audio(rng, events, duration)
    public = [{k: v for k, v in e.items() if not k.startswith("_")} for e in events]
    high = next(e for e in events if e["sound"] == "high")
    caption = (", then ".join(f"a {e['colour']} {e['shape']}" for e in events)
               + "; " + ", ".join(e["sound"] for e in events))
    meta = {
        "task": "qa", "caption": caption, "qas": qas,
        "question": qas[0]["question"], "answer": qas[0]["answer"], **mc,
        "label": high["colour"], "source": "synthetic",
        "duration": round(duration, 4), "fps": round(float(fps), 4), "width": width, "height": height,
        "events": public,
        # timestamped captions, one per segment (as ActivityNet Captions' or YouCook2's): grounded captions
        "segments": [{"start": e["start"], "end": e["end"], "caption": f"a {e['colour']} {e['shape']}; {e['sound']}"}
                     for e in events],
    }
    return encode_av(frames, fps, audio, sample_rate=SAMPLE_RATE, container="mp4",
                     preset="ultrafast"), meta


def chance_levels(metas: list[dict]) -> dict[str, float]:
    """Chance per task: 1 / answer-space size, or the empirical majority-answer rate when that is higher."""
    answers: dict[str, list[Any]] = {key: [] for key in CHANCE_BY_ANSWER_SPACE}
    for m in metas:
        for qa in m["qas"]:
            answers[f"qa/{qa['type']}"].append(qa["answer"])
        answers["mcqa"].append(m["answer_idx"])
        answers["cls"].append(m["label"])
    out = {}
    for key, prior in CHANCE_BY_ANSWER_SPACE.items():
        majority = Counter(answers[key]).most_common(1)[0][1] / len(answers[key]) if answers[key] else 0.0
        out[key] = round(max(prior, majority), 4)
    return out


def synthesize(out: str, num_clips: int, seed: int = 0, shard_size: int = 64, val_fraction: float = 0.0,
               progress: bool = True, workers: int | None = None, overwrite: bool = False) -> dict:
    """Write ``num_clips`` synthetic clips as WebDataset shards + ``manifest.json`` under ``out``.

    With ``val_fraction > 0`` the last ``round(num_clips * val_fraction)`` clips go to ``out/val/`` and the rest
    to ``out/train/`` (clips are i.i.d., so a tail split is unbiased). ``workers`` processes generate clips
    (default: the CPU count); output is identical for any worker count. A folder that already holds shards is
    refused unless ``overwrite`` (see :class:`~mirasol_ray.data.shards.ShardWriter`).
    """
    if num_clips <= 0:
        raise ValueError(f"num_clips must be positive, got {num_clips}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(round(num_clips * val_fraction), num_clips - 1)  # keep at least one training clip
    workers = min(workers or os.cpu_count() or 1, num_clips)
    metas: dict[str, list[dict]] = {}
    writer = ShardWriter(out, shard_size, overwrite=overwrite)
    make = partial(generate_clip, seed)
    # spawn, not fork: callers (Ray drivers, test runners) hold threads that a fork would copy mid-lock.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        clips = pool.imap(make, range(num_clips), chunksize=2) if pool else map(make, range(num_clips))
        for index, (mp4, meta) in enumerate(tqdm(clips, total=num_clips, desc="synth", disable=not progress)):
            split = "" if n_val == 0 else ("val" if index >= num_clips - n_val else "train")
            writer.write(f"clip{index:06d}", {"mp4": mp4, "json": meta}, split=split)
            metas.setdefault(split, []).append(meta)
    except BaseException:  # Ctrl-C included: no half-written shard or temporary folder stays behind
        writer.abort()
        raise
    finally:
        if pool:
            pool.terminate()
    everything = [m for split_metas in metas.values() for m in split_metas]
    # The clips' own tokenizer (tokenizer.json), learnt from the training text only: nothing about held-out answers
    # leaks into it.
    tokenizer = write_tokenizer(out, metas.get("train", everything))
    return writer.close(
        {"source": "synthetic", "seed": seed, "label_set": LABEL_SET, "chance": chance_levels(everything),
         **tokenizer},
        split_extra={split: {"chance": chance_levels(ms)} for split, ms in metas.items() if split},
    )
