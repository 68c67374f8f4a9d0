"""The pieces of ``mirasol bench learn``: scoring by answer kind, rows in memory in the pipeline's order, and the
probes' own order of clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import learn
from benchmarks.learn import MemorySource, answer_kind, row_order, score
from mirasol_ray.config import DataConfig, load_config
from mirasol_ray.data.index import ReadPosition, epoch_permutation
from mirasol_ray.data.pipeline import train_batches
from mirasol_ray.data.schema import row_spec
from mirasol_ray.model import mirasol


def _rec(qtype, target, correct, task="qa"):
    return {"key": "k", "task": task, "qtype": qtype, "pred": "", "target": target, "correct": correct}


def test_answer_kind():
    assert answer_kind("qa/video", "red") == "colour"
    assert answer_kind("qa/av_aligned", "cross") == "shape"
    assert answer_kind("qa/temporal", "high tone") == "tone"
    assert answer_kind("qa/temporal", "blue circle") == "shape"
    assert answer_kind("qa/audio", "low") == ""


def test_score_splits_colour_and_shape_answers():
    recs = [_rec("video", "red", True), _rec("video", "blue", True), _rec("video", "circle", False),
            _rec("video", "square", True), _rec("temporal", "high tone", True), _rec("temporal", "red cross", False),
            _rec("audio", "low", True), _rec("mc", "red", True, task="mcqa")]
    out = score(recs)
    assert out["qa/video"]["value"] == pytest.approx(0.75)
    assert (out["qa/video:colour"]["value"], out["qa/video:colour"]["count"]) == (1.0, 2)
    assert (out["qa/video:shape"]["value"], out["qa/video:shape"]["count"]) == (0.5, 2)
    assert out["qa/temporal:tone"]["value"] == 1.0 and out["qa/temporal:shape"]["value"] == 0.0
    assert not any(k.startswith(("qa/audio:", "mcqa:")) for k in out)


def test_row_order_lists_another_data_sets_question_types_too():
    """bars and beeps (``bench recipe``'s data) asks number / motion / yes_no: printed, after the demo's own."""
    recs = [_rec("number", "two", False), _rec("motion", "up", True), _rec("av_aligned", "chord", True),
            _rec("yes_no", "no", True)]
    order = row_order(score(recs))
    assert order[0] == "qa/av_aligned"
    assert {"qa/number", "qa/motion", "qa/yes_no"} <= set(order[1:])
    assert order[1:] == sorted(order[1:])


def test_memory_source_serves_the_pipelines_order():
    n = 7
    spec = row_spec(DataConfig(height=8, width=8, n_mels=4, mel_frames=4, max_texts=1))
    rows = {k: torch.zeros((n, *shape), dtype=torch.from_numpy(np.zeros(0, dt)).dtype)
            for k, (shape, dt) in spec.items()}
    rows.update(label=torch.arange(n) * 10, pos=torch.arange(n), key=[f"c{i}" for i in range(n)])
    stream = train_batches(MemorySource(rows), ReadPosition().for_world(1), rank=0, batch_size=3, seed=5)
    got = [int(x) // 10 for _ in range(5) for x in next(stream)["label"]]  # 15 rows: two epochs and a bit
    want = np.concatenate([epoch_permutation(n, 5, e) for e in range(3)])[:15]
    assert got == want.tolist()


@pytest.mark.parametrize("clips", [8, 10])
def test_the_encoder_probe_reshuffles_the_clips_every_epoch(monkeypatch, clips):
    """Batches of 4 clips: each epoch (two batches) shows 8 different clips, and each epoch in a new order,
    whether or not the batch size divides the number of clips."""
    cfg = load_config("tiny", ["train.batch_size=4"])
    (S, F, H, W, C), _ = row_spec(cfg.data)["video"]
    # clip i's every pixel is i: the batches the video encoder sees name their clips
    video = torch.arange(clips, dtype=torch.uint8).view(-1, 1, 1, 1, 1, 1).expand(clips, S, F, H, W, C).clone()
    rows = {"video": video, "audio": torch.zeros(clips, *row_spec(cfg.data)["audio"][0]),
            "audio_present": torch.ones(clips, dtype=torch.bool), "key": [f"c{i}" for i in range(clips)]}
    monkeypatch.setattr(learn, "snippet_labels",
                        lambda rows, tok: (torch.zeros(len(rows["key"]), S, dtype=torch.long),) * 2)
    seen: list[list[int]] = []

    class Recorded(mirasol.Mirasol):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.video_encoder.register_forward_pre_hook(
                lambda m, inp: seen.append(inp[0][:, 0, 0, 0, 0, 0].tolist()) if m.training else None)

    monkeypatch.setattr(mirasol, "Mirasol", Recorded)
    learn.probe_encoder(cfg, rows, rows, None, steps=6, seed=0)
    assert len(seen) == 6 and all(len(b) == 4 for b in seen)
    epochs = [seen[0] + seen[1], seen[2] + seen[3], seen[4] + seen[5]]
    assert all(len(set(e)) == 8 for e in epochs), epochs  # no clip twice in an epoch
    assert len({tuple(e) for e in epochs}) == 3, epochs  # a new order each epoch
