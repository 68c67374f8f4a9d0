"""Typed configuration: dataclasses loaded from YAML presets, with ``--set section.key=value`` overrides.

A config is one :class:`Config` holding five sections (data, model, train, scaling, storage). Presets live in
``mirasol_ray/configs/NAME.yaml``; a path to any YAML file works too. Unknown keys are errors that name the key.

Geometry (snippets, frames, image size, mel bins, text lengths, vocabulary and special tokens) is set once, in
``data``; the model section follows it (see :meth:`Config.__post_init__`), so the two can never disagree: setting
one of those model fields to another value is an error that names the ``data.`` key to set
(:data:`DERIVED_MODEL_FIELDS`).

This module is the bottom of the package's layers but storage: it parses, rejects unknown keys and validates, and
reads nothing but the YAML it is given. What needs other files (a tokenizer file's vocabulary, the architecture of
pretrained checkpoints, parameter-name patterns checked against the model) is one driver-side step,
:func:`mirasol_ray.train.prepare.prepare`, run before a run starts; workers get its result as a plain dict.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be loaded: the message names the key or file."""


# ----------------------------------------------------------------------------------------------------------------
# Sections


BYTE_PAD_ID, BYTE_BOS_ID, BYTE_EOS_ID = 0, 1, 2
"""The built-in byte tokenizer's special tokens (``data.tokenizer: byte``); byte b is token b + 3."""
BYTE_VOCAB_SIZE = 256 + 3
"""The byte tokenizer's vocabulary: 256 bytes after its three specials."""
VOCAB_FIELDS = ("vocab_size", "pad_id", "bos_id", "eos_id")
"""The model fields that follow ``data.tokenizer``."""
UNREAD = -1
"""The value of a :data:`VOCAB_FIELDS` field that a tokenizer file has still to fill in (see :func:`from_dict`)."""


def is_byte_tokenizer(spec: str) -> bool:
    """``data.tokenizer`` names the built-in byte tokenizer (whose vocabulary is known without reading a file)."""
    return spec in ("", "byte")


SET_NAME_SKIP = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev",
                           "shards", "split", "splits", "data"})
"""Path components that say which split or what kind of folder a shard set is, not which dataset: a set's derived
name (:func:`set_name`) skips them from the end (``s3://b/kinetics_sounds/train`` -> ``kinetics_sounds``)."""
RESERVED_SET_NAMES = frozenset({"loss", "caption", "qa", "mcqa", "cls"})
"""Names a shard set cannot take: validation's own metric names (``val/qa`` is the overall accuracy, so a set
named ``qa`` would make ``val/qa/...`` mean two things)."""


