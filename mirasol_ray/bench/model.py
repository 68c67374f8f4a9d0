"""``mirasol bench model``: how the model's cost grows with the number of snippets, against a flat baseline.

For S in --snippets, one forward+backward at batch 1 of
  - Mirasol (the preset's model): snippet encoders, Combiner, time-aligned model, text decoder;
  - a flat baseline: one causal transformer over all the clip's video and audio tokens, as wide as the time-aligned
    model and as deep as the stack a token passes through in Mirasol (video depth + combiner depth + depth), with
    the same tubelet/patch embeddings and the same text decoder.
FLOPs come from ``torch.utils.flop_counter``; activation memory is the bytes autograd saves for backward (what
stays alive at the forward/backward boundary, parameters excluded), counted by storage through
``saved_tensors_hooks``: on a GPU this is what dominates peak memory, and it is measurable on a CPU.

The comparison with lucidrains' mirasol-pytorch is a research tool of the repository (``python -m
benchmarks.lucidrains``). ``--params --preset NAME`` prints the per-component parameter count.
``--memory --preset NAME --gpus N [--fsdp] [--batch-size B]`` prints the memory a training step needs per GPU
(parameters, gradients, AdamW state, activations with and without checkpointing) and whether it fits an H100 or
an H200, all counted on the meta device (:mod:`mirasol_ray.bench.plan`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mirasol_ray.bench.plan import memory_plan, print_plan
from mirasol_ray.config import ModelConfig
from mirasol_ray.launch.plots import plt
from mirasol_ray.model.layers import Transformer, init_weights
from mirasol_ray.model.mirasol import Mirasol, param_breakdown
from mirasol_ray.model.text_decoder import TextDecoder
from mirasol_ray.train.prepare import load_prepared

PROMPT_LEN = TARGET_LEN = 16  # a question and a short answer: QA-sized text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", help="model preset whose dimensions are measured (small)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the preset (e.g. data.num_snippets=128 data.frames_per_snippet=4 for --memory)")
    parser.add_argument("--snippets", type=int, nargs="+", default=[4, 8, 16, 32], help="snippet counts")
    parser.add_argument("--params", action="store_true", help="print the preset's parameters per component, exit")
    parser.add_argument("--out", default="", help="folder for model_bench.json and model_scaling.png")
    parser.add_argument("--memory", action="store_true",
                        help="print the preset's memory per GPU for a training step (meta device), exit")
    parser.add_argument("--gpus", type=int, default=1, help="with --memory: data-parallel GPUs")
    parser.add_argument("--fsdp", action="store_true", help="with --memory: FSDP2 (default: DDP)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="with --memory: clips per GPU (default: the preset's train.batch_size)")
    parser.add_argument("--json", action="store_true", help="with --memory: the plan as JSON only")


def run(args: argparse.Namespace) -> int:
    if args.memory:
        return _memory(args)
    cfg = load_prepared(args.preset, args.set).model
    if args.params:
        counts = param_breakdown(cfg)
        for name, n in counts.items():
            print(f"{name:16s} {n:>15,d}  ({n / 1e6:,.1f}M)")
        return 0
    if min(args.snippets) < 2:
        print("error: --snippets must all be >= 2 (the latent loss needs a next snippet)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, max_snippets=max(args.snippets), dropout=0.0)
    rows = [scaling_row(cfg, S) for S in sorted(args.snippets)]
    report: dict[str, Any] = {"preset": args.preset, "config": cfg.to_dict(), "text_tokens": PROMPT_LEN + TARGET_LEN,
                              "threads": torch.get_num_threads(), "scaling": rows, "targets": targets(rows)}
    print_scaling(rows, report["targets"])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_bench.json").write_text(json.dumps(report, indent=2))
        plot(rows, out / "model_scaling.png")
        print(f"wrote {out / 'model_bench.json'} and {out / 'model_scaling.png'}")
    return 0


def _memory(args: argparse.Namespace) -> int:
    if args.gpus <= 0 or args.batch_size < 0:
        raise ValueError("--gpus must be positive and --batch-size >= 0")
    cfg = load_prepared(args.preset, args.set)
    plan = memory_plan(cfg, args.gpus, args.fsdp, args.batch_size or cfg.train.batch_size)
    plan["preset"] = args.preset
    if args.set:
        plan["overrides"] = list(args.set)
    if args.json:
        print(json.dumps(plan))
    else:
        print_plan(plan, args.preset + "".join(f" {kv}" for kv in args.set))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the flat baseline


class FlatBaseline(nn.Module):
    """One causal transformer over every video and audio token of the clip, in time order, then the text decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, p, (pm, pt) = cfg.dim, cfg.patch_size, cfg.audio_patch
        (H, W), F = cfg.image_size, cfg.frames_per_snippet
        self.cfg = cfg
        self.tubelet = nn.Linear(cfg.tubelet_frames * p * p * 3, D)
        self.audio_patch = nn.Linear(pm * pt, D)
        n_tokens = (F // cfg.tubelet_frames) * (H // p) * (W // p) + (cfg.n_mels // pm) * (cfg.mel_frames // pt)
        self.pos = nn.Parameter(0.02 * torch.randn(n_tokens, D))  # within a snippet
        self.snippet_pos = nn.Embedding(cfg.max_snippets, D)
        self.transformer = Transformer(D, cfg.video_depth + cfg.combiner_depth + cfg.depth, cfg.heads,
                                       cfg.mlp_ratio)
        self.text_decoder = TextDecoder(cfg)
        self.apply(init_weights)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        cfg, p = self.cfg, self.cfg.patch_size
        pm, pt = cfg.audio_patch
        video = batch["video"].float() / 255.0
        S = video.shape[1]
        v = self.tubelet(rearrange(video, "b s (f pt) (h ph) (w pw) c -> b s (f h w) (pt ph pw c)",
                                   pt=cfg.tubelet_frames, ph=p, pw=p))
        a = self.audio_patch(rearrange(batch["audio"], "b s (m pm) (t pt) -> b s (m t) (pm pt)", pm=pm, pt=pt))
        x = torch.cat([v, a], dim=2) + self.pos + self.snippet_pos.weight[:S, None]  # (B, S, N, D)
        x = rearrange(x, "b s n d -> b (s n) d")
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        context = self.transformer(x, mask=causal)
        seq = torch.cat([batch["prompt_ids"], batch["target_ids"]], dim=1).long()
        valid = torch.cat([batch["prompt_mask"], batch["target_mask"]], dim=1)
        context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        h = self.text_decoder(seq, valid, context, context_mask)[:, batch["prompt_ids"].shape[1]:-1]
        logits = self.text_decoder.logits(h).float()
        return nn.functional.cross_entropy(rearrange(logits, "b l v -> (b l) v"),
                                           batch["target_ids"][:, 1:].long().flatten())


# ----------------------------------------------------------------------------------------------------------------
# measuring


def synthetic_batch(cfg: ModelConfig, B: int, S: int) -> dict[str, Tensor]:
    F, (H, W) = cfg.frames_per_snippet, cfg.image_size
    target = torch.randint(3, cfg.vocab_size, (B, TARGET_LEN), dtype=torch.int32)
    target[:, 0], target[:, -1] = cfg.bos_id, cfg.eos_id
    return {
        "video": torch.randint(0, 256, (B, S, F, H, W, 3), dtype=torch.uint8),
        "audio": torch.randn(B, S, cfg.n_mels, cfg.mel_frames),
        "audio_present": torch.ones(B, dtype=torch.bool),
        "snippet_mask": torch.ones(B, S, dtype=torch.bool),
        "task": torch.ones(B, dtype=torch.int64),
        "prompt_ids": torch.randint(3, cfg.vocab_size, (B, PROMPT_LEN), dtype=torch.int32),
        "prompt_mask": torch.ones(B, PROMPT_LEN, dtype=torch.bool),
        "target_ids": target, "target_mask": torch.ones(B, TARGET_LEN, dtype=torch.bool),
        "label": torch.full((B,), -1, dtype=torch.int64),
    }


def _loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(batch)
    return out["loss"] if isinstance(out, dict) else out


def measure(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
    """FLOPs of one forward+backward (first run), then its saved-activation bytes and time (second run).

    FLOPs are counted with the math attention backend: the flop counter has no formula for the fused CPU kernel
    (it would count attention as 0), while the math backend's matmuls count the dense attention work.
    """
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        _loss(model, batch).backward()
    model.zero_grad(set_to_none=True)

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, batch)
    loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return {"flops": float(counter.get_total_flops()), "activation_bytes": float(sum(saved.values())),
            "seconds": seconds}


def scaling_row(cfg: ModelConfig, S: int) -> dict[str, Any]:
    batch = synthetic_batch(cfg, 1, S)
    ours = measure(Mirasol(cfg).train(), batch)
    flat = measure(FlatBaseline(cfg).train(), batch)
    return {"snippets": S, "ours": ours, "flat": flat,
            "ours_flops_per_snippet": ours["flops"] / S, "flops_ratio": ours["flops"] / flat["flops"]}


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Cost per snippet within +-10% of its value at the fewest snippets; <= 1/4 of the flat FLOPs at the most."""
    per = [r["ours_flops_per_snippet"] for r in rows]
    spread = max(abs(p / per[0] - 1) for p in per)
    last = rows[-1]
    return {"per_snippet_max_deviation": spread, "per_snippet_ok": spread <= 0.10,
            "flops_ratio_at_max": last["flops_ratio"], "flops_ratio_ok": last["flops_ratio"] <= 0.25,
            "max_snippets": last["snippets"]}


def print_scaling(rows: list[dict[str, Any]], t: dict[str, Any]) -> None:
    print(f"{'S':>3} {'ours GFLOP':>11} {'/snippet':>9} {'flat GFLOP':>11} {'ours/flat':>9} "
          f"{'ours act MiB':>12} {'flat act MiB':>12} {'ours s':>7} {'flat s':>7}")
    mib = 2 ** 20
    for r in rows:
        o, f = r["ours"], r["flat"]
        print(f"{r['snippets']:>3} {o['flops'] / 1e9:>11.1f} {r['ours_flops_per_snippet'] / 1e9:>9.2f} "
              f"{f['flops'] / 1e9:>11.1f} {r['flops_ratio']:>9.3f} {o['activation_bytes'] / mib:>12.1f} "
              f"{f['activation_bytes'] / mib:>12.1f} {o['seconds']:>7.2f} {f['seconds']:>7.2f}")
    print(f"per-snippet FLOPs deviate at most {t['per_snippet_max_deviation']:.1%} from S={rows[0]['snippets']} "
          f"(target <= 10%: {'ok' if t['per_snippet_ok'] else 'MISSED'}); at S={t['max_snippets']} ours/flat = "
          f"{t['flops_ratio_at_max']:.3f} (target <= 0.25: {'ok' if t['flops_ratio_ok'] else 'MISSED'})")


def plot(rows: list[dict[str, Any]], path: Path) -> None:

    S = [r["snippets"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("ours", "Mirasol (snippets + combiner)"), ("flat", "flat causal transformer")):
        ax1.plot(S, [r[key]["flops"] / 1e12 for r in rows], "o-", label=label)
        ax2.plot(S, [r[key]["activation_bytes"] / 2 ** 30 for r in rows], "o-", label=label)
    for ax, ylabel in ((ax1, "TFLOPs, forward + backward"), (ax2, "activation memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(S, [str(s) for s in S])
        ax.set_xlabel("snippets per clip")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle("mirasol bench model: cost against clip length (batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(prog="mirasol bench model", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
