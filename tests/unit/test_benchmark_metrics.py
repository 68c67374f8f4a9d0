"""Each benchmark's evaluation protocol on known predictions: normalisation, per-type accuracy, NExT-QA's groups,
WUPS on known word pairs (WordNet 3.0 from Debian's wordnet-base), top-k and mean class accuracy, the table."""

from __future__ import annotations

import csv
import json

import pytest

from mirasol_ray.launch.evaluate import format_table, write_results
from mirasol_ray.train.metrics import (
    NEXTQA_STOPWORDS,
    WordNetMissing,
    benchmark_results,
    nextqa_clean,
    nextqa_oe_scores,
    normalize_vqa,
    table_rows,
    wordnet,
    wup,
    wups,
)


def _qa(qtype, pred, target, refs=None, task="qa", correct=None, rank=-1):
    return {"key": "k", "task": task, "qtype": qtype, "pred": pred, "target": target, "refs": refs or [],
            "correct": pred == target if correct is None else correct, "rank": rank}


@pytest.mark.parametrize("text,want", [
    ("The Dog.", "dog"),                # case, article, final period
    ("  a  man\tand\nwoman ", "man and woman"),
    ("two", "2"), ("None", "0"),        # number words to digits
    ("yes!", "yes"), ("man,woman", "man woman"), ("man, woman", "man woman"),  # marks touching a space vanish
    ("3.5", "3.5"), ("1,000 people", "1000 people"),  # decimal point kept; digit comma digit: commas deleted
    ("red-blue", "red blue"), ("(kitchen)", "kitchen"), ("an apple", "apple"),
])
def test_vqa_normalisation_on_tricky_answers(text, want):
    assert normalize_vqa(text) == want


def test_open_ended_accuracy_per_msrvtt_type_with_either_normalisation():
    recs = [_qa("what", "The Dog.", "dog"), _qa("what", "cat", "dog"), _qa("who", "man", "man"),
            _qa("how", "two", "2"), _qa("when", "night", "night"), _qa("where", "room", "kitchen")]
    res = benchmark_results(recs, "msrvtt-qa")
    assert (res["dataset"], res["task"], res["normalization"]) == ("MSRVTT-QA", "Video QA", "vqa")
    head = res["metrics"][0]
    assert (head["name"], head["value"], head["count"], head["paper"]) == ("accuracy", pytest.approx(400 / 6), 6, 50.42)
    per = {t["type"]: (t["value"], t["count"]) for t in res["per_type"]}
    assert per == {"how": (100.0, 1), "what": (50.0, 2), "when": (100.0, 1), "where": (0.0, 1), "who": (100.0, 1)}
    exact = benchmark_results(recs, "msrvtt-qa", normalize="exact")
    assert exact["metrics"][0]["value"] == pytest.approx(200 / 6)  # "The Dog." and "two" no longer match
    with pytest.raises(ValueError, match="normalize"):
        benchmark_results(recs, "msrvtt-qa", normalize="nope")


def test_activitynet_qa_reports_free_types_together():
    recs = [_qa("motion", "jump", "jump"), _qa("spatial_relation", "left", "right"), _qa("yes_no", "yes", "yes"),
            _qa("color", "red", "blue"), _qa("number", "3", "3"), _qa("other", "a ball", "ball")]
    res = benchmark_results(recs, "activitynet-qa")
    m = {x["name"]: (x["value"], x["count"], x["paper"]) for x in res["metrics"]}
    assert m["accuracy"] == (pytest.approx(400 / 6), 6, 51.13)
    assert m["accuracy (free)"] == (75.0, 4, None)


def test_nextqa_mc_accuracy_and_groups_with_tp_merged_into_tn():
    recs = [_qa("CW", "a", "a", task="mcqa", correct=True), _qa("CH", "a", "b", task="mcqa", correct=False),
            _qa("TN", "a", "a", task="mcqa", correct=True), _qa("TP", "a", "b", task="mcqa", correct=False),
            _qa("TC", "a", "a", task="mcqa", correct=True), _qa("DC", "a", "a", task="mcqa", correct=True),
            _qa("DL", "a", "b", task="mcqa", correct=False), _qa("DO", "a", "a", task="mcqa", correct=True)]
    res = benchmark_results(recs, "nextqa-mc")
    m = {x["name"]: x["value"] for x in res["metrics"]}
    assert res["metrics"][0]["paper"] == 72.0
    assert m == {"accuracy": 62.5, "Acc@C": 50.0, "Acc@T": pytest.approx(200 / 3), "Acc@D": pytest.approx(200 / 3)}
    per = {t["type"]: (t["value"], t["count"]) for t in res["per_type"]}
    assert per["TN"] == (50.0, 2) and "TP" not in per


