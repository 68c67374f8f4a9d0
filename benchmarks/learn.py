"""The demo's recipe in plain torch, on clips decoded once into memory, to see what it learns.

``python -m benchmarks.learn`` from the repository's root, or ``mirasol bench learn`` in a checkout. What
``mirasol demo`` runs through Ray, without Ray: the same shards (synthesised as the demo does, or any
folder with ``train/`` and ``val/``), the same decode (:func:`mirasol_ray.bench.rows.decode_clips`, i.e.
:func:`~mirasol_ray.data.rows.decode_sample_safe` with the training frame positions of epoch 0, as ``data.cache``
holds them; held-out clips with the evaluation ones), the same order (:func:`~mirasol_ray.data.pipeline.
train_batches` over the rows in memory: a new permutation of the clips every epoch from ``data.seed``), the same
step (:func:`~mirasol_ray.train.step.train_step`) and the same predictions (:func:`~mirasol_ray.train.step.
predict_batch`, scored by :func:`~mirasol_ray.train.metrics.aggregate`). The recipe: pretraining on captions
(the rows' other texts masked out: what ``data.task=caption`` gives), then fine-tuning on every text
(``data.task=all``) from those weights, with a new optimiser, ``train.freeze_av_steps`` in both stages.

It prints held-out and training-clip accuracy per task, and for the questions whose answer is a colour or a
shape (``qa/video``, ``qa/av_aligned``) the two kinds apart, so that "shapes are not learnt" is a number; for
``qa/temporal``, the questions whose answer is the tone apart from those whose answer is the shape::

    python -m benchmarks.learn --data runs/demo-data --seed 0                # the demo's recipe
    python -m benchmarks.learn --data runs/demo-data --finetune-steps 500 --set model.patch_size=8   # a quick probe
    python -m benchmarks.learn --data runs/demo-data --frames-png frames.png # what the model sees

One process, one torch thread (``--threads``): the figures are those of the demo's single Train worker.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mirasol_ray.data.synthetic import COLOURS, SHAPES

KIND_TASKS = ("qa/video", "qa/av_aligned", "qa/temporal")
"""Tasks scored by the kind of their answer too (:func:`answer_kind`)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="folder with train/ and val/ shards and the manifest; synthesised as the demo's if empty")
    p.add_argument("--clips", type=int, default=960, help="clips to synthesise when --data is empty (the demo's)")
    p.add_argument("--config", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, both stages")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="train.* overrides for the pretraining stage alone (after --set), e.g. train.freeze_av_steps=0")
    p.add_argument("--seed", type=int, default=0, help="train.seed and data.seed (weights, order, frame positions)")
    p.add_argument("--pretrain-steps", type=int, default=-1, help="default: the config's train.steps")
    p.add_argument("--finetune-steps", type=int, default=-1, help="default: 6.5 x the pretraining steps (the demo's)")
    p.add_argument("--train-clips", type=int, default=0, help="use only the first N training clips (0: all)")
    p.add_argument("--val-clips", type=int, default=0, help="score only the first N held-out clips (0: all)")
    p.add_argument("--train-eval-clips", type=int, default=96, help="training clips scored beside the held-out")
    p.add_argument("--eval-every", type=int, default=0, help="fine-tuning steps between scorings (0: at the end)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--frames-png", default="", help="also save a contact sheet of decoded training frames here")
    p.add_argument("--png", default="", help="save the held-out learning curves per task here")
    p.add_argument("--probe-encoder", type=int, default=0, metavar="STEPS",
                   help="instead of the recipe: train the video encoder alone (mean-pooled, a linear head) to name "
                        "each snippet's shape and colour from the caption, for STEPS steps; held-out accuracy")
    p.add_argument("--probe-answers", default="", metavar="QTYPE",
                   help="instead of the recipe: train the audio encoder (or, with --probe-read combiner, both "
                        "encoders and the Combiner) from scratch, with a small head over the clip's snippets, to "
                        "give the answer of its QTYPE question (e.g. number: how many beeps), for --probe-steps "
                        "steps; held-out accuracy")
    p.add_argument("--probe-steps", type=int, default=600, help="steps of --probe-answers")
    p.add_argument("--probe-audio-first", type=int, default=0, metavar="STEPS",
                   help="with --probe-answers and --probe-read combiner: first train the audio encoder alone on the "
                        "answers for STEPS steps, then freeze it and train the rest")
    p.add_argument("--probe-read", choices=("mean", "max", "combiner"), default="mean",
                   help="how --probe-encoder / --probe-answers read a snippet: the mean or the max of its video "
                        "(audio) tokens, or the model's own read (video and audio encoders, then the Combiner; the "
                        "mean of its m tokens)")
    p.add_argument("--json-out", default="")


def answer_kind(task: str, target: str) -> str:
    """``colour`` or ``shape`` for a colour/shape answer of the synthetic set, ``tone`` or ``shape`` for which came
    first (``qa/temporal``), else ``""``."""
    t = target.strip().lower()
    if task == "qa/temporal":
        return "tone" if t == "high tone" else "shape"
    if t in COLOURS:
        return "colour"
    if t in SHAPES:
        return "shape"
    return ""


def score(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """:func:`~mirasol_ray.train.metrics.aggregate`, plus ``<task>:<kind>`` accuracy for :data:`KIND_TASKS`."""
    from mirasol_ray.train.metrics import aggregate, metric_key

    out = aggregate(records)
    by_kind: dict[str, list[float]] = defaultdict(list)
    for r in records:
        key = metric_key(r["task"], r.get("qtype", "other"))
        if key in KIND_TASKS:
            kind = answer_kind(key, r["target"])
            if kind:
                by_kind[f"{key}:{kind}"].append(float(bool(r["correct"])))
    for k, v in sorted(by_kind.items()):
        out[k] = {"metric": "accuracy", "value": sum(v) / len(v), "count": len(v)}
    return out


def load_rows(url: str, cfg, n: int, *, train: bool) -> dict[str, Any]:
    """The first ``n`` samples of ``url`` (0: all), decoded once, as one torch batch of clip rows (``pos`` = the
    row's sample index)."""
    from mirasol_ray.bench.rows import decode_clips
    from mirasol_ray.data.pipeline import find_manifest, sample_index, stack_rows, to_torch

    index = sample_index(url)
    label_set = (find_manifest(url) or {}).get("label_set")
    rows = decode_clips(url, cfg, n or len(index), train=train, label_set=label_set, index=index)
    if not rows:
        raise ValueError(f"{url}: no clip row decoded")
    return to_torch(stack_rows(rows, cfg.data))


def take(batch: dict[str, Any], idx) -> dict[str, Any]:
    idx = torch.as_tensor(idx, dtype=torch.long)
    return {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()]) for k, v in batch.items()}


