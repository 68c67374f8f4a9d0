"""The train and eval steps: plain torch, no Ray (runs and benchmarks on a bare GPU or CPU).

Batches are dicts per :mod:`mirasol_ray.data.schema`; video arrives uint8 and is moved to the device as uint8
(the model normalises it there), so a host->device copy carries a quarter of the bytes of float32.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from mirasol_ray.config import ConfigError, TrainConfig
from mirasol_ray.data.schema import TASKS, qtype_name
from mirasol_ray.data.text import Tokenizer, encode_target
from mirasol_ray.model.mirasol import build_model, texts_of
from mirasol_ray.train.augment import augment_batch
from mirasol_ray.train.metrics import exact_match

TASK_CAPTION, TASK_QA, TASK_MCQA, TASK_CLS = (TASKS.index(t) for t in TASKS)


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, precision: str):
    """bf16 autocast on GPU (precision auto|bf16); fp32 on CPU unless bf16 is asked for explicitly."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


AV_MODULES = ("video_encoder", "audio_encoder", "combiner", "av_model")
"""The audio-video path: what ``train.freeze_av_steps`` holds still while the text decoder learns to read it."""


def _param_name(name: str) -> str:
    return name.removeprefix("module.")  # DDP's wrapper


def _unmatched(names: list[str], patterns) -> list[str]:
    return [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]


def check_patterns(cfg) -> None:
    """``train.freeze`` and ``train.lr_mult`` patterns that match no parameter of the model ``cfg`` builds are
    errors (a typo would otherwise silently train everything). Checked on the meta device: nothing allocated."""

    with torch.device("meta"):
        names = [n for n, _ in build_model(cfg.model).named_parameters()]
    for setting, patterns in (("freeze", cfg.train.freeze), ("lr_mult", cfg.train.lr_mult)):
        bad = _unmatched(names, patterns)
        if bad:
            raise ConfigError(f"train.{setting} pattern {bad[0]!r} matches no parameter (names look like "
                              f"{names[0]}, text_decoder.transformer.blocks.0.attn.to_q.weight)")


