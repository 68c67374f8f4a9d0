"""Mirasol3B model: causality, memory, gradients, overfitting, decoding, scoring, checkpoints, sizes."""

from __future__ import annotations

import dataclasses
import resource

import pytest
import torch
from small_models import small_model_config

from mirasol_ray.config import ModelConfig
from mirasol_ray.model.mirasol import (
    Mirasol,
    beam_search,
    build_model,
    param_breakdown,
)

PAD, BOS, EOS = 0, 1, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(**kw) -> ModelConfig:
    """The unit tests' small model, with sparse tubes sized for its 2-frame, 32-pixel snippets."""
    return small_model_config(**{"sparse_tube_size": (2, 16), "sparse_tube_stride": (2, 16), **kw})


def make_batch(cfg: ModelConfig, B: int = 2, Lp: int = 5, Lt: int = 7, K: int = 3, seed: int = 0) -> dict:
    """A batch following mirasol_ray/data/schema.py: left-padded prompts, BOS..EOS right-padded targets."""
    g = torch.Generator().manual_seed(seed)
    S, F = cfg.max_snippets, cfg.frames_per_snippet
    H, W = cfg.image_size

    def text(n):
        return torch.randint(3, cfg.vocab_size, (n,), generator=g)

    prompt_ids = torch.zeros(B, Lp, dtype=torch.int32)
    prompt_mask = torch.zeros(B, Lp, dtype=torch.bool)
    target_ids = torch.zeros(B, Lt, dtype=torch.int32)
    target_mask = torch.zeros(B, Lt, dtype=torch.bool)
    option_ids = torch.zeros(B, K, Lt, dtype=torch.int32)
    option_mask = torch.zeros(B, K, Lt, dtype=torch.bool)
    for b in range(B):
        n_prompt = Lp - b  # row b has b pads on the left
        prompt_ids[b, Lp - n_prompt:] = text(n_prompt)
        prompt_mask[b, Lp - n_prompt:] = True
        for k in range(K):
            n = Lt - (k % 2)  # BOS + words + EOS, some right-padded
            option_ids[b, k, :n] = torch.cat([torch.tensor([BOS]), text(n - 2), torch.tensor([EOS])])
            option_mask[b, k, :n] = True
        target_ids[b], target_mask[b] = option_ids[b, 1], option_mask[b, 1]
    return {
        "video": torch.randint(0, 256, (B, S, F, H, W, 3), generator=g, dtype=torch.uint8),
        "audio": torch.randn(B, S, cfg.n_mels, cfg.mel_frames, generator=g),
        "audio_present": torch.ones(B, dtype=torch.bool),
        "snippet_mask": torch.ones(B, S, dtype=torch.bool),
        "task": torch.full((B,), 2, dtype=torch.int64),
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "target_ids": target_ids, "target_mask": target_mask,
        "option_ids": option_ids, "option_mask": option_mask,
        "answer_idx": torch.ones(B, dtype=torch.int64),
        "label": torch.tensor([0, 1] * (B // 2) + [0] * (B % 2), dtype=torch.int64),
    }


def model_for(cfg: ModelConfig, seed: int = 0) -> Mirasol:
    torch.manual_seed(seed)
    return Mirasol(cfg).eval()


def train(model: Mirasol, batch: dict, steps: int, lr: float = 3e-3) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def perturb_snippet(batch: dict, s: int) -> dict:
    out = dict(batch)
    out["video"] = batch["video"].clone()
    out["video"][:, s] = 255 - out["video"][:, s]
    out["audio"] = batch["audio"].clone()
    out["audio"][:, s] = -3 * out["audio"][:, s] + 1
    return out


def test_padding_columns_every_text_leaves_unused_change_nothing_and_are_cut():
    """A batch padded to longer ``max_prompt_len`` / ``max_target_len`` gives the same loss and the same gradients,
    and the training step cuts those columns (``trim_text_padding``) back to the batch's longest text."""
    from mirasol_ray.train.step import trim_text_padding

    cfg = small_cfg()
    model = model_for(cfg)
    batch = make_batch(cfg)
    wide = dict(batch)
    B = batch["prompt_ids"].shape[0]
    wide["prompt_ids"] = torch.cat([torch.zeros(B, 4, dtype=torch.int32), batch["prompt_ids"]], 1)
    wide["prompt_mask"] = torch.cat([torch.zeros(B, 4, dtype=torch.bool), batch["prompt_mask"]], 1)
    wide["target_ids"] = torch.cat([batch["target_ids"], torch.zeros(B, 5, dtype=torch.int32)], 1)
    wide["target_mask"] = torch.cat([batch["target_mask"], torch.zeros(B, 5, dtype=torch.bool)], 1)
    cut, ref = trim_text_padding(wide), trim_text_padding(batch)
    assert cut["prompt_ids"].shape[1] == batch["prompt_ids"].shape[1]  # row 0's prompt fills its columns
    assert cut["target_ids"].shape[1] == batch["target_ids"].shape[1] - 1  # every target ends one short of Lt
    for name in ("prompt_ids", "prompt_mask", "target_ids", "target_mask"):
        assert torch.equal(cut[name], ref[name])
    grads = []
    for b in (batch, wide, cut):
        model.zero_grad()
        loss = model(b)["loss"]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    for other in grads[1:]:
        torch.testing.assert_close(grads[0][0], other[0])
        for a, b in zip(grads[0][1], other[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# causality and memory


@pytest.mark.parametrize("combiner", ["transformer", "ttm"])
@pytest.mark.parametrize("sparse", [False, True])
def test_changing_snippet_t_plus_1_leaves_outputs_up_to_t_unchanged(combiner, sparse):
    cfg = small_cfg(combiner=combiner, sparse_tubes=sparse)
    model, batch = model_for(cfg), make_batch(cfg)
    t = 0
    with torch.no_grad():
        a, b = model.encode_av(batch), model.encode_av(perturb_snippet(batch, t + 1))
    for name in ("z", "h"):
        torch.testing.assert_close(a[name][:, : t + 1], b[name][:, : t + 1], rtol=0, atol=1e-6)
        assert (a[name][:, t + 1] - b[name][:, t + 1]).abs().max() > 1e-3  # the change does reach snippet t+1


def test_changing_a_later_text_token_leaves_earlier_logits_unchanged():
    cfg = small_cfg()
    model, batch = model_for(cfg), make_batch(cfg)
    j = 3
    changed = dict(batch, target_ids=batch["target_ids"].clone())
    changed["target_ids"][:, j] = (changed["target_ids"][:, j] + 5) % (cfg.vocab_size - 3) + 3
    with torch.no_grad():
        a, b = model.text_logits(batch), model.text_logits(changed)
    # logits[:, i] predicts target[i + 1] from target[: i + 1]
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-5)
    assert (a[:, j] - b[:, j]).abs().max() > 1e-3


def test_left_padding_does_not_change_the_text_logits():
    """Positions count valid tokens: more left padding of the prompt changes nothing."""
    cfg = small_cfg()
    model, batch = model_for(cfg), make_batch(cfg)
    padded = dict(batch,
                  prompt_ids=torch.cat([torch.zeros(2, 3, dtype=torch.int32), batch["prompt_ids"]], 1),
                  prompt_mask=torch.cat([torch.zeros(2, 3, dtype=torch.bool), batch["prompt_mask"]], 1))
    with torch.no_grad():
        torch.testing.assert_close(model.text_logits(batch), model.text_logits(padded), rtol=1e-4, atol=1e-4)


def test_ttm_memory_carries_snippet_0_to_later_snippets():
    batch = make_batch(small_cfg())
    changed = perturb_snippet(batch, 0)
    with torch.no_grad():
        ttm = model_for(small_cfg(combiner="ttm"))
        z, z_changed = ttm.encode_av(batch)["z"], ttm.encode_av(changed)["z"]
        assert (z[:, 2] - z_changed[:, 2]).abs().max() > 1e-3
        # the Transformer Combiner has no memory: its snippet 2 output ignores snippet 0
        plain = model_for(small_cfg(combiner="transformer"))
        torch.testing.assert_close(plain.encode_av(batch)["z"][:, 2], plain.encode_av(changed)["z"][:, 2],
                                   rtol=0, atol=1e-6)


def test_padded_snippets_and_absent_audio_are_ignored():
    cfg = small_cfg()
    model, batch = model_for(cfg), make_batch(cfg)
    batch["snippet_mask"][:, -1] = False
    batch["audio_present"][:] = False
    other = perturb_snippet(batch, cfg.max_snippets - 1)
    other["audio"] = torch.randn_like(batch["audio"])
    with torch.no_grad():
        torch.testing.assert_close(model.text_logits(batch), model.text_logits(other), rtol=0, atol=1e-5)
        assert model(batch)["losses"]["latent"].item() == pytest.approx(model(other)["losses"]["latent"].item())


# ----------------------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("combiner,sparse", [("transformer", True), ("ttm", False)])
def test_every_parameter_receives_a_gradient(combiner, sparse):
    cfg = small_cfg(combiner=combiner, sparse_tubes=sparse, cls_mode="head", num_classes=3, combiner_tokens=3)
    model = model_for(cfg).train()
    out = model(make_batch(cfg))
    assert set(out["losses"]) == {"text", "latent", "cls"}
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("combiner", ["transformer", "ttm"])
def test_each_combiner_overfits_a_fixed_batch(combiner):
    cfg = small_cfg(combiner=combiner)
    model, batch = model_for(cfg), make_batch(cfg)
    losses = train(model, batch, steps=60)
    assert losses[-1] < 0.15 * losses[0], losses[::10]


def test_activation_checkpointing_gives_the_same_gradients():
    batch = make_batch(small_cfg())
    grads = []
    for ckpt in (False, True):
        model = model_for(small_cfg(activation_checkpointing=ckpt)).train()
        model(batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_forward_backward():
    cfg = small_cfg()
    model, batch = model_for(cfg).train(), make_batch(cfg)
    ref = model(batch)["loss"].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch)["loss"]
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref) < 0.05 * ref


def test_cls_head_learns_labels_and_loss_only_with_labels():
    cfg = small_cfg(cls_mode="head", num_classes=2)
    model, batch = model_for(cfg), make_batch(cfg, B=4)
    train(model, batch, steps=30)
    model.eval()
    assert model.classify(batch).argmax(-1).tolist() == batch["label"].tolist()
    unlabelled = dict(batch, label=torch.full((4,), -1))
    assert "cls" not in model(unlabelled)["losses"]


# ----------------------------------------------------------------------------------------------------------------
# decoding and scoring


@pytest.fixture(scope="module")
def trained():
    """A model overfit to answer option 1 of each row (its target)."""
    cfg = small_cfg()
    model, batch = model_for(cfg), make_batch(cfg)
    train(model, batch, steps=80)
    return model.eval(), batch


def test_generation_reproduces_the_trained_answer_and_stops_at_eos(trained):
    model, batch = trained
    out = model.generate(batch, max_new_tokens=12)
    for b in range(out.shape[0]):
        want = batch["target_ids"][b][batch["target_mask"][b]][1:].tolist()  # words + EOS, after BOS
        got = out[b].tolist()
        assert got[: len(want)] == want
        assert all(t == PAD for t in got[len(want):])
    assert out.shape[1] == max(int(m.sum()) - 1 for m in batch["target_mask"])  # stopped once every row ended
    assert model.generate(batch, max_new_tokens=3).shape[1] == 3


@pytest.mark.parametrize("beam_size", [1, 3])
def test_generation_with_kv_cache_equals_without(beam_size):
    cfg = small_cfg()
    model, batch = model_for(cfg, seed=1), make_batch(cfg)
    a = model.generate(batch, max_new_tokens=10, beam_size=beam_size, use_cache=True)
    b = model.generate(batch, max_new_tokens=10, beam_size=beam_size, use_cache=False)
    assert a.shape[1] > 2
    assert torch.equal(a, b)


def test_beam_width_1_equals_greedy_and_wider_beams_score_no_worse():
    cfg = small_cfg()
    model, batch = model_for(cfg, seed=2), make_batch(cfg)
    greedy = model.generate(batch, max_new_tokens=8)
    with torch.no_grad():
        state, steps = model.start_decoding(model.encode(batch), batch["prompt_ids"], batch["prompt_mask"],
                                            torch.arange(2), max_new_tokens=8, beam_size=1)
    assert torch.equal(beam_search(state, steps, 1, PAD, EOS), greedy)

    def logprob(ids):  # summed log-probability of a generated continuation, scored by teacher forcing
        target = torch.cat([torch.full((ids.shape[0], 1), BOS), ids], 1)
        mask = torch.ones_like(target, dtype=torch.bool)
        mask[:, 1:] = torch.cat([torch.ones(ids.shape[0], 1, dtype=torch.bool), ids[:, :-1] != EOS], 1).cumprod(1).bool()
        mask[:, 1:] &= ids != PAD
        scored = dict(batch, option_ids=target[:, None], option_mask=mask[:, None])
        return model.score_options(scored)[:, 0]

    beam = model.generate(batch, max_new_tokens=8, beam_size=4)
    assert (logprob(beam) >= logprob(greedy) - 1e-4).all()


def test_multiple_choice_scoring_picks_the_trained_option(trained):
    model, batch = trained
    scores = model.score_options(batch)
    assert scores.shape == (2, 3)
    assert scores.argmax(-1).tolist() == batch["answer_idx"].tolist()
    absent = dict(batch, option_mask=batch["option_mask"].clone())
    absent["option_mask"][:, 2] = False
    assert torch.isneginf(model.score_options(absent)[:, 2]).all()


# ----------------------------------------------------------------------------------------------------------------
# config, checkpoints, sizes


def test_checkpoint_rebuilds_the_model_from_its_state_alone(tmp_path):
    from mirasol_ray.train.checkpoint import load_model, model_state

    cfg = small_cfg(combiner="transformer", sparse_tubes=True, audio_patch=(16, 4))
    model, batch = model_for(cfg), make_batch(cfg)
    torch.save(model_state(model), tmp_path / "m.pt")
    loaded = load_model(torch.load(tmp_path / "m.pt", weights_only=True)).eval()
    assert loaded.config == cfg and isinstance(loaded.config.audio_patch, tuple)
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_logits(batch), model.text_logits(batch), rtol=0, atol=0)


@pytest.mark.parametrize("change,field", [
    (dict(patch_size=12), "patch_size"),
    (dict(tubelet_frames=3), "tubelet_frames"),
    (dict(audio_patch=(5, 8)), "audio_patch"),
    (dict(text_dim=30, text_heads=4), "text_dim"),
    (dict(combiner="lstm"), "combiner"),
    (dict(cls_mode="head", num_classes=0), "num_classes"),
])
def test_validate_names_the_bad_field(change, field):
    with pytest.raises(ValueError, match=field):
        small_cfg(**change).validate()
    with pytest.raises(ValueError, match=field):
        build_model(dataclasses.replace(small_cfg(), **change))


def test_presets_sizes_counted_on_meta_device():
    from mirasol_ray.config import load_config

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    big = param_breakdown(load_config("mirasol3b").model)
    assert 2.7e9 <= big["total"] <= 3.3e9
    assert big["total"] == sum(v for k, v in big.items() if k != "total")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1_000_000  # 3B fp32 would be 12 GB
    assert param_breakdown(load_config("tiny").model)["total"] < 5e6


# ----------------------------------------------------------------------------------------------------------------
# the decoder's context


def test_context_is_clip_tokens_then_normalised_snippet_deviations_with_time():
    cfg = small_cfg()
    model = model_for(cfg)
    S, m = cfg.max_snippets, cfg.combiner_tokens
    h = torch.randn(2, S, m, cfg.dim)
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[1, -1] = False  # row 1: last snippet is padding
    context, context_mask = model._context(h, mask)
    assert context.shape == (2, (S + 1) * m, cfg.dim) and context_mask.shape == (2, (S + 1) * m)
    assert context_mask[0].all() and not context_mask[1, -m:].any() and context_mask[1, :-m].all()
    torch.testing.assert_close(context[0, :m], h[0].mean(0))  # clip tokens: mean over valid snippets
    torch.testing.assert_close(context[1, :m], h[1, :-1].mean(0))
    # what every snippet shares (a scene, a background) moves the clip tokens only, not the snippet tokens
    shifted, _ = model._context(h + 5 * torch.randn(2, 1, m, cfg.dim), mask)
    torch.testing.assert_close(shifted[:, m:], context[:, m:], rtol=0, atol=1e-4)
    # the same latent in every snippet: the snippet tokens are their time embeddings alone, and differ
    same = h[:, :1].expand(-1, S, -1, -1)
    ctx, _ = model._context(same, torch.ones(2, S, dtype=torch.bool))
    time = model.context_time.weight[:S].detach()
    torch.testing.assert_close(ctx[0, m:].reshape(S, m, cfg.dim), time[:, None].expand(-1, m, -1),
                               rtol=0, atol=1e-4)
    assert (time[0] - time[1]).norm() > 1.0


def test_decoder_learns_which_snippet_a_question_points_at():
    """The skill the demo's questions need: the prompt names a snippet ("the second one"), the answer is what
    that snippet shows, every clip shows every answer once (so reading the whole clip tells nothing) over a
    background that changes from clip to clip far more than the snippets do. With the audio-video path held
    still (``freeze_av_steps``) the decoder learns to pick the snippet from its random features."""
    from mirasol_ray.config import TrainConfig
    from mirasol_ray.train.step import make_optimizer, make_scheduler, train_step

    torch.manual_seed(0)
    cfg = small_cfg(max_snippets=4, frames_per_snippet=2, image_size=(16, 16), patch_size=8, combiner="transformer",
                    text_depth=2, dim=128, text_dim=128, video_dim=128, heads=4, text_heads=4)
    model = Mirasol(cfg)
    colours = torch.tensor([[230, 40, 40], [40, 200, 60], [50, 80, 230], [230, 210, 40]], dtype=torch.float)
    answer = torch.arange(10, 14)  # token of each colour; prompt token 20 + k asks for snippet k

    def batch(n, g):
        perm = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])  # (n, S): colour per snippet
        background = torch.rand(n, 1, 1, 1, 1, 3, generator=g) * 255  # the same in every snippet of a clip
        pixels = background + 20 * torch.randn(n, 4, 2, 16, 16, 3, generator=g)
        square = colours[perm][:, :, None, None, None, :].expand(-1, -1, 2, 8, 8, -1)
        pixels[:, :, :, 4:12, 4:12] = square
        k = torch.randint(0, 4, (n,), generator=g)
        ones = torch.ones(n, dtype=torch.bool)
        return {
            "video": pixels.clamp(0, 255).to(torch.uint8),
            "audio": torch.zeros(n, 4, cfg.n_mels, cfg.mel_frames), "audio_present": ~ones,
            "snippet_mask": torch.ones(n, 4, dtype=torch.bool),
            "prompt_ids": torch.stack([torch.full((n,), 3), 20 + k], 1).int(),
            "prompt_mask": torch.ones(n, 2, dtype=torch.bool),
            "target_ids": torch.stack([torch.full((n,), BOS), answer[perm[torch.arange(n), k]],
                                       torch.full((n,), EOS)], 1).int(),
            "target_mask": torch.ones(n, 3, dtype=torch.bool),
            "label": torch.full((n,), -1),
        }

    tcfg = TrainConfig(steps=600, lr=1e-3, warmup_steps=10, freeze_av_steps=600, weight_decay=0.0)
    opt = make_optimizer(model, tcfg)
    sched = make_scheduler(opt, tcfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(tcfg.steps):
        train_step(model, [batch(32, g)], opt, sched, tcfg, torch.device("cpu"))
    test = batch(256, torch.Generator().manual_seed(2))
    with torch.no_grad():
        pred = model.eval().text_logits(test)[:, 0].argmax(-1)
    accuracy = (pred == test["target_ids"][:, 1]).float().mean().item()
    assert accuracy > 0.8  # chance: 0.25


def test_scoring_a_label_set_equals_scoring_its_texts_as_options(trained):
    model, batch = trained
    labels, mask = batch["option_ids"][0], batch["option_mask"][0]  # (K, Lt): one label set for every row
    B = batch["option_ids"].shape[0]
    as_options = dict(batch, option_ids=labels.expand(B, -1, -1), option_mask=mask.expand(B, -1, -1))
    want = model.score_options(as_options)
    assert torch.allclose(model.score_candidates(batch, labels, mask), want, atol=1e-5)
    assert torch.allclose(model.score_candidates(batch, labels, mask, chunk=1), want, atol=1e-5)
    assert model.score_candidates(batch, labels, mask)[0].argmax().item() == 1  # row 0 was trained on option 1