def only_task(batch: dict[str, Any], task: str) -> dict[str, Any]:
    """The batch with only the texts of ``task`` present: what a row of ``data.task=<task>`` holds."""
    from mirasol_ray.data.schema import TASKS

    return {**batch, "text_mask": batch["text_mask"] & (batch["task"] == TASKS.index(task))}


def predict(model, batch: dict[str, Any], cfg, tok, label_set, batch_size: int = 16,
            qtypes: dict[int, str] | None = None) -> list[dict[str, Any]]:
    from mirasol_ray.train.step import predict_batch

    n = len(batch["key"])
    records: list[dict[str, Any]] = []
    for lo in range(0, n, batch_size):
        part = take(batch, range(lo, min(n, lo + batch_size)))
        records += predict_batch(model, part, tok, torch.device("cpu"), cfg.train.precision, label_set=label_set,
                                 qtypes=qtypes)
    return records


def train_stage(model, rows: dict[str, Any], cfg, steps: int, *, task: str = "", on_step=None) -> list[dict]:
    """``steps`` train steps over ``rows`` in the pipeline's order (:func:`~mirasol_ray.data.pipeline.
    train_batches`, one worker); a new optimiser and schedule, as a new run. Returns the per-step losses."""
    from mirasol_ray.data.index import ReadPosition
    from mirasol_ray.data.pipeline import train_batches
    from mirasol_ray.train.step import make_optimizer, make_scheduler, train_step

    cfg.train.steps = steps
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    source = MemorySource(rows)
    stream = train_batches(source, ReadPosition().for_world(1), rank=0, batch_size=cfg.train.batch_size,
                           seed=cfg.data.seed, shuffle=cfg.data.shuffle, prefetch_batches=0)
    log = []
    for step in range(1, steps + 1):
        batch = next(stream)
        if task:
            batch = only_task(batch, task)
        parts = train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
        log.append({"step": step, "epoch": int(batch["epoch"]), **parts})
        if on_step is not None:
            on_step(step, parts)
    return log


