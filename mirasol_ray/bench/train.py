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

Beside it, the CPU each variant's whole process tree used over the measured window, by process
(:class:`~mirasol_ray.bench.data.CpuTree`, which also counts the Ray workers the kernel reaps): where a variant's
CPU goes when the machine is full, which decides samples/s on a small one. For the torch loop the window is
exact (steps ``--steps`` to ``2 * --steps``); for Ray it runs from the first step report at or past the warm-up's
last step to the first at or past the last step, as rank 0 reports them to the run's counter actor (read every
0.1 s until the window starts, then every 0.5 s, as often as the console reads it, by a thread whose own CPU is left
out; the counter actor's CPU for those reads, ~1 ms each, is not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Any

import ray
import torch
import webdataset as wds

from mirasol_ray.bench.data import CpuTree
from mirasol_ray.config import DataConfig
from mirasol_ray.data.index import sample_rng
from mirasol_ray.data.pipeline import expand_shard_urls, stack_rows, to_torch
from mirasol_ray.data.rows import decode_sample_safe
from mirasol_ray.launch.results import read_metrics
from mirasol_ray.launch.train import run_training
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.train.metrics import Throughput
from mirasol_ray.train.prepare import load_prepared
from mirasol_ray.train.step import count_tokens, make_optimizer, make_scheduler, train_step


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
    return load_prepared(args.config, [
        *args.set, f"data.train={args.url}", "data.cache=false", "data.decode_threads=1",
        f"train.batch_size={args.batch_size}", f"train.steps={2 * args.steps}", f"train.log_every={args.steps}",
        f"train.checkpoint_every={2 * args.steps}", "train.eval_every=0", f"storage.root={root}",
        f"storage.name={name}", "scaling.num_workers=1", "scaling.cpus_per_worker=1"])


def process_group(proc: dict[str, Any], driver: str = "driver") -> str:
    """Which part of a variant a process of :class:`~mirasol_ray.bench.data.CpuTree` is: ``trainer`` (the torch
    loop's own process, named by ``driver``, or Ray Train's worker), ``decode`` (the DataLoader's workers, or Ray
    Data's decode tasks), ``idle_ray_workers``, one of Ray's daemons or Ray Data's actors by role, or a Ray actor by class name (Ray
    Train's controller and helpers, our skip counter)."""
    role, title = proc["role"], proc["title"]
    if role == "driver":
        return driver
    if role == "child":
        return "decode"
    if role != "worker":
        return role
    if title.startswith("ray::RayTrainWorker"):
        return "trainer"
    if "decode_items" in title or "DecodeItems" in title:
        return "decode"
    if title.startswith("ray::IDLE"):
        return "idle_ray_workers"
    return title[5:].split(".", 1)[0].strip() if title.startswith("ray::") else "worker"


def window_cpu(tree, samples: int, seconds: float, driver: str = "driver") -> dict[str, Any]:
    """A stopped :class:`~mirasol_ray.bench.data.CpuTree` over a window of ``samples`` samples and ``seconds``:
    CPUs busy on average and CPU ms per sample, in all and by :func:`process_group`."""
    groups: dict[str, float] = {}
    for proc in tree.processes:
        g = process_group(proc, driver)
        groups[g] = groups.get(g, 0.0) + proc["cpu_s"]
    if tree.by_role.get("exited"):
        groups["exited"] = tree.by_role["exited"]
    per = 1000 / max(samples, 1)
    return {"window_s": seconds, "window_samples": samples, "cpus_busy": tree.total / max(seconds, 1e-9),
            "cpu_ms_per_sample": tree.total * per,
            "cpu_ms_per_sample_by_group": {k: v * per for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}}


class _RayWindow:
    """:class:`~mirasol_ray.bench.data.CpuTree` over the steps ``lo`` to ``hi`` of the run that
    :func:`~mirasol_ray.launch.train.run_training` is driving in this process, found by its counter actor's step
    reports (``mirasol-skips-*``; rank 0 reports its step at most every 0.25 s, and always the last one)."""

    def __init__(self, lo: int, hi: int, batch_size: int):
        self.lo, self.hi, self.batch_size = lo, hi, batch_size
        self.result: dict[str, Any] | None = None
        self.error = ""
        self._counter = None

    def start(self) -> _RayWindow:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-window", daemon=True)
        self._thread.start()
        return self

    def _step(self) -> int:
        if self._counter is None:  # looked up once: a lookup a poll would add to the GCS's CPU in the window
            names = [n for n in ray.util.list_named_actors() if n.startswith("mirasol-skips-")]
            if not names:
                return -1
            self._counter = ray.get_actor(names[-1])
        status = ray.get(self._counter.status.remote(), timeout=10)
        return int((status.get("progress") or {}).get("step", -1))

    def _run(self) -> None:
        tree, own, first = None, 0.0, (0, 0.0)
        # every 0.1 s until the window starts (so that a short one is not missed), then every 0.5 s, as often as
        # the console reads the counter, so the reads add little to the counter actor's CPU in the window
        while not self._done.wait(0.1 if tree is None else 0.5):
            t0 = time.thread_time()
            try:
                step = self._step()
            except Exception as e:  # the run is ending (or Ray with it): no window
                self.error = f"{type(e).__name__}: {e}"
                step = -1
            if tree is None and step >= self.hi:  # the whole window passed between two reads
                self.error = f"steps {self.lo}-{self.hi} passed between two reads 0.1 s apart: raise --steps"
                return
            if tree is None and step >= self.lo:
                tree, first = CpuTree().start(), (step, time.perf_counter())
            elif tree is not None and step >= self.hi:
                tree.exclude(own + time.thread_time() - t0)  # this thread's reads of the counter
                tree.stop()
                samples = (step - first[0]) * self.batch_size
                self.result = {**window_cpu(tree, samples, time.perf_counter() - first[1]),
                               "window_steps": [first[0], step]}
                return
            if tree is not None:
                own += time.thread_time() - t0

    def stop(self) -> dict[str, Any] | None:
        self._done.set()
        self._thread.join()
        return self.result


