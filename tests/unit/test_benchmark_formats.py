"""The six benchmarks' converters: annotation files written in their real formats (quirks included), real videos
named as each dataset names them, shards checked (counts, question grouping, fields, cuts to the frame, missing
videos by name)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import frame_index, index_frames, tone

from mirasol_ray.config import load_config
from mirasol_ray.data.decode import Video, decode_audio
from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.rows import text_rows
from mirasol_ray.data.schema import QTYPES
from mirasol_ray.data.shards import build_shards, read_manifest

FPS, SR = 10, 16000


def _clip(seconds: float, container: str = "mp4", onset: float | None = None) -> bytes:
    """32x32 at 10 fps, frame i coloured by its index (conftest.frame_index reads it back); silence, then a tone
    from ``onset`` seconds (or a tone throughout)."""
    n = int(round(seconds * FPS))
    audio = tone(seconds)
    if onset is not None:
        audio[: round(onset * SR)] = 0
    return encode_av(index_frames(n), FPS, audio, SR, container=container, gop=10)


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    """{split folder/key: {ext: bytes}} of every shard under ``out``."""
    found: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.rglob("*.tar")):
        folder = tar.parent.relative_to(out).as_posix()
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                found.setdefault(f"{folder}/{key}" if folder != "." else key, {})[ext] = t.extractfile(m).read()
    return found


def _meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def _frames_and_audio(data: bytes) -> tuple[np.ndarray, float, np.ndarray]:
    """(frame indices of every stored frame, duration, audio) of a stored clip."""
    with Video(data, 32, 32) as v:
        idx = frame_index(v.read(v.frame_starts))
        duration, start = v.duration, v.start_time
    pcm = decode_audio(data, SR, start=start, end=start + duration)
    return idx, duration, pcm


def _onset(pcm: np.ndarray) -> float:
    return float(np.argmax(np.abs(pcm) > 0.1)) / SR


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    """The few distinct videos the tests copy into each dataset's layout."""
    return {"short": _clip(1.0), "long": _clip(6.0, onset=2.5), "mkv": _clip(1.0, "mkv")}


# ----------------------------------------------------------------------------------------------------------------
# MSRVTT-QA


def test_msrvtt_qa_splits_groups_types_vocab_and_missing(tmp_path, clips, caplog):
    ann, videos = tmp_path / "MSRVTT-QA", tmp_path / "MSRVTT" / "videos"
    train = [{"question": "what is shown?", "answer": "bar", "category_id": 0, "video_id": 7, "id": 0},
             {"question": "who moves?", "answer": "man", "category_id": 1, "video_id": 7, "id": 1},
             {"question": "where is it?", "answer": "room", "category_id": 4, "video_id": 7, "id": 2},
             {"question": "what is it?", "answer": "bar", "category_id": 0, "video_id": 8, "id": 3},
             {"question": "how?", "answer": "fast", "category_id": 2, "video_id": 9, "id": 4},
             {"answer": "no question", "category_id": 0, "video_id": 9, "id": 5}]
    test = [{"question": "when does it end?", "answer": "night", "category_id": 3, "video_id": 10, "id": 6},
            {"question": "what colour?", "answer": "bar", "category_id": 0, "video_id": 10, "id": 7}]
    _write(ann / "train_qa.json", json.dumps(train))
    _write(ann / "test_qa.json", json.dumps(test))
    _write(videos / "TrainValVideo" / "video7.mp4", clips["short"])
    _write(videos / "TrainValVideo" / "video9.mp4", clips["short"])
    _write(videos / "TestVideo" / "video10.mp4", clips["short"])  # video8 is missing
    out = tmp_path / "out"
    m = build_shards("msrvtt-qa", str(ann), str(videos), str(out), progress=False, answer_vocab=1)

    assert (m["source"], m["num_samples"]) == ("msrvtt-qa", 2)
    # train: video7 keeps only its "bar" question (vocabulary of 1), video9 has none left; video8 is missing
    assert m["splits"]["train"]["num_samples"] == 1 and m["splits"]["test"]["num_samples"] == 1
    assert m["skipped"] == {"malformed": 1, "missing_video": 1, "no_question_in_vocab": 1}
    assert "video8.mp4: missing_video" in m["skipped_items"] and "train_qa.json item 5: malformed" in m["skipped_items"]
    assert "video8.mp4" in caplog.text
    assert m["answer_vocab"] == [["bar", 2]] and m["questions_outside_vocab"] == 3
    test_manifest = read_manifest(str(out / "test"))
    assert test_manifest["split"] == "test" and test_manifest["splits"]["test"]["answer_vocab_coverage"] == 0.5
    assert test_manifest["splits"]["test"]["qtype_counts"] == {"what": 1, "when": 1}

    s = _samples(out)
    assert set(s) == {"train/video7", "test/video10"}
    assert s["train/video7"]["mp4"] == clips["short"]  # stored as is: nothing to cut
    meta = _meta(s["test/video10"])
    assert [(q["question"], q["answer"], q["type"], q["category_id"]) for q in meta["qas"]] == [
        ("when does it end?", "night", "when", 3), ("what colour?", "bar", "what", 0)]
    assert meta["task"] == "qa" and meta["video_id"] == 10


