"""The bars-and-beeps task (``mirasol bench recipe``'s data): real MP4s whose pixels and sound, decoded back by the
project's own decoder at the demo's training geometry, say what the annotations say; and the bench runs the
README's "Your own data" commands as the README writes them."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bars_beeps import (
    BEEP_HZ,
    NUMBERS,
    QUESTIONS,
    SOUNDS,
    chance_levels,
    clip_annotation,
    generate_clip,
    write_dataset,
)
from benchmarks.recipe import README_COMMANDS, commands
from mirasol_ray.config import load_config
from mirasol_ray.data.decode import decode_audio
from mirasol_ray.data.rows import decode_av
from mirasol_ray.data.synthetic import generate_clip as demo_clip

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def clips() -> list[tuple[bytes, dict]]:
    return [generate_clip(5, i) for i in range(16)]


def beep_onsets(pcm: np.ndarray, sr: int = 16000) -> int:
    """Onsets of energy in a band around the beeps' pitch (10 ms hops): where no other sound of the task reaches."""
    win, hop = 400, 160
    frames = np.stack([pcm[i * hop:i * hop + win] * np.hanning(win) for i in range((len(pcm) - win) // hop)])
    spec = np.abs(np.fft.rfft(frames, axis=1))  # [T, win // 2 + 1]
    freqs = np.fft.rfftfreq(win, 1 / sr)
    band = spec[:, (freqs > 0.85 * BEEP_HZ) & (freqs < 1.15 * BEEP_HZ)].sum(1)
    on = band > 5 * np.median(band) + 1e-3
    return int(on[0]) + int(np.sum(np.diff(on.astype(int)) == 1))


def test_pixels_and_sound_match_the_annotations(clips):
    cfg = load_config("demo", []).data  # what training decodes: 4 snippets x 4 frames at 64 x 64
    for mp4, meta in clips:
        ev = meta["events"]
        d = decode_av(mp4, None, cfg, train=False, rng=np.random.default_rng(0))
        lum = d["video"].reshape(-1, cfg.height, cfg.width, 3).astype(np.float32).mean(-1)  # [S*F, H, W]
        bar_row = lum.mean(2).argmax(1)  # the bar is the brightest row, dark or not
        assert (bar_row[-1] < bar_row[0]) == (ev["direction"] == "up"), (meta["caption"], bar_row)
        brightness = lum.mean((1, 2))
        half = len(brightness) // 2
        first_dark = brightness[:half].mean() < brightness[half:].mean()
        assert first_dark == (ev["dark_half"] == 0), (meta["caption"], brightness)
        assert min(brightness[:half].mean(), brightness[half:].mean()) < 0.4 * max(brightness.mean(), 1)
        assert beep_onsets(decode_audio(mp4, 16000)) == len(ev["beeps"]), meta["caption"]
        answers = {q["type"]: q["answer"] for q in meta["qas"]}
        dark_sound = ev["sounds"][ev["dark_half"]]
        assert answers == {"number": NUMBERS[len(ev["beeps"]) - 1], "motion": ev["direction"],
                           "av_aligned": dark_sound, "yes_no": answers["yes_no"]}
        yes_no = next(q for q in meta["qas"] if q["type"] == "yes_no")
        asked = next(s for s in SOUNDS if s in yes_no["question"])
        assert yes_no["answer"] == ("yes" if asked == dark_sound else "no")
        assert asked in ev["sounds"], "the yes/no question asks about a sound the clip plays"


def test_the_sound_during_the_dark_half(clips):
    """The open audio-video question: the dark half's sound is the one whose spectrum is heard in that half."""
    for mp4, meta in clips:
        ev = meta["events"]
        pcm = decode_audio(mp4, 16000)
        half = len(pcm) // 2
        dark = pcm[:half] if ev["dark_half"] == 0 else pcm[half:]
        power = np.abs(np.fft.rfft(dark)) ** 2
        freqs = np.fft.rfftfreq(len(dark), 1 / 16000)
        low = power[(freqs > 80) & (freqs < 160)].sum()  # the buzz's fundamental (~60% of its power)
        mid = power[(freqs > 190) & (freqs < 370)].sum()  # the chord's three notes (~90% of its)
        wide = power[(freqs > 450) & (freqs < 1400)].sum()  # most of the sweep's glide
        loudest = ("buzz", "chord", "sweep")[int(np.argmax([low, mid, wide]))]
        assert loudest == ev["sounds"][ev["dark_half"]], meta["caption"]


def test_unlike_the_demo_and_balanced(clips):
    metas = [m for _, m in clips]
    assert generate_clip(5, 3)[0] == clips[3][0], "a pure function of (seed, index)"
    assert clip_annotation(5, 3) == clips[3][1]
    demo_answers = {q["answer"] for q in demo_clip(0, 0)[1]["qas"]} | {"red", "green", "blue", "yellow", "circle",
                                                                        "square", "triangle", "cross"}
    words = {w for m in metas for q in m["qas"] for w in q["answer"].split()}
    assert not words & demo_answers
    for kind, templates in QUESTIONS.items():
        used = {q["question"] for m in metas for q in m["qas"] if q["type"] == kind}
        assert used <= {t.format(sound=s) for t in templates for s in SOUNDS}
    big = [clip_annotation(6, i) for i in range(400)]
    chance = chance_levels(big)
    assert chance["qa/av_aligned"] < 0.4 and chance["qa/yes_no"] < 0.58 and chance["qa/motion"] < 0.58
    assert Counter(len(m["events"]["beeps"]) for m in big).keys() == {1, 2, 3, 4}


def test_written_as_a_users_data(tmp_path):
    info = write_dataset(str(tmp_path), {"train": 3, "val": 2}, seed=1, workers=1, progress=False)
    assert {k: v["clips"] for k, v in info.items()} == {"train": 3, "val": 2}
    lines = [json.loads(ln) for ln in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [ln["video"] for ln in lines] == ["val/clip00000.mp4", "val/clip00001.mp4"]
    assert (tmp_path / "videos" / lines[1]["video"]).read_bytes() == generate_clip(1, 4)[0], "val follows train"


def test_bench_runs_the_readme_commands_as_written():
    # the README's one command block that builds data/mine/train: "Your own data", wherever its heading goes
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S) if "--out data/mine/train" in b]
    joined = re.sub(r"\\\s*\n\s*", " ", block)
    lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in joined.splitlines()]
    assert [" ".join(ln.split()) for ln in lines if ln] == README_COMMANDS
    run = [line for _, line in commands(True, [], [])]
    for readme_line in README_COMMANDS:  # each README command runs as written (plus --json/--out to read it)
        assert any(line == readme_line or line.startswith(readme_line + " --") for line in run), readme_line
