"""``train_loop_per_worker``: what each Ray Train worker runs.

Only a plain dict comes in (see :func:`mirasol_ray.launch.train.loop_config`): the config as a dict, the run's
URI, the skip counter's name, the label set, the training data (the sample index, or the refs of the cached
rows), the run's lease token and the driver's scratch folder. Each worker reads its own share of the training
stream (:func:`~mirasol_ray.data.pipeline.train_batches`), steps the model (DDP, or FSDP2 for large presets),
logs metrics on rank 0, and reports checkpoints through ``ray.train.report``, marking each complete once all its
files are stored; on restart (a dead worker, or the same run name again) it continues from the run folder's
newest complete checkpoint (:func:`~mirasol_ray.train.checkpoint.latest_checkpoint_dir`), at the same step,
optimiser and scheduler state, and data position: the samples not consumed yet, exactly (data/index.py),
whatever the number of workers. Progress goes to the run's counter actor, which the driver draws; the worker's
own output stays in Ray's log files.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch.distributed as dist
from tensorboardX import SummaryWriter

from mirasol_ray import storage
from mirasol_ray.config import Config, from_dict
from mirasol_ray.data.index import MixtureOrder, ReadPosition, SampleIndex, StreamOrder
from mirasol_ray.data.pipeline import (
    CacheSource,
    DecodeSource,
    NoRowsError,
    counter_actor,
    describe_skips,
    forget_counter,
    iter_worker_batches,
    shards_failed,
    split_by_set,
    train_batches,
)
from mirasol_ray.data.schema import qtype_table
from mirasol_ray.data.text import get_tokenizer
from mirasol_ray.model.pretrained import startup_table
from mirasol_ray.train import checkpoint as ckpt
from mirasol_ray.train import sharded
from mirasol_ray.train.metrics import Throughput, aggregate
from mirasol_ray.train.parallel import (
    build_on_rank,
    evaluating,
    gather_objects,
    gradient_sync,
    is_fsdp,
    mean_over_ranks,
    parallelize,
)
from mirasol_ray.train.ray_metrics import TrainGauges
from mirasol_ray.train.step import (
    apply_freeze,
    count_tokens,
    eval_loss,
    make_optimizer,
    make_scheduler,
    predict_batch,
    train_step,
)
from mirasol_ray.train.weights import load_pretrained

LOSS_PARTS = ("loss", "text", "latent", "cls")
"""Loss parts logged as their mean over the ranks."""


class NoBatchError(RuntimeError):
    """A whole epoch gave this worker no row: training could never take a step (every clip skipped, or a
    ``data.task`` that matches no text)."""


def scratch_dir(config: dict[str, Any]) -> str | None:
    """Where this worker keeps its temporary folders: the driver's scratch folder when this worker shares the
    driver's machine (the driver removes it on every exit, even after killing the workers), else the system's."""
    scratch = config.get("scratch") or ""
    return scratch if scratch and os.path.isdir(scratch) else None


def die_with_raylet() -> None:
    """Ask the kernel to kill this process the moment its parent, the node's raylet, dies.

    Ray (2.60) starts each worker in a process group of its own, so a signal to the driver's group (a killed
    ``mirasol train``, with the embedded Ray it started) does not reach it; the worker only notices the lost raylet
    at its next periodic check, and meanwhile kept training and wrote a checkpoint into a run folder a new run was
    already using. ``PR_SET_PDEATHSIG`` closes that window. Linux only; elsewhere Ray's check applies."""
    if not sys.platform.startswith("linux"):
        return

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ulong = ctypes.c_ulong  # prctl is variadic: pass full-width arguments
        libc.prctl(ctypes.c_int(1), ulong(signal.SIGKILL), ulong(0), ulong(0), ulong(0))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the raylet died before the call
        os._exit(1)


