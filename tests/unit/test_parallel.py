"""parallelize(): FSDP2 and DDP over two gloo processes on the CPU (no Ray), against one process.

Each test spawns two ranks that write what they saw into a file; the assertions run here, in the test process.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mirasol_ray.bench.step import synthetic_batch
from mirasol_ray.config import load_config
from mirasol_ray.data.text import get_tokenizer
from mirasol_ray.train.parallel import (
    build_on_rank,
    evaluating,
    gather_objects,
    is_fsdp,
    mean_over_ranks,
    parallelize,
)
from mirasol_ray.train.step import make_optimizer, make_scheduler, predict_batch, train_step

CPU = torch.device("cpu")
OVERRIDES = ["train.steps=6", "train.warmup_steps=1", "model.cls_mode=head", "model.num_classes=3",
             "data.max_prompt_len=8", "data.max_target_len=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path, *args) -> list[dict]:
    port = _free_port()
    mp.spawn(fn, args=(2, port, str(tmp_path), *args), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _done() -> None:
    """End a rank once its results are written: torch's gloo process group can abort the interpreter's own exit
    ("terminate called without an active exception", SIGABRT) after a clean destroy_process_group, about one run in
    two on this machine; what the rank had to say is in its file already, so skip the interpreter's teardown."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _batch(cfg, rank: int, step: int) -> dict:
    """Every task in one batch, a text per clip: open QA (generated), multiple choice (scored), classification (the
    head)."""
    batch = synthetic_batch(cfg, 3, torch.Generator().manual_seed(100 * rank + step))
    batch["task"][:, 0] = torch.tensor([1, 2, 3])
    batch["option_mask"][:, 0, :3] = True
    batch["answer_idx"][:, 0] = 1
    batch["label"][:] = torch.tensor([0, -1, 2])
    return batch


def _records(model, cfg, batches) -> list[dict]:
    tok = get_tokenizer(cfg.data.tokenizer)
    with evaluating(model) as m:
        return [r for b in batches for r in predict_batch(m, b, tok, CPU, label_set=["a", "b", "c"])]


def _train_and_evaluate(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    cfg = load_config("tiny", OVERRIDES)
    result: dict = {}
    for kind in ("fsdp", "ddp"):
        cfg.train.fsdp = kind == "fsdp"
        model = parallelize(build_on_rank(cfg.model, 0, rank), cfg, CPU)
        assert is_fsdp(model) == cfg.train.fsdp
        opt = make_optimizer(model, cfg.train)
        sched = make_scheduler(opt, cfg.train)
        losses = [mean_over_ranks(train_step(model, [_batch(cfg, rank, s)], opt, sched, cfg.train, CPU),
                                  ("loss",))["loss"] for s in range(3)]
        # rank 1 evaluates two batches, rank 0 one: decoding must not wait on the other rank
        records = _records(model, cfg, [_batch(cfg, rank, 10 + i) for i in range(rank + 1)])
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, os.path.join(out, f"{kind}.pt"))
        result[kind] = {"losses": losses, "records": records}
        dist.barrier()
    # each rank its own dropout masks, the same initial weights
    model = build_on_rank(cfg.model, 0, rank)
    weights = float(sum(p.double().sum() for p in model.parameters()))
    x = torch.ones(1, 64)
    result["seeding"] = {"weights": gather_objects(weights),
                         "masks": gather_objects((torch.nn.functional.dropout(x, 0.5) > 0).int().tolist())}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    _done()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    return tmp, _spawn(_train_and_evaluate, tmp)


def test_fsdp2_and_ddp_step_alike(two_ranks):
    _, ranks = two_ranks
    fsdp, ddp = ranks[0]["fsdp"]["losses"], ranks[0]["ddp"]["losses"]
    # fp32 on the CPU: the same arithmetic up to the order of the gradient reductions
    assert fsdp == pytest.approx(ddp, rel=1e-5)
    assert ranks[1]["fsdp"]["losses"] == fsdp  # the logged loss is the mean over ranks: the same on both
    assert fsdp[2] < fsdp[0]


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_generation_scoring_and_classification_match_one_process(two_ranks, kind):
    """Under FSDP2 (sharded parameters) and DDP, each rank's predictions equal those of one process holding the
    same weights: generated answers, the picked option, the head's class."""
    from mirasol_ray.model.mirasol import build_model

    tmp, ranks = two_ranks
    cfg = load_config("tiny", OVERRIDES)
    ref = build_model(cfg.model)
    ref.load_state_dict(torch.load(tmp / f"{kind}.pt", weights_only=True))
    tok = get_tokenizer(cfg.data.tokenizer)
    for rank, seen in enumerate(ranks):
        expected = [r for i in range(rank + 1) for r in predict_batch(ref, _batch(cfg, rank, 10 + i), tok, CPU,
                                                                      label_set=["a", "b", "c"])]
        assert seen[kind]["records"] == json.loads(json.dumps(expected))
        assert [r["task"] for r in expected] == ["qa", "mcqa", "cls"] * (rank + 1)


