"""Our model against lucidrains' mirasol-pytorch 0.0.16: forward+backward seconds at matched dimensions, one run.

``python -m benchmarks.lucidrains`` from the repository's root, or ``mirasol bench lucidrains`` in a checkout::

    bash benchmarks/lucidrains_venv.sh                    # once: .venv-lucidrains with their package
    python -m benchmarks.lucidrains --preset small --repeats 5 --json-out lucidrains.json

Ours is timed in this process, theirs in their own venv (:mod:`benchmarks._lucidrains_runner`: their code needs
x-transformers<1.29, FIELD_NOTES), on random inputs of the same shapes, with this process's torch threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from mirasol_ray.bench.model import PROMPT_LEN, TARGET_LEN, synthetic_batch
from mirasol_ray.config import ModelConfig
from mirasol_ray.model.mirasol import Mirasol

HERE = Path(__file__).resolve().parent
LUCIDRAINS_PYTHON = HERE.parent / ".venv-lucidrains" / "bin" / "python"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model preset whose dimensions are matched (small)")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes of each (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--snippets", type=int, default=8)
    p.add_argument("--python", default=str(LUCIDRAINS_PYTHON),
                   help="the Python of the venv holding mirasol-pytorch (made by benchmarks/lucidrains_venv.sh)")
    p.add_argument("--json-out", default="", help="also write the figures here")


def lucidrains_dims(cfg: ModelConfig, snippets: int) -> ModelConfig:
    """Our config at dimensions their code accepts: one width everywhere (theirs has one), divisible by 6 (their
    3D sin-cos position embedding breaks otherwise, FIELD_NOTES), 64-wide heads, square frames, the Transformer
    Combiner (they have no TTM). Their audio chunking (``'b f (t tc) -> b tc f t'``, tc = frames per snippet)
    interleaves time and only yields the shapes it asserts when mel frames per snippet == snippets: so be it."""
    width, heads = 192, 3
    return dataclasses.replace(cfg, video_dim=width, audio_dim=width, dim=width, text_dim=width, video_heads=heads,
                               audio_heads=heads, heads=heads, text_heads=heads, combiner="transformer",
                               sparse_tubes=False, image_size=(cfg.image_size[0], cfg.image_size[0]),
                               mel_frames=snippets, audio_patch=(cfg.audio_patch[0], snippets // 2),
                               max_snippets=max(cfg.max_snippets, snippets))


def compare_lucidrains(cfg: ModelConfig, repeats: int, batch_size: int = 2, snippets: int = 8,
                       python: Path = LUCIDRAINS_PYTHON) -> dict[str, Any]:
    """Median forward+backward seconds of both at matched dims: theirs by ``python`` (first: a peer that fails
    ends the run before ours is timed), then ours here."""
    if not Path(python).exists():
        raise FileNotFoundError(f"{python} missing: run bash benchmarks/lucidrains_venv.sh")
    cfg = lucidrains_dims(cfg, snippets)
    dims = {"dim": cfg.dim, "heads": cfg.heads, "vocab_size": cfg.vocab_size, "image_size": cfg.image_size[0],
            "frames_per_snippet": cfg.frames_per_snippet, "n_mels": cfg.n_mels, "mel_frames": cfg.mel_frames,
            "audio_patch": list(cfg.audio_patch), "patch_size": cfg.patch_size, "tubelet_frames": cfg.tubelet_frames,
            "video_depth": cfg.video_depth, "audio_depth": cfg.audio_depth, "depth": cfg.depth,
            "text_depth": cfg.text_depth, "combiner_depth": cfg.combiner_depth,
            "combiner_tokens": cfg.combiner_tokens, "text_len": PROMPT_LEN + TARGET_LEN, "batch": batch_size,
            "snippets": snippets, "warmup": 1, "repeats": repeats, "threads": torch.get_num_threads()}
    proc = subprocess.run([str(python), "-W", "ignore", str(HERE / "_lucidrains_runner.py"), json.dumps(dims)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"lucidrains' mirasol-pytorch failed: {err}")
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    model, batch = Mirasol(cfg).train(), synthetic_batch(cfg, batch_size, snippets)
    times = []
    for i in range(1 + repeats):
        t0 = time.perf_counter()
        model(batch)["loss"].backward()
        if i:
            times.append(time.perf_counter() - t0)
    ours = statistics.median(times)
    ratio = ours / theirs["fwd_bwd_s"]
    print(f"lucidrains mirasol-pytorch 0.0.16 at width {cfg.dim}, batch {batch_size} x {snippets} snippets: "
          f"ours {ours:.3f} s ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), theirs "
          f"{theirs['fwd_bwd_s']:.3f} s ({theirs['params'] / 1e6:.1f}M params); ours/theirs = {ratio:.2f} "
          f"(target <= 1.0: {'ok' if ratio <= 1.0 else 'MISSED'})")
    return {"dims": dims, "ours_fwd_bwd_s": ours, "ours_times_s": times, "theirs_fwd_bwd_s": theirs["fwd_bwd_s"],
            "theirs_times_s": theirs["times_s"], "theirs_params": theirs["params"], "ratio": ratio,
            "ok": ratio <= 1.0}


def run(args: argparse.Namespace) -> int:
    from mirasol_ray.train.prepare import load_prepared

    if args.repeats < 1 or args.batch_size < 1 or args.snippets < 2:
        raise ValueError("--repeats and --batch-size must be positive, --snippets at least 2")
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_prepared(args.preset).model, dropout=0.0)
    res = {"preset": args.preset, **compare_lucidrains(cfg, args.repeats, args.batch_size, args.snippets,
                                                       Path(args.python))}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json_out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks import run_as_script

    return run_as_script("python -m benchmarks.lucidrains", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
