"""The video encoder's conv stem (``model.video_stem: conv``) and the TokenLearner initialisation of TokenPool."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from einops import rearrange
from small_models import small_model_config

from mirasol_ray.config import ModelConfig
from mirasol_ray.model.encoders import ConvStem, VideoEncoder
from mirasol_ray.model.mirasol import Mirasol, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg_for(**kw) -> ModelConfig:
    """Two 2-frame tubelets of 32x32 frames, 16-pixel patches: a 2x2 grid, 8 tokens a snippet."""
    return small_model_config(**{"max_snippets": 2, "frames_per_snippet": 4, "max_text_len": 16, "text_depth": 1,
                                 **kw})


def video(cfg: ModelConfig, B: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, cfg.max_snippets, cfg.frames_per_snippet, *cfg.image_size, 3), generator=g,
                         dtype=torch.uint8)



def clip_batch(cfg: ModelConfig, targets: list[list[int]]) -> dict[str, torch.Tensor]:
    """One text per clip, a clip per target (BOS ... EOS ids), every snippet present, random prompts."""
    B, S = len(targets), cfg.max_snippets
    return {"video": video(cfg, B), "audio": torch.randn(B, S, 16, 8), "audio_present": torch.ones(B, dtype=torch.bool),
            "snippet_mask": torch.ones(B, S, dtype=torch.bool), "task": torch.zeros(B, dtype=torch.int64),
            "prompt_ids": torch.randint(3, 40, (B, 4)), "prompt_mask": torch.ones(B, 4, dtype=torch.bool),
            "target_ids": torch.tensor(targets), "target_mask": torch.ones(B, len(targets[0]), dtype=torch.bool)}

def test_conv_stem_gives_the_same_tokens_as_the_patch_embedding():
    patch, conv = cfg_for(), cfg_for(video_stem="conv", video_stem_channels=8)
    torch.manual_seed(0)
    enc_p, enc_c = VideoEncoder(patch), VideoEncoder(conv)
    v = video(patch)
    assert enc_c(v).shape == enc_p(v).shape == (2, 2, 8, 32)  # (B, S, 2 tubelets x 2x2 grid, D)
    assert enc_c.num_tokens == enc_p.num_tokens == 8
    assert not hasattr(enc_c, "tubelet") and not hasattr(enc_p, "stem")
    # log2(16) = 4 convs of 8, 16, 32, 32 channels (doubling, capped at video_dim), each with a GroupNorm; a 1x1
    # projection to video_dim with its bias
    convs = [m for m in enc_c.stem.convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == \
        [(6, 8, (2, 2)), (8, 16, (2, 2)), (16, 32, (2, 2)), (32, 32, (2, 2))]
    channels = [(6, 8), (8, 16), (16, 32), (32, 32)]
    n_stem = sum(9 * i * o + 2 * o for i, o in channels) + 32 * 32 + 32
    assert sum(p.numel() for p in enc_c.stem.parameters()) == n_stem
    n_linear = 2 * 16 * 16 * 3 * 32 + 32
    assert sum(p.numel() for p in enc_c.parameters()) - n_stem == sum(p.numel() for p in enc_p.parameters()) - n_linear


def test_conv_stem_tokens_see_their_own_tubelet_and_mostly_their_own_neighbourhood():
    """A cell of the grid is computed from its neighbourhood; the GroupNorms (one group: the whole feature map)
    couple the cells only through their statistics."""
    stem = ConvStem(6, 8, 16, 32).eval()
    x = torch.randn(2, 6, 32, 32)  # 2 tubelets of 2 frames as channels
    y = x.clone()
    y[0, :, 0, 0] += 50.0  # the top-left pixel of tubelet 0
    a, b = stem(x), stem(y)  # (2, 32, 2, 2)
    assert a.shape == (2, 32, 2, 2)
    near, far = (a - b)[0, :, 0, 0].norm(), (a - b)[0, :, 1, 1].norm()
    assert near > 2 * far > 0, (near, far)
    for i, m in enumerate(stem.convs):  # without the norms the far cell does not see the corner at all
        if isinstance(m, torch.nn.GroupNorm):
            stem.convs[i] = torch.nn.Identity()
    a, b = stem(x), stem(y)
    assert not torch.allclose(a[0, :, 0, 0], b[0, :, 0, 0])
    torch.testing.assert_close(a[0, :, 1, 1], b[0, :, 1, 1], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)  # the other tubelet: unchanged


def test_default_stem_is_the_linear_tubelet_embedding():
    cfg = cfg_for()
    assert ModelConfig().video_stem == "patch" and cfg.video_stem == "patch"
    torch.manual_seed(0)
    enc = VideoEncoder(cfg).eval()
    v = video(cfg)
    x = (rearrange(v, "b s f h w c -> (b s) f h w c").float() / 255.0 - enc.mean) / enc.std
    tokens = rearrange(x, "n (f pt) (h ph) (w pw) c -> n (f h w) (pt ph pw c)", pt=2, ph=16, pw=16)
    expected = enc.vit(tokens @ enc.tubelet.weight.T + enc.tubelet.bias + enc.pos)
    torch.testing.assert_close(enc(v), rearrange(expected, "(b s) n d -> b s n d", b=2))
    assert not any("stem" in k for k in Mirasol(cfg).state_dict())


def test_a_model_with_the_conv_stem_trains_every_stem_parameter():
    cfg = cfg_for(video_stem="conv", video_stem_channels=8)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = clip_batch(cfg, [[1, 5, 6, 2]] * 2)
    model(batch)["loss"].backward()
    missing = [n for n, p in model.video_encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("change", [
    dict(video_stem="resnet"),
    dict(video_stem="conv", patch_size=12, image_size=(36, 36)),
    dict(video_stem="conv", sparse_tubes=True, sparse_tube_size=(2, 16), sparse_tube_stride=(2, 16)),
    dict(video_stem="conv", video_init="/weights/vit.safetensors"),
])
def test_bad_stem_settings_name_video_stem(change):
    with pytest.raises(ValueError, match="model.video_stem"):
        cfg_for(**change).validate()
    with pytest.raises(ValueError, match="model.video_stem"):
        build_model(dataclasses.replace(cfg_for(), **change))


def test_stem_channels_must_be_positive():
    with pytest.raises(ValueError, match="model.video_stem_channels"):
        cfg_for(video_stem="conv", video_stem_channels=0).validate()
    cfg_for(video_stem="conv", video_stem_channels=1).validate()


def test_token_pools_start_as_tokenlearner_not_as_a_mean():
    """Xavier-uniform score MLPs (TokenLearner's), kept by the model's init; their weights are not all ~1/N."""
    cfg = cfg_for()
    torch.manual_seed(0)
    model = Mirasol(cfg)
    read = model.combiner.read
    for layer in (read.score[0], read.score[2]):
        bound = (6 / (layer.in_features + layer.out_features)) ** 0.5
        w = layer.weight.detach()
        assert w.abs().max() <= bound and w.std() > 0.8 * bound / 3**0.5  # uniform(-b, b) has std b / sqrt 3
        assert not layer.bias.detach().any()
    x = torch.randn(4, 20, cfg.dim)
    weights = read.score(read.norm(x)).softmax(dim=1)  # (4, 20, r)
    assert weights.max() > 2.0 / 20  # some input counts at least twice the mean's share


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_max_token_is_the_channel_max_of_the_snippet_tokens_and_carries_gradient(stem):
    plain = cfg_for(video_stem=stem, video_stem_channels=8)
    with_max = dataclasses.replace(plain, video_max_token=True)
    torch.manual_seed(0)
    enc = VideoEncoder(with_max)
    torch.manual_seed(0)
    ref = VideoEncoder(plain)  # the same weights: the option adds no parameter
    assert [n for n, _ in enc.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = video(plain)
    out, base = enc(x), ref(x)
    n = base.shape[2]
    assert out.shape == (*base.shape[:2], n + 1, base.shape[3]) and enc.num_tokens == ref.num_tokens + 1
    torch.testing.assert_close(out[:, :, :n], base)
    torch.testing.assert_close(out[:, :, n], base.amax(dim=2))
    # the max token moves with whichever token holds each channel's max, wherever it is in the frame
    out[:, :, n].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.vit.parameters())


def test_a_whole_model_with_the_max_token_trains_and_fits_a_fixed_batch():
    cfg = cfg_for(video_stem="conv", video_stem_channels=8, video_max_token=True)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = clip_batch(cfg, [[1, 5, 6, 2], [1, 7, 8, 2]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.video_encoder.named_parameters()
                       if p.grad is None or not p.grad.abs().sum() > 0]
            assert missing == []
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
