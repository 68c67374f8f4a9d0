"""The synthetic dataset: deterministic real MP4s whose pixels and sound agree with their metadata."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from mirasol_ray.data.shards import read_manifest
from mirasol_ray.data.synthetic import (
    COLOURS,
    LABEL_SET,
    MC_QUESTION,
    TONES,
    chance_levels,
    generate_clip,
    synthesize,
)


@pytest.fixture(scope="module")
def clips() -> list[tuple[bytes, dict]]:
    return [generate_clip(7, i) for i in range(10)]


def test_deterministic_for_seed_and_index(clips):
    again = generate_clip(7, 3)
    assert again[0] == clips[3][0] and again[1] == clips[3][1]
    assert generate_clip(8, 3)[0] != clips[3][0]
    assert len({c[0] for c in clips}) == len(clips)


def test_clips_vary(clips):
    metas = [m for _, m in clips]
    assert all(2.0 <= m["duration"] <= 4.0 for m in metas)
    assert len({m["duration"] for m in metas}) > 5
    assert len({m["fps"] for m in metas}) > 1
    assert len({(m["width"], m["height"]) for m in metas}) > 2
    assert all(128 <= m["width"] <= 320 and 96 <= m["height"] <= 240 for m in metas)


def test_metadata_answers_follow_events(clips):
    for _, m in clips:
        ev = m["events"]
        assert len(ev) == 4 and sorted(e["colour"] for e in ev) == LABEL_SET  # each colour once
        high = [e for e in ev if e["sound"] == "high"]
        assert len(high) == 1
        high = high[0]
        assert m["label"] == high["colour"] and m["task"] == "qa" and m["source"] == "synthetic"
        assert m["mc_question"] == MC_QUESTION and sorted(m["options"]) == LABEL_SET
        assert m["options"][m["answer_idx"]] == high["colour"]
        assert [qa["type"] for qa in m["qas"]] == ["video", "audio", "av_aligned", "temporal"]
        assert (m["question"], m["answer"]) == (m["qas"][0]["question"], m["qas"][0]["answer"])
        ordinals = ("first", "second", "third", "fourth")
        video, audio, aligned, temporal = m["qas"]
        k = next(i for i, o in enumerate(ordinals) if f" {o} " in video["question"])
        assert video["answer"] == ev[k]["colour" if "colour" in video["question"] else "shape"]
        k = next(i for i, o in enumerate(ordinals) if f" {o} " in audio["question"])
        assert audio["answer"] == ev[k]["sound"]
        assert aligned["answer"] == high["colour" if "colour" in aligned["question"] else "shape"]
        other = next(e for e in ev if e is not high and f"{e['colour']} {e['shape']}" in temporal["question"])
        first = high if high["segment"] < other["segment"] else other
        assert temporal["answer"] == ("high tone" if first is high else f"{other['colour']} {other['shape']}")
        assert m["caption"].startswith(f"a {ev[0]['colour']} {ev[0]['shape']}, then ")
        assert m["caption"].endswith("; " + ", ".join(e["sound"] for e in ev))
        # one timestamped caption per segment, on the segment's times
        assert [(s["start"], s["end"], s["caption"]) for s in m["segments"]] == [
            (e["start"], e["end"], f"a {e['colour']} {e['shape']}; {e['sound']}") for e in ev]


def _dominant_colour(rgb: np.ndarray) -> str:
    """The named colour of the saturated pixels of one frame (the background is low-saturation)."""
    px = rgb.reshape(-1, 3).astype(float)
    px = px[px.max(1) - px.min(1) > 70]
    ref = np.array([COLOURS[c] for c in LABEL_SET], dtype=float)
    nearest = np.argmin(((px[:, None] / np.linalg.norm(px, axis=1, keepdims=True)[:, :, None]
                          - ref[None] / np.linalg.norm(ref, axis=1)[None, :, None]) ** 2).sum(-1), axis=1)
    return LABEL_SET[Counter(nearest.tolist()).most_common(1)[0][0]]


def test_mp4_content_matches_metadata(clips):
    """Decode with PyAV: H.264 + AAC; the colour mid-segment and the tone's pitch are what the events say."""
    for mp4, m in clips[:3]:
        with av.open(io.BytesIO(mp4)) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert (v.codec_context.name, a.codec_context.name) == ("h264", "aac")
            assert (v.codec_context.width, v.codec_context.height) == (m["width"], m["height"])
            frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
        with av.open(io.BytesIO(mp4)) as c:
            pcm = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
        assert abs(len(frames) - m["duration"] * m["fps"]) <= 1
        assert abs(len(pcm) / 16000 - m["duration"]) < 0.15
        for e in m["events"]:
            mid = (e["start"] + e["end"]) / 2
            _, rgb = min(frames, key=lambda tf: abs(tf[0] - mid))
            assert _dominant_colour(rgb) == e["colour"]
            if e["sound"] == "silence":
                continue
            a, b = round((e["tone_start"] + 0.08) * 16000), round((e["tone_end"] - 0.08) * 16000)
            spec = np.abs(np.fft.rfft(pcm[a:b] * np.hanning(b - a)))
            peak = np.fft.rfftfreq(b - a, 1 / 16000)[np.argmax(spec)]
            assert abs(peak - TONES[e["sound"]]) < 0.06 * TONES[e["sound"]], (e, peak)