@pytest.fixture(scope="module")
def wn():
    """WordNet 3.0 as Debian's wordnet-base installs it. Missing, this fails (CI installs it: .ci/run)."""
    try:
        return wordnet()
    except WordNetMissing as e:
        pytest.fail(str(e))


def test_wup_on_known_word_pairs(wn):
    assert wup("dog", "cat", 0.0, wn) == pytest.approx(6 / 7)  # dog.n.01 / cat.n.01 meet at carnivore.n.01
    assert wup("dog", "cat", 0.9, wn) == pytest.approx(0.6 / 7)  # below the threshold: scaled by 0.1
    assert wup("red", "blue", 0.0, wn) == pytest.approx(0.875) and wup("red", "blue", 0.9, wn) == pytest.approx(0.0875)
    assert wup("car", "automobile", 0.9, wn) == 1.0  # one synset: at or above the threshold, kept
    assert wup("man", "woman", 0.0, wn) == pytest.approx(2 / 3)
    assert wup("dog", "dog", 0.9, wn) == 1.0
    assert wup("dog", "xqzt", 0.0, wn) == 0.0  # not in WordNet


def test_wups_of_answers_and_nextqa_cleaning(wn):
    assert nextqa_clean("He pulled the boxes.", wn) == ["pull", "box", "."]  # lemmas, stopwords out
    assert {"the", "a", "is", "his"} <= NEXTQA_STOPWORDS
    assert wups("dog", "cat", 0.0, wn) == pytest.approx(6 / 7)
    assert wups("dog run", "cat run", 0.0, wn) == pytest.approx(6 / 7)  # product of best matches, both ways
    assert wups("dog", "dog run", 0.0, wn) == pytest.approx(1.0 * 1.0 * wup("run", "dog", 0.0, wn))
    assert wups("xqzt", "dog", 0.0, wn) == 0.0
    oe = nextqa_oe_scores(_qa("CW", "the dogs", "cat"), wn)
    assert oe == pytest.approx((6 / 7, 0.6 / 7))
    assert nextqa_oe_scores(_qa("DC", "three", "3"), wn) == (0.0, 0.0)  # counting: exact match only
    assert nextqa_oe_scores(_qa("DC", "two", "3", refs=["3", "two"]), wn) == (1.0, 1.0)  # best reference


def test_nextqa_oe_reports_wups_at_0_and_0_9(wn):
    recs = [_qa("CW", "dog", "cat"), _qa("TP", "dog", "dog"), _qa("DL", "kitchen", "kitchen")]
    res = benchmark_results(recs, "nextqa-oe")
    m = {x["name"]: x["value"] for x in res["metrics"]}
    assert m["WUPS@0"] == pytest.approx(100 * (6 / 7 + 2) / 3)
    assert m["WUPS@0.9"] == pytest.approx(100 * (0.6 / 7 + 2) / 3)
    assert m["WUPS_C"] == pytest.approx(600 / 7) and m["WUPS_T"] == 100.0 and m["WUPS_D"] == 100.0
    assert {t["type"] for t in res["per_type"]} == {"CW", "TN", "DL"}


def test_missing_wordnet_names_the_debian_package(tmp_path):
    with pytest.raises(WordNetMissing, match="wordnet-base"):
        wordnet(str(tmp_path))


def test_classification_top1_top5_and_epic_mean_class_accuracy():
    recs = ([_qa("label", "a", "a", task="cls", correct=True, rank=0)] * 3
            + [_qa("label", "b", "a", task="cls", correct=False, rank=3)]
            + [_qa("label", "b", "c", task="cls", correct=False, rank=7)])
    res = benchmark_results(recs, "epic-sounds")
    m = {x["name"]: x["value"] for x in res["metrics"]}
    assert res["metrics"][0]["paper"] == 78.2
    assert m == {"top-1": 60.0, "top-5": 80.0, "mean class accuracy": pytest.approx((75.0 + 0.0) / 2)}
    vgg = benchmark_results(recs, "vggsound")
    assert [x["name"] for x in vgg["metrics"]] == ["top-1", "top-5"] and vgg["metrics"][0]["paper"] == 69.8
    generated = [dict(r, rank=-1) for r in recs]  # generation ranks nothing: no top-5
    assert [x["name"] for x in benchmark_results(generated, "kinetics-sounds")["metrics"]] == ["top-1"]


