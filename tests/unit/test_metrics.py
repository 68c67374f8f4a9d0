"""Task metrics on known predictions."""

import pytest

from mirasol_ray.train.metrics import aggregate, exact_match, normalize_answer, token_f1


def test_normalisation_and_exact_match():
    assert normalize_answer("The  Red!") == "red"
    assert exact_match("a blue square.", "Blue square")
    assert not exact_match("blue", "blue square")


def test_token_f1():
    assert token_f1("red circle", "red circle") == 1.0
    assert token_f1("red square", "red circle") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0


def test_aggregate_exact_on_known_predictions():
    recs = [
        {"task": "qa", "qtype": "video", "pred": "red", "target": "red", "correct": True},
        {"task": "qa", "qtype": "video", "pred": "blue", "target": "red", "correct": False},
        {"task": "qa", "qtype": "audio", "pred": "low", "target": "low", "correct": True},
        {"task": "mcqa", "qtype": "mc", "pred": "red", "target": "red", "correct": True},
        {"task": "mcqa", "qtype": "mc", "pred": "red", "target": "blue", "correct": False},
        {"task": "mcqa", "qtype": "mc", "pred": "red", "target": "blue", "correct": False},
        {"task": "mcqa", "qtype": "mc", "pred": "red", "target": "blue", "correct": False},
        {"task": "cls", "qtype": "label", "pred": "red", "target": "red", "correct": True},
        {"task": "caption", "qtype": "caption", "pred": "a red circle", "target": "a red square", "correct": False},
    ]
    m = aggregate(recs)
    assert m["qa/video"] == {"metric": "accuracy", "value": 0.5, "count": 2}
    assert m["qa/audio"]["value"] == 1.0
    assert m["qa"] == {"metric": "accuracy", "value": pytest.approx(2 / 3), "count": 3}
    assert m["mcqa"]["value"] == 0.25 and m["mcqa"]["count"] == 4
    assert m["cls"]["value"] == 1.0
    assert m["caption"] == {"metric": "token_f1", "value": pytest.approx(0.5), "count": 1}