def apply_freeze(model: nn.Module, patterns) -> list[str]:
    """Parameters matching ``train.freeze`` stop requiring gradients (so :func:`make_optimizer` leaves them out);
    returns their names. Call before wrapping the model (DDP/FSDP2)."""
    bad = _unmatched([n for n, _ in model.named_parameters()], patterns)
    if bad:
        raise ValueError(f"train.freeze pattern {bad[0]!r} matches no parameter")
    frozen = []
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(_param_name(name), pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def lr_multiplier(name: str, lr_mult: dict[str, float]) -> float:
    """The first ``train.lr_mult`` pattern matching the parameter ``name`` gives its multiplier; else 1."""
    name = _param_name(name)
    return next((m for pat, m in lr_mult.items() if fnmatch.fnmatchcase(name, pat)), 1.0)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that require gradients (``train.freeze`` removed some); no weight decay on biases,
    norms, embeddings, position tables and learned tokens (parameters with < 2 dims, or named
    embed/pos/token/memory/time/prefix). The audio-video path's parameters get groups of their own (``"av": True``)
    so that :func:`make_scheduler` can hold them still for ``freeze_av_steps``; each ``train.lr_mult`` multiplier
    its own group, at ``lr * multiplier``."""
    groups: dict[tuple[bool, bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or any(k in name for k in ("embed", "pos", "token", "memory", "time", "prefix"))
        av = _param_name(name).split(".")[0] in AV_MODULES
        groups.setdefault((av, no_decay, lr_multiplier(name, cfg.lr_mult)), []).append(p)
    params = [p for ps in groups.values() for p in ps]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.0 if no_decay else cfg.weight_decay, "av": av, "lr": cfg.lr * mult,
          "lr_mult": mult}
         for (av, no_decay, mult), ps in sorted(groups.items())],
        lr=cfg.lr, betas=(0.9, 0.95), fused=fused or None)


class LRFactor:
    """Learning-rate factor at a step: linear warmup for ``warmup`` steps, then cosine decay to ``min_ratio`` at
    ``steps``. With ``frozen_until`` > 0 it is 0 before that step and then warms up again from there (the
    audio-video path after ``freeze_av_steps``: a sudden full learning rate on it would undo what the decoder
    learnt to read)."""

    def __init__(self, warmup: int, steps: int, min_ratio: float, frozen_until: int = 0):
        self.warmup, self.steps, self.min_ratio, self.frozen_until = warmup, steps, min_ratio, frozen_until

    def __call__(self, step: int) -> float:
        if step < self.frozen_until:
            return 0.0
        if step < self.warmup:
            factor = (step + 1) / (self.warmup + 1)
        else:
            progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
            factor = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.frozen_until and step < self.frozen_until + self.warmup:
            factor *= (step - self.frozen_until + 1) / (self.warmup + 1)
        return factor


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup for ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``; the
    audio-video groups are held at 0 for ``freeze_av_steps`` first (see :class:`LRFactor`)."""
    warm = max(0, min(cfg.warmup_steps, cfg.steps - 1))
    factors = [LRFactor(warm, cfg.steps, cfg.min_lr_ratio, cfg.freeze_av_steps if g.get("av") else 0)
               for g in opt.param_groups]
    return Schedule(opt, factors)


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose saved state is the step count alone: the schedule's shape (steps, warmup, freeze, base
    learning rates) comes from the config of the run that loads it. Plain LambdaLR saves its callables'
    attributes and restores them over the new ones, so a run resumed with ``train.steps`` raised from 50 to 400
    would keep decaying over 50 steps while printing "step 250/400"."""

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        # the learning rates of the restored step under this schedule (the optimiser's state holds the old ones)
        self._last_lr = [base * f(self.last_epoch) for base, f in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def count_tokens(batch: dict[str, Any]) -> int:
    """Text tokens in a batch (prompt and target of the texts present; padding and absent texts excluded): what
    tokens/s counts. Video is measured in clips (samples/s), not tokens."""
    return int(batch["prompt_mask"].sum() + batch["target_mask"].sum())


def train_step(model: nn.Module, micro_batches: Iterable[dict[str, Any]], opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, device: torch.device,
               no_sync=None) -> dict[str, float]:
    """One optimiser step over ``grad_accum`` micro-batches: video augmentation (``cfg.augment``, seeded by
    ``cfg.seed``, the step and the rank), forward, backward (gradients averaged over the micro-batches; DDP's
    all-reduce only on the last through ``no_sync``), clip, step, schedule.

    Returns the mean of each loss part, the total loss, the gradient norm and the learning rate."""
    model.train()
    # cut the padding no text uses before the batch leaves the host: less to copy, and no device sync to find it
    micro = [trim_text_padding(b) for b in micro_batches]
    parts: dict[str, float] = {}
    # While freeze_av_steps holds the audio-video path at lr 0, it runs without autograd: no graph, no backward, no
    # activations kept for it. Not under FSDP2, whose hooks expect every sharded parameter's gradient. (DDP is
    # wrapped with find_unused_parameters, so parameters outside the graph are fine there.)
    held = [p for g in opt.param_groups if g.get("av") and g["lr"] == 0 for p in g["params"] if p.requires_grad]
    if held and not _is_fsdp(model):
        for p in held:
            p.requires_grad_(False)
    else:
        held = []
    if cfg.augment:
        step, rank = int(getattr(sched, "last_epoch", 0)), _rank_of_process()
        micro = [augment_batch(move_batch(b, device), cfg, step, rank, i) for i, b in enumerate(micro)]
    try:
        _forward_backward(model, micro, cfg, device, no_sync, parts)
    finally:
        for p in held:
            p.requires_grad_(True)
    # Norm and clipping over what this step trains (under FSDP2 a held audio-video path still has gradients: they
    # would dominate the norm and shrink the decoder's clipped update).
    trained = [p for g in opt.param_groups if g["lr"] > 0 for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    parts["lr"] = max(float(g["lr"]) for g in opt.param_groups)
    sched.step()
    parts["grad_norm"] = float(grad_norm)
    return parts


def _rank_of_process() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def trim_text_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with the prompt columns that are padding in every text (prompts are left-padded) and the target
    columns that are padding in every text (targets are right-padded) cut off. The training loss is the same
    (positions count valid tokens; pads are masked), at the cost of the batch's longest prompt and target instead
    of ``max_prompt_len`` and ``max_target_len``: a batch of short answers and timestamped captions beside one
    long caption pays for that caption's length, not the limit's. Done by :func:`train_step` on the host batch,
    before augmentation and the copy to the device (no device sync to find the columns), and outside the model, so
    the model keeps fixed shapes where it is traced (FLOP counts on the meta device, ``torch.compile``)."""
    out = dict(batch)
    if "prompt_mask" in batch:
        used = batch["prompt_mask"].reshape(-1, batch["prompt_mask"].shape[-1]).any(0)  # (Lp,)
        first = int(used.int().argmax()) if bool(used.any()) else used.shape[0]
        out["prompt_ids"], out["prompt_mask"] = batch["prompt_ids"][..., first:], batch["prompt_mask"][..., first:]
    if "target_mask" in batch:
        used = batch["target_mask"].reshape(-1, batch["target_mask"].shape[-1]).any(0)  # (Lt,)
        last = max(int(used.nonzero().max()) + 1 if bool(used.any()) else 0, min(2, used.shape[0]))
        out["target_ids"], out["target_mask"] = batch["target_ids"][..., :last], batch["target_mask"][..., :last]
    return out


