"""``train_loop_per_worker``: what each Ray Train worker runs.

Only a plain dict comes in (see :func:`mirasol_ray.launch.train.loop_config`): the config as a dict, the run's
URI, the skip counter's name and the label set. The loop streams its shard of the training dataset, steps the
model (DDP, or FSDP2 for large presets), logs metrics on rank 0, and reports checkpoints through
``ray.train.report``; on restart (a dead worker, or the same run name again) it continues from the latest one,
at the same step, optimiser and scheduler state, and data position.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from mirasol_ray import storage
from mirasol_ray.config import Config, from_dict
from mirasol_ray.data.text import get_tokenizer
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.model.pretrained import load_pretrained, startup_table
from mirasol_ray.train import checkpoint as ckpt
from mirasol_ray.train.metrics import Throughput, aggregate
from mirasol_ray.train.step import (
    apply_freeze,
    count_tokens,
    eval_loss,
    make_optimizer,
    make_scheduler,
    predict_batch,
    train_step,
)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunLog:
    """Rank 0's metrics.jsonl and TensorBoard events: written locally, copied into the run folder (local or
    S3) at every checkpoint and at the end, so an object store never sees partial appends."""

    def __init__(self, run_uri: str, endpoint_url: str, resume_step: int):
        self.run_uri, self.endpoint_url = run_uri, endpoint_url
        self.local = tempfile.mkdtemp(prefix="mirasol-log-")
        self.metrics_path = os.path.join(self.local, "metrics.jsonl")
        previous = storage.join(run_uri, "metrics.jsonl")
        if storage.exists(previous, endpoint_url):  # resume: keep history up to the checkpoint's step
            lines = storage.read_text(previous, endpoint_url).splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.metrics_path, "w") as f:
                f.write("".join(ln + "\n" for ln in kept))
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"), purge_step=resume_step + 1 or None)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, record["step"])
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)):
                        self.tb.add_scalar(f"{k}/{kk}", vv, record["step"])

    def sync(self) -> None:
        self.tb.flush()
        fs = storage.fsspec_fs(self.run_uri, self.endpoint_url)
        dest = storage.strip_scheme(self.run_uri)
        fs.makedirs(dest, exist_ok=True)
        fs.put(self.metrics_path, dest + "/metrics.jsonl")
        fs.put(os.path.join(self.local, "tensorboard") + "/", dest + "/tensorboard/", recursive=True)

    def close(self) -> None:
        self.sync()
        self.tb.close()
        shutil.rmtree(self.local, ignore_errors=True)


def _skips(counter_name: str) -> dict[str, int]:
    import ray

    try:
        return ray.get(ray.get_actor(counter_name).snapshot.remote(), timeout=10)["skipped"]
    except Exception:  # the counter is informative: never fail training for it
        return {}


def _wrap(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    import ray.train.torch

    if cfg.train.fsdp and torch.distributed.is_initialized():
        from torch.distributed.fsdp import fully_shard

        from mirasol_ray.model.layers import Block

        model = model.to(device)
        for block in [m for m in model.modules() if isinstance(m, Block)]:  # one FSDP unit per block
            fully_shard(block)
        fully_shard(model)
        return model
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})


def evaluate(model, batches, tok, device, cfg: Config, label_set, max_batches: int = 0) -> dict[str, Any]:
    """Task metrics over the validation batches (:func:`aggregate`), and their loss as ``loss``: the same weighted
    loss as training's, teacher-forced. The loss moves with every step where accuracies move in jumps, which is
    what a scheduler comparing young trials (ASHA in ``mirasol sweep``) needs."""
    records, loss_sum, rows = [], 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        records += predict_batch(model, batch, tok, device, cfg.train.precision, label_set=label_set)
        n = len(batch["key"])
        loss_sum += eval_loss(model, batch, device, cfg.train.precision) * n
        rows += n
    out = aggregate(records)
    if rows:
        out["loss"] = {"metric": "loss", "value": loss_sum / rows, "count": rows}
    return out


def _load_state(folder: str, endpoint_url: str) -> tuple[dict, dict]:
    """(model state dict, training state) from a checkpoint folder (local, or a URI in the run folder)."""
    model = ckpt.load_torch(storage.join(folder, ckpt.MODEL_FILE), endpoint_url)["model"]
    return model, ckpt.load_torch(storage.join(folder, ckpt.STATE_FILE), endpoint_url)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from mirasol_ray.data.pipeline import iter_worker_batches

    cfg: Config = from_dict(config["cfg"])
    run_uri, endpoint_url = config["run_uri"], cfg.storage.endpoint_url
    label_set = config.get("label_set")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.train.seed + rank)
    device = ray.train.torch.get_device()
    pid_dir = config.get("pid_dir")
    if pid_dir:
        os.makedirs(pid_dir, exist_ok=True)
        with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))

    cfg.model.num_classes = len(label_set) if label_set else cfg.model.num_classes
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    start_step, epoch, skip_batches = 0, 0, 0
    resume = ray.train.get_checkpoint()  # set when Ray Train restarted the worker group
    # the same run name again (e.g. after the driver died): continue from the run folder's latest checkpoint
    latest = None if resume is not None else ckpt.latest_checkpoint_dir(run_uri, endpoint_url)
    if resume is None and latest is None and cfg.train.init_from:
        info = ckpt.load_weights_into(model, cfg.train.init_from, endpoint_url)
        if rank == 0:
            _say(f"initialised from {cfg.train.init_from}; new: {info['missing']}")
    elif resume is None and latest is None and (cfg.model.video_init or cfg.model.audio_init or cfg.model.text_init):
        reports = load_pretrained(model, cfg.model, endpoint_url)
        if rank == 0:
            _say(startup_table(reports, model))
    if cfg.train.freeze:  # on resume too: the optimiser's groups must be the ones the checkpoint saved
        frozen = set(apply_freeze(model, cfg.train.freeze))
        if rank == 0:
            values = sum(p.numel() for n, p in model.named_parameters() if n in frozen)
            _say(f"frozen ({', '.join(cfg.train.freeze)}): {len(frozen)} tensors, {values:,} parameters")
    model = _wrap(model, cfg, device)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    state = None
    if resume is not None:
        with resume.as_directory() as d:
            state = _load_state(d, "")
    elif latest is not None:
        state = _load_state(latest, endpoint_url)
    if state is not None:
        model_sd, st = state
        ckpt.restore_state(model, opt, model_sd, st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_step, epoch, skip_batches = st["step"], st["epoch"], st["batch_in_epoch"]
        if rank == 0:
            _say(f"resumed at step {start_step} (epoch {epoch}, batch {skip_batches})")

    tok = get_tokenizer(cfg.data.tokenizer)
    log = RunLog(run_uri, endpoint_url, start_step) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    no_sync = getattr(model, "no_sync", None)
    meter = Throughput()
    step = start_step
    t_start = time.perf_counter()
    final_eval: dict[str, Any] = {}

    def batches_forever():
        nonlocal epoch, skip_batches
        while True:
            it = iter_worker_batches(shard, cfg.train.batch_size, prefetch_batches=cfg.train.prefetch_batches,
                                     local_shuffle_buffer_size=cfg.data.shuffle_buffer or 4 * cfg.train.batch_size,
                                     drop_last=True)
            n = 0
            for batch in it:
                n += 1
                if n <= skip_batches:  # resume: the data position inside the epoch
                    continue
                yield batch, n
            skip_batches = 0
            epoch += 1

    stream = batches_forever()
    while step < cfg.train.steps:
        micro = []
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch, pos = next(stream)
            meter.add(len(batch["key"]) * world, count_tokens(batch) * world, time.perf_counter() - t0)
            micro.append(batch)
        parts = train_step(model, micro, opt, sched, cfg.train, device, no_sync=no_sync)
        meter.step()
        step += 1
        record = None
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            record = {"step": step, "epoch": epoch, **parts, **meter.read(),
                      "elapsed_s": time.perf_counter() - t_start}
        do_eval = val is not None and ((cfg.train.eval_every and step % cfg.train.eval_every == 0)
                                       or step == cfg.train.steps)
        if do_eval and rank == 0:
            ev = evaluate(model, iter_worker_batches(val, cfg.train.batch_size), tok, device, cfg, label_set,
                          cfg.train.eval_batches)
            record = (record or {"step": step}) | {"val": {k: v["value"] for k, v in ev.items()}}
            final_eval = ev
        if log is not None and record is not None:
            record["skipped"] = _skips(config["counter"])
            log.write(record)
            extras = "".join(f" {k}={v:.3f}" for k, v in record.get("val", {}).items())
            _say(f"step {step}/{cfg.train.steps} loss {parts['loss']:.4f} lr {parts['lr']:.2e} "
                 f"{record.get('samples_per_s', 0):.1f} samples/s wait {record.get('data_wait_fraction', 0):.2f}"
                 + extras)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            _report(model, opt, sched, cfg, step, epoch, pos, rank, log, record, final_eval, label_set)
    if log is not None:
        log.close()


def _say(message: str) -> None:
    """One progress line on the driver. Ray Train patches ``print`` in its workers to log *and*, when the worker's
    stdout is wrapped (it is), also print: every line reached the driver twice. Writing to the process's own
    stdout takes the plain path once."""
    print(message, file=sys.__stdout__, flush=True)


def _report(model, opt, sched, cfg: Config, step: int, epoch: int, pos: int, rank: int, log: RunLog | None,
            record: dict | None, final_eval: dict, label_set: list[str] | None) -> None:
    import ray.train

    model_sd, optim_sd = ckpt.gather_state(model, opt)  # a collective under FSDP2
    metrics = {"step": step, "epoch": epoch}
    if record:
        metrics.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    if final_eval:
        metrics["val"] = {k: v["value"] for k, v in final_eval.items()}
    if rank == 0:
        log.sync()
        with tempfile.TemporaryDirectory(prefix="mirasol-ckpt-") as d:
            ckpt.write_checkpoint(d, model, model_sd, optim_sd, sched, step=step, epoch=epoch,
                                  batch_in_epoch=pos, stage=cfg.train.stage, metrics=metrics,
                                  run_config=cfg.to_dict(), label_set=label_set)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics, checkpoint=None)