class MemorySource:
    """Clip rows held in this process, served as :class:`~mirasol_ray.data.pipeline.CacheSource` serves the
    object store's: by sample index (``pos``), in the positions' order."""

    def __init__(self, rows: dict[str, Any]):
        self.rows = {k: (v.numpy() if torch.is_tensor(v) else np.asarray(v, dtype=object)) for k, v in rows.items()}
        self.n = int(self.rows["pos"].max()) + 1
        self.where: dict[int, list[int]] = defaultdict(list)
        for r, sample in enumerate(self.rows["pos"].tolist()):
            self.where[sample].append(r)

    def __len__(self) -> int:
        return self.n

    def batches(self, positions: np.ndarray, samples: np.ndarray, epochs: np.ndarray, batch_size: int,
                prefetch_batches: int):
        picked = [(r, g) for g, s in zip(positions.tolist(), samples.tolist()) for r in self.where.get(s, [])]
        for i in range(0, len(picked), batch_size):
            part = picked[i:i + batch_size]
            idx = np.array([r for r, _ in part])
            batch = {k: v[idx] for k, v in self.rows.items() if k != "pos"}
            batch["pos"] = np.array([g for _, g in part], np.int64)
            yield batch


def contact_sheet(rows: dict[str, Any], png: str, tok, clips: int = 8) -> str:
    """Each snippet's first frame of the first ``clips`` clips as decoded (the model's input), under the clip's
    caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mirasol_ray.data.schema import TASKS

    video = rows["video"][:clips].numpy()  # [C, S, F, H, W, 3]
    C, S = video.shape[:2]
    fig, axes = plt.subplots(C, S, figsize=(1.7 * S, 1.9 * C), squeeze=False)
    for c in range(C):
        for s in range(S):
            axes[c, s].imshow(video[c, s, 0], interpolation="nearest")
            axes[c, s].set_axis_off()
        caption = [k for k in range(rows["task"].shape[1])
                   if bool(rows["text_mask"][c, k]) and int(rows["task"][c, k]) == TASKS.index("caption")]
        text = tok.decode(rows["target_ids"][c, caption[0], 1:].tolist()) if caption else rows["key"][c]
        axes[c, 0].set_title(text.split(";")[0], fontsize=7, loc="left")
    fig.suptitle(f"decoded frames, {video.shape[3]}x{video.shape[4]} (first frame of each snippet)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def curves_plot(history: list[dict[str, Any]], png: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    keys = [k for k in history[-1]["val"] if ":" in k or k.startswith(("qa/", "mcqa", "cls"))]
    for k in keys:
        ax.plot([h["step"] for h in history], [h["val"][k]["value"] for h in history],
                ("--" if ":" in k else "-"), label=k)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


ROW_ORDER = ("qa/video", "qa/video:colour", "qa/video:shape", "qa/audio", "qa/av_aligned", "qa/av_aligned:colour",
             "qa/av_aligned:shape", "qa/temporal", "qa/temporal:tone", "qa/temporal:shape", "mcqa", "cls", "caption",
             "caption/segment")


def row_order(scores: dict[str, Any]) -> list[str]:
    """The tasks of ``scores`` in :data:`ROW_ORDER`, then any others (another data set's question types) by name."""
    return [k for k in ROW_ORDER if k in scores] + sorted(k for k in scores if k not in ROW_ORDER)


def print_table(final: dict[str, Any], chance: dict[str, float]) -> None:
    print(f"\n{'task':<22}{'held-out':>9}{'train':>8}{'chance':>8}{'n':>6}")
    for k in row_order(final["val"]):
        v, tr = final["val"][k], final["train"].get(k, {}).get("value", float("nan"))
        c = chance.get(k)
        print(f"{k:<22}{v['value']:>9.3f}{tr:>8.3f}{(f'{c:.3f}' if c else '-'):>8}{v['count']:>6}")


def snippet_labels(rows: dict[str, Any], tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour, shape) index of every snippet (B, S), read from each clip's caption ("a red circle, then ...");
    -1 where a caption does not say."""
    from mirasol_ray.data.schema import TASKS

    colours, shapes = sorted(COLOURS), list(SHAPES)
    B, S = rows["video"].shape[:2]
    out = torch.full((2, B, S), -1, dtype=torch.long)
    for c in range(B):
        k = [k for k in range(rows["task"].shape[1])
             if bool(rows["text_mask"][c, k]) and int(rows["task"][c, k]) == TASKS.index("caption")]
        if not k:
            continue
        parts = tok.decode(rows["target_ids"][c, k[0], 1:].tolist()).split(";")[0].split(", then ")
        for s, part in enumerate(parts[:S]):
            words = part.split()
            if len(words) == 3 and words[1] in colours and words[2] in shapes:
                out[0, c, s], out[1, c, s] = colours.index(words[1]), shapes.index(words[2])
    return out[0], out[1]


def shuffled_batches(n: int, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Batches of ``batch_size`` clip indices out of ``n``, without end: each epoch a new permutation drawn from
    ``g``, its last incomplete batch left out (with ``n < batch_size``: all ``n`` clips, reshuffled every step). A
    new epoch starts wherever the batches run out, whether or not ``batch_size`` divides ``n``."""
    order, lo = torch.randperm(n, generator=g), 0
    while True:
        if lo + batch_size > n:
            order, lo = torch.randperm(n, generator=g), 0
        yield order[lo:lo + batch_size]
        lo += batch_size


def probe_encoder(cfg, train_rows, val_rows, tok, steps: int, seed: int, read: str = "mean") -> dict[str, Any]:
    """The video encoder of ``cfg.model``, trained from scratch to name each snippet's colour and shape (two linear
    heads), batches of ``train.batch_size`` clips in a seeded order: can this encoder, at this resolution and patch
    size, tell the shapes apart, and how soon? ``read``: the heads see the mean (``mean``) or the max (``max``) of
    the snippet's video tokens, or (``combiner``) what the model's decoder reads from: the video and audio encoders
    and the Combiner, as the model builds and initialises them, the mean of the snippet's m tokens."""
    from torch import nn

    from mirasol_ray.model.mirasol import Mirasol
    from mirasol_ray.train.parallel import seed_everything

    seed_everything(seed)
    model = Mirasol(cfg.model)  # built and initialised as in training; only the path to the Combiner is used
    enc = nn.ModuleList([model.video_encoder] + ([model.audio_encoder, model.combiner] if read == "combiner" else []))
    heads = nn.Linear(cfg.model.dim if read == "combiner" else cfg.model.video_dim, len(COLOURS) + len(SHAPES))
    params = [*enc.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    tr_c, tr_s = snippet_labels(train_rows, tok)
    va_c, va_s = snippet_labels(val_rows, tok)
    g = torch.Generator().manual_seed(seed)
    n, bs, nc = len(train_rows["key"]), cfg.train.batch_size, len(COLOURS)

    def logits(rows, lo, hi):
        tokens = model.video_encoder(rows["video"][lo:hi])  # (B, S, Nv, Dv)
        if read == "combiner":
            tokens = model.combiner(tokens, model.audio_encoder(rows["audio"][lo:hi]), rows["audio_present"][lo:hi])
        out = heads(tokens.amax(2) if read == "max" else tokens.mean(2))  # (B, S, colours + shapes)
        return out[..., :nc], out[..., nc:]

    def accuracy(rows, col, shp) -> dict[str, float]:
        enc.eval()
        hits = {"colour": [], "shape": []}
        with torch.no_grad():
            for lo in range(0, len(rows["key"]), 32):
                lc, ls = logits(rows, lo, lo + 32)
                for name, lg, y in (("colour", lc, col[lo:lo + 32]), ("shape", ls, shp[lo:lo + 32])):
                    ok = y >= 0
                    hits[name].append((lg.argmax(-1) == y)[ok].float())
        enc.train()
        return {k: float(torch.cat(v).mean()) for k, v in hits.items()}

    history, batches, t0 = [], shuffled_batches(n, bs, g), time.perf_counter()
    for step in range(1, steps + 1):
        idx = next(batches)
        lc, ls = logits({k: train_rows[k][idx] for k in ("video", "audio", "audio_present")}, 0, len(idx))
        y_c, y_s = tr_c[idx], tr_s[idx]
        loss = nn.functional.cross_entropy(lc.flatten(0, 1), y_c.flatten(), ignore_index=-1) + \
            nn.functional.cross_entropy(ls.flatten(0, 1), y_s.flatten(), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            point = {"step": step, "loss": float(loss.detach()), "val": accuracy(val_rows, va_c, va_s),
                     "train": accuracy(train_rows, tr_c, tr_s)}
            history.append(point)
            print(f"  encoder probe step {step}/{steps}: loss {point['loss']:.3f}; held-out colour "
                  f"{point['val']['colour']:.3f} shape {point['val']['shape']:.3f}; train colour "
                  f"{point['train']['colour']:.3f} shape {point['train']['shape']:.3f} "
                  f"({(time.perf_counter() - t0) / step:.2f} s/step)", flush=True)
    return {"history": history, "final": history[-1]}


def answer_labels(rows: dict[str, Any], tok, qtype: str) -> list[str | None]:
    """The answer of each clip's question of type ``qtype`` (its first one), ``None`` where the clip has none."""
    from mirasol_ray.data.schema import qtype_index

    code, out = qtype_index(qtype), []
    for c in range(rows["qtype"].shape[0]):
        k = [k for k in range(rows["qtype"].shape[1])
             if bool(rows["text_mask"][c, k]) and int(rows["qtype"][c, k]) == code]
        ids = rows["target_ids"][c, k[0]][rows["target_mask"][c, k[0]]].tolist() if k else None
        out.append(tok.decode(ids[1:]).strip() if ids else None)
    return out


def probe_answers(cfg, train_rows, val_rows, tok, qtype: str, steps: int, seed: int, read: str = "mean",
                  audio_first: int = 0) -> dict[str, Any]:
    """Can the model's audio path give the answer of a question type, supervised directly? The audio encoder of
    ``cfg.model`` (``read`` ``mean`` / ``max`` of each snippet's tokens), or the video and audio encoders and the
    Combiner (``combiner``: the mean of each snippet's m tokens), built and initialised as in training, trained
    from scratch with a two-layer head over the clip's snippets (their reads side by side) to name the answer of
    the clip's ``qtype`` question (classes: the training clips' answers); batches of ``train.batch_size`` clips
    in a seeded order. Held-out and training accuracy five times over the run. ``audio_first`` steps (with
    ``combiner``): first train the audio encoder alone (mean read, a head of its own) on the same answers, then
    freeze it: can the Combiner pass on what the encoder already knows?"""
    from torch import nn

    from mirasol_ray.model.mirasol import Mirasol
    from mirasol_ray.train.parallel import seed_everything

    tr_answers, va_answers = answer_labels(train_rows, tok, qtype), answer_labels(val_rows, tok, qtype)
    classes = sorted({a for a in tr_answers if a is not None})
    if len(classes) < 2:
        raise SystemExit(f"error: --probe-answers {qtype}: the training clips have {len(classes)} distinct answers "
                         f"to that question type (need 2 or more)")
    if audio_first and read != "combiner":
        raise SystemExit("error: --probe-audio-first needs --probe-read combiner")
    y_tr = torch.tensor([classes.index(a) if a in classes else -1 for a in tr_answers])
    y_va = torch.tensor([classes.index(a) if a in classes else -1 for a in va_answers])
    seed_everything(seed)
    model = Mirasol(cfg.model)
    S = train_rows["audio"].shape[1]

    def head(width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(S * width, 128), nn.GELU(), nn.Linear(128, len(classes)))

    def fit(logits, modules: nn.ModuleList, steps: int, g: torch.Generator, label: str) -> list[dict[str, Any]]:
        params = list(modules.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

        def accuracy(rows, y) -> float:
            modules.eval()
            hits = []
            with torch.no_grad():
                for lo in range(0, len(y), 32):
                    idx = torch.arange(lo, min(lo + 32, len(y)))
                    ok = y[idx] >= 0
                    hits.append((logits(rows, idx).argmax(-1) == y[idx])[ok].float())
            modules.train()
            return float(torch.cat(hits).mean())

        history, batches, t0 = [], shuffled_batches(len(y_tr), cfg.train.batch_size, g), time.perf_counter()
        for step in range(1, steps + 1):
            idx = next(batches)
            loss = nn.functional.cross_entropy(logits(train_rows, idx), y_tr[idx], ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            if step % max(1, steps // 5) == 0 or step == steps:
                point = {"step": step, "loss": float(loss.detach()), "val": accuracy(val_rows, y_va),
                         "train": accuracy(train_rows, y_tr)}
                history.append(point)
                print(f"  answer probe ({qtype}, {label}) step {step}/{steps}: loss {point['loss']:.3f}; held-out "
                      f"{point['val']:.3f}, train {point['train']:.3f} "
                      f"({(time.perf_counter() - t0) / step:.2f} s/step)", flush=True)
        return history

    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"qtype": qtype, "classes": classes}
    if audio_first:
        first = head(cfg.model.audio_dim)
        out["audio_first"] = fit(lambda rows, idx: first(model.audio_encoder(rows["audio"][idx]).mean(2).flatten(1)),
                                 nn.ModuleList([model.audio_encoder, first]), audio_first, g,
                                 "audio encoder alone, read mean")
        model.audio_encoder.requires_grad_(False)
    last = head(cfg.model.dim if read == "combiner" else cfg.model.audio_dim)

    def logits(rows, idx):
        tokens = model.audio_encoder(rows["audio"][idx])  # (B, S, Na, Da)
        if read == "combiner":
            tokens = model.combiner(model.video_encoder(rows["video"][idx]), tokens, rows["audio_present"][idx])
        return last((tokens.amax(2) if read == "max" else tokens.mean(2)).flatten(1))

    trained = ([] if audio_first else [model.audio_encoder]) + (
        [model.video_encoder, model.combiner] if read == "combiner" else [])
    out["history"] = fit(logits, nn.ModuleList([*trained, last]), steps, g,
                         f"read {read}" + (", audio encoder frozen" if audio_first else ""))
    out["final"] = out["history"][-1]
    counts = {c: sum(a == c for a in va_answers) for c in classes}
    out["val_majority"] = max(counts.values()) / max(1, len(va_answers))
    return out


def run(args: argparse.Namespace) -> int:
    from mirasol_ray import storage
    from mirasol_ray.data.schema import manifest_qtypes, qtype_table
    from mirasol_ray.data.synthetic import synthesize
    from mirasol_ray.data.text import get_tokenizer
    from mirasol_ray.launch.demo import FINETUNE_PER_PRETRAIN_STEP
    from mirasol_ray.train.parallel import build_on_rank
    from mirasol_ray.train.prepare import load_prepared

    torch.set_num_threads(args.threads)
    data = os.path.abspath(args.data)
    if not os.path.exists(os.path.join(data, "manifest.json")):
        print(f"synthesising {args.clips} clips into {data} (as mirasol demo does)", flush=True)
        synthesize(data, args.clips, seed=0, shard_size=16, val_fraction=0.1, progress=False)
    manifest = json.loads(storage.read_text(os.path.join(data, "manifest.json")))
    label_set = manifest.get("label_set")
    qtypes = qtype_table(manifest_qtypes(manifest))
    chance = manifest.get("splits", {}).get("val", {}).get("chance") or manifest.get("chance", {})
    common = [f"data.train={data}/train", f"data.val={data}/val", "data.task=all", f"train.seed={args.seed}",
              f"data.seed={args.seed}"]
    if manifest.get("tokenizer"):
        common.append(f"data.tokenizer={data}/{manifest['tokenizer']}")
    cfg = load_prepared(args.config, common + args.set)
    bad = [kv for kv in args.pretrain_set if not kv.startswith("train.")]
    if bad:
        raise SystemExit(f"error: --pretrain-set takes train.* keys only (the model is the same in both stages): "
                         f"{bad[0]}")
    pre_cfg = load_prepared(args.config, common + args.set + args.pretrain_set)
    cfg.model.num_classes = len(label_set) if label_set else cfg.model.num_classes
    tok = get_tokenizer(cfg.data.tokenizer)
    pre_steps = cfg.train.steps if args.pretrain_steps < 0 else args.pretrain_steps
    ft_steps = (round(FINETUNE_PER_PRETRAIN_STEP * pre_steps) if args.finetune_steps < 0
                else args.finetune_steps)

    t0 = time.perf_counter()
    train_rows = load_rows(cfg.data.train, cfg, args.train_clips, train=True)
    val_rows = load_rows(cfg.data.val, cfg, args.val_clips, train=False)
    train_eval = take(train_rows, range(min(args.train_eval_clips, len(train_rows["key"]))))
    decode_s = time.perf_counter() - t0
    texts = int(train_rows["text_mask"].sum())
    print(f"decoded {len(train_rows['key'])} training clips ({texts} texts) and {len(val_rows['key'])} held-out "
          f"clips in {decode_s:.0f} s; seed {args.seed}; {pre_steps} caption steps, then {ft_steps} on every text; "
          f"batch {cfg.train.batch_size} clips, freeze_av_steps {cfg.train.freeze_av_steps}", flush=True)
    if args.frames_png:
        print(f"wrote {contact_sheet(train_rows, args.frames_png, tok)}")

    if args.probe_answers:
        res = {"data": data, "config": args.config, "overrides": args.set, "seed": args.seed,
               "probe_read": args.probe_read,
               "probe_answers": probe_answers(cfg, train_rows, val_rows, tok, args.probe_answers, args.probe_steps,
                                              args.seed, args.probe_read, args.probe_audio_first)}
        print(f"held-out majority answer: {res['probe_answers']['val_majority']:.3f}")
        if args.json_out:
            with open(args.json_out, "w") as fh:
                json.dump(res, fh, indent=1)
        return 0

    if args.probe_encoder:
        res = {"data": data, "config": args.config, "overrides": args.set, "seed": args.seed,
               "probe_read": args.probe_read,
               "probe_encoder": probe_encoder(cfg, train_rows, val_rows, tok, args.probe_encoder, args.seed,
                                              args.probe_read)}
        if args.json_out:
            with open(args.json_out, "w") as fh:
                json.dump(res, fh, indent=1)
        return 0

    model = build_on_rank(cfg.model, cfg.train.seed, 0)
    res: dict[str, Any] = {"data": data, "config": args.config, "overrides": args.set,
                           "pretrain_overrides": args.pretrain_set, "seed": args.seed,
                           "pretrain_steps": pre_steps, "finetune_steps": ft_steps,
                           "train_clips": len(train_rows["key"]), "val_clips": len(val_rows["key"]),
                           "batch_size": cfg.train.batch_size, "decode_s": decode_s, "history": []}

    def evaluate(step: int) -> dict[str, Any]:
        point = {"step": step, "val": score(predict(model, val_rows, cfg, tok, label_set, qtypes=qtypes)),
                 "train": score(predict(model, train_eval, cfg, tok, label_set, qtypes=qtypes))}
        res["history"].append(point)
        line = "  ".join(f"{k} {point['val'][k]['value']:.2f}/{point['train'].get(k, {}).get('value', 0):.2f}"
                         for k in row_order(point["val"]) if ":" not in k)
        print(f"  step {step} held-out/train: {line}", flush=True)
        return point

    def progress(stage: str, total: int, started: float):
        def on_step(step: int, parts: dict[str, float]) -> None:
            if step % max(1, total // 10) == 0 or step == total:
                dt = time.perf_counter() - started
                print(f"  {stage} {step}/{total} loss {parts['loss']:.3f} (text {parts.get('text', 0):.3f}) "
                      f"{dt / step:.2f} s/step, ETA {dt / step * (total - step):.0f} s", flush=True)
            if stage == "finetune" and args.eval_every and step % args.eval_every == 0 and step < total:
                evaluate(step)
        return on_step

    t1 = time.perf_counter()
    if pre_steps:
        res["pretrain_log"] = train_stage(model, train_rows, pre_cfg, pre_steps, task="caption",
                                          on_step=progress("pretrain", pre_steps, t1))
    t2 = time.perf_counter()
    res["finetune_log"] = train_stage(model, train_rows, cfg, ft_steps, on_step=progress("finetune", ft_steps, t2))
    t3 = time.perf_counter()
    res["pretrain_s"], res["finetune_s"] = t2 - t1, t3 - t2
    final = evaluate(ft_steps)
    res["final"] = final
    res["eval_s"] = time.perf_counter() - t3
    print_table(final, chance)
    print(f"\n{len(train_rows['key'])} training clips, seed {args.seed}: decode {decode_s:.0f} s, pretraining "
          f"{res['pretrain_s']:.0f} s, fine-tuning {res['finetune_s']:.0f} s "
          f"({res['finetune_s'] / max(ft_steps, 1):.2f} s/step), scoring {res['eval_s']:.0f} s")
    if args.png:
        print(f"wrote {curves_plot(res['history'], args.png, f'bench learn, seed {args.seed}')}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(res, fh, indent=1, default=float)
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks import run_as_script

    return run_as_script("python -m benchmarks.learn", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
