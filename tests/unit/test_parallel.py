"""parallelize(): FSDP2 and DDP over two gloo processes on the CPU (no Ray), against one process.

Each test spawns two ranks that write what they saw into a file; the assertions run here, in the test process.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mirasol_ray.bench.step import synthetic_batch
from mirasol_ray.config import load_config
from mirasol_ray.data.text import get_tokenizer
from mirasol_ray.train.parallel import (
    build_on_rank,
    full_parameters,
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


def _batch(cfg, rank: int, step: int) -> dict:
    """Every task in one batch: open QA (generated), multiple choice (scored), classification (the head)."""
    batch = synthetic_batch(cfg, 3, torch.Generator().manual_seed(100 * rank + step))
    batch["task"][:] = torch.tensor([1, 2, 3])
    batch["option_mask"][:, :3] = True
    batch["answer_idx"][:] = 1
    batch["label"][:] = torch.tensor([0, -1, 2])
    return batch


def _records(model, cfg, batches) -> list[dict]:
    tok = get_tokenizer(cfg.data.tokenizer)
    with full_parameters(model) as m:
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
    dist.destroy_process_group()


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