class RunLog:
    """Rank 0's metrics.jsonl and TensorBoard events: written locally, copied into the run folder (local or
    S3) at every checkpoint and at the end, so an object store never sees partial appends. Each record's numbers
    also go to Ray's metrics (:mod:`~mirasol_ray.train.ray_metrics`), tagged with the run's folder name."""

    def __init__(self, run_uri: str, resume_step: int, scratch: str | None = None):
        self.run_uri = run_uri
        self.local = tempfile.mkdtemp(prefix="mirasol-log-", dir=scratch)
        self.metrics_path = os.path.join(self.local, "metrics.jsonl")
        previous = storage.join(run_uri, "metrics.jsonl")
        if storage.exists(previous):  # resume: keep history up to the checkpoint's step
            lines = storage.read_text(previous).splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.metrics_path, "w") as f:
                f.write("".join(ln + "\n" for ln in kept))
        # the file exists from the start: a checkpoint before the first record (train.checkpoint_every below
        # train.log_every) copies it as it is, empty, instead of failing the run on a missing file
        open(self.metrics_path, "a").close()

        self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"), purge_step=resume_step + 1 or None)
        self.gauges = TrainGauges(run_uri.rstrip("/").rsplit("/", 1)[-1])

    def write(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.gauges.set(record)
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, record["step"])
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)):
                        self.tb.add_scalar(f"{k}/{kk}", vv, record["step"])

    def sync(self) -> None:
        self.tb.flush()
        fs = storage.fsspec_fs(self.run_uri)
        dest = storage.strip_scheme(self.run_uri)
        fs.makedirs(dest, exist_ok=True)
        fs.put(self.metrics_path, dest + "/metrics.jsonl")
        fs.put(os.path.join(self.local, "tensorboard") + "/", dest + "/tensorboard/", recursive=True)

    def close(self, sync: bool = True) -> None:
        try:
            if sync:
                self.sync()
            self.tb.close()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)


def _snapshot(counter_name: str) -> dict[str, Any]:
    actor = counter_actor(counter_name)
    try:
        return ray.get(actor.snapshot.remote(), timeout=10) if actor is not None else {}
    except Exception:  # the counter is informative: never fail training for it
        forget_counter(counter_name)
        return {}


def _say(counter_name: str, message: str) -> None:
    """A line for the person at the driver (workers run with ``log_to_driver=False``: their own output stays in
    the Ray session's logs): an event on the counter actor, which the driver's progress thread prints."""
    _progress(counter_name, None, message)


def _skips(counter_name: str) -> dict[str, int]:
    return _snapshot(counter_name).get("skipped", {})


def _progress(counter_name: str, progress: dict[str, Any] | None, event: str = "") -> None:
    """Rank 0's step (and an event line such as a resume) to the counter actor, which the driver draws."""
    actor = counter_actor(counter_name)
    try:
        if actor is not None:
            actor.report_step.remote(progress, event)
    except Exception:  # informative only
        forget_counter(counter_name)


PROGRESS_EVERY_S = 0.25
"""Rank 0 reports its step to the counter actor at most this often: a report per step costs the actor's process
~1 ms of CPU, ~0.7 ms per sample of a small model on 2 CPUs (docs/HISTORY.md, "The data path"), while the console draws
every 0.5 s."""


def due_between(step: int, steps: int, every: int) -> int:
    """How many of the steps after ``step`` up to ``steps`` are multiples of ``every`` or the last step (the
    evaluations or checkpoints still to come)."""
    if step >= steps:
        return 0
    regular = steps // every - step // every if every > 0 else 0
    return regular + (0 if every > 0 and steps % every == 0 else 1)


