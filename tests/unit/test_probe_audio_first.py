"""``bench learn --probe-answers Q --probe-read combiner --probe-audio-first N``: the audio encoder trained alone
in the first stage stays exactly as it was through the second, while the Combiner and the video encoder learn."""

from __future__ import annotations

import copy

import numpy as np
import torch

from benchmarks import learn
from mirasol_ray.config import load_config
from mirasol_ray.data.schema import row_spec
from mirasol_ray.model import mirasol


def _rows(cfg, n: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    spec = row_spec(cfg.data)
    (S, F, H, W, C), _ = spec["video"]
    return {"video": torch.from_numpy(rng.integers(0, 256, (n, S, F, H, W, C), dtype=np.uint8)),
            "audio": torch.from_numpy(rng.standard_normal((n, *spec["audio"][0])).astype(np.float32)),
            "audio_present": torch.ones(n, dtype=torch.bool)}


def test_audio_encoder_stays_frozen_in_the_second_stage(monkeypatch):
    cfg = load_config("tiny", ["train.batch_size=4"])
    answers = ["one", "two", "three"]
    # answers by clip position: what answer_labels reads from the rows' texts in a real run
    monkeypatch.setattr(learn, "answer_labels", lambda rows, tok, qtype: [answers[i % 3] for i in
                                                                         range(len(rows["audio"]))])
    built, frozen_at = [], {}

    class Recorded(mirasol.Mirasol):
        """The model the probe builds, with the audio encoder's weights copied when the probe freezes it."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)
            enc, freeze = self.audio_encoder, self.audio_encoder.requires_grad_

            def requires_grad_(flag: bool = True):
                frozen_at["audio"] = copy.deepcopy(enc.state_dict())
                frozen_at["combiner"] = copy.deepcopy(self.combiner.state_dict())
                return freeze(flag)

            enc.requires_grad_ = requires_grad_

    monkeypatch.setattr(mirasol, "Mirasol", Recorded)
    out = learn.probe_answers(cfg, _rows(cfg, 12, 0), _rows(cfg, 6, 1), None, "count", steps=3, seed=0,
                              read="combiner", audio_first=3)
    (model,) = built
    assert len(out["audio_first"]) >= 1 and len(out["history"]) >= 1  # both stages ran and were scored
    assert frozen_at, "the probe never froze the audio encoder"
    after = model.audio_encoder.state_dict()
    for name, value in frozen_at["audio"].items():
        assert torch.equal(after[name], value), f"audio encoder weight {name} moved in the second stage"
    assert not any(p.requires_grad for p in model.audio_encoder.parameters())
    # the second stage did train: the Combiner's weights moved from where they stood at the freeze
    combiner = model.combiner.state_dict()
    assert any(not torch.equal(combiner[k], v) for k, v in frozen_at["combiner"].items())
