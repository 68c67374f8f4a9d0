"""Typed configuration: dataclasses loaded from YAML presets, with ``--set section.key=value`` overrides.

A config is one :class:`Config` holding five sections (data, model, train, scaling, storage). Presets live in
``mirasol_ray/configs/NAME.yaml``; a path to any YAML file works too. Unknown keys are errors that name the key.

Geometry (snippets, frames, image size, mel bins, text lengths, vocabulary and special tokens) is set once, in ``data``; the model
section follows it (see :meth:`Config.__post_init__`), so the two can never disagree: setting one of those model
fields to another value is an error that names the ``data.`` key to set (:data:`DERIVED_MODEL_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mirasol_ray.model.config import ModelConfig


class ConfigError(ValueError):
    """A config that cannot be loaded: the message names the key or file."""


# ----------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class DataConfig:
    """Where the shards are and what one decoded sample looks like (fixed shapes)."""

    train: str = ""
    """Training shards: a folder, a glob, a brace list (``shard-{000..009}.tar``) or ``s3://`` URI."""
    val: str = ""
    """Validation shards (same forms as ``train``); empty means no validation during training."""
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
    (docs/PERFORMANCE.md, "The demo"). Scored apart as ``caption/segment``. False: ignored."""
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
    beyond its decode and leaves its CPU idle ~0.1 s before the next one starts (docs/PERFORMANCE.md), so small
    clips want large blocks; large rows want small ones (a block is held whole in memory). 0: as many as fit in
    64 MB of decoded rows, at most 64 (tiny: 64, demo: 64, base: 19, mirasol3b: 6, finetune_msrvtt_qa: 3)."""
    decode_cpus: float = 0.5
    """CPUs reserved by each decode task: fractional so training workers are not starved (FIELD_NOTES)."""
    decode_actors: int = 0
    """Decode in a pool of this many long-lived actors (each holding ``decode_cpus``) instead of tasks; 0: tasks
    (Ray reuses their worker processes, so imports are paid once either way: docs/PERFORMANCE.md)."""
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
    (docs/PERFORMANCE.md, "The demo")."""
    augment: bool = False
    """Train-time video augmentation (:mod:`mirasol_ray.train.augment`): each training clip gets a random zoom
    (``augment_min_scale``), translation (``augment_shift``), optional left-right flip (``augment_flip``) and
    brightness/contrast change (``augment_jitter``), the same for all its frames, new at every step, drawn from
    ``seed``, the step and the rank (reproducible). Never at evaluation. Against memorising a small data set's
    exact pixels (docs/PERFORMANCE.md, "Why shapes are not learnt"). Wrong for data whose answers depend on
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


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        from mirasol_ray.data.text import get_tokenizer

        d, m = self.data, self.model
        # data owns the geometry; the model follows it.
        m.max_snippets = max(m.max_snippets, d.num_snippets)
        m.frames_per_snippet = d.frames_per_snippet
        m.image_size = (d.height, d.width)
        m.n_mels = d.n_mels
        m.mel_frames = d.mel_frames
        m.max_text_len = d.max_prompt_len + d.max_target_len
        tok = get_tokenizer(d.tokenizer)
        m.vocab_size, m.pad_id, m.bos_id, m.eos_id = tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id
        # num_classes 0 means "the label set of the training shards' manifest", filled in by the train loop
        dataclasses.replace(m, num_classes=max(m.num_classes, 1)).validate()

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
        return _coerce(value, args[0], key)
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
"""Model fields that :meth:`Config.__post_init__` sets from the data section, and what to set instead."""


def _check_derived(raw_model: dict[str, Any], model: ModelConfig) -> None:
    """A derived model field given with another value than the data implies is an error naming the ``data.`` key
    (it would be overwritten without a word). The same value is fine: a run's saved config holds them all."""
    for key, source in DERIVED_MODEL_FIELDS.items():
        if key not in raw_model:
            continue
        given = _coerce(raw_model[key], typing.get_type_hints(ModelConfig)[key], f"model.{key}")
        if given != getattr(model, key):
            raise ConfigError(f"model.{key}={given!r} cannot be set: it follows {source} ({getattr(model, key)!r} "
                              f"here); set {source} instead")


def from_dict(raw: dict[str, Any]) -> Config:
    data, train = raw.get("data"), raw.get("train")
    if isinstance(data, dict | None) and "task" not in (data or {}):  # the stage says which rows to train on
        stage = train.get("stage") if isinstance(train, dict) else None
        raw = {**raw, "data": {**(data or {}), "task": "finetune" if stage == "finetune" else "caption"}}
    cfg = _build(Config, raw, "")
    if isinstance(raw.get("model"), dict):
        _check_derived(raw["model"], cfg.model)
    return cfg


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML path, apply ``--set`` overrides, validate."""
    raw = _read_yaml(name_or_path)
    _deep_update(raw, parse_overrides(overrides))
    pretrained = any((raw.get("model") or {}).get(k) for k in ("video_init", "audio_init", "text_init"))
    if pretrained:
        # the checkpoints' architectures and the LM's tokenizer, resolved once, here: workers, checkpoints and
        # evaluation then take the config as it is and never need the pretrained files to build the model
        from mirasol_ray.model.pretrained import rehearse_load, resolve_pretrained

        raw = resolve_pretrained(raw)
    cfg = from_dict(raw)
    if pretrained:
        rehearse_load(cfg)
    if cfg.train.freeze or cfg.train.lr_mult:
        from mirasol_ray.train.step import check_patterns

        check_patterns(cfg)
    return cfg
