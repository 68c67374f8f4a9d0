"""``mirasol bench step --preset NAME``: the train step of :mod:`mirasol_ray.train.step` in plain torch, no Ray.

Feeds a fixed batch of the preset's geometry (uint8 video, log-mel audio, text) so that only the model and the
optimiser are timed; the model goes through :func:`mirasol_ray.train.parallel.parallelize` as in training
(activation checkpointing and ``--compile`` as the config says). Reports samples/s (clips), text tokens/s, and on a
GPU the model FLOPs utilisation: the model FLOPs of one forward + backward (:func:`mirasol_ray.bench.plan.step_flops`:
counted once on the meta device, attention included, activation recompute not) over the step time, over the
card's dense bf16 peak; ``hfu`` counts the recompute too (hardware FLOPs).

    mirasol bench step --preset base                 # bf16 on a GPU
    mirasol bench step --preset base --compile
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mirasol_ray.bench.plan import step_flops
from mirasol_ray.data.schema import row_spec
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.train.parallel import bf16_compute, parallelize
from mirasol_ray.train.prepare import load_prepared
from mirasol_ray.train.step import count_tokens, make_optimizer, make_scheduler, train_step

PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
"""Dense bf16 peak FLOP/s (no sparsity), by the first substring of ``torch.cuda.get_device_name()`` it holds
(NVIDIA data sheets; the SXM H100 is the plain "H100")."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=0, help="clips; default: the preset's train.batch_size")
    p.add_argument("--texts-per-clip", type=int, default=1,
                   help="texts each clip carries (at most data.max_texts); the clip is encoded once for all")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (train.compile)")
    p.add_argument("--json-out", default="")


def synthetic_batch(cfg, batch_size: int, generator: torch.Generator | None = None, texts: int = 1) -> dict:
    """A batch with the schema's shapes and dtypes: random pixels/mel; ``texts`` open-ended questions of full
    length per clip (the other text entries padding)."""

    g = generator or torch.Generator().manual_seed(0)
    spec = row_spec(cfg.data)
    out = {}
    for name, (shape, dtype) in spec.items():
        full = (batch_size, *shape)
        if name == "video":
            out[name] = torch.randint(0, 256, full, dtype=torch.uint8, generator=g)
        elif name == "audio":
            out[name] = torch.randn(full, generator=g)
        elif dtype == np.bool_:  # masks, audio_present, text_span: everything present
            out[name] = torch.ones(full, dtype=torch.bool)
        elif name.endswith("_ids"):
            out[name] = torch.randint(3, cfg.model.vocab_size, full, dtype=torch.int32, generator=g)
        else:
            out[name] = torch.zeros(full, dtype=torch.int64)
    texts = min(max(1, texts), cfg.data.max_texts)
    out["task"][:] = 1  # open-ended QA: prompt + target
    out["label"][:] = 0 if cfg.model.num_classes else -1
    out["answer_idx"][:] = -1
    out["num_texts"][:] = texts
    out["text_index"][:] = torch.arange(cfg.data.max_texts)
    for name in ("text_mask", "prompt_mask", "target_mask", "option_mask"):
        out[name][:, texts:] = False
    out["text_index"][:, texts:] = -1
    out["key"] = [str(i) for i in range(batch_size)]
    return out


def run(args: argparse.Namespace) -> int:
    cfg = load_prepared(args.preset, args.set)
    if args.compile:
        cfg.train.compile = True
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    bs = args.batch_size or cfg.train.batch_size
    cfg.train.steps = args.steps + args.warmup + 1
    cfg.train.warmup_steps = 1
    texts = min(max(1, args.texts_per_clip), cfg.data.max_texts)
    flops = step_flops(cfg, bs, texts)  # counted once, on the meta device, before anything is allocated
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg.model)
    model = parallelize(model, cfg, device)  # activation checkpointing and compile as the config says
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    batch = synthetic_batch(cfg, bs, texts=texts)
    tokens = count_tokens(batch)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compiles here with --compile
        train_step(model, [batch], opt, sched, cfg.train, device)
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, [batch], opt, sched, cfg.train, device)
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    res = {"preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else
           f"cpu ({torch.get_num_threads()} threads)", "precision": "bf16" if bf16_compute(device, cfg.train.precision)
           else "fp32", "compile": cfg.train.compile, "activation_checkpointing": cfg.model.activation_checkpointing,
           "batch_size": bs, "texts_per_clip": texts, "step_s": dt, "warmup_s": warmup_s, "samples_per_s": bs / dt,
           "text_tokens_per_s": tokens / dt, "model_flops_per_step": flops["model"],
           "hardware_flops_per_step": flops["hardware"], "model_tflops_per_s": flops["model"] / dt / 1e12,
           "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        peak = peak_bf16(torch.cuda.get_device_name())
        res["peak_bf16_tflops"] = peak / 1e12 if peak else None
        res["mfu"] = flops["model"] / dt / peak if peak else None
        res["hfu"] = flops["hardware"] / dt / peak if peak else None
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    for k, v in res.items():
        print(f"{k:<26}{v:.4g}" if isinstance(v, float) else f"{k:<26}{v}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def peak_bf16(device_name: str) -> float | None:
    """The card's dense bf16 peak FLOP/s, or None for a card not in :data:`PEAK_BF16`."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)
