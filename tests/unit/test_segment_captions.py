"""Timestamped captions (a sample's ``segments``): caption texts of their own, each read by the decoder from the
snippets its time span covers (``text_span``), and scored apart as ``caption/segment``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from small_models import small_model_config

from mirasol_ray.config import DataConfig
from mirasol_ray.data.rows import decode_sample, sample_texts, snippet_span
from mirasol_ray.data.schema import TASKS, check_row, qtype_index
from mirasol_ray.model.mirasol import Mirasol, texts_of
from mirasol_ray.train.metrics import aggregate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEGMENTS = [{"start": 0.0, "end": 2.0, "caption": "dark and quiet"},
            {"start": 2.0, "end": 4.0, "caption": "bright and loud"},
            {"start": 3.5, "end": 4.0, "caption": "the very end"},
            {"start": 9.0, "end": 12.0, "caption": "after the clip"},  # outside the video: dropped
            {"start": 1.0, "end": 0.5, "caption": "backwards"},  # malformed: ignored
            {"start": 0.0, "end": 1.0, "caption": ""},  # no text: ignored
            "not a segment"]
META = {"caption": "dark, then bright", "segments": SEGMENTS, "label": "x"}


def cfg(**kw) -> DataConfig:
    base = dict(num_snippets=4, frames_per_snippet=2, height=32, width=32, n_mels=16, mel_frames=8,
                max_prompt_len=16, max_target_len=16, max_options=4, task="caption")
    return DataConfig(**{**base, **kw})


def rows_of(video: bytes, c: DataConfig, meta: dict = META) -> list[dict]:
    sample = {"__key__": "clip", "mp4": video, "json": json.dumps(meta).encode()}
    rows = decode_sample(sample, c, train=False, rng=np.random.default_rng(0))
    for row in rows:
        check_row(row, c)
    return rows


def test_snippet_span_takes_the_windows_mostly_inside():
    windows = np.array([[0, 1], [1, 2], [2, 3], [3, 4]], float)
    assert snippet_span(windows, 1.0, 3.0).tolist() == [False, True, True, False]
    assert snippet_span(windows, 0.4, 1.6).tolist() == [True, True, False, False]  # 0.6 of each: half or more
    assert snippet_span(windows, 1.2, 1.4).tolist() == [False, True, False, False]  # inside one: the one it overlaps
    assert snippet_span(windows, 0.9, 1.3).tolist() == [False, True, False, False]  # mostly the second
    assert not snippet_span(windows, 5.0, 6.0).any()  # after the clip


def test_timestamped_captions_become_grounded_caption_texts(step_clip):
    (row,) = rows_of(step_clip, cfg())
    n = int(row["text_mask"].sum())
    assert n == 4 and int(row["num_texts"]) == 4  # the clip's caption and three segments; the rest dropped
    assert [TASKS[int(t)] for t in row["task"][:n]] == ["caption"] * 4
    assert row["qtype"][:n].tolist() == [qtype_index("caption")] + [qtype_index("segment")] * 3
    assert row["text_span"][:n].tolist() == [[True] * 4,  # the clip's caption reads the whole clip
                                             [True, True, False, False],  # 0-2 s of a 4 s clip in 4 windows
                                             [False, False, True, True],
                                             [False, False, False, True]]
    assert row["text_span"][n:].all()  # padding: the default
    # the snippets a span names are the ones showing that moment: the clip turns bright at 2 s
    brightness = row["video"].mean(axis=(1, 2, 3, 4))
    assert (brightness[row["text_span"][2]] > 128).all() and (brightness[row["text_span"][1]] < 128).all()


def test_segments_are_texts_of_the_caption_task_only_and_can_be_switched_off(step_clip):
    assert int(rows_of(step_clip, cfg(task="all"))[0]["num_texts"]) == 5  # + the label
    assert int(rows_of(step_clip, cfg(segment_captions=False))[0]["num_texts"]) == 1
    assert rows_of(step_clip, cfg(task="finetune"), {**META, "caption": ""})[0]["qtype"][0] == qtype_index("label")
    # segments alone are enough for a caption row
    (row,) = rows_of(step_clip, cfg(), {"segments": SEGMENTS[:1]})
    assert int(row["num_texts"]) == 1 and row["text_span"][0].tolist() == [True, True, False, False]
    assert "bright and loud" in sample_texts(META)  # a learnt tokenizer sees their words


def grounded_batch(model_cfg, span: list[list[bool]], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    S, F, (H, W) = model_cfg.max_snippets, model_cfg.frames_per_snippet, model_cfg.image_size
    K = len(span)
    ids = torch.randint(3, model_cfg.vocab_size, (1, K, 6), generator=g).int()
    ids[..., 0] = 1
    return {
        "video": torch.randint(0, 256, (1, S, F, H, W, 3), generator=g, dtype=torch.uint8),
        "audio": torch.randn(1, S, model_cfg.n_mels, model_cfg.mel_frames, generator=g),
        "audio_present": torch.ones(1, dtype=torch.bool), "snippet_mask": torch.ones(1, S, dtype=torch.bool),
        "label": torch.full((1,), -1), "text_mask": torch.ones(1, K, dtype=torch.bool),
        "task": torch.zeros(1, K, dtype=torch.long),
        "prompt_ids": torch.full((1, K, 2), 5, dtype=torch.int32), "prompt_mask": torch.ones(1, K, 2, dtype=torch.bool),
        "target_ids": ids, "target_mask": torch.ones(1, K, 6, dtype=torch.bool),
        "text_span": torch.tensor([span]),
    }


def test_a_grounded_text_reads_its_snippets_tokens_alone():
    """The decoder's view: a text spanning snippet 1 attends to snippet 1's m context tokens and nothing else (not
    the clip tokens, which average every snippet); one spanning every snippet reads the whole context."""
    cfg = small_model_config(max_snippets=3)
    torch.manual_seed(0)
    model = Mirasol(cfg).eval()
    batch = grounded_batch(cfg, [[False, True, False], [True, True, True]])
    m = cfg.combiner_tokens
    with torch.no_grad():
        enc = model.encode(batch)
        t = texts_of(batch)
        mask = model.text_context_mask(enc, t["clip"], t["text_span"])
        assert mask[0].tolist() == [False] * m + [False] * m + [True] * m + [False] * m
        assert mask[1].all()
        logits = model.text_logits(batch)
        # the same text, decoded over a context cut down to snippet 1's tokens: the same logits
        own = enc["context"][:, 2 * m:3 * m]
        alone = model._target_logits(own, torch.ones(1, m, dtype=torch.bool), t["prompt_ids"][:1],
                                     t["prompt_mask"][:1], t["target_ids"][:1], t["target_mask"][:1])
        torch.testing.assert_close(logits[:1], alone, rtol=1e-4, atol=1e-5)
        # and generation and option scoring take the same view (greedy from the span equals greedy from the cut)
        gen = model.generate_from(enc, t["prompt_ids"][:1], t["prompt_mask"][:1], t["clip"][:1], 4,
                                  span=t["text_span"][:1])
        cut = model.generate_from({"context": own, "context_mask": torch.ones(1, m, dtype=torch.bool)},
                                  t["prompt_ids"][:1], t["prompt_mask"][:1], t["clip"][:1], 4)
        assert gen.tolist() == cut.tolist()
        beams = model.generate_from(enc, t["prompt_ids"][:1], t["prompt_mask"][:1], t["clip"][:1], 4, beam_size=3,
                                    span=t["text_span"][:1])
        cut3 = model.generate_from({"context": own, "context_mask": torch.ones(1, m, dtype=torch.bool)},
                                   t["prompt_ids"][:1], t["prompt_mask"][:1], t["clip"][:1], 4, beam_size=3)
        assert beams.tolist() == cut3.tolist()


def test_a_grounded_captions_loss_reaches_the_context_only_at_its_snippets():
    """The training loss of a text about snippet 1 has a gradient on snippet 1's context tokens and on no other
    (the encoders then see it through those tokens, which are snippet 1's latents relative to the clip's mean)."""
    cfg = small_model_config(max_snippets=3)
    torch.manual_seed(0)
    model = Mirasol(cfg)
    batch = grounded_batch(cfg, [[False, True, False]])
    kept = {}
    encode_context = model._context

    def context(h, mask):  # the decoder's context, kept to read its gradient
        kept["context"], context_mask = encode_context(h, mask)
        kept["context"].retain_grad()
        return kept["context"], context_mask

    model._context = context
    model(batch)["losses"]["text"].backward()
    m = cfg.combiner_tokens
    grad = kept["context"].grad[0].abs().sum(-1)  # ((S+1)*m,)
    assert (grad[2 * m:3 * m] > 0).all() and grad[:2 * m].sum() == 0 and grad[3 * m:].sum() == 0


def test_segment_captions_are_scored_apart_from_the_clips_captions():
    records = [{"task": "caption", "qtype": "caption", "pred": "a b", "target": "a b", "correct": True},
               {"task": "caption", "qtype": "segment", "pred": "a", "target": "c", "correct": False}]
    out = aggregate(records)
    assert out["caption"]["value"] == 1.0 and out["caption"]["count"] == 1
    assert out["caption/segment"] == {"metric": "token_f1", "value": 0.0, "count": 1}


def test_a_cut_clip_takes_its_segments_onto_its_own_clock():
    from mirasol_ray.data.shards import rebase_segments

    segs = [{"start": 10.0, "end": 12.0, "caption": "a"}, {"start": 11.5, "end": 20.0, "caption": "b"},
            {"start": 1.0, "end": 2.0, "caption": "before"}, {"caption": "no times"}]
    assert rebase_segments(segs, 10.5, 15.0) == [{"start": 0.0, "end": 1.5, "caption": "a"},
                                                 {"start": 1.0, "end": 4.5, "caption": "b"},
                                                 {"caption": "no times"}]
