import json

import numpy as np
import pytest
from conftest import STEP_AT, tone, wav_bytes

from mirasol_ray.config import DataConfig
from mirasol_ray.data.rows import (
    SKIP_REASONS,
    count_lengths,
    decode_sample,
    decode_sample_safe,
    truncation_warning,
)
from mirasol_ray.data.schema import TASKS, TEXT_COLUMNS, check_row, qtype_index
from mirasol_ray.data.text import get_tokenizer

META = {
    "task": "qa",
    "caption": "a tone plays",
    "qas": [{"question": "what sound?", "answer": "a beep", "type": "audio"},
            {"question": "when?", "answer": "late", "type": "temporal"}],
    "options": ["red", "green", "blue"], "answer_idx": 2, "mc_question": "which colour?",
    "label": "beep",
}


def cfg(**kw) -> DataConfig:
    base = dict(num_snippets=4, frames_per_snippet=2, height=32, width=32, n_mels=16, mel_frames=8,
                max_prompt_len=16, max_target_len=16, max_options=4)
    return DataConfig(**{**base, **kw})


def sample(video: object, meta: object = None, **members) -> dict:
    meta = META if meta is None else meta
    return {"__key__": "clip", "mp4": video, "json": json.dumps(meta).encode(), **members}


def rows_of(s: dict, c: DataConfig, train: bool = False, label_set=("beep", "bark")) -> list[dict]:
    rows = decode_sample(s, c, train=train, rng=np.random.default_rng(0), label_set=list(label_set))
    for row in rows:
        check_row(row, c)
    return rows


def texts_of(rows: list[dict]) -> list[dict]:
    """The text entries present in clip rows, each as a dict of its K-axis columns."""
    return [{k: row[k][i] for k in TEXT_COLUMNS} for row in rows for i in np.flatnonzero(row["text_mask"])]


@pytest.mark.parametrize("train", [False, True])
def test_bright_and_loud_snippets_share_an_index(step_clip, train):
    (row,) = rows_of(sample(step_clip), cfg(task="caption"), train=train)
    brightness = row["video"].mean(axis=(1, 2, 3, 4))  # [S]
    loudness = row["audio"].max(axis=(1, 2))  # [S]
    first_bright = int(np.argmax(brightness > 128))
    first_loud = int(np.argmax(loudness > loudness.min() + 5))
    assert first_bright == first_loud == int(STEP_AT)  # 4 s in S=4 windows: the step opens snippet 2
    assert brightness[first_bright] - brightness[first_bright - 1] > 200
    assert loudness[first_loud] - loudness[first_loud - 1] > 5


@pytest.mark.parametrize(("task", "tasks"), [
    ("caption", ["caption"]), ("qa", ["qa", "qa"]), ("mcqa", ["mcqa"]), ("cls", ["cls"]),
    ("finetune", ["qa", "qa", "mcqa", "cls"]), ("all", ["caption", "qa", "qa", "mcqa", "cls"]),
])
def test_one_row_per_clip_with_its_texts(make_clip, task, tasks):
    (row,) = rows_of(sample(make_clip(1.0)), cfg(task=task))
    assert [TASKS[int(t["task"])] for t in texts_of([row])] == tasks
    assert row["key"] == "clip" and int(row["num_texts"]) == len(tasks) and int(row["label"]) == 0
    assert row["text_mask"].sum() == len(tasks) and not row["text_mask"][len(tasks):].any()  # padded, masked
    assert row["text_index"].tolist() == list(range(len(tasks))) + [-1] * (row["text_mask"].size - len(tasks))
    assert not row["prompt_mask"][len(tasks):].any() and not row["target_mask"][len(tasks):].any()


def test_more_texts_than_max_texts_give_rows_of_k_sharing_the_clip(make_clip):
    rows = rows_of(sample(make_clip(1.0)), cfg(task="all", max_texts=2))
    assert len(rows) == 3 and [int(r["text_mask"].sum()) for r in rows] == [2, 2, 1]
    assert [r["text_index"].tolist() for r in rows] == [[0, 1], [2, 3], [4, -1]]
    assert all(r["video"] is rows[0]["video"] and int(r["num_texts"]) == 5 for r in rows)  # decoded once
    assert [TASKS[int(t["task"])] for t in texts_of(rows)] == ["caption", "qa", "qa", "mcqa", "cls"]


