"""Checkpoint files without Ray: full model + optimiser state round trip, resolving URIs, finetune init."""

import json

import pytest
import torch

from mirasol_ray.bench.step import synthetic_batch
from mirasol_ray.config import load_config
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.train import checkpoint as ckpt
from mirasol_ray.train import strict
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
        folder = str(run / f"checkpoint_{step}")
        ckpt.write_checkpoint(folder, model, model_sd, optim_sd, sched, step=step, run_config=cfg.to_dict(),
                              label_set=["a", "b"])
        assert ckpt.mark_complete(folder, ckpt.local_files(folder), step)
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


def test_resume_while_the_av_path_is_held(tmp_path, fresh_training):
    """Stopped while freeze_av_steps holds the audio-video path (no gradients yet, so no optimiser state for it):
    the checkpoint restores, and the resumed run steps exactly like the one that never stopped."""
    cfg = load_config("tiny", ["train.steps=6", "train.warmup_steps=1", "train.freeze_av_steps=3"])
    batch = synthetic_batch(cfg, 2)


    model, opt, sched = fresh_training(cfg)
    for _ in range(2):
        train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
    model_sd, optim_sd = ckpt.gather_state(model, opt)
    ckpt.write_checkpoint(str(tmp_path / "checkpoint_2"), model, model_sd, optim_sd, sched, step=2)
    resumed, ropt, rsched = fresh_training(cfg)
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


def _copy_checkpoint(src, dst, step=None, complete=True):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(ckpt.COMPLETE_FILE))
    if complete:
        assert ckpt.mark_complete(str(dst), ckpt.local_files(str(dst)), step)
    return dst