def test_msrvtt_qa_single_file_without_vocab_keeps_every_question(tmp_path, clips):
    _write(tmp_path / "videos" / "video7.mp4", clips["short"])
    words = ("what", "who", "how", "when", "where")
    qa = [{"question": f"{words[i % 5]} q{i}?", "answer": f"a{i}", "category_id": i % 5, "video_id": 7, "id": i}
          for i in range(10)]
    _write(tmp_path / "val_qa.json", json.dumps(qa))
    m = build_shards("msrvtt-qa", str(tmp_path / "val_qa.json"), str(tmp_path / "videos"), str(tmp_path / "out"),
                     progress=False)
    assert m["num_samples"] == 1 and m["split"] == "val" and m["splits"]["all"]["num_questions"] == 10
    meta = _meta(_samples(tmp_path / "out")["video7"])
    assert len(meta["qas"]) == 10 and [q["type"] for q in meta["qas"][:5]] == ["what", "who", "how", "when", "where"]
    with pytest.raises(ValueError, match="not valid JSON"):
        _write(tmp_path / "bad" / "test_qa.json", '[{"question": "x",')
        build_shards("msrvtt-qa", str(tmp_path / "bad"), str(tmp_path / "videos"), str(tmp_path / "o2"),
                     progress=False)


def test_msrvtt_qa_category_id_is_the_video_category_not_the_question_type(tmp_path, clips):
    """The official files' ``category_id`` is the MSR-VTT video category (0-19): a question of category 14 is kept,
    typed by its first word (just-ask's ``get_type``), its ``category_id`` in its metadata; a question starting
    with another word is kept as ``other``."""
    _write(tmp_path / "videos" / "video3.mp4", clips["short"])
    qa = [{"question": "who is singing on the stage?", "answer": "woman", "category_id": 14, "video_id": 3, "id": 0},
          {"question": "How many people dance?", "answer": "two", "category_id": 19, "video_id": 3, "id": 1},
          {"question": "is it raining?", "answer": "no", "category_id": 14, "video_id": 3, "id": 2}]
    _write(tmp_path / "test_qa.json", json.dumps(qa))
    m = build_shards("msrvtt-qa", str(tmp_path / "test_qa.json"), str(tmp_path / "videos"), str(tmp_path / "out"),
                     progress=False)
    assert m["skipped"] == {} and m["splits"]["all"]["num_questions"] == 3
    assert m["splits"]["all"]["qtype_counts"] == {"how": 1, "other": 1, "who": 1}
    meta = _meta(_samples(tmp_path / "out")["video3"])
    assert [(q["type"], q["category_id"]) for q in meta["qas"]] == [("who", 14), ("how", 19), ("other", 14)]


# ----------------------------------------------------------------------------------------------------------------
# ActivityNet-QA