def test_text_columns(make_clip):
    tok = get_tokenizer("byte")
    qa, _, mc, cls = texts_of(rows_of(sample(make_clip(1.0)), cfg(task="finetune", max_prompt_len=24)))
    assert tok.decode(qa["prompt_ids"][qa["prompt_mask"]]) == "what sound?"
    assert tok.decode(qa["target_ids"]) == "a beep" and int(qa["qtype"]) == qtype_index("audio")
    assert tok.decode(mc["prompt_ids"][mc["prompt_mask"]]) == "which colour?"
    assert tok.decode(mc["target_ids"]) == "blue" and int(mc["answer_idx"]) == 2
    assert [tok.decode(o) for o in mc["option_ids"][:3]] == ["red", "green", "blue"]
    assert not mc["option_mask"][3].any() and not qa["option_mask"].any()
    assert tok.decode(cls["target_ids"]) == "beep" and int(cls["qtype"]) == qtype_index("label")
    assert tok.decode(cls["prompt_ids"][cls["prompt_mask"]]) == "classify the clip."


def test_caption_and_label_rows_carry_their_task_prompt(make_clip):
    """Tasks trained together must look different to the decoder: with no prompt, a caption row and a class-label
    row of the same clip would be the same input with two targets."""
    tok = get_tokenizer("byte")
    caption, *_, cls = texts_of(rows_of(sample(make_clip(1.0)), cfg(task="all", max_prompt_len=24)))
    prompts = {tok.decode(r["prompt_ids"][r["prompt_mask"]]) for r in (caption, cls)}
    assert prompts == {"caption the clip.", "classify the clip."}
    (row,) = texts_of(rows_of(sample(make_clip(1.0)), cfg(task="caption", caption_prompt="describe:")))
    assert tok.decode(row["prompt_ids"][row["prompt_mask"]]) == "describe:"
    (unknown,) = rows_of(sample(make_clip(1.0), {"label": "meow"}), cfg(task="cls"))
    assert int(unknown["label"]) == -1


def test_texts_longer_than_max_len_are_kept_cut_and_counted_per_kind(make_clip):
    """A 75-byte caption in 40 target tokens: the row keeps its first 38 bytes (BOS, EOS), and the counts (which
    the pipeline sends to its counter, and the console turns into one warning line) say so."""
    tok = get_tokenizer("byte")
    caption = "a yellow triangle, then a red square, then a green circle; high, mid, silence"[:75]
    meta = dict(META, caption=caption, qas=[{"question": "which came first: the red or the green one?",
                                             "answer": "red", "type": "temporal"}])
    c = cfg(task="all", max_target_len=40, max_prompt_len=32)
    (row,) = rows_of(sample(make_clip(1.0), meta), c)
    cap, qa, mc, cls = texts_of([row])
    assert tok.decode(cap["target_ids"]) == caption[:38] and cap["target_mask"].all()  # cut, kept
    assert tok.decode(qa["prompt_ids"][qa["prompt_mask"]]) == "which came first: the red or the green one?"[-32:]
    counts = count_lengths(row["text_lengths"], c)
    assert counts["caption_target"] == {"texts": 1, "cut": 1, "longest": 77, "limit": 40}
    assert counts["qa_prompt"] == {"texts": 1, "cut": 1, "longest": 43, "limit": 32}
    assert counts["qa_target"] == {"texts": 1, "cut": 0, "longest": 5, "limit": 40}
    assert counts["mcqa_option"] == {"texts": 3, "cut": 0, "longest": 7, "limit": 40}
    assert counts["caption_prompt"]["cut"] == counts["cls_target"]["cut"] == 0
    line = truncation_warning(counts, c.tokenizer)
    assert line.startswith("warning: 1 of 1 caption targets longer than data.max_target_len=40 tokens with BOS/EOS "
                           "(longest 77); 1 of 1 questions longer than data.max_prompt_len=32 tokens (longest 43) "
                           "were cut; raise data.max_target_len and data.max_prompt_len")
    assert "shards build --tokenizer learn" in line and "\n" not in line
    fits = count_lengths(row["text_lengths"], cfg(task="all", max_target_len=77, max_prompt_len=43))
    assert sum(k["cut"] for k in fits.values()) == 0 and truncation_warning(fits) == ""


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_audio_track_or_none(make_clip, container):
    c = cfg(task="caption")
    (with_audio,) = rows_of({"__key__": "k", container: make_clip(1.0, container=container),
                             "json": {"caption": "x"}}, c)
    assert with_audio["audio_present"] and with_audio["audio"].max() > 0
    (silent,) = rows_of(sample(make_clip(1.0, audio=False)), c)
    assert not silent["audio_present"] and not silent["audio"].any()