def test_results_files_and_the_paper_table(tmp_path):
    res_b = benchmark_results([_qa("what", "dog", "dog"), _qa("who", "man", "woman")], "msrvtt-qa")
    res = {"benchmark": res_b, "table": table_rows(res_b, "ft (step 10)")}
    text = format_table(res)
    lines = text.splitlines()
    assert lines[0].split() == ["Task", "Dataset", "Model", "Metric", "name", "Metric", "value", "(%)", "Paper", "(%)",
                                "n"]
    assert "Video QA" in lines[2] and "MSRVTT-QA" in lines[2] and "50.00" in lines[2] and "50.42" in lines[2]
    assert "per type:" in text and "accuracy [what]" in text
    write_results(res, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["benchmark"]["dataset"] == "MSRVTT-QA"
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows[0] == {"task": "Video QA", "dataset": "MSRVTT-QA", "model": "ft (step 10)", "metric": "accuracy",
                       "value": "50.0", "count": "2", "paper": "50.42"}
    assert [r["metric"] for r in rows[1:]] == ["accuracy [what]", "accuracy [who]"]


# ----------------------------------------------------------------------------------------------------------------
# predictions: label-set scoring ranks, a question's accepted answers


def _rows_batch(meta: dict, cfg, label_set):
    import numpy as np

    from mirasol_ray.data.pipeline import stack_rows, to_torch
    from mirasol_ray.data.rows import stack_texts, text_rows
    from mirasol_ray.data.schema import row_spec

    texts = text_rows(meta, cfg.data, label_set)
    av = {k: np.zeros(shape, dt) for k, (shape, dt) in row_spec(cfg.data).items()
          if k in ("video", "audio", "audio_present", "snippet_mask")}
    av["snippet_mask"][:] = True
    row = {**av, **stack_texts(texts, cfg.data), "label": texts[0]["label"], "num_texts": np.int64(len(texts)),
           "key": "c"}
    return to_torch(stack_rows([row], cfg.data))


@pytest.mark.parametrize("mode", ["score", "head"])
def test_classification_predictions_rank_the_whole_label_set(mode):
    import torch

    from mirasol_ray.config import load_config
    from mirasol_ray.data.text import get_tokenizer
    from mirasol_ray.model.mirasol import build_model
    from mirasol_ray.train.step import predict_batch

    labels = ["dog barking", "cat meowing", "rain", "male speech, man speaking", "engine", "bird", "bell"]
    cfg = load_config("tiny", [f"model.cls_mode={mode}", f"model.num_classes={len(labels)}", "data.task=cls"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batch = _rows_batch({"label": "rain"}, cfg, labels)
    tok = get_tokenizer(cfg.data.tokenizer)
    (rec,) = predict_batch(model, batch, tok, torch.device("cpu"), "fp32", label_set=labels)
    if mode == "score":
        from mirasol_ray.train.step import _label_targets

        ids, mask = _label_targets(tok, labels, cfg.data.max_target_len, torch.device("cpu"))
        scores = model.score_candidates(batch, ids, mask)[0]
    else:
        scores = model.classify(batch)[0]
    order = scores.argsort(descending=True).tolist()
    assert rec["pred"] == labels[order[0]] and rec["target"] == "rain"
    assert rec["rank"] == order.index(2) and rec["correct"] == (order[0] == 2)


def test_open_ended_predictions_carry_every_accepted_answer():
    import torch

    from mirasol_ray.config import load_config
    from mirasol_ray.data.text import get_tokenizer
    from mirasol_ray.model.mirasol import build_model
    from mirasol_ray.train.step import predict_batch

    cfg = load_config("tiny", ["data.task=qa"])
    model = build_model(cfg.model).eval()
    meta = {"qas": [{"question": "how many?", "answer": "two", "answers": ["two", "2"], "type": "DC"},
                    {"question": "why?", "answer": "to eat", "type": "CW"},
                    {"question": "which?", "options": ["a", "b"], "answer_idx": 0, "type": "CH"}]}
    batch = _rows_batch(meta, cfg, None)
    recs = predict_batch(model, batch, get_tokenizer(cfg.data.tokenizer), torch.device("cpu"), "fp32")
    assert [(r["qtype"], r["target"], r["refs"], r["rank"]) for r in recs] == [
        ("DC", "two", ["two", "2"], -1), ("CW", "to eat", [], -1)]  # the MC question gives no open-ended row


def test_benchmark_presets_load_with_their_tasks():
    from mirasol_ray.config import load_config
    from mirasol_ray.data.formats import FORMATS
    from mirasol_ray.train.metrics import BENCHMARKS

    # jsonl is a user's own data; ActivityNet Captions is training data (timestamped captions), not a paper figure
    assert set(BENCHMARKS) == set(FORMATS) - {"jsonl", "activitynet-captions"}
    tasks = {"msrvtt_qa": "qa", "activitynet_qa": "qa", "nextqa_mc": "mcqa", "nextqa_oe": "qa",
             "kinetics_sounds": "cls", "vggsound": "cls", "epic_sounds": "cls"}
    for name, task in tasks.items():
        cfg = load_config(f"finetune_{name}")
        assert (cfg.data.task, cfg.train.stage) == (task, "finetune")
        assert cfg.model.cls_mode == ("score" if task == "cls" else "generate")
        assert cfg.data.num_snippets * cfg.data.frames_per_snippet == (32 if task == "cls" else 128)
