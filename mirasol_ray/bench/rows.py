"""``mirasol bench rows URL``: what clip rows save against one row per text, on real decoded clips, in one run.

The same clips (the first ``--clips`` of URL, decoded once with the training decode) are laid out two ways:
**clip rows** (this project: a row is a clip with up to ``data.max_texts`` texts) and **text rows** (before: one
row per text, each carrying its own copy of the clip's video and audio; built here from the clip rows, so the
two hold the same numbers, and the model computes on a text-row batch exactly what it did before: the batch
without the K axis). Measured for each:

- object-store bytes per clip: the bytes of a clip's rows, as Ray Data holds them between decoding and training;
- audio-video path GFLOP per step and whole forward+backward GFLOP per step (``torch.utils.flop_counter``, math
  attention), a step being ``--batch-size`` clips' texts;
- train steps/s over those texts (plain torch, one thread), as clips/s and texts/s.

``--make-msrvtt DIR`` first writes MSRVTT-QA-shaped data and benchmarks that: ``--clips`` synthetic clips
(:func:`~mirasol_ray.data.synthetic.generate_clip`) as ``video<i>.mp4`` with ``--questions`` open-ended questions
each (about what each snippet shows and sounds like) in a ``test_qa.json``, built by the ``msrvtt-qa`` converter
(one sample per video, its questions in ``qas``: what MSRVTT-QA's ~10 questions a clip become).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mirasol_ray.data.index import read_samples, sample_rng
from mirasol_ray.data.pipeline import sample_index, stack_rows, to_torch
from mirasol_ray.data.rows import decode_sample_safe
from mirasol_ray.data.shards import build_shards
from mirasol_ray.data.synthetic import ORDINALS, generate_clip
from mirasol_ray.model.mirasol import build_model, texts_of
from mirasol_ray.train.prepare import load_prepared
from mirasol_ray.train.step import make_optimizer, make_scheduler, train_step

AV_PARTS = ("video_encoder", "audio_encoder", "combiner", "av_model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", nargs="?", default="", help="shard folder")
    p.add_argument("--make-msrvtt", default="", metavar="DIR",
                   help="first build MSRVTT-QA-shaped shards in DIR (--questions a clip) and benchmark those")
    p.add_argument("--questions", type=int, default=10, help="questions a clip for --make-msrvtt (at most 12)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--clips", type=int, default=32, help="clips to decode (at least --batch-size)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per step (their texts, as text rows)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout (after one warm-up step)")
    p.add_argument("--json-out", default="")


def make_msrvtt(folder: str, clips: int, questions: int) -> str:
    """MSRVTT-QA-shaped shards of ``clips`` synthetic clips with ``questions`` questions each (module docstring);
    returns their folder."""

    if not 1 <= questions <= 3 * len(ORDINALS):
        raise ValueError(f"--questions must be 1 to {3 * len(ORDINALS)}, got {questions}")
    videos, ann, out = (os.path.join(folder, d) for d in ("videos", "annotations", "shards"))
    os.makedirs(videos, exist_ok=True)
    os.makedirs(ann, exist_ok=True)
    items = []
    for i in range(clips):
        mp4, meta = generate_clip(0, i)
        with open(os.path.join(videos, f"video{i}.mp4"), "wb") as fh:
            fh.write(mp4)
        qas = [(f"what {attr} is the {ORDINALS[e['segment']]} shape?", e[attr]) for e in meta["events"]
               for attr in ("colour", "shape")]
        qas += [(f"what do you hear in the {ORDINALS[e['segment']]} quarter?", e["sound"]) for e in meta["events"]]
        items += [{"question": q, "answer": a, "category_id": 0, "video_id": i, "id": len(items) + j}
                  for j, (q, a) in enumerate(qas[:questions])]
    with open(os.path.join(ann, "test_qa.json"), "w") as fh:
        json.dump(items, fh)
    build_shards("msrvtt-qa", ann, videos, out, shard_size=max(1, clips), progress=False, overwrite=True)
    return out


def decode_clips(url: str, cfg, n: int, *, train: bool = True, label_set: list[str] | None = None,
                 index=None) -> list[dict[str, Any]]:
    """The clip rows of the first ``n`` samples of ``url`` (each ``pos`` its sample index), decoded as the
    pipeline decodes them: with training's frame positions of epoch 0 (what ``data.cache`` holds), or
    evaluation's (``train=False``)."""

    index = index or sample_index(url)
    samples = read_samples(index.url, index.shards, index.refs(np.arange(min(n, len(index)))))
    rows: list[dict[str, Any]] = []
    for i, s in enumerate(samples):
        if isinstance(s, Exception):
            continue
        out, _, _ = decode_sample_safe(s, cfg.data, train=train, label_set=label_set,
                                       rng=sample_rng(cfg.data.seed, 0, str(s["__key__"])))
        for row in out:
            row["pos"] = i
        rows += out
    return rows


