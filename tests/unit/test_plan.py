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


def _block_forward_flops(cfg) -> tuple[int, int]:
    """(FLOPs of every transformer block's forward, FLOPs of the blocks' last MLP projection) of one forward at
    batch 2, on real CPU tensors with attention as two matmuls, attributed to modules by the counter."""
    from mirasol_ray.model.layers import Block

    torch.manual_seed(0)
    model = build_model(cfg.model)
    names = [n for n, m in model.named_modules() if isinstance(m, Block)]
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(synthetic_batch(cfg, 2))
    by_module = counter.get_flop_counts()

    def total(name: str) -> int:
        return sum(by_module[f"Mirasol.{name}"].values())

    last = [f"{n}.mlp.2" if isinstance(model.get_submodule(f"{n}.mlp"), torch.nn.Sequential) else f"{n}.mlp.down"
            for n in names]
    return sum(total(n) for n in names), sum(total(n) for n in last)


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
    # hardware FLOPs add every block's forward again, counted independently here, except its last MLP projection:
    # torch's non-reentrant checkpoint stops recomputing once the last tensor backward needs is back, and that
    # projection's output is not one
    blocks, last = _block_forward_flops(cfg)
    assert 0 < last < blocks
    assert recomputed["hardware"] - recomputed["model"] == blocks - last


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


def test_memory_plan_bytes_follow_the_parameter_counts():
    """Every state figure of the plan from the parameter counts (fp32 weights, AdamW's two fp32 moments, bf16
    copies in flight), the totals their sums, and "fits" the comparison with the usable part of each card."""
    from mirasol_ray.bench.plan import CARDS, USABLE
    from mirasol_ray.model.layers import Block
    from mirasol_ray.model.mirasol import param_breakdown

    cfg = load_config("tiny")
    P = param_breakdown(cfg.model)["total"]
    blocks = [sum(p.numel() for p in b.parameters()) for b in meta_model(cfg.model, False).modules()
              if isinstance(b, Block)]
    root = P - sum(blocks)
    assert root > 0 and len(blocks) == 10
    for gpus, fsdp in ((1, False), (4, False), (4, True), (8, True)):
        plan = memory_plan(cfg, gpus, fsdp, 2)
        b, acts = plan["bytes"], plan["activations"]
        assert plan["preset_params"] == P
        if fsdp:  # split over the GPUs, plus the root unit and two gathered blocks in flight
            assert (b["parameters"], b["gradients"], b["optimizer"]) == (4 * P / gpus, 4 * P / gpus, 8 * P / gpus)
            assert b["in_flight"] == root * 6 + 2 * max(blocks) * 8
        else:  # every GPU holds everything, whatever the number of GPUs
            assert (b["parameters"], b["gradients"], b["optimizer"], b["in_flight"]) == (4 * P, 8 * P, 8 * P, 2 * P)
        states = b["parameters"] + b["gradients"] + b["optimizer"] + b["in_flight"]
        assert b["activations_without_checkpointing"] == acts["total"]
        assert b["activations_with_checkpointing"] == (acts["outside_blocks"] + acts["block_inputs"]
                                                       + acts["largest_block"])
        assert plan["totals"] == {"without_checkpointing": states + acts["total"],
                                  "with_checkpointing": states + b["activations_with_checkpointing"]}
        for card, cap in CARDS.items():
            assert plan["fits"][card] == {k: v <= USABLE * cap for k, v in plan["totals"].items()}


def test_mirasol3b_on_eight_h100s_needs_activation_checkpointing():
    """The 3B preset (counted on the meta device, nothing allocated) on 8 GPUs at its batch: without activation
    checkpointing it fits no H100 (its activations alone take most of the card); FSDP2 with checkpointing needs
    under a third of what replicated DDP needs (docs/PERFORMANCE.md records the figures)."""
    from mirasol_ray.model.mirasol import param_breakdown

    cfg = load_config("mirasol3b")
    P = param_breakdown(cfg.model)["total"]
    assert 2.5e9 < P < 3.5e9
    fsdp = memory_plan(cfg, 8, True, cfg.train.batch_size)
    ddp = memory_plan(cfg, 8, False, cfg.train.batch_size)
    assert fsdp["fits"]["H100 80GB"] == {"without_checkpointing": False, "with_checkpointing": True}
    assert not ddp["fits"]["H100 80GB"]["without_checkpointing"]
    assert fsdp["totals"]["with_checkpointing"] < ddp["totals"]["with_checkpointing"] / 3
    assert fsdp["bytes"]["optimizer"] == 8 * P / 8 and ddp["bytes"]["optimizer"] == 8 * P


def test_bench_step_reports_model_flops_and_text_tokens(tmp_path, capsys):
    """``mirasol bench step`` on the CPU: FLOPs are the meta-device model count (not the fused kernel's), tokens
    are the batch's text tokens (prompt + target), not video frames."""
    from mirasol_ray.cli import main

    out = tmp_path / "step.json"
    assert main(["bench", "step", "--preset", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                 "--device", "cpu", "--json-out", str(out)]) == 0
    res = json.loads(out.read_text())
    cfg = load_config("tiny")
    assert res["model_flops_per_step"] == res["hardware_flops_per_step"] == step_flops(cfg, 2)["model"]
    text = 2 * (cfg.data.max_prompt_len + cfg.data.max_target_len)  # every bench row is full-length text
    assert res["text_tokens_per_s"] * res["step_s"] == pytest.approx(text, rel=1e-9)
    assert res["samples_per_s"] * res["step_s"] == pytest.approx(2, rel=1e-9)
    assert res["precision"] == "fp32" and "mfu" not in res  # no peak to divide by on a CPU
    assert "text_tokens_per_s" in capsys.readouterr().out


def test_bench_model_memory_prints_the_verdict(capsys):
    from mirasol_ray.cli import main

    assert main(["bench", "model", "--memory", "--preset", "tiny", "--gpus", "8", "--fsdp"]) == 0
    text = capsys.readouterr().out
    assert "FSDP2 over 8 GPUs" in text and f"batch {load_config('tiny').train.batch_size} per GPU" in text
    assert "total, checkpointing" in text and "H100 80GB: fits" in text
    assert main(["bench", "model", "--memory", "--preset", "tiny", "--gpus", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mirasol: error: --gpus must be positive and --batch-size >= 0"


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