class Pace:
    """What rank 0 tells the console beside its step so that the time left covers evaluations and checkpoints:
    the seconds a training step takes (evaluations and checkpoints left out, the first step too: it waits for the
    pipeline), the last evaluation's and checkpoint's measured seconds, how many of each are still to come, and the
    clips an evaluation scores (:func:`mirasol_ray.launch.console.time_left` does the arithmetic)."""

    def __init__(self, cfg: Config, start_step: int, world: int, has_eval: bool, scored: bool):
        self.cfg, self.start, self.world, self.has_eval, self.scored = cfg, start_step, world, has_eval, scored
        self.t_first: float | None = None
        self.busy = 0.0  # evaluation and checkpoint seconds since the first step
        self.eval_s: float | None = None
        self.ckpt_s: float | None = None
        self.eval_rows = 0

    def stepped(self, step: int) -> None:
        if step == self.start + 1:
            self.t_first = time.perf_counter()

    def evaluated(self, seconds: float, rows: int) -> None:
        self.eval_s, self.eval_rows = seconds, rows
        self.busy += seconds

    def checkpointed(self, seconds: float) -> None:
        self.ckpt_s = seconds
        self.busy += seconds

    def eval_clips(self) -> str:
        t = self.cfg.train
        if self.eval_rows:
            return f"{self.eval_rows} clips"
        if t.eval_batches > 0:
            return f"up to {t.eval_batches * t.batch_size * self.world} clips"
        return "the held-out clips"

    def progress(self, step: int, loss: float, phase: str = "", val: dict | None = None) -> dict[str, Any]:
        t = self.cfg.train
        out: dict[str, Any] = {"step": step, "steps": t.steps, "loss": loss,
                               "rows_per_step": t.batch_size * t.grad_accum * self.world}
        if self.t_first is not None and step > self.start + 1:
            out["step_s"] = max(time.perf_counter() - self.t_first - self.busy, 0.0) / (step - self.start - 1)
        ckpts = due_between(step, t.steps, t.checkpoint_every)
        if self.has_eval:
            evals = due_between(step, t.steps, t.eval_every)
            if self.scored:  # every evaluation writes a checkpoint too
                ckpts = max(ckpts, evals)
            # the last step's evaluation, announced before it runs, is still to come
            out["evals_left"] = evals + phase.startswith("validating")
            if self.eval_s is not None:
                out["eval_s"] = self.eval_s
            if self.eval_rows or t.eval_batches > 0:
                out["eval_rows"] = self.eval_rows or t.eval_batches * t.batch_size * self.world
        out["ckpts_left"] = ckpts + (phase != "")  # the last step's checkpoint, still to write
        if self.ckpt_s is not None:
            out["ckpt_s"] = self.ckpt_s
        if phase:
            out["phase"] = phase
        if val is not None:
            out["val"] = val
        return out


def no_batch_message(cfg: Config, world: int, snap: dict[str, Any]) -> str:
    """The one line that says why no batch could be formed, with the skip counts by reason."""

    skipped = snap.get("skipped", {})
    if snap.get("decoded", 0) == 0 and skipped and set(skipped) <= {"no_text_for_task"}:
        cause = f"data.task={cfg.data.task} matches no text in {cfg.data.train_label}"
    elif snap.get("decoded", 0) == 0 and shards_failed(snap) and snap.get("skipped") and all(
            r in ("not_a_tar", "truncated_shard", "unreadable_shard", "bad_shard") for r in skipped):
        cause = f"no shard of {cfg.data.train_label} could be read"
    elif snap.get("decoded", 0) == 0:
        cause = f"no clip of {cfg.data.train_label} decoded"
    else:
        cause = (f"an epoch gave a worker no row ({snap.get('rows', 0)} rows in all for {world} worker(s)): the "
                 "few clips that decode fell to other workers")
    return f"no training batch can be formed: {cause}; {describe_skips(snap)}"


def evaluate(model, batches, tok, device, cfg: Config, label_set, max_batches: int = 0,
             qtypes: dict[int, str] | None = None, sets: list | None = None) -> tuple[dict[str, Any], list[int]]:
    """Task metrics over an evaluation split (``val``, or ``train_eval``: the training clips scored beside it),
    their loss as ``loss``, and the rows (clips) each rank scored: each rank
    predicts its own share (``batches``, its split of the dataset), with the model gathered once (FSDP2) so that
    decoding needs no collective; every rank's records and loss sums are then gathered and scored together, so the
    metrics are those of the whole split. The loss is training's weighted loss, teacher-forced: it moves with every
    step where accuracies move in jumps, which is what a scheduler comparing young trials (ASHA in ``mirasol
    sweep``) needs. A collective: every rank calls it.

    ``sets``: ``[name, first row]`` of each set the split is made of (rows in the sets' order, ``pos`` their index):
    each set is also scored apart, as ``<name>/<metric>`` (``val/<name>/qa`` once nested under the split)."""
    records, loss_sum, rows = [], 0.0, 0
    set_loss: dict[str, list[float]] = {}  # name -> [loss sum, rows]
    with evaluating(model) as m:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            for name, part in split_by_set(batch, sets):
                recs = predict_batch(m, part, tok, device, cfg.train.precision, label_set=label_set, qtypes=qtypes)
                n = len(part["key"])
                loss = eval_loss(m, part, device, cfg.train.precision) * n
                loss_sum += loss
                rows += n
                if name is not None:
                    recs = [dict(r, set=name) for r in recs]
                    acc = set_loss.setdefault(name, [0.0, 0])
                    acc[0], acc[1] = acc[0] + loss, acc[1] + n
                records += recs
    parts = gather_objects((records, loss_sum, rows, set_loss))
    every = [r for part in parts for r in part[0]]
    out = aggregate(every)
    total = sum(p[2] for p in parts)
    if total:
        out["loss"] = {"metric": "loss", "value": sum(p[1] for p in parts) / total, "count": total}
    for name, _ in sets or []:
        for k, v in aggregate(r for r in every if r.get("set") == name).items():
            out[f"{name}/{k}"] = v
        done = [p[3][name] for p in parts if name in p[3]]
        if sum(d[1] for d in done):
            out[f"{name}/loss"] = {"metric": "loss", "value": sum(d[0] for d in done) / sum(d[1] for d in done),
                                   "count": sum(d[1] for d in done)}
    return out, [p[2] for p in parts]