def text_rows_of(batch: dict[str, Any]) -> dict[str, Any]:
    """A clip-row batch as one row per text, each with a copy of its clip (the layout before clip rows)."""

    t = texts_of(batch)
    out = {k: batch[k][t["clip"]] for k in ("video", "audio", "audio_present", "snippet_mask", "label")}
    out.update({k: v for k, v in t.items() if k != "clip"})
    out["key"] = [batch["key"][int(c)] for c in t["clip"]]
    return out


def nbytes(batch: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))


def flops(model, batch: dict[str, Any]) -> dict[str, float]:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    counts = fc.get_flop_counts()
    av = sum(sum(counts.get(f"Mirasol.{part}", {}).values()) for part in AV_PARTS)
    return {"av_gflop": av / 1e9, "total_gflop": fc.get_total_flops() / 1e9}


def steps_per_s(model, opt, sched, cfg, batch: dict[str, Any], steps: int) -> float:
    train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def run(args: argparse.Namespace) -> int:
    if args.make_msrvtt:
        args.url = make_msrvtt(args.make_msrvtt, args.clips, args.questions)
    if not args.url:
        raise ValueError("give a shard URL, or --make-msrvtt DIR")
    cfg = load_prepared(args.config, args.set)
    torch.set_num_threads(1)
    rows = decode_clips(args.url, cfg, args.clips)
    if len(rows) < args.batch_size:
        raise ValueError(f"{args.url}: only {len(rows)} clip rows decoded, fewer than --batch-size")
    clips = to_torch(stack_rows(rows, cfg.data))
    texts_per_clip = float(clips["text_mask"].sum()) / len(rows)
    as_texts = text_rows_of(clips)
    res: dict[str, Any] = {"url": args.url, "config": args.config, "overrides": args.set,
                           "clips": len(rows), "texts_per_clip": texts_per_clip, "batch_size": args.batch_size,
                           "machine": f"{os.cpu_count()} CPUs, 1 torch thread", "load_average": os.getloadavg()}
    res["bytes_per_clip"] = {"clip_rows": nbytes(clips) / len(rows), "text_rows": nbytes(as_texts) / len(rows)}
    cfg.train.steps = 10**6
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    step = {k: v[: args.batch_size] for k, v in clips.items()}
    step_texts = text_rows_of(step)
    res["flops_per_step"] = {"clip_rows": flops(model, step), "text_rows": flops(model, step_texts)}
    n_texts = int(step["text_mask"].sum())
    sps = {"clip_rows": steps_per_s(model, opt, sched, cfg, step, args.steps),
           "text_rows": steps_per_s(model, opt, sched, cfg, step_texts, args.steps)}
    res["throughput"] = {k: {"steps_per_s": v, "clips_per_s": v * args.batch_size, "texts_per_s": v * n_texts}
                         for k, v in sps.items()}
    b, f, t = res["bytes_per_clip"], res["flops_per_step"], res["throughput"]
    res["ratios"] = {"bytes per clip, text rows / clip rows": b["text_rows"] / b["clip_rows"],
                     "AV-path FLOPs per step, text rows / clip rows": f["text_rows"]["av_gflop"]
                     / f["clip_rows"]["av_gflop"],
                     "FLOPs per step, text rows / clip rows": f["text_rows"]["total_gflop"]
                     / f["clip_rows"]["total_gflop"],
                     "samples/s, clip rows / text rows": t["clip_rows"]["steps_per_s"] / t["text_rows"]["steps_per_s"]}
    print(f"{len(rows)} clips, {texts_per_clip:.2f} texts a clip; a step: {args.batch_size} clips, {n_texts} texts")
    print(f"{'layout':<12}{'bytes/clip':>12}{'AV GFLOP/step':>15}{'GFLOP/step':>12}{'clips/s':>9}{'texts/s':>9}")
    for k in ("text_rows", "clip_rows"):
        print(f"{k:<12}{b[k]:>12,.0f}{f[k]['av_gflop']:>15.2f}{f[k]['total_gflop']:>12.2f}"
              f"{t[k]['clips_per_s']:>9.2f}{t[k]['texts_per_s']:>9.1f}")
    for k, v in res["ratios"].items():
        print(f"{k:<48}{v:>7.2f}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0