def test_latest_is_the_newest_complete_checkpoint(trained, tmp_path):
    """A checkpoint counts once its complete.json is written (last) and every file it lists is there at its size:
    a folder cut short by a stopped upload is never "the latest", for resume, eval and tests alike."""
    *_, run = trained
    src = run / "checkpoint_2"
    runs = tmp_path / "run"
    _copy_checkpoint(src, runs / "checkpoint_00000002_a", 2)
    _copy_checkpoint(src, runs / "checkpoint_00000004_a", 4)
    _copy_checkpoint(src, runs / "checkpoint_00000006_a", complete=False)  # upload stopped before the marker
    cut = _copy_checkpoint(src, runs / "checkpoint_00000008_a", 8)
    data = (cut / ckpt.MODEL_FILE).read_bytes()
    (cut / ckpt.MODEL_FILE).write_bytes(data[: len(data) // 2])  # marked, then its model file was cut short
    (runs / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's file, not a checkpoint
    assert ckpt.latest_checkpoint_dir(str(runs)) == str(runs / "checkpoint_00000004_a")
    assert ckpt.resolve_checkpoint(str(runs)) == str(runs / "checkpoint_00000004_a" / ckpt.MODEL_FILE)
    assert ckpt.complete_step(str(runs / "checkpoint_00000006_a")) is None
    assert not ckpt.mark_complete(str(cut), ckpt.local_files(str(src)), 8)  # a short file is never marked
    empty = tmp_path / "only-partial"
    _copy_checkpoint(src, empty / "checkpoint_00000002_b", complete=False)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at .*only-partial"):
        ckpt.resolve_checkpoint(str(empty))


def test_prune_keeps_what_ray_train_registered_and_the_newest_complete(trained, tmp_path):
    *_, run = trained
    src, runs = run / "checkpoint_2", tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, True), (8, False)):
        _copy_checkpoint(src, runs / f"checkpoint_{step:08d}_a", step if complete else None, complete)
    # Ray Train registered 2 only: it refuses to restore a run whose snapshot names a missing folder
    (runs / ckpt.RAY_SNAPSHOT).write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000002_a"}]}))
    deleted = ckpt.prune_checkpoints(str(runs), keep=1)
    assert sorted(p.rsplit("/", 1)[1] for p in deleted) == ["checkpoint_00000004_a", "checkpoint_00000008_a"]
    assert sorted(p.name for p in runs.iterdir()) == [
        "checkpoint_00000002_a", "checkpoint_00000006_a", ckpt.RAY_SNAPSHOT]


def test_broken_checkpoint_files_are_named(trained, tmp_path):
    *_, run = trained
    good = (run / "checkpoint_2" / ckpt.MODEL_FILE).read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(good[: len(good) - 100])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, needle in (("empty.pt", "empty"), ("cut.pt", "truncated"), ("text.pt", "not a torch")):
        with pytest.raises(ValueError, match=f"{name}.*{needle}"):
            ckpt.check_model_file(str(tmp_path / name))
        with pytest.raises(ValueError, match=name):
            ckpt.load_torch(str(tmp_path / name))
    ckpt.check_model_file(str(run / "checkpoint_2" / ckpt.MODEL_FILE))
    with pytest.raises(IsADirectoryError, match="checkpoint_2"):
        ckpt.check_model_file(str(run / "checkpoint_2"))
    bare = _copy_checkpoint(run / "checkpoint_2", tmp_path / "bare", 2)
    (bare / ckpt.META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="bare has no meta.json"):
        ckpt.require_meta(ckpt.resolve_checkpoint(str(bare)))


def test_a_sharded_checkpoint_reads_like_a_full_one(trained, tmp_path):
    """A sharded checkpoint folder (the DCP shards, and model.pt holding the config alone) serves everything that
    reads checkpoints: the whole model for evaluation and prediction, export into one file, and train.init_from.
    Written here by one process (no process group); tests/unit/test_parallel.py writes one from two ranks."""
    from mirasol_ray.train import sharded

    cfg, model, opt, sched, batch, run = trained
    folder = tmp_path / "run" / "checkpoint_9"
    sharded.save(str(folder), model, opt)
    ckpt.write_checkpoint(str(folder), model, None, None, sched, step=9, run_config=cfg.to_dict(), sharded=True)
    assert ckpt.mark_complete(str(folder), ckpt.local_files(str(folder)), 9)
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

    # a shard missing (an upload cut short): the checkpoint is not complete, so it is nobody's "latest"
    (folder / "__0_0.distcp").unlink()
    assert ckpt.complete_step(str(folder)) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(str(tmp_path / "run"))


def _scored_checkpoint(src, dst, step, metrics, score):
    """A copy of ``src`` as the checkpoint of ``step`` whose meta.json holds ``metrics`` and the run's ``score``."""
    _copy_checkpoint(src, dst, complete=False)
    meta = json.loads((dst / ckpt.META_FILE).read_text())
    (dst / ckpt.META_FILE).write_text(json.dumps({**meta, "step": step, "metrics": metrics, "score": score}))
    assert ckpt.mark_complete(str(dst), ckpt.local_files(str(dst)), step)


def test_a_run_folder_stands_for_its_best_checkpoint_and_pruning_keeps_it(trained, tmp_path):
    """The best is the complete checkpoint with the best value of the run's score, judged from meta.json; one not
    evaluated at its own step is never the best; ``last`` takes the newest; pruning never deletes the best."""
    *_, run = trained
    src, runs = run / "checkpoint_2", tmp_path / "run"
    score = {"metric": "val/qa", "mode": "max"}
    for step, qa in ((2, 0.5), (4, 0.75), (6, None), (8, 0.625)):
        metrics = {"step": step, "loss": 1.0 / step} | ({"val": {"qa": qa, "loss": 2.0 - qa}} if qa else {})
        _scored_checkpoint(src, runs / f"checkpoint_{step:08d}_a", step, metrics, score)
    _copy_checkpoint(src, runs / "checkpoint_00000010_a", complete=False)  # cut short: never chosen
    best = ckpt.best_checkpoint_dir(str(runs))
    assert best == {"uri": str(runs / "checkpoint_00000004_a"), "step": 4, "value": 0.75, **score}
    assert ckpt.resolve_checkpoint(str(runs)) == str(runs / "checkpoint_00000004_a" / ckpt.MODEL_FILE)
    assert ckpt.resolve_checkpoint(str(runs), choice="last") == str(runs / "checkpoint_00000008_a" / ckpt.MODEL_FILE)
    uri, chosen = ckpt.resolve_choice(str(runs))
    assert chosen["choice"] == "best" and "best checkpoint by val/qa (75.00%, max) at step 4" in ckpt.describe_choice(
        chosen)
    assert ckpt.resolve_choice(uri) == (uri, None)  # a model file names itself
    with pytest.raises(ValueError, match="checkpoint choice must be best or last"):
        ckpt.resolve_checkpoint(str(runs), choice="newest")
    # Ray Train registered only the newest; the best was written just before a stop (never registered)
    (runs / ckpt.RAY_SNAPSHOT).write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000008_a"}]}))
    deleted = ckpt.prune_checkpoints(str(runs), keep=1)
    assert sorted(p.rsplit("/", 1)[1] for p in deleted) == [
        "checkpoint_00000002_a", "checkpoint_00000006_a", "checkpoint_00000010_a"]
    assert ckpt.best_checkpoint_dir(str(runs))["step"] == 4


def test_lower_is_better_for_a_loss_and_an_unscored_run_takes_its_newest(trained, tmp_path):
    *_, run = trained
    src = run / "checkpoint_2"
    runs = tmp_path / "loss"
    for step, loss in ((2, 0.9), (4, 0.4), (6, 0.7)):
        _scored_checkpoint(src, runs / f"checkpoint_{step:08d}_a", step, {"val": {"loss": loss}},
                           {"metric": "val/loss", "mode": "min"})
    assert ckpt.best_checkpoint_dir(str(runs))["step"] == 4
    plain = tmp_path / "plain"
    for step in (2, 4):
        _scored_checkpoint(src, plain / f"checkpoint_{step:08d}_a", step, {"loss": 1.0 / step}, None)
    assert ckpt.best_checkpoint_dir(str(plain)) is None
    chosen = ckpt.choose_checkpoint(str(plain), "best")
    assert (chosen["choice"], chosen["step"], chosen["metric"]) == ("last", 4, None)


# ----------------------------------------------------------------------------------------------------------------
# strict loads: a tensor the checkpoint lacks, one it holds that the model lacks, or one of another shape is an error
# naming it (resume, always; train.init_from unless model.init_strict=false), never a tensor silently left as
# initialised


def _altered(state: dict, change: str) -> dict:
    """``state`` (a model state dict) with one tensor left out, one added, or one of another shape."""
    state = dict(state)
    if change == "missing":
        del state["text_decoder.embed.weight"]
    elif change == "unexpected":
        state["text_decoder.extra.weight"] = torch.zeros(3)
    else:
        state["text_decoder.embed.weight"] = state["text_decoder.embed.weight"][:-1]
    return state


NAMED = {"missing": "missing text_decoder.embed.weight", "unexpected": "unexpected text_decoder.extra.weight",
         "mismatched": r"text_decoder.embed.weight is \(\d+, \d+\) in the checkpoint, \(\d+, \d+\) in the model"}


def _sharded_checkpoint(folder, model, opt, sched, cfg, change: str | None = None) -> str:
    """A sharded checkpoint folder written by DCP in this process (no process group), its model state altered."""
    import torch.distributed.checkpoint as dcp

    from mirasol_ray.train import sharded

    states = sharded._states(model, opt)
    if change:
        states["model"] = _altered(states["model"], change)
    dcp.save(states, storage_writer=dcp.FileSystemWriter(str(folder)))
    ckpt.write_checkpoint(str(folder), model, None, None, sched, step=2, run_config=cfg.to_dict(), sharded=True)
    assert ckpt.mark_complete(str(folder), ckpt.local_files(str(folder)), 2)
    return str(folder)


@pytest.mark.parametrize("change", ["missing", "unexpected", "mismatched"])
def test_a_sharded_checkpoint_that_differs_from_the_model_fails_to_load_naming_the_tensor(
        trained, tmp_path, fresh_training, change):
    from mirasol_ray.train import sharded

    cfg, model, opt, sched, *_ = trained
    folder = _sharded_checkpoint(tmp_path / "checkpoint_2", model, opt, sched, cfg, change)
    fresh, fresh_opt, _ = fresh_training(cfg)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(strict.CheckpointMismatch, match=f"checkpoint {folder} does not match the model: {NAMED[change]}"):
        sharded.load(folder, fresh, fresh_opt)
    with pytest.raises(strict.CheckpointMismatch, match=f"train.init_from .*: {NAMED[change]}.*init_strict=false"):
        ckpt.load_weights_into(fresh, folder)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())  # nothing was loaded
    info = ckpt.load_weights_into(fresh, folder, strict=False)  # model.init_strict=false: the rest loads
    left = [] if change == "unexpected" else ["text_decoder.embed.weight"]
    assert info["missing"] == left
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items() if k not in left)
    assert not torch.equal(fresh.state_dict()["video_encoder.pos"], before["video_encoder.pos"])  # trained: it moved