def _all_ranks(value: int) -> list[int]:
    """``value`` of every rank, in rank order (a collective: every rank calls it)."""
    return [int(v) for v in gather_objects(value)]


def _train_source(config: dict[str, Any], cfg: Config):
    """Where a worker's training rows come from: the decoder over the sample index, or the cached rows."""

    data = config["train_data"]
    if "cache" in data:
        return CacheSource(data["cache"], data["num_samples"])
    return DecodeSource(SampleIndex.from_dict(data["index"]), cfg.data, counter_name=config["counter"],
                        label_set=config.get("label_set"), cpu_limit=float(data.get("cpu_limit", 0.0)))


def _train_order(config: dict[str, Any], cfg: Config, source):
    """Which sample each position of the training stream holds: the one dataset's epochs, or a weighted mixture of
    the sets ``train_data["sets"]`` lists (:class:`~mirasol_ray.data.index.MixtureOrder`)."""
    sets = config["train_data"].get("sets")
    if sets:
        return MixtureOrder([s["size"] for s in sets], [s["weight"] for s in sets], cfg.data.seed, cfg.data.shuffle)
    return StreamOrder(len(source), cfg.data.seed, cfg.data.shuffle)


class SampleLog:
    """``train.sample_log``: this worker's samples per step, appended locally (in the scratch folder) and copied to
    ``samples/<start step>-rank<r>.jsonl`` in the run folder at every checkpoint."""

    def __init__(self, run_uri: str, start_step: int, rank: int, scratch: str | None = None):
        self.uri = storage.join(run_uri, "samples", f"{start_step:08d}-rank{rank}.jsonl")
        fd, self.local = tempfile.mkstemp(prefix="mirasol-samples-", suffix=".jsonl", dir=scratch)
        os.close(fd)

    def write(self, step: int, batches: list[dict[str, Any]]) -> None:
        with open(self.local, "a") as f:
            f.write(json.dumps({"step": step, "keys": [k for b in batches for k in b["key"]],
                                "pos": [int(p) for b in batches for p in b["pos"]]}) + "\n")

    def sync(self) -> None:
        with open(self.local, "rb") as f:
            storage.write_bytes(self.uri, f.read())

    def close(self, sync: bool = True) -> None:
        try:
            if sync:
                self.sync()
        finally:
            os.remove(self.local)