def bench_ray(args: argparse.Namespace, root: str, name: str) -> dict[str, Any]:
    cfg = _cfg(args, root, name)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        window = _RayWindow(args.steps, 2 * args.steps, args.batch_size).start()
        run_training(cfg)
        cpu = window.stop()
    finally:
        ray.shutdown()
    records = [r for r in read_metrics(os.path.join(root, name)) if "samples_per_s" in r]
    measured = records[-1]
    if cpu is None:
        raise RuntimeError(f"the Ray run's measured window was not seen ({window.error or 'no step report'})")
    return {"samples_per_s": measured["samples_per_s"], "data_wait_fraction": measured["data_wait_fraction"],
            "step_time_s": measured["step_time_s"], "warmup_samples_per_s": records[0]["samples_per_s"],
            "cpu": cpu}


class _Clips(torch.utils.data.IterableDataset):
    """Decoded clip rows from webdataset shards (split between DataLoader workers), endlessly: what a user would
    write around the same decode function."""

    def __init__(self, urls: list[str], data_cfg):
        super().__init__()
        self.urls, self.data_cfg = urls, data_cfg

    def __iter__(self):
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
    return to_torch(stack_rows(rows, DataConfig()))  # the config only shapes empty batches


def bench_torch(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    cfg = _cfg(args, tempfile.gettempdir(), "unused")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tree, t_window = None, 0.0
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        opt, device = make_optimizer(model, cfg.train), torch.device("cpu")
        sched = make_scheduler(opt, cfg.train)
        dl = torch.utils.data.DataLoader(_Clips(expand_shard_urls(args.url), cfg.data), batch_size=args.batch_size,
                                         num_workers=workers, collate_fn=_collate, prefetch_factor=2,
                                         persistent_workers=True,
                                         # fork would copy a process with threads (the model's, Ray's): see
                                         # bench/data.py's bench_dataloader
                                         multiprocessing_context="spawn" if workers else None)
        stream, meter, windows = iter(dl), Throughput(), []
        for step in range(1, 2 * args.steps + 1):
            t0 = time.perf_counter()
            batch = next(stream)
            meter.add(len(batch["key"]), count_tokens(batch), time.perf_counter() - t0)
            train_step(model, [batch], opt, sched, cfg.train, device)
            meter.step()
            if step % args.steps == 0:
                windows.append(meter.read())
                if tree is None:
                    tree, t_window = CpuTree().start(), time.perf_counter()
        tree.stop()
        cpu = window_cpu(tree, args.steps * args.batch_size, time.perf_counter() - t_window, driver="trainer")
        del stream, dl
    finally:
        torch.set_num_threads(threads)
    return {**{k: windows[-1][k] for k in ("samples_per_s", "data_wait_fraction", "step_time_s")},
            "warmup_samples_per_s": windows[0]["samples_per_s"], "cpu": cpu}


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
    print(f"\nCPU over the measured window (median of {len(rounds)}): CPUs busy, CPU ms per sample, by process")
    for k in rounds[0]:
        cpus = statistics.median(r[k]["cpu"]["cpus_busy"] for r in rounds)
        total = statistics.median(r[k]["cpu"]["cpu_ms_per_sample"] for r in rounds)
        groups = rounds[0][k]["cpu"]["cpu_ms_per_sample_by_group"]
        med = {g: statistics.median(r[k]["cpu"]["cpu_ms_per_sample_by_group"].get(g, 0.0) for r in rounds)
               for g in groups}
        print(f"{k:<24}{cpus:>5.2f} CPUs {total:>7.1f} ms/sample: "
              + ", ".join(f"{g} {v:.1f}" for g, v in sorted(med.items(), key=lambda kv: -kv[1]) if v >= 0.05))
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in res['load_average'])}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2, default=float)
    return 0

