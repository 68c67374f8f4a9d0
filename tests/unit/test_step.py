"""The optimiser and its schedule: warmup + cosine, and the audio-video path held still for freeze_av_steps."""

import math

import pytest
import torch

from mirasol_ray.config import load_config
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.train.step import make_optimizer, make_scheduler


def _lrs(cfg, steps):
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    av = [g["av"] for g in opt.param_groups]
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return av, out


def test_warmup_then_cosine_to_min_lr():
    cfg = load_config("tiny", ["train.steps=100", "train.warmup_steps=10", "train.lr=1e-3", "train.min_lr_ratio=0.1"])
    _, lrs = _lrs(cfg, 100)
    first = [row[0] for row in lrs]
    assert first[0] == pytest.approx(1e-3 / 11)
    assert first[9] == pytest.approx(1e-3 * 10 / 11)
    assert first[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(first[10:], first[11:]))  # cosine decays monotonically
    assert first[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(len(set(row)) == 1 for row in lrs)  # no freeze: every group follows one schedule


def test_freeze_av_steps_holds_the_av_path_then_warms_it_up():
    cfg = load_config("tiny", ["train.steps=100", "train.warmup_steps=10", "train.lr=1e-3",
                               "train.freeze_av_steps=40"])
    av, lrs = _lrs(cfg, 100)
    assert any(av) and not all(av)
    for step, row in enumerate(lrs):
        text = max(lr for lr, is_av in zip(row, av) if not is_av)
        av_lr = max(lr for lr, is_av in zip(row, av) if is_av)
        if step < 40:
            assert av_lr == 0.0 and (text > 0)
        elif step < 50:
            assert 0 < av_lr < text  # warming up again
        else:
            assert av_lr == pytest.approx(text)


def test_frozen_av_parameters_do_not_move_but_the_decoder_does():
    from mirasol_ray.bench.step import synthetic_batch
    from mirasol_ray.train.step import train_step

    cfg = load_config("tiny", ["train.steps=10", "train.warmup_steps=1", "train.freeze_av_steps=5"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = synthetic_batch(cfg, 2)
    for _ in range(3):
        train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not {n for n in moved if n.split(".")[0] in ("video_encoder", "audio_encoder", "combiner", "av_model")}
    assert any(n.startswith("text_decoder.") for n in moved)


def test_a_held_av_path_runs_without_autograd_then_trains(fresh_training):
    """While freeze_av_steps holds it, the audio-video path builds no graph (no backward, no saved activations);
    from the step it is released, it does again, and its parameters still require gradients afterwards."""
    from mirasol_ray.bench.step import synthetic_batch
    from mirasol_ray.train.step import train_step

    cfg = load_config("tiny", ["train.steps=10", "train.warmup_steps=1", "train.freeze_av_steps=2"])
    model, opt, sched = fresh_training(cfg)
    seen = []
    model.video_encoder.register_forward_hook(lambda mod, inp, out: seen.append(out.requires_grad))
    batch = synthetic_batch(cfg, 2)
    losses = [train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))["loss"] for _ in range(4)]
    assert seen == [False, False, True, True]
    assert all(p.requires_grad for p in model.parameters())
    assert all(math.isfinite(v) for v in losses)


def test_negative_freeze_av_steps_is_a_config_error():
    from mirasol_ray.config import ConfigError

    with pytest.raises(ConfigError, match="train.freeze_av_steps"):
        load_config("tiny", ["train.freeze_av_steps=-1"])


def test_grad_norm_counts_only_what_the_step_trains():
    import copy

    from mirasol_ray.bench.step import synthetic_batch
    from mirasol_ray.train.step import AV_MODULES, train_step

    cfg = load_config("tiny", ["train.steps=10", "train.warmup_steps=1", "train.freeze_av_steps=5",
                               "train.grad_clip=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = synthetic_batch(cfg, 2)
    twin = copy.deepcopy(model)
    twin(batch)["loss"].backward()
    grads = {n: p.grad.norm() for n, p in twin.named_parameters() if p.grad is not None}
    trained = torch.stack([g for n, g in grads.items() if n.split(".")[0] not in AV_MODULES]).norm()
    everything = torch.stack(list(grads.values())).norm()
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    parts = train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
    assert parts["grad_norm"] == pytest.approx(float(trained), rel=1e-4)
    assert float(everything) > 1.5 * float(trained)  # the frozen path's gradients would have dominated


def test_a_resumed_schedule_follows_the_new_config():
    """The saved schedule is its step count: resumed with more steps (or another freeze), the learning rate at
    the restored step is the new config's, not the old one's carried over from the checkpoint."""
    old = load_config("tiny", ["train.steps=50", "train.warmup_steps=5", "train.freeze_av_steps=30"])
    new = load_config("tiny", ["train.steps=400", "train.warmup_steps=5", "train.freeze_av_steps=10"])
    model = build_model(old.model)
    opt = make_optimizer(model, old.train)
    sched = make_scheduler(opt, old.train)
    for _ in range(40):
        opt.step()
        sched.step()
    state = torch.load(_saved(sched.state_dict()), weights_only=True)  # as a checkpoint stores it
    opt2 = make_optimizer(model, new.train)
    sched2 = make_scheduler(opt2, new.train)
    sched2.load_state_dict(state)
    _, expected = _lrs(new, 41)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(expected[40])
    opt2.step()
    sched2.step()
    assert sched2.last_epoch == 41
    assert max(g["lr"] for g in opt2.param_groups) > 0.9 * new.train.lr  # 41 of 400: still near the peak


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_freeze_patterns_keep_parameters_and_lr_mult_scales_groups():
    """train.freeze: matching parameters leave the optimiser and do not move; train.lr_mult: the first matching
    pattern scales a parameter's learning rate, through warmup and decay alike."""
    from mirasol_ray.bench.step import synthetic_batch
    from mirasol_ray.train.step import apply_freeze, train_step

    cfg = load_config("tiny", ["train.steps=10", "train.warmup_steps=2", "train.lr=1e-3",
                               "train.freeze=[video_encoder.*, text_decoder.embed.weight]",
                               'train.lr_mult={"text_decoder.transformer.blocks.0.*": 0.1, "text_decoder.*": 0.5}'])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    frozen = apply_freeze(model, cfg.train.freeze)
    assert frozen and all(n.startswith("video_encoder.") or n == "text_decoder.embed.weight" for n in frozen)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert not any(id(named[n]) in in_opt for n in frozen)
    mult = {id(p): g["lr_mult"] for g in opt.param_groups for p in g["params"]}
    assert mult[id(named["text_decoder.transformer.blocks.0.attn.to_q.weight"])] == 0.1
    assert mult[id(named["text_decoder.transformer.blocks.1.attn.to_q.weight"])] == 0.5
    assert mult[id(named["combiner.read.score.0.weight"])] == 1.0
    before = {n: p.detach().clone() for n, p in named.items()}
    batch = synthetic_batch(cfg, 2)
    for _ in range(2):
        lrs = {g["lr_mult"]: g["lr"] for g in opt.param_groups}
        assert lrs[0.1] == pytest.approx(0.1 * lrs[1.0]) and lrs[0.5] == pytest.approx(0.5 * lrs[1.0])
        train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
    moved = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert not moved & set(frozen)
    assert "text_decoder.transformer.blocks.0.attn.to_q.weight" in moved


def test_a_pattern_matching_nothing_is_an_error():
    from mirasol_ray.config import ConfigError
    from mirasol_ray.train.prepare import load_prepared

    with pytest.raises(ConfigError, match="train.freeze pattern 'video_encodr.*' matches no parameter"):
        load_prepared("tiny", ["train.freeze=[video_encodr.*]"])
    with pytest.raises(ConfigError, match="train.lr_mult pattern 'decoder.*' matches no parameter"):
        load_prepared("tiny", ["train.lr_mult={decoder.*: 0.1}"])
    load_config("tiny", ["train.freeze=[video_encodr.*]"])  # parsing alone builds no model: the driver's step does
