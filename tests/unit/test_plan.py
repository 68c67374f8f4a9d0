"""Costs counted on the meta device: model FLOPs (MFU's numerator) and the per-GPU memory plan."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mirasol_ray.bench.plan import (
    Autocast16,
    memory_plan,
    meta_batch,
    meta_model,
    saved_activations,
    step_flops,
)
from mirasol_ray.bench.step import synthetic_batch
from mirasol_ray.config import load_config
from mirasol_ray.model.layers import Attention
from mirasol_ray.model.mirasol import build_model


def _cpu_flops(cfg, backend=None) -> int:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    counter = FlopCounterMode(display=False)
    with counter, (sdpa_kernel(backend) if backend else torch.enable_grad()):
        model(synthetic_batch(cfg, 2))["loss"].backward()
    return counter.get_total_flops()


def test_model_flops_count_attention_and_not_the_recompute():
    cfg = load_config("tiny")
    flops = step_flops(cfg, 2)
    assert flops["model"] == flops["hardware"]  # no activation checkpointing: nothing is computed twice
    # attention counted in full: what the counter sees when attention runs as two matmuls ...
    assert flops["model"] == _cpu_flops(cfg, SDPBackend.MATH)
    # ... and not the fused CPU kernel's zero
    assert flops["model"] > _cpu_flops(cfg)
    cfg.model.activation_checkpointing = True
    recomputed = step_flops(cfg, 2)
    assert recomputed["model"] == flops["model"]
    # hardware FLOPs add one more forward of the blocks (most, not all, of the forward's third)
    assert flops["model"] < recomputed["hardware"] < flops["model"] * 4 / 3


def test_autocast16_casts_like_cuda_autocast_and_attention_saves_no_weights():
    lin, norm = torch.nn.Linear(8, 8, device="meta"), torch.nn.LayerNorm(8, device="meta")
    x = torch.empty(2, 8, device="meta")
    with Autocast16():
        assert lin(x).dtype == torch.bfloat16 and norm(lin(x)).dtype == torch.float32

    def saved(n: int) -> float:
        with torch.device("meta"):
            attn = Attention(64, 4)
        return saved_activations(attn, torch.empty(1, n, 64, device="meta"))["total"]

    # a fused kernel keeps q, k, v, the output and a row statistic: linear in the tokens, not quadratic
    assert saved(512) == pytest.approx(2 * saved(256), rel=0.05)


def test_memory_plan_splits_state_over_gpus_and_checkpointing_cuts_activations():
    cfg = load_config("tiny")
    params = sum(p.numel() for p in meta_model(cfg.model, False).parameters())
    ddp = memory_plan(cfg, 1, False, 4)
    fsdp = memory_plan(cfg, 8, True, 4)
    assert ddp["bytes"]["optimizer"] == 8 * params and fsdp["bytes"]["optimizer"] == 8 * params / 8
    assert fsdp["bytes"]["parameters"] == 4 * params / 8
    b = fsdp["bytes"]
    assert 0 < b["activations_with_checkpointing"] < b["activations_without_checkpointing"]
    assert ddp["bytes"]["activations_without_checkpointing"] == b["activations_without_checkpointing"]
    assert all(all(v.values()) for v in fsdp["fits"].values())  # 2M parameters fit anything
    # activations grow with the batch (a few saved tensors, masks and position tables, do not)
    double = memory_plan(cfg, 8, True, 8)["bytes"]["activations_without_checkpointing"]
    assert 1.5 * b["activations_without_checkpointing"] < double <= 2 * b["activations_without_checkpointing"]


def test_saved_activations_counts_each_storage_once():
    cfg = load_config("tiny")
    acts = saved_activations(meta_model(cfg.model, False), meta_batch(cfg.data, 2))
    assert acts["total"] >= acts["outside_blocks"] + acts["largest_block"]
    assert acts["block_inputs"] > 0


def test_bench_model_memory_cli_json(capsys):
    from mirasol_ray.cli import main

    assert main(["bench", "model", "--memory", "--preset", "tiny", "--gpus", "2", "--fsdp", "--batch-size", "2",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpus"] == 2 and plan["fsdp"] and plan["batch_size_per_gpu"] == 2
    assert set(plan["fits"]) == {"H100 80GB", "H200 141GB"}