def set_name(path: str) -> str:
    """The name a shard set gets in metrics (``val/<name>/...``, ``epochs/<name>``) when its entry gives none:
    the last component of ``path`` that is not a split or folder word (:data:`SET_NAME_SKIP`), a glob, a brace list
    or a tar; characters other than letters, digits, ``_.-`` become ``_``. Pure: nothing is read."""
    parts = [c for c in path.split("://", 1)[-1].split("/") if c]
    for i, c in enumerate(parts):  # a glob or brace list: the folder above it
        if any(ch in c for ch in "*?[{"):
            parts = parts[:i]
            break
    if parts and parts[-1].endswith(".tar"):
        parts = parts[:-1]
    while len(parts) > 1 and parts[-1].lower() in SET_NAME_SKIP:
        parts = parts[:-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", parts[-1] if parts else "").strip("_")
    return name or "set"


@dataclass
class ShardSet:
    """One shard set of a list in ``data.train`` (a mixture) or ``data.val`` (validation sets scored apart).
    A plain string in such a list is a set of that path, weight 1, its name derived from the path."""

    path: str = ""
    """Its shards: a folder, a glob, a brace list or an ``s3://`` URI (the forms of a single ``data.train``)."""
    weight: float = 1.0
    """Its share of the training stream: ``weight`` / the sum of the weights (``data.train`` only; a validation set
    is read whole)."""
    name: str = ""
    """What metrics call it: ``val/<name>/...`` (its validation metrics), ``epochs/<name>`` (epochs of it seen).
    Empty: derived from ``path`` (:func:`set_name`). Letters, digits, ``_.-``; not a metric's name
    (:data:`RESERVED_SET_NAMES`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("a shard set needs a path")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
                math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"the weight of {self.path} must be a positive number, got {self.weight!r}")
        self.weight = float(self.weight)
        self.name = self.name or set_name(self.path)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"set name {self.name!r} ({self.path}): use letters, digits, _ . - only")
        if self.name in RESERVED_SET_NAMES:
            raise ConfigError(f"set name {self.name!r} ({self.path}) is a metric's name: give the set another "
                              "name (name: ...)")


def _shard_sets(value: Any, key: str, weights: bool) -> list[ShardSet]:
    """A list given for ``data.train`` / ``data.val`` as :class:`ShardSet` entries (from entries that are sets,
    mappings or path strings), names unique; a validation list with weights is an error."""
    if not value:
        raise ConfigError(f"{key}: an empty list; give a path or one or more sets")
    sets = []
    for i, v in enumerate(value):
        if isinstance(v, ShardSet):
            sets.append(v)
        elif isinstance(v, str):
            sets.append(ShardSet(path=v))
        elif isinstance(v, dict):
            try:
                sets.append(_build(ShardSet, v, f"{key}[{i}]."))
            except ConfigError as e:
                raise ConfigError(str(e) if str(e).startswith("unknown") else f"{key}[{i}]: {e}") from None
        else:
            raise ConfigError(f"{key}[{i}]: expected a path or {{path, weight, name}}, got {v!r}")
    if not weights:
        for s in sets:
            if s.weight != 1.0:
                raise ConfigError(f"{key}: validation sets take no weight ({s.path} has {s.weight:g}): each is "
                                  "read whole")
    names = [s.name for s in sets]
    for n in names:
        if names.count(n) > 1:
            same = [s.path for s in sets if s.name == n]
            raise ConfigError(f"{key}: two sets are named {n!r} ({', '.join(same)}): give them names (name: ...)")
    return sets


@dataclass
class DataConfig:
    """Where the shards are and what one decoded sample looks like (fixed shapes)."""

    train: str | list[ShardSet] = ""
    """Training shards: a folder, a glob, a brace list (``shard-{000..009}.tar``) or ``s3://`` URI; or a weighted
    mixture of shard sets, a list of :class:`ShardSet` (``[{path: s3://b/kinetics_sounds/train, weight: 3},
    {path: s3://b/msrvtt_qa/train, weight: 1}]``): the training stream draws from each in proportion to its weight,
    each set starting its next epoch on its own when it runs out (data/index.py, :class:`MixtureOrder`)."""
    val: str | list[ShardSet] = ""
    """Validation shards (same forms as a single ``train``); empty means no validation during training. A list of
    sets (paths or ``{path, name}``, no weights) is scored as one validation set (``val/...``) and each set apart
    (``val/<name>/...``)."""
    num_snippets: int = 4
    """S: consecutive time chunks a clip is cut into."""
    frames_per_snippet: int = 4
    """F: frames sampled in each snippet's time window."""
    height: int = 64
    width: int = 64
    sample_rate: int = 16000
    """Audio is resampled to this rate, mono."""
    n_mels: int = 64
    """M: log-mel bins."""
    mel_frames: int = 32
    """T: log-mel frames per snippet (the hop adapts to the snippet's duration, so the window stays aligned)."""
    n_fft: int = 400
    clip_seconds: float = 0.0
    """Seconds of each clip to use (random start for training, centred for eval); 0 uses the whole clip."""
    eval_windows: bool = False
    """Evaluation only (``mirasol eval/predict --windows``): score a video longer than ``clip_seconds`` in
    consecutive windows of it and average the answers' scores (:func:`~mirasol_ray.data.snippets.eval_views`)."""
    eval_views: int = 1
    """Evaluation only (``--views K``): K temporal views per video, scores averaged (MMAction2's multi-view test)."""
    tokenizer: str = "byte"
    """``byte`` (built in), or a path or ``s3://`` URI to an HF ``tokenizer.json`` or a sentencepiece ``.model``
    (read into memory by each process: workers need no shared disk)."""
    max_prompt_len: int = 48
    """Question tokens (left-padded)."""
    max_target_len: int = 48
    """Answer/caption/label tokens including BOS/EOS (right-padded)."""
    max_options: int = 5
    """Multiple-choice options kept per question (padded)."""
    max_texts: int = 16
    """K: texts (caption, questions, label) a row carries with its clip, padded and masked. The clip is decoded
    and encoded once for all of them; a clip with more texts gives several rows of K (each a copy of the clip:
    raise K above the most texts a clip has to avoid that). Only the texts present cost compute."""
    task: str = "caption"
    """Which text a row carries: caption | qa | mcqa | cls | finetune (qa + mcqa + cls rows) | all. Left out of a
    config (YAML and ``--set``), it follows ``train.stage``: caption rows to pretrain (with the latent prediction
    loss), finetune rows (open-ended QA, multiple choice, labels) to fine-tune."""
    segment_captions: bool = True
    """Timestamped captions (a sample's ``segments``: ``{"start", "end", "caption"}``, seconds of the video, as
    ActivityNet Captions or YouCook2 give them) become caption texts of their own, each read by the decoder from
    the snippets its time span covers alone (``text_span``). They say which snippet shows what, which a clip's
    caption does not: the per-snippet signal that teaches the encoders what each snippet shows
    (docs/HISTORY.md, "The demo"). Scored apart as ``caption/segment``. False: ignored."""
    caption_prompt: str = "caption the clip."
    """The prompt of caption rows. With the next, it tells the decoder which task a row is when tasks share a
    run (``task: all``): with no prompt, a caption row and a class-label row would look the same."""
    cls_prompt: str = "classify the clip."
    """The prompt of classification rows (the label text is the target)."""
    decode_timeout_s: float = 30.0
    """A sample whose decode takes longer is skipped and counted as ``timeout``."""
    decode_threads: int = 1
    decode_batch_size: int = 0
    """Clips per decode task in the steady state (a pass's first and last tasks take fewer, so every CPU starts
    at once and the pass ends together: ``data/pipeline.py``'s ``block_sizes``). Each task costs ~25 ms of CPU
    beyond its decode and leaves its CPU idle ~0.1 s before the next one starts (docs/HISTORY.md, "The data path"), so small
    clips want large blocks; large rows want small ones (a block is held whole in memory). 0: as many as fit in
    64 MB of decoded rows, at most 64 (tiny: 64, demo: 64, base: 19, mirasol3b: 6, finetune_msrvtt_qa: 3)."""
    decode_cpus: float = 0.5
    """CPUs reserved by each decode task: fractional so training workers are not starved (FIELD_NOTES)."""
    decode_actors: int = 0
    """Decode in a pool of this many long-lived actors (each holding ``decode_cpus``) instead of tasks; 0: tasks
    (Ray reuses their worker processes, so imports are paid once either way: docs/HISTORY.md, "The data path")."""
    cache: bool = False
    """Decode the training and validation sets once, before training, and keep the rows in Ray's object store:
    for a small dataset trained over many epochs, where decoding every epoch would bound the step rate. Rows then
    keep the frame positions of that one decode (no per-epoch sampling); the order is still new every epoch."""
    shuffle: bool = True
    """Training reads the samples in a new order every epoch: a permutation of the whole dataset from
    (``seed``, epoch); False: the dataset's own order every epoch. Either way the order, like each clip's frame
    positions, is a function of (``seed``, epoch, key), so a stopped run resumes exactly (data/index.py)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.train, (list, tuple)):
            self.train = _shard_sets(self.train, "data.train", weights=True)
        if isinstance(self.val, (list, tuple)):
            self.val = _shard_sets(self.val, "data.val", weights=False)
        for name in ("num_snippets", "frames_per_snippet", "height", "width", "sample_rate", "n_mels",
                     "mel_frames", "n_fft", "max_prompt_len", "max_target_len", "max_options", "max_texts",
                     "decode_threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.decode_batch_size < 0:
            raise ConfigError(f"data.decode_batch_size must be >= 0 (0: automatic), got {self.decode_batch_size}")
        if self.task not in ("caption", "qa", "mcqa", "cls", "finetune", "all"):
            raise ConfigError(f"data.task must be caption|qa|mcqa|cls|finetune|all, got {self.task!r}")
        if self.decode_actors < 0:
            raise ConfigError(f"data.decode_actors must be >= 0, got {self.decode_actors}")
        if not 0 < self.decode_cpus <= 64:
            raise ConfigError(f"data.decode_cpus must be in (0, 64], got {self.decode_cpus}")
        if self.eval_views < 1 or (self.eval_windows and self.eval_views > 1):
            raise ConfigError(f"data.eval_views must be >= 1, and 1 with data.eval_windows (got {self.eval_views})")

    @property
    def train_sets(self) -> list[ShardSet]:
        """``train`` as a list of sets: a single path is one set of weight 1 (none when empty)."""
        return _as_sets(self.train)

    @property
    def val_sets(self) -> list[ShardSet]:
        """``val`` as a list of sets (see :attr:`train_sets`)."""
        return _as_sets(self.val)

    @property
    def mixture(self) -> bool:
        """``train`` names a list of sets (a weighted mixture), not a single path."""
        return isinstance(self.train, list)

    @property
    def train_label(self) -> str:
        """``train`` in words, for messages: the path, or the sets' paths."""
        return ", ".join(s.path for s in self.train_sets)


def _as_sets(value: str | list[ShardSet]) -> list[ShardSet]:
    if isinstance(value, list):
        return list(value)
    return [ShardSet(path=value)] if value else []


@dataclass
class TrainConfig:
    """Optimisation and the run's rhythm (per Ray Train worker unless stated)."""

    stage: str = "pretrain"
    """pretrain (from scratch, or from pretrained encoders/decoder: ``model.*_init``) or finetune (from a trained
    checkpoint, ``train.init_from``, on task rows: ``data.task`` qa, mcqa, cls, finetune or all). Checked when a
    run starts (:meth:`Config.check_start`); the checkpoint's meta.json records it."""
    init_from: str = ""
    """Run folder, checkpoint folder or ``model.pt`` (local or ``s3://``) to initialise the model from: a
    finetune run's pretrained weights."""
    finetune_from_scratch: bool = False
    """Let a ``stage: finetune`` run start with neither ``init_from`` nor pretrained parts (``model.video_init``,
    ``audio_init``, ``text_init``): random weights, for ablations and smoke tests. Off, starting such a run is an
    error (see :meth:`Config.check_start`): a fine-tuning job that quietly trains from scratch wastes a cluster's
    hours."""
    steps: int = 100
    """Optimiser steps of the run (a resumed run continues up to it)."""
    batch_size: int = 8
    """Per worker, per micro-step."""
    grad_accum: int = 1
    """Micro-steps (batches) per optimiser step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW), reached after ``warmup_steps``."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at ``lr * min_lr_ratio`` at the last step."""
    warmup_steps: int = 10
    """Steps of linear warmup from 0 to ``lr``."""
    weight_decay: float = 0.05
    """AdamW's decoupled weight decay."""
    freeze: list[str] = field(default_factory=list)
    """Parameter-name patterns (fnmatch, e.g. ``video_encoder.*``) whose parameters keep their initial (e.g.
    pretrained) values: no gradient, not in the optimiser. A pattern that matches no parameter is an error."""
    lr_mult: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by parameter-name pattern, e.g. ``{"video_encoder.*": 0.1}``; the first
    matching pattern counts; other parameters get 1. A pattern that matches no parameter is an error."""
    freeze_av_steps: int = 0
    """Steps at the start during which the audio-video path (encoders, combiner, time-aligned model) keeps its
    weights (and runs without autograd, except under FSDP2) while only the text decoder learns; it then warms up
    to the schedule. From scratch this lets the decoder learn where to look before the features under it move
    (docs/HISTORY.md, "The demo")."""
    augment: bool = False
    """Train-time video augmentation (:mod:`mirasol_ray.train.augment`): each training clip gets a random zoom
    (``augment_min_scale``), translation (``augment_shift``), optional left-right flip (``augment_flip``) and
    brightness/contrast change (``augment_jitter``), the same for all its frames, new at every step, drawn from
    ``seed``, the step and the rank (reproducible). Never at evaluation. Against memorising a small data set's
    exact pixels (docs/HISTORY.md, "The demo"). Wrong for data whose answers depend on
    where things are in the frame or on their size."""
    augment_min_scale: float = 0.8
    """With ``augment``: the smallest crop side, as a fraction of the frame's, zoomed back to the frame (1 = no
    zoom)."""
    augment_shift: float = 0.1
    """With ``augment``: the largest translation beyond the crop's own room, as a fraction of the frame's side
    (edge pixels repeat where the view leaves the frame; 0 = crops inside the frame only)."""
    augment_flip: bool = False
    """With ``augment``: mirror half the clips left-right. Wrong for data whose answers depend on left and right
    (directions, text, asymmetric shapes); fine for the demo's left-right symmetric shapes."""
    augment_jitter: float = 0.1
    """With ``augment``: contrast scaled by up to 1 +/- this around the clip's mean, brightness moved by up to this
    x 255. No hue change, so colour names stay right."""
    grad_clip: float = 1.0
    """Gradient norm clipped to this (0 = off)."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32."""
    fsdp: bool = False
    """Shard with FSDP2 (``fully_shard`` per transformer block and at the root) instead of DDP: for large presets.
    Checkpoints are then sharded too (each rank writes its own part). See :mod:`mirasol_ray.train.parallel`."""
    compile: bool = False
    """``torch.compile`` each transformer block (the first steps are slower while it compiles)."""
    seed: int = 0
    """Seeds the model's initial weights and each worker's random streams (dropout). The data's order and frame
    positions follow ``data.seed``. The same seeds on the same machine give the same losses and metrics."""
    log_every: int = 10
    """Steps between records in metrics.jsonl (loss parts, throughput)."""
    eval_every: int = 0
    """Steps between validation passes (with ``data.val``); 0 = only at the end. Each pass also writes a checkpoint
    when checkpoints are scored (``checkpoint_metric``), so that the weights it scored can be kept."""
    eval_batches: int = 0
    """Validation batches per pass and per worker (each worker evaluates its own share of the split); 0 = the whole
    split."""
    eval_train_batches: int = 2
    """At each validation pass, also score this many batches (per worker) of training clips, a fixed subset drawn
    with ``data.seed``, decoded as for validation (deterministic frames, no augmentation): the same task metrics
    on clips the model trains on, recorded as ``train_eval`` beside ``val``, so the gap between the two (memorising
    instead of learning) shows at every pass. 0 = off. Costs about ``eval_train_batches / (validation batches)`` of
    a validation pass."""
    checkpoint_every: int = 50
    """Steps between checkpoints (and the last step)."""
    keep_checkpoints: int = 2
    """Checkpoints kept: the best ``keep_checkpoints`` by ``checkpoint_metric`` and the newest (with no metric: the
    newest ``keep_checkpoints``)."""
    checkpoint_metric: str = ""
    """What makes a checkpoint the best: a reported metric (``val/qa``, ``val/loss``, ``val/qa/temporal``, ``loss``,
    ...; lower is better for losses, higher for the rest). Empty = the data's main validation metric
    (``val/<data.task>``'s accuracy, or token F1 for captions; ``val/qa`` for mixed fine-tuning data), and no
    scoring (the newest checkpoints are kept) when the run has no ``data.val``. A run folder given to ``mirasol
    eval``, ``predict``, ``export`` or ``train.init_from`` stands for its best checkpoint."""
    prefetch_batches: int = 2
    """Training batches each worker decodes ahead."""
    sample_log: bool = False
    """Each worker writes the keys and stream positions of every step's samples to
    ``samples/<start step>-rank<r>.jsonl`` in the run folder (one file per worker and per start or resume), to
    trace what a step saw (a loss spike, a bad clip)."""

    def __post_init__(self) -> None:
        if self.stage not in ("pretrain", "finetune"):
            raise ConfigError(f"train.stage must be pretrain|finetune, got {self.stage!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto|bf16|fp32, got {self.precision!r}")
        if not 0 < self.augment_min_scale <= 1:
            raise ConfigError(f"train.augment_min_scale must be in (0, 1], got {self.augment_min_scale}")
        if not 0 <= self.augment_shift <= 1:
            raise ConfigError(f"train.augment_shift must be in [0, 1], got {self.augment_shift}")
        if not 0 <= self.augment_jitter < 1:
            raise ConfigError(f"train.augment_jitter must be in [0, 1), got {self.augment_jitter}")
        if self.freeze_av_steps < 0:
            raise ConfigError(f"train.freeze_av_steps must be >= 0, got {self.freeze_av_steps}")
        if not isinstance(self.lr_mult, dict):
            raise ConfigError(f"train.lr_mult must be a mapping of pattern: multiplier, got {self.lr_mult!r}")
        try:
            self.lr_mult = {str(k): float(v) for k, v in self.lr_mult.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"train.lr_mult values must be numbers, got {self.lr_mult!r}") from None
        for k, v in self.lr_mult.items():
            if v < 0:
                raise ConfigError(f"train.lr_mult[{k!r}] must be >= 0, got {v}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "eval_train_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ScalingConfig:
    """How many Ray Train workers and what each one holds."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    """Restarts after a worker dies (Ray Train ``FailureConfig``)."""
    placement_strategy: str = "PACK"
    """How the workers spread over nodes (a Ray placement group strategy): PACK | SPREAD | STRICT_PACK |
    STRICT_SPREAD (one worker per node)."""
    data_cpu_limit: float = 0.0
    """Cap on CPUs Ray Data may use while training; 0 = what is left after the workers."""

    def __post_init__(self) -> None:
        if self.num_workers <= 0:
            raise ConfigError(f"scaling.num_workers must be positive, got {self.num_workers}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError("scaling.placement_strategy must be PACK|SPREAD|STRICT_PACK|STRICT_SPREAD, "
                              f"got {self.placement_strategy!r}")


@dataclass
class StorageConfig:
    """Where runs live. Credentials never go here: they come from the standard AWS environment variables."""

    root: str = "runs"
    """Local path, ``file://`` or ``s3://bucket/prefix`` holding run directories."""
    name: str = ""
    """Run name; re-running with the same name resumes. Empty: derived from the config name and time."""
    endpoint_url: str = ""
    """S3 endpoint; empty uses ``AWS_ENDPOINT_URL`` from the environment."""


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")
"""MLP activations: exact GELU, tanh-approximated GELU (GPT-2's gelu_new), CLIP's QuickGELU, SiLU, ReLU."""


@dataclass
class ModelConfig:
    """The model section: everything needed to rebuild a Mirasol3B model from a checkpoint alone.

    Flat on purpose (no nested dataclasses, no Optional): ``dataclasses.asdict`` of it is plain python, travels in
    a ``weights_only`` checkpoint, and the YAML loader below can coerce every field."""

    # --- geometry: set from the data section by Config; listed here so a checkpoint is complete
    max_snippets: int = 4
    """Most snippets a clip may have: size of the time-aligned model's snippet position table."""
    frames_per_snippet: int = 4
    """F: frames in one snippet."""
    image_size: tuple[int, int] = (64, 64)
    """(H, W) of a frame."""
    n_mels: int = 64
    """M: log-mel bins."""
    mel_frames: int = 32
    """T: log-mel frames per snippet."""
    max_text_len: int = 96
    """Prompt + target tokens: size of the text decoder's position table."""
    vocab_size: int = BYTE_VOCAB_SIZE
    """Text vocabulary (the tokenizer's, specials included). Follows ``data.tokenizer``: the byte tokenizer's at
    once; a tokenizer file's once the driver has read it (:mod:`mirasol_ray.train.prepare`), :data:`UNREAD` until
    then (as the three ids below)."""
    num_classes: int = 0
    """Classes of the linear head (cls_mode == "head"); 0 = no head."""

    # --- video snippet encoder (ViT over tubelets)
    video_dim: int = 96
    """Width of the video ViT."""
    video_depth: int = 2
    """Blocks of the video ViT."""
    video_heads: int = 4
    """Attention heads of the video ViT."""
    tubelet_frames: int = 2
    """t of a t x p x p tubelet."""
    patch_size: int = 16
    """p: spatial side of a tubelet, and of the 2D image patches with sparse tubes."""
    video_stem: str = "patch"
    """How a dense tubelet becomes a token. "patch": one linear projection of its t x p x p pixels (the ViT of
    the paper, and what video_init loads). "conv": a stack of log2(p) 3x3 stride-2 convolutions (each with a
    GroupNorm and a GELU) over the tubelet's frames as channels, down to the same p-pixel grid, then a linear
    projection: the "hybrid ViT" (Dosovitskiy et al. 2021) with the convolutional stem of Xiao et al. 2021 ("Early
    convolutions help transformers see better"). The same tokens, built from local, translation-equivariant
    features: on the demo's clips the tiny preset's 2-block ViT, trained from scratch to name each snippet's shape,
    reached 0.97 held-out in 200 steps on them and 0.52 on linear 16-pixel tubelets (docs/HISTORY.md, "The
    demo"); +7% FLOPs a demo training step."""
    video_max_token: bool = False
    """Append one token per snippet to the video encoder's output: the channel-wise max of its tokens, so the
    Combiner can read a feature wherever in the frame it fires (a max read named held-out shapes at 0.97 where a
    mean read stayed at 0.41, docs/HISTORY.md, "The demo"). Not in the paper; no parameters."""
    video_stem_channels: int = 16
    """Channels of the conv stem's first convolution; each next one doubles them, up to video_dim."""
    sparse_tubes: bool = False
    """Sparse Video Tubes (Piergiovanni et al. 2023): 2D patches of the snippet's first frame plus sparse 3D tubes,
    instead of dense tubelets."""
    sparse_tube_size: tuple[int, int] = (4, 16)
    """(t, p) kernel of a sparse 3D tube."""
    sparse_tube_stride: tuple[int, int] = (4, 32)
    """(t, p) stride of the sparse 3D tubes: larger than the kernel makes them sparse."""
    video_init: str = ""
    """Pretrained weights for the video encoder: a timm ViT (``.safetensors``, or a ``.pth`` state dict with timm's
    names, or a folder holding one with timm's ``config.json``), local path or ``s3://``. Its architecture replaces the
    video_* sizes and options below (docs: README, "Starting from pretrained weights")."""
    video_inflation: str = "central"
    """How video_init's 2D patch embedding becomes a t-frame tubelet: "central" (the 2D kernel on the tubelet's
    frame t//2, zeros on the others: at start the encoder sees that frame as the image model did) or "average" (the
    kernel / t on every frame: it sees the tubelet's mean frame)."""
    video_pos: str = "joint"
    """"joint": one learned position per token of the snippet; "factorized": a 2D grid table (an image ViT's,
    interpolated to the frame size) plus a per-tubelet time table that starts at zero."""
    video_prefix_tokens: int = 0
    """Learned tokens before the patch tokens (a ViT's class token, then its register tokens); they are in the output."""
    video_prefix_pos: bool = False
    """The position table has rows for the prefix tokens (timm's default; not with no_embed_class)."""
    video_pre_norm: bool = False
    """A norm after the embeddings, before the blocks (CLIP ViTs)."""
    video_norm_eps: float = 1e-5
    """LayerNorm epsilon of the video ViT (timm ViTs: 1e-6; CLIP: 1e-5)."""
    video_qkv_bias: bool = True
    video_patch_bias: bool = True
    video_layer_scale: bool = False
    """Per-channel scales on the residual branches (DINOv2)."""
    video_act: str = "gelu"
    """MLP activation: gelu | gelu_tanh | quick_gelu | silu | relu."""
    video_mlp_hidden: int = 0
    """MLP hidden width; 0 = mlp_ratio * video_dim."""
    video_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean of frames in [0, 1], subtracted before the patch embedding (the pretrained model's)."""
    video_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    # --- audio snippet encoder (ViT over log-mel patches)
    audio_dim: int = 96
    """Width of the audio ViT."""
    audio_depth: int = 2
    """Blocks of the audio ViT."""
    audio_heads: int = 4
    """Attention heads of the audio ViT."""
    audio_patch: tuple[int, int] = (16, 16)
    """(mel bins, frames) of a log-mel patch."""
    audio_init: str = ""
    """Pretrained weights for the audio encoder: a timm ViT, as video_init (an image ViT's 3-channel patch
    embedding is summed over its channels, as AST does: the ViT sees the spectrogram as a grey image)."""
    audio_patch_norm: bool = True
    """LayerNorm on each raw log-mel patch before the embedding (log-mel scales differ by front end)."""
    audio_prefix_tokens: int = 0
    audio_prefix_pos: bool = False
    audio_pre_norm: bool = False
    audio_norm_eps: float = 1e-5
    audio_qkv_bias: bool = True
    audio_patch_bias: bool = True
    audio_layer_scale: bool = False
    audio_act: str = "gelu"
    audio_mlp_hidden: int = 0
    """As the video_* options of the same names, for the audio ViT."""

    # --- combiner
    combiner: str = "ttm"
    """"transformer" or "ttm" (Token Turing Machine)."""
    combiner_depth: int = 2
    """Blocks of the combiner's transformer (the TTM's process unit)."""
    combiner_tokens: int = 4
    """m: output tokens per snippet."""
    combiner_readout: str = "queries"
    """How the Transformer Combiner (``combiner: transformer``) reads out its m tokens. "queries": m learned query
    tokens join the snippet's tokens and their outputs are the snippet's (this implementation's own form). "last":
    the paper's (Mirasol3B sec. 3.2): a transformer over the snippet's concatenated video and audio tokens, its last
    m outputs kept (the last m tokens the clip has: its video's when it has no audio). The two hold different
    tensors (only "queries" has ``combiner.out_tokens``), so a checkpoint of one does not load into the other."""
    ttm_memory: int = 16
    """k: memory tokens the TTM carries from snippet to snippet."""
    ttm_read: int = 8
    """r: tokens the TTM reads from memory + inputs and processes."""
    ttm_slot_retention: bool = False
    """The TTM's write keeps each memory slot with a learned per-slot log-odds, half-lives from 1 snippet to twice
    max_snippets at initialisation, so the memory can carry a long video's start to its end (the long-video
    presets'; :class:`~mirasol_ray.model.combiner.TTMCombiner`). Off: the write as published."""

    # --- time-aligned autoregressive model
    dim: int = 128
    """Width of the combiner and the time-aligned model."""
    depth: int = 2
    """Blocks of the time-aligned model."""
    heads: int = 4
    """Attention heads of the combiner and the time-aligned model."""
    latent_loss: str = "cosine"
    """Latent prediction loss: "l2" or "cosine"."""
    latent_loss_weight: float = 1.0
    """Weight of the latent loss in the total."""

    # --- context autoregressive model (text decoder)
    text_dim: int = 128
    """Width of the text decoder."""
    text_depth: int = 2
    """Blocks of the text decoder (each: causal self-attention, cross-attention, MLP)."""
    text_heads: int = 4
    """Attention heads of the text decoder."""
    text_init: str = ""
    """Pretrained language model for the text decoder: a Hugging Face transformers folder (``config.json`` +
    ``model.safetensors`` or its shards; Llama, Mistral, Qwen2 or GPT-2 architecture), local or ``s3://``. Its
    architecture replaces the text_* options, and its tokenizer becomes the run's unless data.tokenizer is set."""
    text_norm: str = "layernorm"
    """"layernorm" or "rmsnorm"."""
    text_norm_eps: float = 1e-5
    text_pos: str = "learned"
    """"learned" (a table of max_text_len positions, as GPT-2) or "rope" (rotary, as Llama)."""
    text_rope_theta: float = 10000.0
    text_rope_scaling: str = ""
    """"" | "linear" | "llama3" (Llama 3.1+ long-context frequencies)."""
    text_rope_scaling_args: tuple[float, ...] = ()
    """linear: (factor,); llama3: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)."""
    text_kv_heads: int = 0
    """Key/value heads (grouped-query attention when fewer than text_heads); 0 = text_heads."""
    text_head_dim: int = 0
    """Width of one head; 0 = text_dim // text_heads."""
    text_mlp: str = "plain"
    """"plain" (fc, act, fc) or "gated" (SwiGLU-style: down(act(gate(x)) * up(x)))."""
    text_act: str = "gelu"
    text_mlp_hidden: int = 0
    """MLP hidden width; 0 = mlp_ratio * text_dim."""
    text_qkv_bias: bool = True
    text_out_bias: bool = True
    text_mlp_bias: bool = True
    text_tied_head: bool = True
    """The output head is the input embedding (else a separate ``lm_head``)."""
    text_vocab_rows: int = 0
    """Rows of the embedding when more than vocab_size: a pretrained LM's table is often padded past its tokenizer."""
    pad_id: int = BYTE_PAD_ID
    """Tokenizer's PAD id."""
    bos_id: int = BYTE_BOS_ID
    """Tokenizer's BOS id: generation starts from it."""
    eos_id: int = BYTE_EOS_ID
    """Tokenizer's EOS id: generation of a row stops at it."""
    score_length_norm: bool = False
    """score_options divides each option's log-likelihood by its token count."""

    # --- classification
    cls_mode: str = "generate"
    """How a clip's class is predicted: "generate" (the decoder writes the label text), "score" (trained like
    generate; predicts the label whose text the decoder finds most likely among the whole label set: gives a
    ranking, so top-5) or "head" (linear head on pooled latents; needs num_classes)."""
    cls_loss_weight: float = 1.0
    """Weight of the head's cross-entropy in the total (cls_mode == "head")."""

    # --- shared
    mlp_ratio: float = 4.0
    """MLP hidden width over block width."""
    dropout: float = 0.0
    """Dropout on attention weights and MLP/residual outputs."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (training only): less memory, ~1/3 more compute."""
    init_strict: bool = True
    """A missing, unexpected or mis-shaped tensor in a pretrained checkpoint (video_init, audio_init, text_init) or
    in the checkpoint ``train.init_from`` names (the classification head excepted: it is the fine-tuning run's own)
    is an error; false reports it and leaves that part as initialised. Resuming a run is always strict."""

    @property
    def embed_rows(self) -> int:
        """Rows of the text embedding and output head: the tokenizer's vocabulary, or a pretrained LM's if larger."""
        return max(self.vocab_size, self.text_vocab_rows)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        unread = [k for k in VOCAB_FIELDS if getattr(self, k) == UNREAD]
        _check(not unread, unread[0] if unread else "", "is unread: data.tokenizer has not been read yet (the "
               "driver's mirasol_ray.train.prepare step fills the vocabulary in)")
        positive = ("max_snippets", "frames_per_snippet", "n_mels", "mel_frames", "max_text_len", "vocab_size",
                    "video_dim", "video_depth", "video_heads", "tubelet_frames", "patch_size", "audio_dim",
                    "audio_depth", "audio_heads", "combiner_depth", "combiner_tokens", "ttm_memory", "ttm_read",
                    "dim", "depth", "heads", "text_dim", "text_depth", "text_heads")
        for name in positive:
            _check(getattr(self, name) > 0, name, "must be positive")
        _check(self.num_classes >= 0, "num_classes", "must be >= 0")
        for name in ("pad_id", "bos_id", "eos_id"):
            _check(0 <= getattr(self, name) < self.vocab_size, name, f"must be in [0, vocab_size {self.vocab_size})")
        for name in ("image_size", "sparse_tube_size", "sparse_tube_stride", "audio_patch"):
            _check(all(v > 0 for v in getattr(self, name)), name, "must be positive")
        H, W = self.image_size
        p = self.patch_size
        _check(H % p == 0 and W % p == 0, "patch_size", f"must divide image_size {self.image_size}")
        if self.sparse_tubes:
            (tt, tp), (st, sp) = self.sparse_tube_size, self.sparse_tube_stride
            _check(tt <= self.frames_per_snippet and tp <= min(H, W), "sparse_tube_size",
                   f"must fit in a snippet ({self.frames_per_snippet} frames of {self.image_size})")
            _check(st >= tt and sp >= tp, "sparse_tube_stride", "must be >= sparse_tube_size (tubes are sparse)")
        else:
            _check(self.frames_per_snippet % self.tubelet_frames == 0, "tubelet_frames",
                   f"must divide frames_per_snippet {self.frames_per_snippet}")
        pm, pt = self.audio_patch
        _check(self.n_mels % pm == 0, "audio_patch", f"mel size {pm} must divide n_mels {self.n_mels}")
        _check(self.mel_frames % pt == 0, "audio_patch", f"frame size {pt} must divide mel_frames {self.mel_frames}")
        pairs = [("video_dim", "video_heads"), ("audio_dim", "audio_heads"), ("dim", "heads")]
        if not self.text_head_dim:
            pairs.append(("text_dim", "text_heads"))
        for width, heads in pairs:
            _check(getattr(self, width) % getattr(self, heads) == 0, width,
                   f"{getattr(self, width)} must be divisible by {heads} {getattr(self, heads)}")
        _check(self.combiner in ("transformer", "ttm"), "combiner", f"must be transformer|ttm, got {self.combiner!r}")
        _check(self.combiner_readout in ("queries", "last"), "combiner_readout",
               f"must be queries|last, got {self.combiner_readout!r}")
        _check(self.combiner_readout == "queries" or self.combiner == "transformer", "combiner_readout",
               f"{self.combiner_readout!r} is the Transformer Combiner's (model.combiner=transformer), not the "
               f"{self.combiner!r} one's")
        _check(self.latent_loss in ("l2", "cosine"), "latent_loss", f"must be l2|cosine, got {self.latent_loss!r}")
        _check(self.cls_mode in ("generate", "score", "head"), "cls_mode",
               f"must be generate|score|head, got {self.cls_mode!r}")
        if self.cls_mode == "head":
            _check(self.num_classes > 0, "num_classes", "must be positive when cls_mode is 'head'")
        _check(self.latent_loss_weight >= 0, "latent_loss_weight", "must be >= 0")
        _check(self.cls_loss_weight >= 0, "cls_loss_weight", "must be >= 0")
        _check(self.mlp_ratio > 0, "mlp_ratio", "must be positive")
        for part in ("video", "audio"):
            _check(getattr(self, f"{part}_act") in ACTIVATIONS, f"{part}_act", f"must be one of {'|'.join(ACTIVATIONS)}")
            _check(getattr(self, f"{part}_prefix_tokens") >= 0, f"{part}_prefix_tokens", "must be >= 0")
            _check(getattr(self, f"{part}_norm_eps") > 0, f"{part}_norm_eps", "must be positive")
            _check(getattr(self, f"{part}_mlp_hidden") >= 0, f"{part}_mlp_hidden", "must be >= 0")
        _check(self.video_stem in ("patch", "conv"), "video_stem", f"must be patch|conv, got {self.video_stem!r}")
        if self.video_stem == "conv":
            _check(p >= 2 and p & (p - 1) == 0, "video_stem", f"conv needs a power-of-two patch_size, got {p}")
            _check(not self.sparse_tubes, "video_stem", "conv needs dense tubelets (sparse_tubes false)")
            _check(not self.video_init, "video_stem", "conv cannot load video_init (a ViT's linear patch embedding)")
            _check(self.video_stem_channels > 0, "video_stem_channels", "must be positive")
        _check(self.video_pos in ("joint", "factorized"), "video_pos", "must be joint|factorized")
        _check(self.video_inflation in ("central", "average"), "video_inflation", "must be central|average")
        _check(all(s > 0 for s in self.video_std), "video_std", "must be positive")
        _check(self.text_norm in ("layernorm", "rmsnorm"), "text_norm", "must be layernorm|rmsnorm")
        _check(self.text_norm_eps > 0, "text_norm_eps", "must be positive")
        _check(self.text_pos in ("learned", "rope"), "text_pos", "must be learned|rope")
        _check(self.text_mlp in ("plain", "gated"), "text_mlp", "must be plain|gated")
        _check(self.text_act in ACTIVATIONS, "text_act", f"must be one of {'|'.join(ACTIVATIONS)}")
        _check(self.text_mlp_hidden >= 0 and self.text_head_dim >= 0 and self.text_vocab_rows >= 0, "text_mlp_hidden",
               "text_mlp_hidden, text_head_dim and text_vocab_rows must be >= 0")
        kv = self.text_kv_heads or self.text_heads
        _check(self.text_heads % kv == 0, "text_kv_heads", f"{kv} must divide text_heads {self.text_heads}")
        if self.text_pos == "rope":
            _check(self.text_rope_theta > 0, "text_rope_theta", "must be positive")
            _check((self.text_head_dim or self.text_dim // self.text_heads) % 2 == 0, "text_head_dim",
                   "must be even with rotary positions")
        n_args = {"": 0, "linear": 1, "llama3": 4}
        _check(self.text_rope_scaling in n_args, "text_rope_scaling", "must be ''|linear|llama3")
        _check(len(self.text_rope_scaling_args) == n_args.get(self.text_rope_scaling, 0), "text_rope_scaling_args",
               f"needs {n_args.get(self.text_rope_scaling, 0)} values for text_rope_scaling "
               f"{self.text_rope_scaling!r}")
        _check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """Plain python (tuples as lists): safe for ``torch.load(weights_only=True)`` and YAML."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(raw) - set(hints))
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        kwargs = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in raw.items()}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"model.{field} {message}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        d, m = self.data, self.model
        # data owns the geometry; the model follows it.
        m.max_snippets = max(m.max_snippets, d.num_snippets)
        m.frames_per_snippet = d.frames_per_snippet
        m.image_size = (d.height, d.width)
        m.n_mels = d.n_mels
        m.mel_frames = d.mel_frames
        m.max_text_len = d.max_prompt_len + d.max_target_len
        if is_byte_tokenizer(d.tokenizer):
            m.vocab_size, m.pad_id, m.bos_id, m.eos_id = BYTE_VOCAB_SIZE, BYTE_PAD_ID, BYTE_BOS_ID, BYTE_EOS_ID
        # a tokenizer file's vocabulary is the driver's to read (mirasol_ray.train.prepare): until then the fields
        # it has not filled are UNREAD, and checked once they are.
        # num_classes 0 means "the label set of the training shards' manifest", filled in by the train loop
        check = dataclasses.replace(m, num_classes=max(m.num_classes, 1))
        for name in ("pad_id", "bos_id", "eos_id"):
            if getattr(check, name) == UNREAD:
                setattr(check, name, 0)
        if check.vocab_size == UNREAD:
            check.vocab_size = 1 + max(check.pad_id, check.bos_id, check.eos_id)
        check.validate()

    def tokenizer_unread(self) -> list[str]:
        """The model's vocabulary fields still to be read from ``data.tokenizer`` (by the driver's prepare step)."""
        return [f"model.{k}" for k in VOCAB_FIELDS if getattr(self.model, k) == UNREAD]

    def check_start(self) -> None:
        """What a training run needs beyond a valid config: a fine-tuning run trains on task rows, from pretrained
        weights.
        Checked when a run starts, not when a config loads (a finetune preset names no checkpoint of its own)."""
        t, m = self.train, self.model
        if t.stage == "finetune" and self.data.task == "caption":
            raise ConfigError("train.stage=finetune trains on task rows, but data.task=caption: set data.task="
                              "qa|mcqa|cls|finetune|all (or train.stage=pretrain to train on captions)")
        if (t.stage == "finetune" and not t.init_from and not t.finetune_from_scratch
                and not any(getattr(m, k, "") for k in ("video_init", "audio_init", "text_init"))):
            raise ConfigError("train.stage=finetune needs train.init_from=RUN_OR_CHECKPOINT (the pretrained weights) "
                              "or pretrained parts (model.video_init/audio_init/text_init); set "
                              "train.finetune_from_scratch=true to fine-tune random weights on purpose")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("mirasol_ray.configs").iterdir() if p.name.endswith(".yaml"))


def preset_purpose(name: str) -> str:
    """What a preset is for, in one line: the first sentence of the comment that opens its YAML (``# NAME: what it
    is for ...``, up to the commands it shows)."""
    text = (resources.files("mirasol_ray.configs") / f"{name}.yaml").read_text()
    words = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith("#   ") or not line[1:].strip():
            break
        words.append(line[1:].strip())
    about = " ".join(words).removeprefix(f"{name}:").strip()
    end = re.search(r"(?<!\bsec)(?<!\be\.g)(?<!\bi\.e)(?<!\bcf)\. ", about)  # not "sec. 3: ..."
    return (about[:end.start() + 1] if end else about).rstrip(":")


def _is_path(name_or_path: str) -> bool:
    return name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path


def _read_yaml(name_or_path: str, _chain: tuple[tuple[str, str], ...] = (), _folder: str = "") -> dict[str, Any]:
    """The mapping of a preset name or YAML path, its ``base:`` chain merged underneath.

    A relative ``base:`` path is looked up from the folder of the YAML that names it (``_folder``), not from the
    current directory; a chain that comes back to a file or preset already in it is an error naming the chain."""
    if _is_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if _folder and not path.is_absolute():
            path = Path(_folder) / path
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" + (f" (base: of {_chain[-1][1]})" if _chain else ""))
        ident, shown = f"file:{path.resolve()}", str(path)
        text = path.read_text()
        folder = str(path.resolve().parent)
    else:
        res = resources.files("mirasol_ray.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
        ident, shown = f"preset:{name_or_path}", name_or_path
        text = res.read_text()
        folder = ""
    if any(ident == seen for seen, _ in _chain):
        raise ConfigError("config base: cycle: " + " -> ".join([s for _, s in _chain] + [shown]))
    chain = _chain + ((ident, shown),)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{shown}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{shown}: top level must be a mapping")
    base = raw.pop("base", None)
    if base:  # a preset may extend another (`base: tiny`), a YAML a preset or a YAML beside it
        if not isinstance(base, str):
            raise ConfigError(f"{shown}: base must be a preset name or a YAML path, got {base!r}")
        merged = _read_yaml(base, chain, folder)
        _deep_update(merged, raw)
        return merged
    return raw


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, (list, tuple)):  # e.g. data.train: a path, or a list of sets
            args = [a for a in args if typing.get_origin(a) in (list, tuple)] or args
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):  # a list's entry (data.train's sets): built by its section's own rules
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = [n for n in fields if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.lr=1e-3", "data.train=s3://b/x"]`` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or "." not in key:
            raise ConfigError(f"--set key must be section.key, got {key!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return nested


DERIVED_MODEL_FIELDS = {
    "frames_per_snippet": "data.frames_per_snippet",
    "image_size": "data.height, data.width",
    "n_mels": "data.n_mels",
    "mel_frames": "data.mel_frames",
    "max_text_len": "data.max_prompt_len + data.max_target_len",
    "vocab_size": "data.tokenizer",
    "pad_id": "data.tokenizer",
    "bos_id": "data.tokenizer",
    "eos_id": "data.tokenizer",
}
"""Model fields that :meth:`Config.__post_init__` sets from the data section, and what to set instead. The
vocabulary fields of a tokenizer file are checked by the driver's prepare step, which reads the file."""


def _check_derived(raw_model: dict[str, Any], model: ModelConfig, tokenizer: str) -> None:
    """A derived model field given with another value than the data implies is an error naming the ``data.`` key
    (it would be overwritten without a word). The same value is fine: a run's saved config holds them all."""
    for key, source in DERIVED_MODEL_FIELDS.items():
        if key not in raw_model or (key in VOCAB_FIELDS and not is_byte_tokenizer(tokenizer)):
            continue
        given = _coerce(raw_model[key], typing.get_type_hints(ModelConfig)[key], f"model.{key}")
        if given != getattr(model, key):
            raise ConfigError(f"model.{key}={given!r} cannot be set: it follows {source} ({getattr(model, key)!r} "
                              f"here); set {source} instead")


def from_dict(raw: dict[str, Any]) -> Config:
    """A :class:`Config` from its mapping (a YAML's, or :meth:`Config.to_dict`'s): unknown keys are errors, every
    section is validated. Nothing is read: a tokenizer file's vocabulary fields the mapping does not give are left
    :data:`UNREAD` for the driver's prepare step (:mod:`mirasol_ray.train.prepare`); a prepared config's mapping
    gives them all, so a worker rebuilds the same config."""
    data, train, model = raw.get("data"), raw.get("train"), raw.get("model")
    if isinstance(data, dict | None) and "task" not in (data or {}):  # the stage says which rows to train on
        stage = train.get("stage") if isinstance(train, dict) else None
        raw = {**raw, "data": {**(data or {}), "task": "finetune" if stage == "finetune" else "caption"}}
    tokenizer = (raw["data"] if isinstance(raw.get("data"), dict) else {}).get("tokenizer", DataConfig.tokenizer)
    if not is_byte_tokenizer(str(tokenizer or "")) and isinstance(model, dict | None):
        raw = {**raw, "model": {**{k: UNREAD for k in VOCAB_FIELDS}, **(model or {})}}
    cfg = _build(Config, raw, "")
    if isinstance(model, dict):
        _check_derived(model, cfg.model, cfg.data.tokenizer)
    return cfg


def read_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> dict[str, Any]:
    """The mapping of a preset name or YAML path (its ``base:`` chain merged in), ``--set`` overrides applied; not
    validated yet (:func:`from_dict` does)."""
    raw = _read_yaml(name_or_path)
    _deep_update(raw, parse_overrides(overrides))
    return raw


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML path, apply ``--set`` overrides, validate. Pure: what needs files beyond the YAML
    (a tokenizer file's vocabulary, pretrained checkpoints' architectures, parameter patterns) is the driver's
    prepare step, :func:`mirasol_ray.train.prepare.prepare`."""
    return from_dict(read_config(name_or_path, overrides))