def test_activitynet_qa_aligns_questions_and_answers_by_id(tmp_path, clips):
    ann, videos = tmp_path / "dataset", tmp_path / "ActivityNet" / "v1-3"
    q = [{"video_name": "abc_1", "question": "is it day", "question_id": "v_abc_1_0"},
         {"video_name": "abc_1", "question": "what color is the car", "question_id": "v_abc_1_1"},
         {"video_name": "-xY", "question": "what does he do first", "question_id": "v_-xY_0"},
         {"video_name": "-xY", "question": "unanswered", "question_id": "v_-xY_9"},
         {"video_name": "gone", "question": "where", "question_id": "v_gone_0"}]
    a = [{"answer": "yes", "type": 3, "question_id": "v_abc_1_0"},
         {"answer": "red", "type": 4, "question_id": "v_abc_1_1"},
         {"answer": "jump", "type": 0, "question_id": "v_-xY_0"},
         {"answer": "park", "type": 6, "question_id": "v_gone_0"}]
    _write(ann / "test_q.json", json.dumps(q))
    _write(ann / "test_a.json", json.dumps(a))
    _write(videos / "v_abc_1.mkv", clips["mkv"])  # ActivityNet copies mix containers
    _write(videos / "v_-xY.mp4", clips["short"])
    m = build_shards("activitynet-qa", str(ann / "test_q.json"), str(videos), str(tmp_path / "out"), progress=False)
    assert m["num_samples"] == 2 and m["split"] == "test"
    assert m["skipped"] == {"no_answer": 1, "missing_video": 1}
    assert "v_gone.mp4: missing_video" in m["skipped_items"]
    s = _samples(tmp_path / "out")
    assert set(s) == {"v_abc_1", "v_-xY"} and "mkv" in s["v_abc_1"]
    meta = _meta(s["v_abc_1"])
    assert [(x["answer"], x["type"], x["type_id"]) for x in meta["qas"]] == [("yes", "yes_no", 3), ("red", "color", 4)]
    assert _meta(s["v_-xY"])["qas"][0]["type"] == "motion"
    with pytest.raises(FileNotFoundError, match="val_a.json"):
        _write(ann / "val_q.json", json.dumps(q))
        build_shards("activitynet-qa", str(ann), str(videos), str(tmp_path / "o2"), split="val", progress=False)


def test_activitynet_qa_video_name_is_the_youtube_id_as_is_and_no_type_is_dropped(tmp_path, clips):
    """MILVLG/activitynet-qa's ``train_q.json`` has ``"video_name": "v_UmAH95xls"``: a YouTube id that begins
    with ``v_``, whose file is ``v_v_UmAH95xls.mp4``; the prefix is not stripped from it. A ``type`` outside 0-8 or
    missing is kept as its own type name, not dropped."""
    q = [{"video_name": "v_UmAH95xls", "question": "what is under the cup", "question_id": "v_v_UmAH95xls_4"},
         {"video_name": "v_UmAH95xls", "question": "is it day", "question_id": "v_v_UmAH95xls_5"},
         {"video_name": "UmAH95xlsAB", "question": "what next", "question_id": "v_UmAH95xlsAB_0"}]
    a = [{"answer": "ball", "type": 11, "question_id": "v_v_UmAH95xls_4"},
         {"answer": "yes", "question_id": "v_v_UmAH95xls_5"},
         {"answer": "jump", "type": 2, "question_id": "v_UmAH95xlsAB_0"}]
    _write(tmp_path / "train_q.json", json.dumps(q))
    _write(tmp_path / "train_a.json", json.dumps(a))
    _write(tmp_path / "v" / "v_v_UmAH95xls.mp4", clips["short"])
    _write(tmp_path / "v" / "UmAH95xls.mp4", clips["mkv"])  # would be taken if the v_ were stripped
    _write(tmp_path / "v" / "UmAH95xlsAB.mp4", clips["short"])  # a copy without the v_ prefix
    m = build_shards("activitynet-qa", str(tmp_path / "train_q.json"), str(tmp_path / "v"), str(tmp_path / "out"),
                     progress=False)
    assert m["skipped"] == {} and m["num_samples"] == 2 and m["splits"]["all"]["num_questions"] == 3
    s = _samples(tmp_path / "out")
    assert set(s) == {"v_v_UmAH95xls", "v_UmAH95xlsAB"}
    assert s["v_v_UmAH95xls"]["mp4"] == clips["short"]
    meta = _meta(s["v_v_UmAH95xls"])
    assert meta["video_id"] == "v_UmAH95xls"
    assert [(x["type"], x.get("type_id")) for x in meta["qas"]] == [("11", 11), ("unknown", None)]
    assert _meta(s["v_UmAH95xlsAB"])["qas"][0]["type"] == "temporal_relation"