def _restore(folder: str, model, opt, sched) -> dict[str, Any]:
    """Load a checkpoint folder (local, or a URI in the run folder) into the parallelised model, its optimiser and
    scheduler, and return its training state (``step``, ``epoch``, ``data_position``). A sharded checkpoint is
    read shard by shard onto however many ranks there are now (resharding); a full one is loaded on every rank. A
    collective under FSDP2."""
    model_file = ckpt.load_torch(storage.join(folder, ckpt.MODEL_FILE))
    state = ckpt.load_torch(storage.join(folder, ckpt.STATE_FILE))
    if ckpt.is_sharded_state(model_file):
        sharded.load(folder, model, opt)
    else:
        ckpt.restore_state(model, opt, model_file["model"], state["optimizer"], source=folder)
    sched.load_state_dict(state["scheduler"])
    return state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    # the driver's storage settings, before anything is read (the config itself may name an s3:// tokenizer)
    storage.configure(**config["storage"])
    cfg: Config = from_dict(config["cfg"])
    run_uri = config["run_uri"]
    label_set = config.get("label_set")
    die_with_raylet()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    pid_dir = config.get("pid_dir")
    if pid_dir:
        os.makedirs(pid_dir, exist_ok=True)
        with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))

    cfg.model.num_classes = len(label_set) if label_set else cfg.model.num_classes
    model = build_on_rank(cfg.model, cfg.train.seed, rank)
    start_step, position = 0, ReadPosition()
    # After a dead worker (Ray Train restarts the group) or with the same run name again, continue from the run
    # folder's newest complete checkpoint. Not ray.train.get_checkpoint(): that is Ray Train's record, which lacks
    # a checkpoint written just before a run was stopped (Ctrl-C at step 15 resumed at 10, losing 5 steps).
    latest = ckpt.latest_checkpoint_dir(run_uri)
    if latest is None and cfg.train.init_from:
        info = ckpt.load_weights_into(model, cfg.train.init_from, strict=cfg.model.init_strict)
        if rank == 0:
            _say(config["counter"], f"initialised from {cfg.train.init_from}; new: {info['missing']}")
    elif latest is None and (cfg.model.video_init or cfg.model.audio_init or cfg.model.text_init):
        reports = load_pretrained(model, cfg.model)
        if rank == 0:
            _say(config["counter"], startup_table(reports, model))
    if cfg.train.freeze:  # on resume too: the optimiser's groups must be the ones the checkpoint saved
        frozen = set(apply_freeze(model, cfg.train.freeze))
        if rank == 0:
            values = sum(p.numel() for n, p in model.named_parameters() if n in frozen)
            _say(config["counter"], f"frozen ({', '.join(cfg.train.freeze)}): {len(frozen)} tensors, "
                                    f"{values:,} parameters")
    model = parallelize(model, cfg, device)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    st = _restore(latest, model, opt, sched) if latest is not None else None
    if st is not None:
        start_step, position = st["step"], ReadPosition.from_dict(st.get("data_position"))
        if rank == 0:
            consumed = position.consumed()
            _progress(config["counter"], {"step": start_step, "steps": cfg.train.steps},
                      f"resumed at step {start_step} (epoch {st['epoch']}, sample position {consumed.prefix}"
                      + (f" and {len(consumed.extra)} past it" if consumed.extra else "") + f") from {latest}")
    position = position.for_world(world)

    nodes = _worker_nodes(world)
    if rank == 0:
        _say(config["counter"], f"{world} worker(s) on {len(set(nodes))} node(s): {' '.join(n[:12] for n in nodes)}")
    tok = get_tokenizer(cfg.data.tokenizer)
    scratch = scratch_dir(config)
    log = RunLog(run_uri, start_step, scratch) if rank == 0 else None
    samples_log = SampleLog(run_uri, start_step, rank, scratch) if cfg.train.sample_log else None
    finished = False
    try:
        _train(model, opt, sched, cfg, config, rank, world, device, tok, log, samples_log, scratch, start_step,
               position, nodes)
        finished = True
    finally:
        if samples_log is not None:
            samples_log.close(sync=finished)
        if log is not None:  # on an error the run folder keeps the log of its last checkpoint
            log.close(sync=finished)


