"""The long-video regime (issue 33): the tiny_long and base_long presets, a 2-minute real MP4 decoded to 128
snippets with frames and audio where the snippet plan puts them, causality and memory at 128 snippets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_model import make_batch, perturb_snippet

from mirasol_ray.bench.plan import memory_plan
from mirasol_ray.config import load_config
from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.rows import decode_av
from mirasol_ray.data.snippets import plan_snippets
from mirasol_ray.model.mirasol import Mirasol
from mirasol_ray.train.prepare import load_prepared

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FPS, SECONDS, BITS, STRIPE = 30, 120, 12, 8
"""The test video: 2 minutes at 30 fps (3,600 frames), each frame showing its own index as 12 black/white stripes."""
TONE_STEP_S = 10
"""The audio: a tone whose pitch rises every 10 s (12 steps), so that a snippet's log-mel says when it was taken."""


@pytest.mark.parametrize("preset", ["tiny_long", "base_long"])
def test_long_presets_read_512_frames(preset):
    cfg = load_config(preset, [])
    assert (cfg.data.num_snippets, cfg.data.frames_per_snippet) == (128, 4)
    assert cfg.model.max_snippets == 128 and cfg.data.clip_seconds == 0.0  # snippets over the whole video


def test_base_long_fits_one_h100_at_batch_8_with_activation_checkpointing_and_not_without():
    cfg = load_prepared("base_long")
    assert cfg.model.activation_checkpointing and cfg.train.batch_size == 8
    plan = memory_plan(cfg, 1, False, 8)
    card = next(c for c in plan["fits"] if "H100" in c)
    assert plan["fits"][card]["with_checkpointing"] and not plan["fits"][card]["without_checkpointing"]


@pytest.fixture(scope="module")
def long_mp4() -> bytes:
    n = FPS * SECONDS
    frames = np.zeros((n, 64, BITS * STRIPE, 3), np.uint8)
    for i in range(n):
        for b in range(BITS):
            if (i >> b) & 1:
                frames[i, :, b * STRIPE:(b + 1) * STRIPE] = 255
    sr = 16000
    t = np.arange(SECONDS * sr) / sr
    freq = 300.0 + 250.0 * np.floor(t / TONE_STEP_S)
    audio = (0.5 * np.sin(2 * np.pi * np.cumsum(freq) / sr)).astype(np.float32)
    return encode_av(frames, FPS, audio, sr, gop=32)


def _frame_index(frame: np.ndarray) -> int:
    """The index a decoded (resized) frame shows: each stripe's centre column, thresholded."""
    width = frame.shape[1]
    cols = [int((b + 0.5) * width / BITS) for b in range(BITS)]
    return sum(1 << b for b, c in enumerate(cols) if frame[:, c].mean() > 127)