def test_wav_member_replaces_the_container_audio(make_clip):
    (row,) = rows_of(sample(make_clip(1.0, audio=False), wav=wav_bytes(tone(1.0))), cfg(task="caption"))
    assert row["audio_present"] and row["audio"].max() > 0


def test_missing_members_from_ray_are_none_or_nan(make_clip):
    s = sample(make_clip(1.0), webm=float("nan"), wav=None, flac=float("nan"))
    assert len(rows_of(s, cfg(task="caption"))) == 1


def test_short_and_odd_clips_give_valid_rows(make_clip):
    (short,) = rows_of(sample(make_clip(0.5, fps=10)), cfg(task="caption"))
    assert short["snippet_mask"].all() and short["audio_present"]
    (odd,) = rows_of(sample(make_clip(1.0, fps=30000 / 1001, size=(61, 97))), cfg(task="caption"))
    assert odd["snippet_mask"].all()


def test_clip_seconds_longer_than_the_clip_pads_snippets(make_clip):
    (row,) = rows_of(sample(make_clip(1.5)), cfg(task="caption", clip_seconds=4.0))
    np.testing.assert_array_equal(row["snippet_mask"], [True, True, False, False])
    assert row["video"][:2].any() and not row["video"][2:].any() and not row["audio"][2:].any()


def test_start_end_select_part_of_the_video(step_clip):
    (row,) = rows_of(sample(step_clip, {"caption": "x", "start": STEP_AT, "end": 4.0}), cfg(task="caption"))
    assert row["video"].min() > 200  # only the white half


@pytest.mark.parametrize(("make", "reason"), [
    (lambda clip: sample(clip[: len(clip) // 2]), "corrupt"),
    (lambda clip: sample(np.random.default_rng(0).bytes(4096)), "corrupt"),
    (lambda clip: sample(b""), "empty"),
    (lambda clip: sample(float("nan")), "no_video_member"),
    (lambda clip: {"__key__": "k", "mp4": clip}, "no_json"),
    (lambda clip: {"__key__": "k", "mp4": clip, "json": b"{not json"}, "bad_json"),
    (lambda clip: sample(clip, {"question": "q?"}), "no_text_for_task"),
    (lambda clip: sample(b"never decoded", {"question": "q?"}), "no_text_for_task"),  # text is checked first
])
def test_skip_reasons(make_clip, make, reason):
    rows, got, _ = decode_sample_safe(make(make_clip(1.0)), cfg(task="caption"), train=True,
                                      rng=np.random.default_rng(0))
    assert (rows, got) == ([], reason) and got in SKIP_REASONS


def test_timeout_is_a_skip_reason(make_clip):
    s = sample(make_clip(2.0))
    assert decode_sample_safe(s, cfg(decode_timeout_s=1e-4), train=False, rng=np.random.default_rng(0))[:2] \
        == ([], "timeout")


def test_question_type_codes_keep_known_indices_and_name_users_own():
    from mirasol_ray.data.schema import QTYPES, manifest_qtypes, qtype_index, qtype_name, qtype_table

    assert [qtype_index(n) for n in QTYPES] == list(range(len(QTYPES)))  # old shards keep their codes
    assert qtype_index(None) == qtype_index("") == QTYPES.index("other")
    code = qtype_index("counting")
    assert code >= len(QTYPES) and code == qtype_index("counting") and code != qtype_index("counted")
    assert np.int64(code) == code  # fits the int64 column
    assert qtype_name(code) == "other"  # a name the table does not know
    manifest = {"qtypes": ["what"], "splits": {"train": {"qtype_counts": {"counting": 2, "video": 1}},
                                               "val": {"qtype_counts": {"colour_of_thing": 1}}}}
    assert manifest_qtypes(manifest) == ["colour_of_thing", "counting", "video", "what"]
    table = qtype_table(manifest_qtypes(manifest))
    assert qtype_name(code, table) == "counting" and qtype_name(qtype_index("colour_of_thing"), table) == \
        "colour_of_thing"
    assert qtype_name(QTYPES.index("what"), table) == "what" and qtype_name(qtype_index("nope"), table) == "other"
