"""``mirasol bench step --preset NAME``: the train step of :mod:`mirasol_ray.train.step` in plain torch, no Ray.

Feeds a fixed batch of the preset's geometry (uint8 video, log-mel audio, text) so that only the model and the
optimiser are timed; reports samples/s, tokens/s, and on a GPU the model FLOPs utilisation (FLOPs of one
forward+backward counted by ``torch.utils.flop_counter``, over step time, over the card's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mirasol_ray.config import load_config

# Dense bf16 peak FLOP/s (no sparsity), by substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=0, help="clips; default: the preset's train.batch_size")
    p.add_argument("--texts-per-clip", type=int, default=1,
                   help="texts each clip carries (at most data.max_texts); the clip is encoded once for all")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--json-out", default="")


def synthetic_batch(cfg, batch_size: int, generator: torch.Generator | None = None, texts: int = 1) -> dict:
    """A batch with the schema's shapes and dtypes: random pixels/mel; ``texts`` open-ended questions of full
    length per clip (the other text entries padding)."""
    from mirasol_ray.data.schema import row_spec

    g = generator or torch.Generator().manual_seed(0)
    spec = row_spec(cfg.data)
    out = {}
    for name, (shape, _) in spec.items():
        full = (batch_size, *shape)
        if name == "video":
            out[name] = torch.randint(0, 256, full, dtype=torch.uint8, generator=g)
        elif name == "audio":
            out[name] = torch.randn(full, generator=g)
        elif name.endswith("_mask") or name in ("audio_present",):
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
    from torch.utils.flop_counter import FlopCounterMode

    from mirasol_ray.model.mirasol import build_model
    from mirasol_ray.train.step import count_tokens, make_optimizer, make_scheduler, move_batch, train_step

    cfg = load_config(args.preset, args.set)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    bs = args.batch_size or cfg.train.batch_size
    cfg.train.steps = args.steps + args.warmup + 1
    cfg.train.warmup_steps = 1
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if args.compile:
        model = torch.compile(model)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    batch = synthetic_batch(cfg, bs, texts=args.texts_per_clip)
    tokens = count_tokens(batch)

    with FlopCounterMode(display=False) as fc:  # one forward+backward, counted once
        from mirasol_ray.train.step import autocast

        with autocast(device, cfg.train.precision):
            out = model(move_batch(batch, device))
        out["loss"].backward()
    flops = fc.get_total_flops()
    opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        train_step(model, [batch], opt, sched, cfg.train, device)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, [batch], opt, sched, cfg.train, device)
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    res = {"preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else
           f"cpu ({torch.get_num_threads()} threads)", "batch_size": bs, "texts_per_clip": args.texts_per_clip,
           "step_s": dt,
           "samples_per_s": bs / dt, "tokens_per_s": tokens / dt, "flops_per_step": flops,
           "achieved_tflops": flops / dt / 1e12,
           "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        res["mfu"] = flops / dt / peak if peak else None
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    for k, v in res.items():
        print(f"{k:<18}{v:.4g}" if isinstance(v, float) else f"{k:<18}{v}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