def _forward_backward(model: nn.Module, micro: list[dict[str, Any]], cfg: TrainConfig, device: torch.device,
                      no_sync, parts: dict[str, float]) -> None:
    for i, batch in enumerate(micro):
        batch = move_batch(batch, device)
        last = i == len(micro) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast(device, cfg.precision):
                out = model(batch)
            (out["loss"] / len(micro)).backward()
        parts["loss"] = parts.get("loss", 0.0) + float(out["loss"].detach()) / len(micro)
        for k, v in out["losses"].items():
            parts[k] = parts.get(k, 0.0) + float(v.detach()) / len(micro)


@torch.no_grad()
def eval_loss(model: nn.Module, batch: dict[str, Any], device: torch.device, precision: str = "auto") -> float:
    """The training loss of a batch (teacher-forced, the same weighted parts), without gradients: the validation
    loss. Runs the unwrapped model, as :func:`predict_batch` does, so one rank can call it alone under DDP."""
    model.eval()
    core = getattr(model, "module", model)
    with autocast(device, precision):
        return float(core(move_batch(batch, device))["loss"])


@torch.no_grad()
def predict_batch(model: nn.Module, batch: dict[str, Any], tok: Tokenizer, device: torch.device,
                  precision: str = "auto", max_new_tokens: int = 0, beam_size: int = 1,
                  label_set: list[str] | None = None, qtypes: dict[int, str] | None = None,
                  with_scores: bool = False) -> list[dict[str, Any]]:
    """Predictions for every text of a batch of clips, as records for :mod:`mirasol_ray.train.metrics`.

    Each clip is encoded once (:meth:`~mirasol_ray.model.mirasol.Mirasol.encode`); its texts are then answered
    from that: open-ended QA, captions and (``cls_mode: generate``) class labels are generated; multiple choice
    picks the option with the highest log-likelihood; classification with ``cls_mode: score`` picks the label of
    ``label_set`` whose text is most likely, with ``head`` the head's arg-max. ``rank`` is the 0-based rank of
    the right answer among the scored candidates (options or labels; -1 when nothing was ranked: generation);
    ``refs`` are a question's accepted answers when it has several. A record's ``key`` is its clip's, with
    ``#i`` (the text's index in the clip) when the clip has several texts. ``qtypes`` maps the rows' question type
    codes to names (:func:`~mirasol_ray.data.schema.qtype_table` of the data's manifest; default: the known names).
    ``with_scores``: ranked records also hold what merging several looks at a clip needs (:mod:`~mirasol_ray.train.
    views`): ``scores`` (each option's or label's log-likelihood, the head's log-softmax), the options' text
    ``choices`` and the right ``answer_idx`` or ``label``."""

    model.eval()
    core = getattr(model, "module", model)
    batch = move_batch(batch, device)
    t = texts_of(batch)
    task = t["task"].cpu()
    n = len(task)
    clip = t["clip"]
    mode = getattr(core.config, "cls_mode", "generate")
    is_cls = task == TASK_CLS
    ranked_cls = bool(is_cls.any()) and (mode == "head" or (mode == "score" and bool(label_set)))
    max_new = max_new_tokens or int(t["target_ids"].shape[1]) - 1

    span = t.get("text_span")

    def sub(rows: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(rows, dtype=torch.long, device=clip.device)
        return t["prompt_ids"][idx], t["prompt_mask"][idx], clip[idx], idx, None if span is None else span[idx]

    gen_rows = [i for i in range(n) if int(task[i]) != TASK_MCQA and not (ranked_cls and bool(is_cls[i]))]
    mc_rows = [i for i in range(n) if int(task[i]) == TASK_MCQA]
    cls_rows = [i for i in range(n) if ranked_cls and bool(is_cls[i])]
    generated, scores, cls_scores = None, {}, {}
    with autocast(device, precision):
        enc = core.encode(batch) if n else None  # once per clip, for every task below
        if gen_rows:
            ids, mask, c, _, sp = sub(gen_rows)
            generated = core.generate_from(enc, ids, mask, c, max_new_tokens=max_new, beam_size=beam_size,
                                           span=sp).cpu()
        if mc_rows:
            ids, mask, c, idx, sp = sub(mc_rows)
            mc = core.score_options_from(enc, ids, mask, t["option_ids"][idx], t["option_mask"][idx], c, sp)
            scores = dict(zip(mc_rows, mc.float().cpu()))
        if cls_rows:
            ids, mask, c, _, sp = sub(cls_rows)
            if mode == "head":
                logits = core.classify_from(enc, batch["snippet_mask"])[c]
            else:
                cand, cand_mask = _label_targets(tok, label_set, int(t["target_ids"].shape[1]), device)
                logits = core.score_candidates_from(enc, ids, mask, c, cand, cand_mask, span=sp)
            cls_scores = dict(zip(cls_rows, logits.float().cpu()))
    gen_at = {i: j for j, i in enumerate(gen_rows)}
    clip_of = clip.cpu().tolist()
    num_texts = batch["num_texts"].cpu().tolist() if "num_texts" in batch else [1] * len(batch["label"])
    text_index = t["text_index"].cpu().tolist() if "text_index" in t else [0] * n
    labels = batch["label"].cpu().tolist()
    records = []
    for i in range(n):
        ti, c = int(task[i]), clip_of[i]
        target = tok.decode(t["target_ids"][i, 1:].cpu().tolist())
        key = batch["key"][c] if "key" in batch else str(c)
        rec = {"key": f"{key}#{text_index[i]}" if num_texts[c] > 1 else key, "task": TASKS[ti],
               "qtype": qtype_name(t["qtype"][i], qtypes), "target": target, "rank": -1, "refs": []}
        if with_scores:
            rec.update(scores=[], choices=[])
        if ti == TASK_MCQA:
            pick = int(scores[i].argmax())
            right = int(t["answer_idx"][i])
            rec["pred"] = tok.decode(t["option_ids"][i, pick, 1:].cpu().tolist())
            rec["correct"] = pick == right
            rec["rank"] = _rank(scores[i], right)
            if with_scores:
                present = t["option_mask"][i, :, 0].cpu()
                rec["scores"] = scores[i][present].tolist()
                rec["choices"] = [tok.decode(o[1:].tolist()) for o in t["option_ids"][i][present].cpu()]
                rec["answer_idx"] = right
        elif i in cls_scores:
            pick = int(cls_scores[i].argmax())
            rec["pred"] = label_set[pick] if label_set and pick < len(label_set) else str(pick)
            rec["correct"] = pick == labels[c]
            rec["rank"] = _rank(cls_scores[i], labels[c]) if 0 <= labels[c] < len(cls_scores[i]) else -1
            if with_scores:
                rec["scores"] = (cls_scores[i].log_softmax(-1) if mode == "head" else cls_scores[i]).tolist()
                rec["label"] = labels[c]
        else:
            rec["pred"] = tok.decode(generated[gen_at[i]].tolist())
            if ti == TASK_QA and bool(t["option_mask"][i, :, 0].any()):
                opts = t["option_ids"][i].cpu()
                rec["refs"] = [tok.decode(opts[k, 1:].tolist()) for k in range(opts.shape[0])
                               if bool(t["option_mask"][i, k, 0])]
            rec["correct"] = any(exact_match(rec["pred"], r) for r in rec["refs"] or [target])
        records.append(rec)
    return records


def _rank(scores: torch.Tensor, right: int) -> int:
    """0-based rank of ``right`` among ``scores`` (ties counted against it)."""
    return int((scores > scores[right]).sum())


_LABEL_TARGETS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _label_targets(tok: Tokenizer, labels: list[str], length: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The label set as target token ids (N, Lt) and mask, formatted like a row's target (cached)."""

    key = (id(tok), tuple(labels), length, str(device))
    if key not in _LABEL_TARGETS:
        pairs = [encode_target(tok, label, length) for label in labels]
        ids = torch.as_tensor(np.stack([p[0] for p in pairs]), device=device)
        mask = torch.as_tensor(np.stack([p[1] for p in pairs]), device=device)
        _LABEL_TARGETS.clear()
        _LABEL_TARGETS[key] = (ids, mask)
    return _LABEL_TARGETS[key]
