"""The Transformer Combiner's two readouts (model.combiner_readout): "queries" (m learned query tokens) and "last"
(the paper's: the last m outputs over the snippet's tokens). Shapes, what each output depends on, gradients, and
checkpoints of one readout refused by the other."""

from __future__ import annotations

import pytest
import torch
from small_models import small_model_config

from mirasol_ray.config import ModelConfig
from mirasol_ray.model.combiner import TransformerCombiner
from mirasol_ray.model.mirasol import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, S, NV, NA = 2, 3, 4, 3


def _cfg(readout: str, **kw) -> ModelConfig:
    return small_model_config(**{"combiner": "transformer", "combiner_readout": readout, "combiner_tokens": 2, **kw})


def _inputs(cfg: ModelConfig, seed: int = 0, audio_present=(True, True)):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, S, NV, cfg.video_dim, generator=g, requires_grad=True)  # (B, S, Nv, Dv)
    audio = torch.randn(B, S, NA, cfg.audio_dim, generator=g, requires_grad=True)  # (B, S, Na, Da)
    return video, audio, torch.tensor(audio_present)


def _combiner(readout: str, **kw) -> TransformerCombiner:
    torch.manual_seed(0)
    return TransformerCombiner(_cfg(readout, **kw)).eval()


@pytest.mark.parametrize("readout", ["queries", "last"])
def test_both_readouts_give_m_tokens_per_snippet(readout):
    cfg = _cfg(readout, combiner_tokens=3)
    out = _combiner(readout, combiner_tokens=3)(*_inputs(cfg))
    assert out.shape == (B, S, 3, cfg.dim)
    assert torch.isfinite(out).all()


def test_last_readout_has_no_query_tokens_and_the_model_runs_with_it():
    model = build_model(_cfg("last"))
    assert model.combiner.out_tokens is None
    assert not any("out_tokens" in n for n, _ in model.named_parameters())
    queries = build_model(_cfg("queries"))
    assert queries.combiner.out_tokens.shape == (2, queries.config.dim)


def test_last_readout_each_output_sees_its_whole_snippet_and_no_other():
    """Bidirectional within a snippet (no causal mask): the first of the m outputs, at a position before the last
    token, depends on that last token too; nothing crosses from one snippet to another."""
    cfg = _cfg("last")
    comb = _combiner("last")
    video, audio, present = _inputs(cfg)
    out = comb(video, audio, present)  # (B, S, m, D)
    w = torch.randn(cfg.dim, generator=torch.Generator().manual_seed(1))  # a sum alone is flat after a LayerNorm
    for s in range(S):
        video.grad = audio.grad = None
        (out[:, s, 0] @ w).sum().backward(retain_graph=True)  # the first of snippet s's m outputs
        for x in (video, audio):
            per_token = x.grad.abs().sum(-1)  # (B, S, N)
            assert (per_token[:, s] > 0).all(), "an input token of the snippet does not reach its first output"
            others = [t for t in range(S) if t != s]
            assert (per_token[:, others] == 0).all(), "another snippet reaches this snippet's output"


def test_last_readout_of_a_clip_without_audio_is_its_last_video_tokens():
    """A clip whose audio is absent: its audio tokens are masked out, so its outputs are those the combiner gives
    the video tokens alone (and changing the absent audio changes nothing)."""
    cfg = _cfg("last")
    comb = _combiner("last")
    video, audio, present = _inputs(cfg, audio_present=(False, True))
    out = comb(video, audio, present)
    no_audio = comb(video, audio[:, :, :0], present)  # the same clips with no audio tokens at all
    torch.testing.assert_close(out[0], no_audio[0])
    other = comb(video, torch.randn_like(audio), present)
    torch.testing.assert_close(out[0], other[0])
    assert not torch.allclose(out[1], other[1])  # the clip with audio does read it


def test_last_readout_needs_m_video_tokens():
    cfg = _cfg("last", combiner_tokens=NV + 1)
    with pytest.raises(ValueError, match="combiner_tokens 5 is more than the snippet's 4 video tokens"):
        _combiner("last", combiner_tokens=NV + 1)(*_inputs(cfg))


@pytest.mark.parametrize("readout", ["queries", "last"])
def test_every_combiner_parameter_receives_a_gradient(readout):
    cfg = _cfg(readout)
    comb = _combiner(readout)
    comb(*_inputs(cfg)).square().sum().backward()
    for name, p in comb.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_checkpoint_of_one_readout_does_not_load_into_the_other():
    from mirasol_ray.train import strict

    queries, last = build_model(_cfg("queries")), build_model(_cfg("last"))
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"combiner.out_tokens\""):
        last.load_state_dict(queries.state_dict())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"combiner.out_tokens\""):
        queries.load_state_dict(last.state_dict())
    with pytest.raises(strict.CheckpointMismatch, match="unexpected combiner.out_tokens"):
        strict.require_same_tensors("q", strict.shapes_of(queries.state_dict()), strict.shapes_of(last.state_dict()))
    with pytest.raises(strict.CheckpointMismatch, match="missing combiner.out_tokens"):
        strict.require_same_tensors("l", strict.shapes_of(last.state_dict()), strict.shapes_of(queries.state_dict()))


@pytest.mark.parametrize("change,needle", [
    (dict(combiner="transformer", combiner_readout="first"), "combiner_readout must be queries|last"),
    (dict(combiner="ttm", combiner_readout="last"), "combiner_readout 'last' is the Transformer Combiner's"),
])
def test_validate_rejects_a_readout_it_cannot_build(change, needle):
    with pytest.raises(ValueError, match=needle):  # ConfigError is a ValueError
        small_model_config(**change).validate()