def _train(model, opt, sched, cfg: Config, config: dict[str, Any], rank: int, world: int, device, tok,
           log: RunLog | None, samples_log: SampleLog | None, scratch: str | None, start_step: int, position,
           nodes: list[str]) -> None:
    """Steps from ``start_step`` to ``train.steps``, reading from ``position`` (a
    :class:`~mirasol_ray.data.index.ReadPosition`); ``nodes`` (every rank's Ray node id) goes into the first record
    this worker group writes."""

    label_set = config.get("label_set")
    qtypes = qtype_table(config.get("qtypes"))
    # the tokenizer's bytes go into every checkpoint (self-contained: see train/checkpoint.py)
    tok_payload = ckpt.tokenizer_payload(cfg.data.tokenizer) if rank == 0 else None
    source = _train_source(config, cfg)
    order = _train_order(config, cfg, source)
    set_names = [s["name"] for s in config["train_data"].get("sets") or []]
    eval_sets = config.get("eval_sets") or {}
    batches = train_batches(source, position, rank=rank, batch_size=cfg.train.batch_size, seed=cfg.data.seed,
                            shuffle=cfg.data.shuffle, prefetch_batches=cfg.train.prefetch_batches, order=order)

    def batches_or_why():
        try:
            yield from batches
        except NoRowsError:  # a whole epoch gave this worker no row: end now, saying why
            raise NoBatchError(no_batch_message(cfg, world, _snapshot(config["counter"]))) from None

    stream = batches_or_why()
    val = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    train_eval = ray.train.get_dataset_shard("train_eval") if config.get("has_train_eval") else None
    scored = bool(config.get("score"))

    def no_sync():
        return gradient_sync(model, sync=False)

    meter = Throughput()
    step = start_step
    last_pos, epoch = position.last[rank], position.epoch(len(order))
    t_start, reported = time.perf_counter(), float("-inf")  # the first step is reported
    pace = Pace(cfg, start_step, world, has_eval=val is not None, scored=scored)

    while step < cfg.train.steps:
        micro = []
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(stream)
            meter.add(len(batch["key"]) * world, count_tokens(batch) * world, time.perf_counter() - t0)
            micro.append(batch)
            last_pos, epoch = batch.pop("last_pos"), batch.pop("epoch")
        parts = train_step(model, micro, opt, sched, cfg.train, device, no_sync=no_sync)
        meter.step()
        step += 1
        pace.stepped(step)
        if samples_log is not None:
            samples_log.write(step, micro)
        record = None
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            parts = mean_over_ranks(parts, LOSS_PARTS)  # every rank logs on the same steps
            record = {"step": step, "epoch": epoch, **parts, **meter.read(),
                      "elapsed_s": time.perf_counter() - t_start}
            if set_names:  # epochs of each set consumed by every rank together (a collective, as the mean above)
                seen = order.epochs_seen(position.advance(_all_ranks(last_pos)))
                record["epochs"] = {name: round(float(x), 4) for name, x in zip(set_names, seen)}
        do_eval = val is not None and ((cfg.train.eval_every and step % cfg.train.eval_every == 0)
                                       or step == cfg.train.steps)
        evaluated: dict[str, dict[str, float]] = {}  # this step's evaluation, if any: what its checkpoint scores
        if do_eval and rank == 0 and step == cfg.train.steps:  # the console's bar would stand still meanwhile
            phase = f"validating {pace.eval_clips()}"
            _progress(config["counter"], pace.progress(step, parts["loss"], phase=phase),
                      f"step {step}/{cfg.train.steps}: {phase} (the final validation), then the last checkpoint")
        if do_eval:
            t0 = t_eval = time.perf_counter()
            ev, rows = evaluate(model, iter_worker_batches(val, cfg.train.batch_size), tok, device, cfg, label_set,
                                cfg.train.eval_batches, qtypes=qtypes, sets=eval_sets.get("val"))
            evaluated["val"] = {k: v["value"] for k, v in ev.items()}
            record = (record or {"step": step}) | {"val": evaluated["val"], "val_rows": rows,
                                                   "val_s": time.perf_counter() - t0}
            if train_eval is not None:  # the fixed subset of training clips, whole (train.eval_train_batches)
                t0 = time.perf_counter()
                ev, rows = evaluate(model, iter_worker_batches(train_eval, cfg.train.batch_size), tok, device, cfg,
                                    label_set, qtypes=qtypes, sets=eval_sets.get("train_eval"))
                evaluated["train_eval"] = {k: v["value"] for k, v in ev.items()}
                record |= {"train_eval": evaluated["train_eval"], "train_eval_rows": rows,
                           "train_eval_s": time.perf_counter() - t0}
            pace.evaluated(time.perf_counter() - t_eval,
                           sum(record["val_rows"]) + sum(record.get("train_eval_rows", [])))
        if log is not None and record is not None:
            record["skipped"] = _skips(config["counter"])
            if nodes:  # the first record of each worker group says where its ranks ran
                record["nodes"], nodes = nodes, []
            log.write(record)
        # rank 0's step to the console, at most every PROGRESS_EVERY_S (the console reads it every 0.5 s), and
        # always the last step and an evaluated one
        if rank == 0 and (time.perf_counter() - reported >= PROGRESS_EVERY_S or step == cfg.train.steps
                          or (record and "val" in record)):
            final = step == cfg.train.steps
            _progress(config["counter"], pace.progress(step, parts["loss"], phase="writing the checkpoint" if final
                                                       else "", val=record.get("val") if record else None),
                      f"step {step}/{cfg.train.steps}: writing the checkpoint" if final else "")
            reported = time.perf_counter()
        # with scored checkpoints every evaluation writes one, so the weights it scored can be kept as the best
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or (evaluated and scored):
            t0 = time.perf_counter()
            reached = position.advance(_all_ranks(last_pos))  # a collective
            if samples_log is not None:
                samples_log.sync()
            _report(model, opt, sched, cfg, config, step, reached.epoch(len(order)), reached, rank, world, log,
                    record, evaluated, scratch, tok_payload)
            pace.checkpointed(time.perf_counter() - t0)