def test_chance_levels():
    def meta(label: str, idx: int) -> dict:
        return {"qas": [{"type": "video", "answer": label}, {"type": "temporal", "answer": "high tone"}],
                "answer_idx": idx, "label": label}

    chance = chance_levels([meta("red", 0), meta("blue", 1), meta("green", 2), meta("yellow", 3)])
    assert chance["qa/video"] == 0.25 and chance["cls"] == 0.25 and chance["mcqa"] == 0.25
    assert chance["qa/temporal"] == 1.0  # every answer the same: majority rate 1 beats the 1/2 prior
    assert chance_levels([meta("red", 0), meta("red", 0), meta("blue", 1)])["cls"] == pytest.approx(0.6667)


def test_synthesize_writes_shards_and_manifest(tmp_path: Path):
    manifest = synthesize(str(tmp_path / "a"), 6, seed=3, shard_size=4, val_fraction=0.34, progress=False,
                          workers=1)
    assert manifest["num_samples"] == 6 and manifest["label_set"] == LABEL_SET
    assert manifest["splits"]["train"]["num_samples"] == 4 and manifest["splits"]["val"]["num_samples"] == 2
    assert [s["name"] for s in manifest["shards"]] == ["train/shard-000000.tar", "val/shard-000000.tar"]
    assert read_manifest(str(tmp_path / "a")) == manifest
    assert read_manifest(str(tmp_path / "a" / "val"))["chance"] == manifest["splits"]["val"]["chance"]
    metas = []
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "a" / shard["name"]) as t:
            names = t.getnames()
            assert names[::2] == [n.replace(".json", ".mp4") for n in names[1::2]]
            metas += [json.loads(t.extractfile(n).read()) for n in names[1::2]]
    assert manifest["chance"] == chance_levels(metas)
    c = manifest["chance"]
    assert set(c) == {"qa/video", "qa/audio", "qa/av_aligned", "qa/temporal", "mcqa", "cls"}
    assert c["qa/temporal"] >= 0.5 and all(v >= 0.25 for v in c.values())
    # the same bytes with another worker count
    again = synthesize(str(tmp_path / "b"), 6, seed=3, shard_size=4, val_fraction=0.34, progress=False, workers=2)
    assert [s["bytes"] for s in again["shards"]] == [s["bytes"] for s in manifest["shards"]]
    assert (tmp_path / "b/val/shard-000000.tar").read_bytes() == (tmp_path / "a/val/shard-000000.tar").read_bytes()
    # the clips' own tokenizer, learnt from the training split's text
    assert manifest["tokenizer"] == "tokenizer.json"
    assert (tmp_path / "a/val" / read_manifest(str(tmp_path / "a/val"))["tokenizer"]).resolve() \
        == (tmp_path / "a/tokenizer.json").resolve()  # a split's manifest names it from its own folder
    assert (tmp_path / "b/tokenizer.json").read_bytes() == (tmp_path / "a/tokenizer.json").read_bytes()


def test_learnt_tokenizer_makes_words_single_tokens_and_still_encodes_anything(tmp_path: Path):
    from mirasol_ray.data.text import HFTokenizer, train_bpe_tokenizer

    corpus = ["a red circle, then a blue square; low, high", "what colour is on screen during the high tone?",
              "red", "blue", "green", "which came first: high tone or red circle?"] * 20
    path = tmp_path / "tokenizer.json"
    path.write_text(train_bpe_tokenizer(corpus, vocab_size=400))
    tok = HFTokenizer(str(path))
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and tok.vocab_size <= 400
    assert len(tok.encode("red")) == 1 and tok.encode("red") == tok.encode(" red")
    question = "what colour is on screen during the high tone?"
    assert len(tok.encode(question)) <= 12 < len(question)
    for text in (question, "red", "Ünseen wörds, 42!"):
        assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id, tok.pad_id]) == text
