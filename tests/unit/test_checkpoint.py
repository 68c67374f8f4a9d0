"""Checkpoint files without Ray: full model + optimiser state round trip, resolving URIs, finetune init."""

import json

import pytest
import torch

from mirasol_ray.bench.step import synthetic_batch
from mirasol_ray.config import load_config
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.train import checkpoint as ckpt
from mirasol_ray.train.step import make_optimizer, make_scheduler, train_step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("tiny", ["train.steps=4", "train.warmup_steps=1"])
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    batch = synthetic_batch(cfg, 2)
    for _ in range(2):
        train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
    run = tmp_path_factory.mktemp("run")
    for step in (1, 2):
        model_sd, optim_sd = ckpt.gather_state(model, opt)
        ckpt.write_checkpoint(str(run / f"checkpoint_{step}"), model, model_sd, optim_sd, sched, step=step,
                              run_config=cfg.to_dict(), label_set=["a", "b"])
    return cfg, model, opt, sched, batch, run


def test_resume_restores_model_optimizer_and_scheduler(trained):
    cfg, model, opt, sched, batch, run = trained
    fresh = build_model(cfg.model)
    fresh_opt = make_optimizer(fresh, cfg.train)
    fresh_sched = make_scheduler(fresh_opt, cfg.train)
    model_sd = ckpt.load_torch(str(run / "checkpoint_2" / ckpt.MODEL_FILE))["model"]
    st = ckpt.load_torch(str(run / "checkpoint_2" / ckpt.STATE_FILE))
    ckpt.restore_state(fresh, fresh_opt, model_sd, st["optimizer"])
    fresh_sched.load_state_dict(st["scheduler"])
    # one more identical step from both: same parameters after it, so optimiser moments came back too
    train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
    train_step(fresh, [batch], fresh_opt, fresh_sched, cfg.train, torch.device("cpu"))
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_resume_while_the_av_path_is_held(tmp_path):
    """Stopped while freeze_av_steps holds the audio-video path (no gradients yet, so no optimiser state for it):
    the checkpoint restores, and the resumed run steps exactly like the one that never stopped."""
    cfg = load_config("tiny", ["train.steps=6", "train.warmup_steps=1", "train.freeze_av_steps=3"])
    batch = synthetic_batch(cfg, 2)

    def fresh():
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = make_optimizer(model, cfg.train)
        return model, opt, make_scheduler(opt, cfg.train)

    model, opt, sched = fresh()
    for _ in range(2):
        train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
    model_sd, optim_sd = ckpt.gather_state(model, opt)
    ckpt.write_checkpoint(str(tmp_path / "checkpoint_2"), model, model_sd, optim_sd, sched, step=2)
    resumed, ropt, rsched = fresh()
    st = ckpt.load_torch(str(tmp_path / "checkpoint_2" / ckpt.STATE_FILE))
    ckpt.restore_state(resumed, ropt, ckpt.load_torch(str(tmp_path / "checkpoint_2" / ckpt.MODEL_FILE))["model"],
                       st["optimizer"])
    rsched.load_state_dict(st["scheduler"])
    for _ in range(3):  # across the release of the audio-video path at step 3
        train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
        train_step(resumed, [batch], ropt, rsched, cfg.train, torch.device("cpu"))
    for (n, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_resolve_and_rebuild_from_checkpoint_alone(trained, tmp_path):
    cfg, model, *_ , run = trained
    assert ckpt.resolve_checkpoint(str(run)).endswith("checkpoint_2/model.pt")  # latest by step
    assert ckpt.read_meta(ckpt.resolve_checkpoint(str(run)))["label_set"] == ["a", "b"]
    rebuilt = ckpt.load_model_from(str(run / "checkpoint_1"))
    assert rebuilt.config == build_model(cfg.model).config
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ckpt.resolve_checkpoint(str(tmp_path / "nowhere"))


def test_finetune_init_skips_mismatched_head(trained):
    cfg, *_ , run = trained
    head_cfg = load_config("tiny", ["model.cls_mode=head"]).model
    head_cfg.num_classes = 3
    model = build_model(head_cfg)
    info = ckpt.load_weights_into(model, str(run))
    assert info["missing"] and all(k.startswith("cls_head") for k in info["missing"])
    src = ckpt.load_torch(ckpt.resolve_checkpoint(str(run)))["model"]
    torch.testing.assert_close(model.state_dict()["text_decoder.embed.weight"], src["text_decoder.embed.weight"])


def test_checkpoints_load_with_weights_only(trained):
    *_, run = trained
    state = torch.load(run / "checkpoint_1" / ckpt.MODEL_FILE, weights_only=True)
    assert set(state) == {"config", "model"}
    json.dumps(state["config"])


def test_a_sharded_checkpoint_reads_like_a_full_one(trained, tmp_path):
    """A sharded checkpoint folder (the DCP shards, and model.pt holding the config alone) serves everything that
    reads checkpoints: the whole model for evaluation and prediction, export into one file, and train.init_from.
    Written here by one process (no process group); tests/unit/test_parallel.py writes one from two ranks."""
    from mirasol_ray.train import sharded

    cfg, model, opt, sched, batch, run = trained
    folder = tmp_path / "run" / "checkpoint_9"
    sharded.save(str(folder), model, opt)
    ckpt.write_checkpoint(str(folder), model, None, None, sched, step=9, run_config=cfg.to_dict(), sharded=True)
    small = torch.load(folder / ckpt.MODEL_FILE, weights_only=True)
    assert small["model"] == {} and ckpt.is_sharded_state(small)
    assert torch.load(folder / ckpt.STATE_FILE, weights_only=True)["optimizer"] is None  # it is in the shards
    assert ckpt.resolve_checkpoint(str(tmp_path / "run")) == str(folder / ckpt.MODEL_FILE)

    rebuilt = ckpt.load_model_from(str(tmp_path / "run"))
    for name, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
    info = ckpt.export(str(folder), str(tmp_path / "model.pt"))
    assert info["step"] == 9 and info["parameters"] == sum(v.numel() for v in model.state_dict().values())
    exported = ckpt.load_model_from(str(tmp_path / "model.pt"))
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in model.state_dict().items())

    head_cfg = load_config("tiny", ["model.cls_mode=head"]).model
    head_cfg.num_classes = 3
    fresh = build_model(head_cfg)
    info = ckpt.load_weights_into(fresh, str(folder))
    assert info["missing"] and all(k.startswith("cls_head") for k in info["missing"])
    assert torch.equal(fresh.state_dict()["text_decoder.embed.weight"], model.state_dict()["text_decoder.embed.weight"])