# ----------------------------------------------------------------------------------------------------------------
# ActivityNet Captions


def test_activitynet_captions_become_timestamped_captions_read_from_their_snippets(tmp_path, clips):
    ann, videos = tmp_path / "captions", tmp_path / "ActivityNet" / "v1-3"
    train = {"v_abc": {"duration": 6.0, "timestamps": [[3.0, 6.0], [0.0, 3.2], [9.0, 9.0], [5.0, 4.0], [1, "x"]],
                       "sentences": ["A tone starts. ", "It is quiet.", "past the end", "reversed", "bad time"]},
             "v_gone": {"duration": 5.0, "timestamps": [[0, 1]], "sentences": ["x"]},
             "v_bad": {"duration": 5.0, "timestamps": [[0, 1]], "sentences": []}}
    _write(ann / "train.json", json.dumps(train))
    _write(videos / "abc.mp4", clips["long"])  # a copy without the v_ prefix
    m = build_shards("activitynet-captions", str(ann), str(videos), str(tmp_path / "out"), progress=False)
    assert m["num_samples"] == 1 and m["skipped"] == {"malformed": 1, "missing_video": 1}
    (sample,) = _samples(tmp_path / "out").values()
    meta = _meta(sample)
    # every event is kept as the file gives it (densevid_eval's evaluate.py uses them as they are): zero-length and
    # past the duration, end before start; only the one whose time is not a number is left out
    assert meta["segments"] == [{"start": 0.0, "end": 3.2, "caption": "It is quiet."},
                                {"start": 3.0, "end": 6.0, "caption": "A tone starts."},
                                {"start": 5.0, "end": 4.0, "caption": "reversed"},
                                {"start": 9.0, "end": 9.0, "caption": "past the end"}]
    assert meta["caption"] == "It is quiet. A tone starts. reversed past the end"
    cfg = load_config("tiny", ["data.task=caption"]).data
    # the decoder trains on the segments it can place (0 <= start < end): the two well-formed ones
    texts = text_rows(meta, cfg)
    assert [t["qtype"] for t in texts] == [QTYPES.index("caption"), QTYPES.index("segment"),
                                           QTYPES.index("segment")]
    from mirasol_ray.data.rows import decode_sample

    (row,) = decode_sample({"__key__": "v_abc", "mp4": sample["mp4"], "json": sample["json"]}, cfg, train=False,
                           rng=np.random.default_rng(0))
    # 6 s in 4 windows of 1.5 s: 0-3.2 s covers the first two (and 0.2 s of the third), 3-6 s the last two
    assert row["text_span"][:3].tolist() == [[True] * 4, [True, True, False, False], [False, False, True, True]]
    # the tone starts at 2.5 s: the snippets of the second event are the loud ones
    loud = row["audio"].max(axis=(1, 2))
    assert loud[2:].min() > loud[0] + 5


# ----------------------------------------------------------------------------------------------------------------
# NExT-QA


NEXT_HEADER = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type"]