def _worker_nodes(world: int) -> list[str]:
    """Every rank's Ray node id, in rank order (a collective: all ranks call it)."""

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _report(model, opt, sched, cfg: Config, config: dict[str, Any], step: int, epoch: int, position, rank: int,
            world: int, log: RunLog | None, record: dict | None, evaluated: dict, scratch: str | None,
            tokenizer: dict | None) -> None:
    """Report a checkpoint through Ray Train (each rank uploads its files), then, once every rank is done, mark it
    complete: ``complete.json``, written by rank 0 after checking the stored files, is the last file of a checkpoint
    (Ray Train uploads a folder's files in no fixed order, so a marker inside the upload could land first).
    ``position``: the :class:`~mirasol_ray.data.index.ReadPosition` every rank has consumed up to.

    Under FSDP2 the checkpoint is sharded: every rank writes its own shard into a folder of its own and reports it,
    Ray Train uploads them all into the one checkpoint folder (nothing is gathered on any rank), and
    ``complete.json`` lists every rank's files. Otherwise rank 0 writes the whole model.

    The checkpoint's metrics are the step's record and ``evaluated``, this step's evaluation (``{"val",
    "train_eval"}``; empty when the step was not evaluated: a checkpoint never carries an older step's scores).
    Ray Train ranks checkpoints by the run's score (``config["score"]``); one not evaluated reports it as NaN,
    which Ray ranks below every number (a missing key would count as -inf, the best under ``mode=min``), so it is
    kept only while it is the newest."""

    run_uri = config["run_uri"]
    by_shards = is_fsdp(model)
    model_sd = optim_sd = None
    if rank == 0 and not by_shards:
        model_sd, optim_sd = ckpt.gather_state(model, opt)
    metrics = {"step": step, "epoch": epoch}
    if record:
        metrics.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    metrics.update(evaluated)
    score = config.get("score")
    reported = metrics
    if score and ckpt.metric_value(metrics, score["metric"]) is None:
        reported = {**metrics, score["metric"]: float("nan")}
    name = ckpt.checkpoint_dir_name(step)
    if rank == 0:
        log.sync()
    files: dict[str, int] = {}
    if rank == 0 or by_shards:
        with tempfile.TemporaryDirectory(prefix="mirasol-ckpt-", dir=scratch) as d:
            if by_shards:
                sharded.save(d, model, opt)  # a collective: this rank's shard (and on rank 0 the .metadata)
            if rank == 0:
                ckpt.write_checkpoint(d, model, model_sd, optim_sd, sched, step=step, epoch=epoch,
                                      data_position=position.to_dict(), stage=cfg.train.stage, metrics=metrics,
                                      run_config=cfg.to_dict(), label_set=config.get("label_set"),
                                      tokenizer=tokenizer, sharded=by_shards, score=score)
            files = ckpt.local_files(d)
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
    else:
        ray.train.report(reported, checkpoint=None)
    # a collective: every rank's upload has returned; rank 0 learns every rank's files (a sharded checkpoint's)
    files = {k: v for part in gather_objects(files) for k, v in part.items()}
    if rank == 0:
        token = config.get("lease") or ""
        if token and ckpt.lease_token(run_uri) != token:
            raise RuntimeError(f"run folder {run_uri} was taken over by another run (its lease.json): stopping "
                               "without marking this checkpoint complete")
        ckpt.mark_complete(storage.join(run_uri, name), files, step)