def test_a_matching_sharded_checkpoint_resumes_model_and_optimiser(trained, tmp_path, fresh_training):
    """The strict check lets the checkpoint of the same model through: weights and AdamW moments come back."""
    from mirasol_ray.train import sharded

    cfg, model, opt, sched, *_ = trained
    folder = _sharded_checkpoint(tmp_path / "checkpoint_2", model, opt, sched, cfg)
    fresh, fresh_opt, _ = fresh_training(cfg)
    sharded.load(folder, fresh, fresh_opt)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    by_name = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        if p in opt.state:
            assert torch.equal(fresh_opt.state[by_name[name]]["exp_avg"], opt.state[p]["exp_avg"]), name


@pytest.mark.parametrize("change", ["missing", "unexpected", "mismatched"])
def test_a_full_checkpoint_that_differs_from_the_model_fails_to_load_naming_the_tensor(
        trained, tmp_path, fresh_training, change):
    cfg, model, opt, sched, *_ = trained
    model_sd, optim_sd = ckpt.gather_state(model, opt)
    folder = tmp_path / "checkpoint_2"
    ckpt.write_checkpoint(str(folder), model, _altered(model_sd, change), optim_sd, sched, step=2,
                          run_config=cfg.to_dict())
    assert ckpt.mark_complete(str(folder), ckpt.local_files(str(folder)), 2)
    fresh, fresh_opt, _ = fresh_training(cfg)
    saved = ckpt.load_torch(str(folder / ckpt.MODEL_FILE))["model"]
    with pytest.raises(strict.CheckpointMismatch, match=f"checkpoint {folder} does not match the model: {NAMED[change]}"):
        ckpt.restore_state(fresh, fresh_opt, saved, optim_sd, source=str(folder))
    with pytest.raises(strict.CheckpointMismatch, match=f"train.init_from .*: {NAMED[change]}"):
        ckpt.load_weights_into(fresh, str(folder))