def test_a_two_minute_mp4_decodes_to_128_snippets_with_frames_and_audio_where_the_plan_puts_them(long_mp4):
    cfg = load_config("tiny_long", []).data
    cols = decode_av(long_mp4, None, cfg, train=False, rng=np.random.default_rng(0))
    S, F = cfg.num_snippets, cfg.frames_per_snippet
    assert cols["video"].shape == (S, F, cfg.height, cfg.width, 3) and cols["snippet_mask"].all()
    plan = plan_snippets(SECONDS, S, F, train=False, rng=np.random.default_rng(0))
    np.testing.assert_allclose(cols["windows"], plan.windows, atol=0.05)  # the whole video, in 128 windows
    assert cols["windows"][0, 0] == pytest.approx(0.0, abs=0.05)
    assert cols["windows"][-1, 1] == pytest.approx(SECONDS, abs=0.05)
    # every frame is the one shown at its planned time (the frame index read back from its stripes)
    shown = np.array([[_frame_index(f) for f in snippet] for snippet in cols["video"]])
    expected = np.floor(plan.frame_times * FPS + 1e-6).astype(int)
    np.testing.assert_array_equal(shown, expected)
    # audio: each snippet's loudest mel band is the tone of the 10 s its window lies in, every window alike
    band = cols["audio"].mean(axis=2).argmax(axis=1)  # [S]
    step = np.floor(cols["windows"] / TONE_STEP_S).astype(int)  # [S, 2]
    inside = step[:, 0] == np.floor((cols["windows"][:, 1] - 1e-6) / TONE_STEP_S).astype(int)
    by_step = {k: set(band[inside & (step[:, 0] == k)].tolist()) for k in range(SECONDS // TONE_STEP_S)}
    assert all(len(v) == 1 for v in by_step.values()), by_step
    bands = [next(iter(by_step[k])) for k in sorted(by_step)]
    assert bands == sorted(bands) and len(set(bands)) >= 8, bands  # rising pitch, rising band


def test_at_128_snippets_the_model_is_causal_and_snippet_0_reaches_the_last_snippet():
    """Snippet 0 reaches snippet 127 through both paths: the time-aligned model's causal attention (h) and the TTM
    Combiner's memory (z). The memory carries it with the long presets' slot retention (model.ttm_slot_retention):
    without it, each write pools the memory with the new snippet's tokens and snippet 0's effect on the Combiner's
    output falls geometrically (~0.3 at snippet 8, float noise by 64)."""
    cfg = load_prepared("tiny_long").model
    assert cfg.ttm_slot_retention
    torch.manual_seed(0)
    model = Mirasol(cfg).eval()
    batch = make_batch(cfg, B=1)
    t = 63
    with torch.no_grad():
        base = model.encode_av(batch)
        later = model.encode_av(perturb_snippet(batch, t + 1))
        first = model.encode_av(perturb_snippet(batch, 0))
    for name in ("z", "h"):
        torch.testing.assert_close(base[name][:, : t + 1], later[name][:, : t + 1], rtol=0, atol=1e-6)
        assert (base[name][:, t + 1] - later[name][:, t + 1]).abs().max() > 1e-3
    assert (base["z"][:, 127] - first["z"][:, 127]).abs().max() > 1e-2  # the TTM memory, to the last snippet
    assert (base["h"][:, 127] - first["h"][:, 127]).abs().max() > 1e-3  # the time-aligned model too


def test_the_ttm_memory_carries_snippet_0_to_snippet_127_only_with_slot_retention():
    """The Combiner alone, on the encoders' outputs: snippet 0's effect on its output at snippet 127, and the
    gradient there reaching snippet 0's tokens, with and without the write's slot retention."""
    effect, grad = {}, {}
    for retention in (True, False):
        cfg = dataclasses.replace(load_prepared("tiny_long").model, ttm_slot_retention=retention)
        torch.manual_seed(0)
        model = Mirasol(cfg).eval()
        batch = make_batch(cfg, B=1)
        with torch.no_grad():
            video, audio = model.video_encoder(batch["video"]), model.audio_encoder(batch["audio"])
        video.requires_grad_(True)
        z = model.combiner(video, audio, batch["audio_present"])  # (1, 128, m, D)
        (z[:, 127] * torch.randn_like(z[:, 127])).sum().backward()  # not .sum(): a LayerNorm's output sums to 0
        grad[retention] = video.grad[:, 0].abs().max().item()
        moved = video.detach().clone()
        moved[:, 0] += torch.randn_like(moved[:, 0])
        with torch.no_grad():
            effect[retention] = (model.combiner(moved, audio, batch["audio_present"])[:, 127]
                                 - z.detach()[:, 127]).abs().max().item()
    assert effect[True] > 5e-3 and grad[True] > 1e-3, (effect, grad)  # measured 0.023 and 0.012
    assert effect[False] < 1e-4 and grad[False] < 1e-6, (effect, grad)  # as published, at initialisation


def test_a_training_step_at_512_frames_gives_every_parameter_a_gradient():
    cfg = load_prepared("tiny_long").model
    torch.manual_seed(0)
    model = Mirasol(cfg).train()
    out = model(make_batch(cfg, B=2))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_per_snippet_flops_stay_within_10_percent_from_4_to_128_snippets_and_the_flat_ratio_is_counted():
    """``bench model``'s rows for the tiny geometry, counted on the meta device (issue 33: compute linear in the
    snippets; Mirasol against a flat causal transformer over every frame's and audio's tokens)."""
    from mirasol_ray.bench.model import flat_definition, scaling_row, targets

    cfg = dataclasses.replace(load_prepared("tiny").model, max_snippets=128, dropout=0.0)
    rows = [scaling_row(cfg, S, measure_cpu=False) for S in (4, 16, 128)]
    per = [r["ours_flops_per_snippet"] for r in rows]
    assert max(per) / min(per) <= 1.1 / 0.9, per  # every one within 10% of their midpoint
    t = targets(rows)
    assert t["per_snippet_ok"] and t["per_snippet_band"] <= 0.10
    for r in rows:  # the ratio is the two counts', and the flat model's cost per snippet grows with the length
        assert r["flops_ratio"] == pytest.approx(r["ours"]["flops"] / r["flat"]["flops"])
    assert rows[-1]["flat_flops_per_snippet"] > 3 * rows[0]["flat_flops_per_snippet"]
    assert rows[-1]["flops_ratio"] < rows[0]["flops_ratio"] / 4
    assert t["flops_ratio"]["128"]["ratio"] == rows[-1]["flops_ratio"]
    assert "width 128" in flat_definition(cfg) and "6 blocks" in flat_definition(cfg)


def test_eval_windows_cover_a_long_video_without_overlap_and_views_spread_over_it():
    from mirasol_ray.data.snippets import eval_views

    looks = eval_views(30.0, 8.0, windows=True)  # ceil(30 / 8) windows of 8 s, the last one padded
    assert [v.segment for v in looks] == [(0.0, 8.0), (8.0, 16.0), (16.0, 24.0), (24.0, 32.0)]
    assert [v.segment for v in eval_views(6.0, 8.0, windows=True)] == [(0.0, 6.0)]  # it fits: one window
    assert [v.segment for v in eval_views(180.0, 0.0, windows=True)] == [(0.0, 180.0)]  # snippets over it all
    three = eval_views(30.0, 8.0, views=3)  # starts evenly through the 22 s of slack; the middle one centred
    assert [round(v.segment[0], 3) for v in three] == [3.667, 11.0, 18.333] and all(v.merged for v in three)
    two = eval_views(30.0, 8.0, views=2)  # an even K: the centred view comes too, for the one-view figure only
    assert [v.merged for v in two] == [True, True, False]
    short = eval_views(5.0, 8.0, views=3)  # no slack: the views take other frames of the same span
    assert {v.segment for v in short} == {(0.0, 5.0)} and [v.offset for v in short] == pytest.approx([1 / 6, .5, 5 / 6])
    with pytest.raises(ValueError):
        eval_views(30.0, 8.0, windows=True, views=2)


def test_merged_looks_average_the_scores_and_keep_the_centred_one_for_the_one_view_figure():
    from mirasol_ray.train.views import merge_view_records, split_view_key

    assert split_view_key("clip@view2#1") == ("clip#1", 2) and split_view_key("clip") == ("clip", None)

    def rec(key, scores, pred=""):
        return {"key": key, "task": "mcqa", "qtype": "other", "pred": pred, "target": "", "correct": False,
                "rank": 0, "refs": [], "scores": scores, "choices": ["a", "b", "c"], "answer_idx": 1}

    looks = [rec("v@view0", [0.0, -3.0, -1.0]), rec("v@view1", [-5.0, -1.0, -2.0]), rec("v@view-", [-1, 0, -2])]
    merged, one_view, summary = merge_view_records(looks + [rec("plain", [0.0, -1.0, -2.0], "a")])
    m = next(r for r in merged if r["key"] == "v")
    assert m["scores"] == [-2.5, -2.0, -1.5] and m["pred"] == "c" and m["rank"] == 1 and m["views"] == 2
    assert not m["correct"] and summary["looks_per_clip"] == {"v": 2, "plain": 1}
    assert [(r["key"], r["scores"]) for r in one_view] == [("plain", [0.0, -1.0, -2.0]), ("v", [-1, 0, -2])]
    gen = [dict(rec(f"q@view{i}", [], p), task="qa", target="x") for i, p in enumerate(["y", "x", "x"])]
    (g,), _, _ = merge_view_records(gen)
    assert g["pred"] == "x" and g["correct"] and g["views"] == 3  # open-ended in eval: the most windows' answer