def _csv(rows: list[list], header: list[str] | None = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def test_nextqa_mc_groups_questions_keeps_options_types_and_names_bad_lines(tmp_path, clips):
    ann, videos = tmp_path / "nextqa", tmp_path / "NExTVideo"
    rows = [[4010069381, 369, 640, 480, "how do they play", 2, 6, "CH", "roll it", "tap feet", "strum, then hum",
             "hit", "pat"],
            [4010069381, 369, 640, 480, "what happens next", 0, 7, "TP", "clap", "sit", "run", "jump", "walk"],
            [4010069381, 369, 640, 480, "broken answer", 7, 8, "CW", "a", "b", "c", "d", "e"],
            [2435100235, 100, 320, 240, "where is this", 1, 1, "DL", "mall", "river", "pool", "room", "hill"]]
    _write(ann / "val.csv", _csv(rows, NEXT_HEADER + ["a0", "a1", "a2", "a3", "a4"]))
    _write(ann / "map_vid_vidorID.json", json.dumps({"4010069381": "1025/4010069381", "2435100235": "0001/2435100235"}))
    _write(videos / "1025" / "4010069381.mp4", clips["short"])
    m = build_shards("nextqa-mc", str(ann), str(tmp_path), str(tmp_path / "out"), split="val", progress=False)
    assert m["num_samples"] == 1 and m["skipped"] == {"malformed": 1, "missing_video": 1}
    assert any(i.startswith("val.csv:4 ") for i in m["skipped_items"])  # line 4: the header is line 1
    assert "NExTVideo/0001/2435100235.mp4: missing_video" in m["skipped_items"]
    assert m["splits"]["all"]["qtype_counts"] == {"CH": 1, "TP": 1}
    meta = _meta(_samples(tmp_path / "out")["4010069381"])
    assert meta["task"] == "mcqa" and len(meta["qas"]) == 2
    first = meta["qas"][0]
    assert first["options"][2] == "strum, then hum" and first["answer_idx"] == 2 and first["answer"] == "strum, then hum"
    assert (first["type"], first["qid"]) == ("CH", "6")
    rows = text_rows(meta, load_config("tiny", ["data.task=mcqa"]).data)  # one multiple-choice row per question
    assert [(int(r["answer_idx"]), QTYPES[int(r["qtype"])]) for r in rows] == [(2, "CH"), (0, "TP")]


def test_nextqa_oe_reads_the_extra_reference_answers(tmp_path, clips):
    ann = tmp_path / "nextqa"
    rows = [[3233088823, 462, 640, 480, "how is the bulldozer controlled", "from the drivers cabin", 3, "CH"],
            [3233088823, 462, 640, 480, "how many people", "two", 4, "DC"]]
    _write(ann / "test.csv", _csv(rows, NEXT_HEADER))
    _write(ann / "map_vid_vidorID.json", json.dumps({"3233088823": "0003/3233088823"}))
    _write(ann / "add_reference_answer_test.json", json.dumps({"3233088823": {"4": "2", "3": "from the drivers cabin"}}))
    _write(tmp_path / "v" / "NExTVideo" / "0003" / "3233088823.mp4", clips["short"])
    m = build_shards("nextqa-oe", str(ann / "test.csv"), str(tmp_path / "v"), str(tmp_path / "out"), progress=False)
    assert m["num_samples"] == 1 and m["splits"]["all"]["answer_counts"] == {"from the drivers cabin": 1, "two": 1}
    qas = _meta(_samples(tmp_path / "out")["3233088823"])["qas"]
    assert "answers" not in qas[0]  # the extra reference equals the answer
    assert qas[1]["answers"] == ["two", "2"] and qas[1]["type"] == "DC"


def test_nextqa_keeps_a_question_of_a_type_the_official_files_do_not_use(tmp_path, clips):
    """The released files hold CW CH TN TP TC DC DL DO (and DB, open-ended): a question of another type is kept
    under its own type, not dropped; an empty answer is still malformed."""
    ann = tmp_path / "nextqa"
    rows = [[3233088823, 462, 640, 480, "how is it controlled", 1, 0, "XY", "a", "b", "c", "d", "e"],
            [3233088823, 462, 640, 480, "why", 0, 1, "", "a", "b", "c", "d", "e"],
            [3233088823, 462, 640, 480, "when", 0, 2, "TC", "a", "b", "c", "d", "e"]]
    _write(ann / "test.csv", _csv(rows, NEXT_HEADER + ["a0", "a1", "a2", "a3", "a4"]))
    _write(ann / "map_vid_vidorID.json", json.dumps({"3233088823": "0003/3233088823"}))
    _write(tmp_path / "v" / "0003" / "3233088823.mp4", clips["short"])
    m = build_shards("nextqa-mc", str(ann / "test.csv"), str(tmp_path / "v"), str(tmp_path / "out"), progress=False)
    assert m["skipped"] == {} and m["splits"]["all"]["num_questions"] == 3
    qas = _meta(_samples(tmp_path / "out")["3233088823"])["qas"]
    assert [(q["qid"], q["type"], q["answer"]) for q in qas] == [("0", "XY", "b"), ("1", "", "a"), ("2", "TC", "a")]
    oe = [[3233088823, 462, 640, 480, "what", "", 0, "DO"], [3233088823, 462, 640, 480, "what", "cup", 1, "QQ"]]
    _write(tmp_path / "oe" / "val.csv", _csv(oe, NEXT_HEADER))
    _write(tmp_path / "oe" / "map_vid_vidorID.json", json.dumps({"3233088823": "0003/3233088823"}))
    m = build_shards("nextqa-oe", str(tmp_path / "oe"), str(tmp_path / "v"), str(tmp_path / "out2"), progress=False)
    assert m["skipped"] == {"malformed": 1} and m["splits"]["all"]["num_questions"] == 1
    assert _meta(_samples(tmp_path / "out2")["3233088823"])["qas"][0]["type"] == "QQ"


# ----------------------------------------------------------------------------------------------------------------
# Kinetics-Sounds and VGGSound: trimmed clips whole, untrimmed videos cut once


def test_kinetics_sounds_trimmed_whole_untrimmed_cut_labels_and_splits(tmp_path, clips):
    ann, videos = tmp_path / "kinetics400", tmp_path / "k400"
    train = [["playing bagpipes", "trimA", 2, 4, "train", 0],
             ["playing bagpipes", "fullB", 1, 3, "train", 1],
             ["tapping pen, loudly", "trimC", 0, 1, "train", 0],
             ["dancing ballet", "other", 0, 10, "train", 0],  # not a Kinetics-Sounds class here
             ["playing bagpipes", "lost", 0, 10, "train", 0],
             ["playing bagpipes", "bad", "x", 10, "train", 0]]
    header = ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"]
    _write(ann / "train.csv", _csv(train, header))
    _write(ann / "validate.csv", _csv([["tapping pen, loudly", "trimD", 5, 6, "val", 0]], header))
    _write(videos / "train" / "playing bagpipes" / "trimA_000002_000004.mp4", clips["short"])
    _write(videos / "fullB.mp4", clips["long"])  # the untrimmed video: window [1, 3) must be cut
    _write(videos / "train" / "tapping pen, loudly" / "trimC_000000_000001.mp4", clips["short"])
    _write(videos / "val" / "trimD_000005_000006.mp4", clips["short"])
    _write(videos / "other_000000_000010.mp4", clips["short"])
    labels = tmp_path / "ks_classes.txt"
    labels.write_text("playing bagpipes\ntapping pen, loudly\n")
    out = tmp_path / "out"
    m = build_shards("kinetics-sounds", str(ann), str(videos), str(out), progress=False,
                     labels=labels.read_text().split("\n")[:2])
    assert m["label_set"] == ["playing bagpipes", "tapping pen, loudly"]
    assert m["splits"]["train"]["num_samples"] == 3 and m["splits"]["val"]["num_samples"] == 1
    assert m["skipped"] == {"malformed": 1, "missing_video": 1} and m["cut"] == 1
    assert "lost_000000_000010.mp4: missing_video" in m["skipped_items"]
    assert m["splits"]["train"]["label_counts"] == {"playing bagpipes": 2, "tapping pen, loudly": 1}
    s = _samples(out)
    assert s["train/trimA_000002_000004"]["mp4"] == clips["short"]  # trimmed: stored whole, not cut again
    assert "cut" not in _meta(s["train/trimA_000002_000004"])
    cut = s["train/fullB_000001_000003"]
    meta = _meta(cut)
    assert meta["cut"] == [1.0, 3.0] and meta["label"] == "playing bagpipes" and meta["task"] == "cls"
    idx, duration, pcm = _frames_and_audio(cut["mp4"])
    assert idx.tolist() == list(range(10, 30)) and duration == pytest.approx(2.0, abs=1e-6)  # exactly [1 s, 3 s)
    assert _onset(pcm) == pytest.approx(1.5, abs=0.03)  # the tone starts at 2.5 s of the source


def test_vggsound_headerless_csv_quoted_labels_and_split_filter(tmp_path, clips):
    rows = [["abc", 1, "male speech, man speaking", "test"],
            ["fullZ", 1, "dog barking", "test"],
            ["trainonly", 0, "dog barking", "train"],
            ["short", "1"]]
    _write(tmp_path / "vggsound.csv", _csv(rows))
    videos = tmp_path / "VGGSound" / "video"
    _write(videos / "abc_000001.mp4", clips["short"])
    _write(videos / "fullZ.mp4", _clip(12.0, onset=6.0))  # untrimmed: [1, 11) is cut
    m = build_shards("vggsound", str(tmp_path / "vggsound.csv"), str(videos), str(tmp_path / "out"), split="test",
                     progress=False)
    assert m["split"] == "test" and m["num_samples"] == 2
    assert m["label_set"] == ["dog barking", "male speech, man speaking"]  # every class of the file
    assert m["skipped"] == {"malformed": 1}
    assert any(i.startswith("vggsound.csv:4 (expected 4 fields, got 2)") for i in m["skipped_items"])
    s = _samples(tmp_path / "out")
    assert s["abc_000001_000011"]["mp4"] == clips["short"]
    assert _meta(s["abc_000001_000011"])["label"] == "male speech, man speaking"
    idx, duration, pcm = _frames_and_audio(s["fullZ_000001_000011"]["mp4"])
    assert idx.tolist() == list(range(10, 110)) and duration == pytest.approx(10.0, abs=1e-6)
    assert _onset(pcm) == pytest.approx(5.0, abs=0.03)


# ----------------------------------------------------------------------------------------------------------------
# EPIC-Sounds: every segment cut from its untrimmed video


EPIC_HEADER = ["annotation_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp", "start_sample",
               "stop_sample", "description", "class", "class_id"]


def test_epic_sounds_cuts_segments_by_sample_and_timestamp(tmp_path, clips):
    ann, videos = tmp_path / "epic-sounds-annotations", tmp_path / "EPIC-KITCHENS"
    train = [["P01_11_0", "P01", "P01_11", "00:00:02.000", "00:00:04.500", 48000, 108000, "rustle", "rustle", 5],
             ["P01_11_1", "P01", "P01_11", "00:00:01.020", "00:00:01.050", 24480, 25200, "click", "click", 2],
             ["P01_11_2", "P01", "P01_11", "00:00:03.000", "00:00:05.000", "", "", "water", "water", 7],
             ["P01_11_3", "P01", "P01_11", "00:00:03.000", "00:00:02.000", "", "", "bad", "water", 7],
             ["P02_01_0", "P02", "P02_01", "00:00:00.000", "00:00:01.000", 0, 24000, "click", "click", 2]]
    _write(ann / "EPIC_Sounds_train.csv", _csv(train, EPIC_HEADER))
    _write(ann / "EPIC_Sounds_validation.csv",
           _csv([["P01_11_9", "P01", "P01_11", "00:00:00.500", "00:00:01.000", 12000, 24000, "x", "rustle", 5]],
                EPIC_HEADER))
    _write(videos / "P01" / "videos" / "P01_11.MP4", clips["long"])  # upper-case extension
    out = tmp_path / "out"
    m = build_shards("epic-sounds", str(ann), str(videos), str(out), transcode=32, progress=False)
    assert m["label_set"] == ["click", "rustle", "water"]  # ordered by class_id
    assert m["splits"]["train"]["num_samples"] == 3 and m["splits"]["validation"]["num_samples"] == 1
    assert m["skipped"] == {"malformed": 1, "missing_video": 1} and m["cut"] == 4
    assert any(i.startswith("EPIC_Sounds_train.csv:5 (empty or negative segment") for i in m["skipped_items"])
    s = _samples(out)
    idx, duration, pcm = _frames_and_audio(s["train/P01_11_0"]["mp4"])  # samples 48000-108000: 2.0-4.5 s
    assert idx.tolist() == list(range(20, 45)) and duration == pytest.approx(2.5, abs=1e-6)
    assert _onset(pcm) == pytest.approx(0.5, abs=0.03)
    meta = _meta(s["train/P01_11_0"])
    assert meta["cut"] == [2.0, 4.5] and meta["class_id"] == 5 and meta["label"] == "rustle"
    short_idx, short_duration, _ = _frames_and_audio(s["train/P01_11_1"]["mp4"])  # 30 ms: inside frame 10
    assert short_idx.tolist() == [10] and short_duration == pytest.approx(0.1, abs=1e-6)
    ts_idx, _, _ = _frames_and_audio(s["train/P01_11_2"]["mp4"])  # no samples: the HH:MM:SS.mmm times
    assert ts_idx.tolist() == list(range(30, 50))
