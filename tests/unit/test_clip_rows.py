"""A clip is encoded once per step with all its texts: the clip-level batch gives what one row per text gave, with
the audio-video path run once per clip, in training and in evaluation."""

from __future__ import annotations

import pytest
import torch
from small_models import small_model_config

from mirasol_ray.bench.rows import text_rows_of
from mirasol_ray.config import ModelConfig
from mirasol_ray.data.text import get_tokenizer
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.train.step import TASK_CAPTION, TASK_CLS, TASK_MCQA, TASK_QA, predict_batch

PAD, BOS, EOS = 0, 1, 2
TEXTS = [[TASK_CAPTION, TASK_QA, TASK_MCQA, TASK_CLS], [TASK_QA, TASK_MCQA]]  # clip 0: 4 texts, clip 1: 2 (K = 4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg(**kw) -> ModelConfig:
    return small_model_config(**{"num_classes": 3, "pad_id": PAD, "bos_id": BOS, "eos_id": EOS, **kw})


def clip_batch(c: ModelConfig, Lp: int = 5, Lt: int = 7, n_options: int = 3, seed: int = 0) -> dict:
    """Two clips with 4 and 2 texts (K = 4, padded), per mirasol_ray/data/schema.py."""
    g = torch.Generator().manual_seed(seed)
    B, K, S, F = len(TEXTS), 4, c.max_snippets, c.frames_per_snippet
    H, W = c.image_size
    b: dict = {
        "video": torch.randint(0, 256, (B, S, F, H, W, 3), generator=g, dtype=torch.uint8),
        "audio": torch.randn(B, S, c.n_mels, c.mel_frames, generator=g),
        "audio_present": torch.ones(B, dtype=torch.bool), "snippet_mask": torch.ones(B, S, dtype=torch.bool),
        "label": torch.tensor([1, 2]), "num_texts": torch.tensor([len(t) for t in TEXTS]), "key": ["a", "b"],
        "text_mask": torch.zeros(B, K, dtype=torch.bool), "text_index": torch.full((B, K), -1),
        "task": torch.zeros(B, K, dtype=torch.int64), "qtype": torch.zeros(B, K, dtype=torch.int64),
        "answer_idx": torch.full((B, K), -1),
        "prompt_ids": torch.zeros(B, K, Lp, dtype=torch.int32), "prompt_mask": torch.zeros(B, K, Lp, dtype=torch.bool),
        "target_ids": torch.zeros(B, K, Lt, dtype=torch.int32), "target_mask": torch.zeros(B, K, Lt, dtype=torch.bool),
        "option_ids": torch.zeros(B, K, n_options, Lt, dtype=torch.int32),
        "option_mask": torch.zeros(B, K, n_options, Lt, dtype=torch.bool),
    }
    for i, tasks in enumerate(TEXTS):
        for k, task in enumerate(tasks):
            n_prompt = Lp - k % 3
            b["prompt_ids"][i, k, Lp - n_prompt:] = torch.randint(3, c.vocab_size, (n_prompt,), generator=g)
            b["prompt_mask"][i, k, Lp - n_prompt:] = True
            for o in range(n_options):
                n = Lt - (o + k) % 3
                b["option_ids"][i, k, o, :n] = torch.cat([torch.tensor([BOS]), torch.randint(
                    3, c.vocab_size, (n - 2,), generator=g), torch.tensor([EOS])])
                b["option_mask"][i, k, o, :n] = True
            b["target_ids"][i, k], b["target_mask"][i, k] = b["option_ids"][i, k, 1], b["option_mask"][i, k, 1]
            b["task"][i, k], b["text_mask"][i, k], b["text_index"][i, k] = task, True, k
            b["answer_idx"][i, k] = 1 if task == TASK_MCQA else -1
    return b


def one_text_per_row(b: dict) -> dict:
    """The same texts as rows of their own, each with a copy of its clip (the layout before clip rows), as
    ``mirasol bench rows`` lays them out."""
    return text_rows_of(b)


def encoder_calls(model) -> list[int]:
    """Batch sizes the video encoder sees, from now on."""
    seen: list[int] = []
    model.video_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


def test_training_encodes_each_clip_once_and_weighs_texts_as_rows_did():
    c = cfg()
    torch.manual_seed(0)
    model = build_model(c).eval()  # eval: no dropout, so both layouts compute the same numbers
    b = clip_batch(c)
    seen = encoder_calls(model)
    out = model(b)
    assert seen == [2], "the video encoder runs once per clip, not once per text"
    rows = one_text_per_row(b)
    ref = model(rows)
    assert seen == [2, 6]
    torch.testing.assert_close(out["losses"]["text"], ref["losses"]["text"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.text_logits(b), model.text_logits(rows), rtol=1e-4, atol=1e-5)
    out["loss"].backward()
    assert any(p.grad is not None for p in model.video_encoder.parameters())


def test_tasks_on_every_text_match_one_row_per_text():
    c = cfg()
    torch.manual_seed(1)
    model = build_model(c).eval()
    b, rows = clip_batch(c), one_text_per_row(clip_batch(c))
    assert torch.equal(model.generate(b, max_new_tokens=6), model.generate(rows, max_new_tokens=6))
    assert torch.equal(model.generate(b, max_new_tokens=6, beam_size=3),
                       model.generate(rows, max_new_tokens=6, beam_size=3))
    torch.testing.assert_close(model.score_options(b), model.score_options(rows), rtol=1e-4, atol=1e-5)
    cand_ids, cand_mask = rows["option_ids"][0], rows["option_mask"][0]
    torch.testing.assert_close(model.score_candidates(b, cand_ids, cand_mask, chunk=2),
                               model.score_candidates(rows, cand_ids, cand_mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls_mode", ["generate", "score", "head"])
def test_evaluation_encodes_each_clip_once_and_answers_every_text(cls_mode):
    c = cfg(cls_mode=cls_mode, vocab_size=259)  # the byte tokenizer scores the label texts
    torch.manual_seed(2)
    model = build_model(c).eval()
    b = clip_batch(c)
    seen = encoder_calls(model)
    tok = get_tokenizer("byte")
    labels = ["x", "y", "z"] if cls_mode == "score" else None
    recs = predict_batch(model, b, tok, torch.device("cpu"), "fp32", max_new_tokens=4, label_set=labels)
    assert seen == [2], "generation, option scoring and classification share one encoding of the clips"
    assert [r["key"] for r in recs] == ["a#0", "a#1", "a#2", "a#3", "b#0", "b#1"]
    assert [r["task"] for r in recs] == ["caption", "qa", "mcqa", "cls", "qa", "mcqa"]
    # the same predictions as one row per text (each its own clip copy), encoded per row
    ref = predict_batch(model, one_text_per_row(b) | {"num_texts": torch.ones(6, dtype=torch.long)}, tok,
                        torch.device("cpu"), "fp32", max_new_tokens=4, label_set=labels)
    assert [(r["pred"], r["rank"], r["correct"]) for r in recs] == [(r["pred"], r["rank"], r["correct"]) for r in ref]