def test_ranks_share_initial_weights_but_not_dropout(two_ranks):
    _, ranks = two_ranks
    seeding = ranks[0]["seeding"]
    assert seeding["weights"][0] == seeding["weights"][1]
    assert seeding["masks"][0] != seeding["masks"][1]


def test_parallelize_in_one_process_applies_checkpointing_and_compile():
    from mirasol_ray.model.layers import Block, Transformer

    cfg = load_config("tiny", ["model.activation_checkpointing=true", "train.compile=true"])
    model = parallelize(build_on_rank(cfg.model, 0, 0), cfg, CPU)
    assert not is_fsdp(model)
    assert all(t.checkpointing for t in model.modules() if isinstance(t, Transformer))
    blocks = [b for b in model.modules() if isinstance(b, Block)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)


# ----------------------------------------------------------------------------------------------------------------
# sharded checkpoints


RESUME = ["train.steps=6", "train.warmup_steps=1", "train.fsdp=true", "train.freeze_av_steps=1"]
"""The audio-video path held at step 1: a checkpoint at step 1 has no optimiser state for it (see sharded.load)."""


def _resume_batch(cfg, rank: int, step: int, world: int) -> dict:
    """Rank ``rank``'s batch of ``step`` when two ranks share the work; one rank alone takes both halves, so that
    it sees the same global batch (every row full length: the mean over ranks is the mean over rows)."""
    from mirasol_ray.data.pipeline import to_torch

    halves = [synthetic_batch(cfg, 2, torch.Generator().manual_seed(100 * r + step)) for r in range(2)]
    if world == 2:
        return halves[rank]
    return to_torch({k: torch.cat([h[k] for h in halves]).numpy() if torch.is_tensor(halves[0][k])
                     else halves[0][k] + halves[1][k] for k in halves[0]})


def _sharded_run(rank: int, world: int, port: int, out: str, phase: str) -> None:
    from mirasol_ray.train import sharded

    _init(rank, world, port)
    cfg = load_config("tiny", RESUME)
    model = parallelize(build_on_rank(cfg.model, 0, rank), cfg, CPU)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    first = 0
    if phase == "resume":
        sharded.load(os.path.join(out, "merged"), model, opt)
        sched.load_state_dict(torch.load(os.path.join(out, "sched.pt"), weights_only=True))
        first = 2
    losses = []
    for step in range(first, 4):
        if phase == "uninterrupted" and step == 2:
            sharded.save(os.path.join(out, f"local-rank{rank}"), model, opt)  # a folder of its own per rank
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(sched.state_dict(), os.path.join(out, "sched.pt"))
                torch.save(full, os.path.join(out, "full.pt"))
        batch = _resume_batch(cfg, rank, step, world)
        losses.append(mean_over_ranks(train_step(model, [batch], opt, sched, cfg.train, CPU), ("loss",))["loss"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses}, f)
    _done()


def test_sharded_checkpoint_from_two_ranks_resumes_on_two_and_on_one(tmp_path):
    """Two FSDP2 ranks write a sharded checkpoint at step 2, each into a folder of its own (merged afterwards, as
    Ray Train merges what every worker reports); resumed on two ranks and on one, steps 3 and 4 give the losses of
    the run that never stopped (fp32 on the CPU; one rank adds the gradients in another order: rel 1e-5)."""
    import shutil

    from mirasol_ray.train import sharded

    ranks = _spawn(_sharded_run, tmp_path, "uninterrupted")
    expected = ranks[0]["losses"][2:]
    merged = tmp_path / "merged"
    for r in range(2):
        shutil.copytree(tmp_path / f"local-rank{r}", merged, dirs_exist_ok=True)
    assert sorted(os.listdir(merged)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sharded.is_sharded(str(merged))
    again = _spawn(_sharded_run, tmp_path, "resume")
    assert again[0]["losses"] == pytest.approx(expected, rel=1e-5)
    mp.spawn(_sharded_run, args=(1, _free_port(), str(tmp_path), "resume"), nprocs=1, join=True)
    alone = json.loads((tmp_path / "rank0.json").read_text())["losses"]
    assert alone == pytest.approx(expected, rel=1e-5)

    # one process, no process group: the whole model's weights (evaluation, export), and train.init_from
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    weights = sharded.model_weights(str(merged))
    assert weights.keys() == full.keys()
    for k in full:
        assert torch.equal(weights[k], full[k]), k
    from mirasol_ray.model.mirasol import build_model

    cfg = load_config("tiny", ["model.cls_mode=head", "model.num_classes=3"])
    fresh = build_model(cfg.model)
    info = sharded.load_weights_into(fresh, str(merged))
    assert info["missing"] == ["cls_head.0.bias", "cls_head.0.weight", "cls_head.1.bias", "cls_head.1.weight"]
    assert torch.equal(fresh.state_dict()["text_decoder.embed.weight"], full["text_decoder.embed.weight"])
