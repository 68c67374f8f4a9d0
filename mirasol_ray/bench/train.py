"""``mirasol bench train URL``: samples/s reaching the model, end to end, against what a user would pick instead.

(a) ray: ``mirasol train`` itself (:func:`~mirasol_ray.launch.train.run_training`): Ray Data decoding into one Ray
Train worker, on a local Ray of ``--cpus`` CPUs (the worker holds one; decoding gets the rest);
(b) torch: a plain torch loop fed by webdataset + a torch DataLoader with ``--workers`` processes, the same decode
function (:func:`~mirasol_ray.bench.data.decode_one`), the same model and train step
(:func:`~mirasol_ray.train.step.train_step`), one torch thread in the training process as Ray gives its worker.

Both decode every step's clips afresh (no ``data.cache``), both measure with the same meter
(:class:`~mirasol_ray.train.metrics.Throughput`): a first window of ``--steps`` steps is the warm-up, the second
is the figure (samples/s: clips; data-wait: the fraction of the window spent waiting for the next batch). Each
round runs every variant once; ``--repeats`` rounds interleave them and the ratios are taken within a round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from typing import Any

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="shard folder (local)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="steps per window (a warm-up window, then a measured one)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per step")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (the torch loop is not bounded)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json-out", default="")


def _cfg(args: argparse.Namespace, root: str, name: str):
    from mirasol_ray.config import load_config

    return load_config(args.config, [
        *args.set, f"data.train={args.url}", "data.cache=false", "data.decode_threads=1",
        f"train.batch_size={args.batch_size}", f"train.steps={2 * args.steps}", f"train.log_every={args.steps}",
        f"train.checkpoint_every={2 * args.steps}", "train.eval_every=0", f"storage.root={root}",
        f"storage.name={name}", "scaling.num_workers=1", "scaling.cpus_per_worker=1"])


def bench_ray(args: argparse.Namespace, root: str, name: str) -> dict[str, float]:
    import ray

    from mirasol_ray.bench.data import tree_cpu_seconds
    from mirasol_ray.launch.train import read_metrics, run_training

    cfg = _cfg(args, root, name)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        cpu0 = tree_cpu_seconds()
        run_training(cfg)
        cpu = tree_cpu_seconds() - cpu0
    finally:
        ray.shutdown()
    records = [r for r in read_metrics(os.path.join(root, name)) if "samples_per_s" in r]
    measured = records[-1]
    return {"samples_per_s": measured["samples_per_s"], "data_wait_fraction": measured["data_wait_fraction"],
            "step_time_s": measured["step_time_s"], "warmup_samples_per_s": records[0]["samples_per_s"],
            "cpu_s_whole_run": cpu}


class _Clips(torch.utils.data.IterableDataset):
    """Decoded clip rows from webdataset shards (split between DataLoader workers), endlessly: what a user would
    write around the same decode function."""

    def __init__(self, urls: list[str], data_cfg):
        super().__init__()
        self.urls, self.data_cfg = urls, data_cfg

    def __iter__(self):
        import webdataset as wds

        from mirasol_ray.data.index import sample_rng
        from mirasol_ray.data.rows import decode_sample_safe

        torch.set_num_threads(1)
        epoch = 0
        while True:
            ds = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False, workersplitter=wds.split_by_worker)
            for sample in ds:
                sample = {k: v for k, v in sample.items() if k != "__url__"}
                rows, _, _ = decode_sample_safe(sample, self.data_cfg, train=True,
                                                rng=sample_rng(self.data_cfg.seed, epoch, str(sample["__key__"])))
                yield from rows
            epoch += 1


def _collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from mirasol_ray.config import DataConfig
    from mirasol_ray.data.pipeline import stack_rows, to_torch

    return to_torch(stack_rows(rows, DataConfig()))  # the config only shapes empty batches


def bench_torch(args: argparse.Namespace, workers: int) -> dict[str, float]:
    import time

    from mirasol_ray.bench.data import tree_cpu_seconds
    from mirasol_ray.data.pipeline import expand_shard_urls
    from mirasol_ray.model.mirasol import build_model
    from mirasol_ray.train.metrics import Throughput
    from mirasol_ray.train.step import count_tokens, make_optimizer, make_scheduler, train_step

    cfg = _cfg(args, tempfile.gettempdir(), "unused")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu0 = tree_cpu_seconds()
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        opt, device = make_optimizer(model, cfg.train), torch.device("cpu")
        sched = make_scheduler(opt, cfg.train)
        dl = torch.utils.data.DataLoader(_Clips(expand_shard_urls(args.url), cfg.data), batch_size=args.batch_size,
                                         num_workers=workers, collate_fn=_collate, prefetch_factor=2,
                                         persistent_workers=True)
        stream, meter, windows = iter(dl), Throughput(), []
        for step in range(1, 2 * args.steps + 1):
            t0 = time.perf_counter()
            batch = next(stream)
            meter.add(len(batch["key"]), count_tokens(batch), time.perf_counter() - t0)
            train_step(model, [batch], opt, sched, cfg.train, device)
            meter.step()
            if step % args.steps == 0:
                windows.append(meter.read())
        del stream, dl
        cpu = tree_cpu_seconds() - cpu0
    finally:
        torch.set_num_threads(threads)
    return {**{k: windows[-1][k] for k in ("samples_per_s", "data_wait_fraction", "step_time_s")},
            "warmup_samples_per_s": windows[0]["samples_per_s"], "cpu_s_whole_run": cpu}


def run(args: argparse.Namespace) -> int:
    rounds = []
    with tempfile.TemporaryDirectory(prefix="mirasol-bench-train-") as root:
        for i in range(max(1, args.repeats)):
            r = {"ray": bench_ray(args, root, f"ray-{i}")}
            for w in args.workers:
                r[f"torch_dataloader_{w}w"] = bench_torch(args, w)
            rounds.append(r)
            print(" ".join(f"{k}={v['samples_per_s']:.2f}/s wait {v['data_wait_fraction']:.2f}"
                           for k, v in r.items()), flush=True)
    ratios = [{f"ray / {k}": r["ray"]["samples_per_s"] / v["samples_per_s"] for k, v in r.items() if k != "ray"}
              for r in rounds]
    res = {"url": args.url, "config": args.config, "overrides": args.set, "batch_size": args.batch_size,
           "steps_per_window": args.steps, "cpus": args.cpus, "machine": f"{os.cpu_count()} CPUs",
           "load_average": os.getloadavg(), "rounds": rounds,
           "ratios": {k: {"median": statistics.median(x[k] for x in ratios), "min": min(x[k] for x in ratios),
                          "max": max(x[k] for x in ratios)} for k in ratios[0]}}
    print(f"\n{'variant':<24}{'samples/s':>10}{'data-wait':>11}{'step s':>9}   (median of {len(rounds)})")
    for k in rounds[0]:
        med = {m: statistics.median(r[k][m] for r in rounds) for m in ("samples_per_s", "data_wait_fraction",
                                                                         "step_time_s")}
        print(f"{k:<24}{med['samples_per_s']:>10.2f}{med['data_wait_fraction']:>11.2f}{med['step_time_s']:>9.3f}")
    for k, v in res["ratios"].items():
        print(f"{k:<36}{v['median']:>7.2f}   ({v['min']:.2f}-{v['max']:.2f})")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in res['load_average'])}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2, default=float)
    return 0

