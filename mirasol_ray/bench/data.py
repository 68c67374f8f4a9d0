"""``mirasol bench data URL``: decode throughput of the data path, every variant measured in one run.

(a) bare: one process, webdataset tar iteration + the decode function, no framework;
(b) ray: the real Ray Data pipeline (:func:`~mirasol_ray.data.pipeline.decoded_dataset`) on 1 and 2 CPUs;
(c) dataloader: webdataset + torch DataLoader, the same decode function, the same number of workers;
(d) ceiling: PyAV decodes every frame of every clip, no conversion (the decoder's floor cost);
(e) with ``--transcoded URL2``: the bare loop over shards built with ``--transcode`` from the same videos.

The comparison is fair by construction: every variant decodes the same samples (whole shards: ``--limit`` rounds
up to a shard) with the same function (:func:`decode_one`: the training decode, frame positions from
(``data.seed``, epoch 0, key)), one decode thread and one torch thread per process, after the same untimed
warm-up (``--warmup`` clips per decoding process, in the same processes the timed pass then uses), and counts the
same unit: clips decoded. Each round measures every variant once; ``--repeats`` rounds interleave them, so a
change in the machine's load hits all alike, and the ratios are taken within each round (median and range).
Beside wall-clock clips/s, each variant's CPU seconds (its whole process tree: Ray's GCS, raylet and workers, the
DataLoader's workers) give CPU ms per clip, which a busy machine disturbs far less than wall time, and that CPU by
process (:class:`CpuTree`: driver, gcs_server, raylet, Ray's daemons, Ray Data's actors, each worker), printed
with ``--breakdown``: where a framework's extra CPU goes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import threading
import time
from typing import Any, Iterator

import av
import numpy as np
import ray
import torch.utils.data
import torch.utils.data as tud
import webdataset as wds

from mirasol_ray import storage
from mirasol_ray.config import DataConfig, load_config
from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.index import SampleIndex, build_index, resolve_shards, sample_rng
from mirasol_ray.data.pipeline import decoded_dataset, make_skip_counter, read_skips
from mirasol_ray.data.rows import VIDEO_EXTENSIONS, decode_sample_safe
from mirasol_ray.data.shards import build_shards


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", nargs="?", default="", help="local shard folder/glob")
    p.add_argument("--make", default="", metavar="DIR",
                   help="first write N test videos (10 s, 640x360, H.264/AAC, long GOP) to DIR, build them as "
                        "shards (DIR/original) and with --transcode (DIR/transcoded), and benchmark those")
    p.add_argument("--make-clips", type=int, default=24)
    p.add_argument("--make-height", type=int, default=128, help="--transcode height for --make")
    p.add_argument("--config", default="tiny", help="preset/YAML giving the decode geometry")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--transcoded", default="", help="the same clips built with --transcode (for the ratio)")
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="CPU counts for ray and dataloader")
    p.add_argument("--limit", type=int, default=0, help="at least N clips (whole shards) per variant; 0: all")
    p.add_argument("--warmup", type=int, default=2, help="untimed clips each decoding process decodes first")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every variant, interleaved")
    p.add_argument("--ray-actors", action="store_true",
                   help="also measure Ray Data with an actor pool of decoders (one actor per CPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=["bare", "ray", "dataloader", "ceiling"])
    p.add_argument("--breakdown", action="store_true",
                   help="also print each variant's CPU per clip by process (driver, gcs_server, raylet, workers...)")
    p.add_argument("--json-out", default="", help="write the figures as JSON here")


def bench_shards(url: str, limit: int) -> list[str]:
    """The shard paths of ``url``, the first ones holding at least ``limit`` samples (all: 0)."""

    shards = resolve_shards(url)
    if not limit:
        return shards.paths
    sizes = shards.sizes if shards.num_samples is not None else \
        np.bincount(build_index(shards).shard, minlength=len(shards.paths)).tolist()
    total, keep = 0, []
    for path, size in zip(shards.paths, sizes):
        keep.append(path)
        total += size
        if total >= limit:
            break
    return keep


def iter_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (member bytes by extension) from local tars, as webdataset groups them."""

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for s in ds:
        yield {k: v for k, v in s.items() if k != "__url__"}


def decode_one(sample: dict[str, Any], cfg: DataConfig) -> bool:
    """The decode every variant runs: the training decode of the Ray pipeline, epoch 0. True when it decoded."""

    _, reason, _ = decode_sample_safe(sample, cfg, train=True, rng=sample_rng(cfg.seed, 0, str(sample["__key__"])))
    return reason is None


def _proc_table() -> dict[int, tuple[int, float, float, int]]:
    """pid -> (ppid, its own CPU seconds, CPU seconds of its reaped children, start time in clock ticks), from
    /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float, float, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[1]: ppid; [11], [12]: utime, stime; [13], [14]: cutime, cstime (waited-for children); [19]: start
        stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick,
                            (int(fields[13]) + int(fields[14])) / tick, int(fields[19]))
    return stats


def _waits_for_children(pid: int) -> bool:
    """Whether ``pid``'s ended children add their CPU to its reaped-children time: not when it ignores SIGCHLD
    (the kernel then reaps them and their CPU is counted nowhere, as for Ray's raylet and its workers)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            ignored = next((int(line.split()[1], 16) for line in f if line.startswith("SigIgn:")), 0)
    except OSError:
        return True
    return not ignored >> 16 & 1  # SIGCHLD is signal 17: bit 16


def _tree(stats: dict[int, tuple[int, float, float, int]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p, (ppid, *_) in stats.items():
        children.setdefault(ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in stats:
            out.append(p)
            todo += children.get(p, [])
    return out


def process_role(pid: int, root: int) -> str:
    """What a process of a variant's tree is: ``driver`` (the benchmark's own), Ray's ``gcs_server``,
    ``raylet``, ``dashboard`` (its head process, even without the web UI), ``dashboard_agent``,
    ``runtime_env_agent``, ``log_monitor``, ``autoscaler_monitor``, Ray Data's own actors (``ray_data_actors``),
    our ``skip_counter``, a Ray ``worker`` (a task's process: its title, e.g. ``ray::IDLE`` or
    ``ray::ReadItemIds->MapBatches(decode_items)``, comes with it in :class:`CpuTree`), or ``child`` (e.g. a
    DataLoader worker)."""
    if pid == root:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "exited"
    words = cmd.split()
    # the program: a binary (gcs_server, raylet) or the script a Python runs (log_monitor.py, dashboard/agent.py)
    prog = words[0] if words else ""
    if os.path.basename(prog).startswith("python"):
        prog = next((w for w in words if w.endswith(".py")), prog)
    for tail, role in (("/gcs_server", "gcs_server"), ("/raylet", "raylet"), ("dashboard/agent.py", "dashboard_agent"),
                       ("runtime_env/agent/main.py", "runtime_env_agent"), ("/log_monitor.py", "log_monitor"),
                       ("dashboard/dashboard.py", "dashboard"), ("autoscaler/_private/monitor.py", "autoscaler_monitor")):
        if prog.endswith(tail):
            return role
    if cmd.startswith("ray::"):  # Ray's workers and actors are titled ray::<actor or task>[.<method>]
        name = cmd[5:].split(" ", 1)[0].split(".", 1)[0].strip()
        return {"DashboardAgent": "dashboard_agent", "RuntimeEnvAgent": "runtime_env_agent",
                "_StatsActor": "ray_data_actors", "_AutoscalingCoordinatorActor": "ray_data_actors",
                "SkipCounter": "skip_counter"}.get(name, "worker")
    return "child"


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace").strip()[:60]
    except OSError:
        return ""


class CpuTree:
    """CPU seconds of a process tree between :meth:`start` and :meth:`stop`: the total and per process, by
    :func:`process_role`, the roles summing to the total.

    A process that ends in between is still counted: a background thread re-reads the tree every ``interval``
    seconds (its own CPU is left out of the figures), and a process gone by :meth:`stop` is counted up to its last
    sighting, under its role. That matters for Ray: its raylet ignores SIGCHLD, so the CPU of a worker that exits
    (an idle worker Ray retires, an actor pool's actors at a pass's end) reaches no parent's reaped-children time and
    would otherwise vanish from the tree (before: a negative ``exited`` entry, the CPU an exiting worker had used
    before :meth:`start`). Where a parent in the tree waits for its children (a DataLoader's workers), what they
    used after their last sighting, and whole processes that lived between two sightings, come from its
    reaped-children time, as ``exited``. Only a process that both starts and ends between two sightings under a
    parent that does not wait for it is missed."""

    def __init__(self, pid: int | None = None, interval: float = 0.25):
        self.root = pid or os.getpid()
        self.interval = interval

    def start(self) -> CpuTree:
        self._seen: dict[int, dict[str, Any]] = {}  # pid -> what the last sighting read of it
        self._poll_cpu = 0.0  # CPU seconds of the polling thread (in this process)
        self._lock = threading.Lock()
        self.poll()
        self._base = {p: (v["own"], v["reaped"]) for p, v in self._seen.items()}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-tree", daemon=True)
        self._thread.start()
        return self

    def exclude(self, seconds: float) -> None:
        """Leave out ``seconds`` of CPU this process spent measuring (another thread's), like the polling's own."""
        with self._lock:
            self._poll_cpu += seconds

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            t0 = time.thread_time()
            self.poll()
            with self._lock:
                self._poll_cpu += time.thread_time() - t0

    def poll(self) -> None:
        """Read the tree now: every process in it and every one seen before that is still alive."""
        stats = _proc_table()
        with self._lock:
            for p in self._seen:
                self._seen[p]["alive"] = p in stats and stats[p][3] == self._seen[p]["started"]
            live = [p for p in self._seen if self._seen[p]["alive"]]  # left the tree (reparented) but running
            for p in set(_tree(stats, self.root)) | set(live):
                ppid, own, reaped, started = stats[p]
                if p in self._seen and self._seen[p]["started"] != started:  # the pid was reused: a new process
                    continue
                v = self._seen.setdefault(p, {"started": started, "role": "", "title": ""})
                v.update(ppid=ppid, own=own, reaped=reaped, alive=True)
                if v["role"] in ("", "worker", "exited"):  # a Ray worker's title follows its task
                    v["role"], v["title"] = process_role(p, self.root), _title(p)
                if "waits" not in v:
                    v["waits"] = _waits_for_children(p)

    def stop(self) -> CpuTree:
        self._done.set()
        self._thread.join()
        self.poll()
        self.processes: list[dict[str, Any]] = []
        # every role of the tree is named, at 0.0 where its processes used less than a clock tick in between (a
        # short pass: the GCS can be idle throughout)
        self.by_role: dict[str, float] = {}
        credit: dict[int, float] = {}  # per waiting parent: its ended children's CPU already counted by sighting
        for v in self._seen.values():
            parent = self._seen.get(v["ppid"])
            if not v["alive"] and parent is not None and parent["alive"] and parent["waits"]:
                credit[v["ppid"]] = credit.get(v["ppid"], 0.0) + v["own"] + v["reaped"]
        exited = 0.0
        for p, v in self._seen.items():
            base_own, base_reaped = self._base.get(p, (0.0, 0.0))
            own = max(v["own"] - base_own, 0.0)
            if p == self.root == os.getpid():
                own = max(own - self._poll_cpu, 0.0)
            self.by_role[v["role"]] = self.by_role.get(v["role"], 0.0) + own
            # children it reaped in between (whole lifetimes), less what sightings of them counted, or had used
            # before start
            exited += max(v["reaped"] - base_reaped - credit.get(p, 0.0), 0.0)
            if own > 0:
                self.processes.append({"pid": p, "role": v["role"], "title": v["title"], "cpu_s": own,
                                       "ended": not v["alive"]})
        if exited > 0:
            self.by_role["exited"] = exited
        self.total = sum(self.by_role.values())
        return self


class _Timer:
    """Wall and process-tree CPU time of a timed phase, with the CPU per process role (:class:`CpuTree`)."""

    def __enter__(self) -> _Timer:
        self.tree = CpuTree().start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.tree.stop()
        self.cpu = self.tree.total


def _result(n: int, timer: _Timer, cfg: DataConfig) -> dict[str, Any]:
    frames = n * cfg.num_snippets * cfg.frames_per_snippet
    per_clip = 1000 / max(n, 1)
    return {"clips": n, "seconds": timer.seconds, "clips_per_s": n / timer.seconds,
            "frames_per_s": frames / timer.seconds, "cpu_s": timer.cpu, "cpu_ms_per_clip": timer.cpu * per_clip,
            "cpu_ms_per_clip_by_role": {k: v * per_clip for k, v in sorted(timer.tree.by_role.items())},
            "processes": [{**p, "cpu_ms_per_clip": p["cpu_s"] * per_clip} for p in timer.tree.processes]}


def bench_bare(urls: list[str], cfg: DataConfig, warmup: int) -> dict[str, float]:
    torch.set_num_threads(1)
    for i, sample in enumerate(iter_samples(urls)):
        if i >= warmup:
            break
        decode_one(sample, cfg)
    n = 0
    with _Timer() as timer:
        for sample in iter_samples(urls):
            n += decode_one(sample, cfg)
    return _result(n, timer, cfg)


class _DecodeIterable(torch.utils.data.IterableDataset):
    """The first pass over it in each DataLoader worker is the warm-up (``warmup`` clips of the first shard);
    later passes decode the worker's shards (webdataset splits them between workers) and yield 1 per clip."""

    def __init__(self, urls: list[str], data_cfg: DataConfig, warmup: int):
        super().__init__()
        self.urls, self.data_cfg, self.warmup = urls, data_cfg, warmup
        self.passes = 0

    def __iter__(self):
        torch.set_num_threads(1)
        self.passes += 1  # the worker's own copy: persistent workers keep it between passes
        if self.passes == 1:
            for i, sample in enumerate(iter_samples(self.urls[:1])):
                if i >= self.warmup:
                    break
                decode_one(sample, self.data_cfg)
            yield 0
            return

        ds = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False, workersplitter=wds.split_by_worker)
        for sample in ds:
            yield int(decode_one({k: v for k, v in sample.items() if k != "__url__"}, self.data_cfg))


def bench_dataloader(urls: list[str], cfg: DataConfig, workers: int, warmup: int) -> dict[str, float]:
    # spawn, not Linux's default fork: by now this process has threads (Ray's gRPC threads outlive ray.shutdown,
    # fsspec's IO loop, the CPU sampler), and a child forked while one of them holds a lock can crash (CI saw
    # "segmentation fault encountered in worker"). Ray's workers are fresh processes too, so the match stays fair.
    dl = tud.DataLoader(_DecodeIterable(urls, cfg, warmup), batch_size=None, num_workers=workers,
                        prefetch_factor=2, persistent_workers=True, multiprocessing_context="spawn")
    for _ in dl:  # warm-up pass: starts the workers, imports the decoders
        pass
    n = 0
    with _Timer() as timer:
        for ok in dl:
            n += int(ok)
    del dl
    return _result(n, timer, cfg)


def bench_ray(url: str, urls: list[str], cfg: DataConfig, cpus: int, warmup: int, actors: bool = False
              ) -> dict[str, float]:

    shards = resolve_shards(url)
    keep = [shards.paths.index(u) for u in urls]
    index: SampleIndex = build_index(type(shards)(shards.url, urls, [shards.sizes[i] for i in keep],
                                                  [shards.offsets[i] for i in keep], shards.manifest))
    cfg = DataConfig(**{**cfg.__dict__, "decode_cpus": 1.0, "decode_actors": cpus if actors else 0})
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        counter, name = make_skip_counter()
        # warm-up: the same pipeline over warmup clips per CPU, in blocks of at most warmup clips so that every
        # decode process gets some, starts the decode processes and imports the decoders
        small = DataConfig(**{**cfg.__dict__, "decode_batch_size": max(1, warmup)})
        for _ in decoded_dataset(url, small, train=True, counter_name=name, index=index,
                                 limit=max(1, warmup) * cpus).iter_batches(batch_size=None, batch_format="numpy"):
            pass
        before = read_skips(counter)["decoded"]
        rows = 0
        with _Timer() as timer:
            ds = decoded_dataset(url, cfg, train=True, counter_name=name, index=index)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
                rows += len(batch["key"])
        n = read_skips(counter)["decoded"] - before
    finally:
        ray.shutdown()
    return _result(n, timer, cfg) | {"rows": rows}


def bench_ceiling(urls: list[str], cfg: DataConfig) -> dict[str, float]:
    """PyAV decodes every video frame of every clip; no colour conversion, no resize."""

    n = frames = 0
    with _Timer() as timer:
        for sample in iter_samples(urls):
            data = next((sample[e] for e in VIDEO_EXTENSIONS if isinstance(sample.get(e), bytes)), None)
            if not data:
                continue
            try:
                with av.open(io.BytesIO(data)) as c:
                    stream = c.streams.video[0]
                    stream.thread_type = "NONE"
                    for _ in c.decode(stream):
                        frames += 1
            except av.FFmpegError:
                continue
            n += 1
    return _result(n, timer, cfg) | {"frames_per_s": frames / timer.seconds}


def make_videos(folder: str, n: int, transcode_height: int) -> tuple[str, str]:
    """``n`` 10 s 640x360 25 fps clips (H.264 + AAC, x264's default long GOP) of moving shapes over texture, as
    a user's videos would arrive, then ``mirasol shards build`` of them as they are and with ``--transcode``."""

    videos = os.path.join(folder, "videos")
    os.makedirs(videos, exist_ok=True)
    rng = np.random.default_rng(0)
    h, w, fps, seconds, sr = 360, 640, 25, 10, 16000
    yy, xx = np.mgrid[0:h, 0:w]
    lines = []
    for i in range(n):
        path = os.path.join(videos, f"clip{i:03d}.mp4")
        if not os.path.exists(path):
            base = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
            frames = np.empty((fps * seconds, h, w, 3), np.uint8)
            for t in range(len(frames)):
                f = np.roll(base, t * 3, axis=1)
                cy, cx = h / 2 + 100 * np.sin(t / 15 + i), (t * 9 + 50 * i) % w
                f[(yy - cy) ** 2 + (xx - cx) ** 2 < 60**2] = (220, 40, 40)
                frames[t] = f
            tt = np.arange(seconds * sr) / sr
            audio = (0.3 * np.sin(2 * np.pi * (300 + 50 * i) * tt)).astype(np.float32)
            with open(path, "wb") as fh:
                fh.write(encode_av(frames, fps, audio, sample_rate=sr))
        lines.append(json.dumps({"video": os.path.basename(path), "caption": f"clip {i}"}))
    ann = os.path.join(folder, "annotations.jsonl")
    with open(ann, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    original, transcoded = os.path.join(folder, "original"), os.path.join(folder, "transcoded")
    for out, th in ((original, None), (transcoded, transcode_height)):
        if not os.path.exists(os.path.join(out, "manifest.json")):
            build_shards("jsonl", ann, videos, out, shard_size=max(1, n // 4), transcode=th, progress=False,
                         overwrite=True)
    return original, transcoded


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(args: argparse.Namespace) -> int:
    if args.make:
        args.url, args.transcoded = make_videos(args.make, args.make_clips, args.make_height)
    if not args.url:
        raise ValueError("give a shard URL, or --make DIR")
    cfg = load_config(args.config, args.set)
    storage.configure(cfg.storage.endpoint_url)
    cfg.data.decode_threads = 1
    urls = bench_shards(args.url, args.limit)
    turls = bench_shards(args.transcoded, args.limit) if args.transcoded else []
    rounds: list[dict[str, dict[str, float]]] = []
    for _ in range(max(1, args.repeats)):
        r: dict[str, dict[str, float]] = {}
        if "bare" not in args.skip:
            r["bare"] = bench_bare(urls, cfg.data, args.warmup)
        if "ceiling" not in args.skip:
            r["ceiling_all_frames"] = bench_ceiling(urls, cfg.data)
        for k in args.cpus:
            if "dataloader" not in args.skip:
                r[f"dataloader_{k}w"] = bench_dataloader(urls, cfg.data, k, args.warmup)
            if "ray" not in args.skip:
                r[f"ray_{k}cpu"] = bench_ray(args.url, urls, cfg.data, k, args.warmup)
                if args.ray_actors:
                    r[f"ray_actors_{k}cpu"] = bench_ray(args.url, urls, cfg.data, k, args.warmup, actors=True)
        if turls:
            r["bare_transcoded"] = bench_bare(turls, cfg.data, args.warmup)
        rounds.append(r)
        print(" ".join(f"{k}={v['clips_per_s']:.2f}" for k, v in r.items()), flush=True)

    def ratios(r: dict[str, dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        cps = {k: v["clips_per_s"] for k, v in r.items()}
        if "bare" in r:  # clips per CPU-second against the bare loop's (load-robust)
            for k, v in r.items():
                if k != "bare" and v["cpu_s"] > 0:
                    out[f"{k} clips per CPU-s / bare"] = r["bare"]["cpu_ms_per_clip"] / v["cpu_ms_per_clip"]
        for k in args.cpus:
            for ray_name in (f"ray_{k}cpu", f"ray_actors_{k}cpu"):
                if ray_name in cps and "bare" in cps:
                    out[f"{ray_name}_per_cpu / bare"] = cps[ray_name] / k / cps["bare"]
                if ray_name in cps and f"dataloader_{k}w" in cps:
                    out[f"{ray_name} / dataloader_{k}w"] = cps[ray_name] / cps[f"dataloader_{k}w"]
            if f"dataloader_{k}w" in cps and "bare" in cps:
                out[f"dataloader_{k}w_per_cpu / bare"] = cps[f"dataloader_{k}w"] / k / cps["bare"]
        if "bare" in cps and "ceiling_all_frames" in cps:
            out["bare / ceiling (clips/s)"] = cps["bare"] / cps["ceiling_all_frames"]
        if "bare" in cps and "bare_transcoded" in cps:
            out["transcoded / original (bare clips/s)"] = cps["bare_transcoded"] / cps["bare"]
        return out

    per_round = [ratios(r) for r in rounds]
    res: dict[str, Any] = {
        "url": args.url, "config": args.config, "overrides": args.set, "machine": f"{os.cpu_count()} CPUs",
        "load_average": os.getloadavg(), "shards": len(urls), "warmup": args.warmup, "rounds": rounds,
        "results": {k: {m: statistics.median(r[k][m] for r in rounds) for m, v in rounds[0][k].items()
                        if isinstance(v, (int, float))} for k in rounds[0]},
        "cpu_ms_per_clip_by_role": {k: {role: statistics.median(r[k]["cpu_ms_per_clip_by_role"].get(role, 0.0)
                                                                for r in rounds)
                                        for role in rounds[0][k]["cpu_ms_per_clip_by_role"]} for k in rounds[0]},
        "ratios": {k: _summary([r[k] for r in per_round]) for k in per_round[0]},
    }
    print(f"\n{'variant':<22}{'clips':>7}{'s':>8}{'clips/s':>10}{'frames/s':>10}{'CPU ms/clip':>13}"
          f"   (median of {len(rounds)})")
    for k, v in res["results"].items():
        print(f"{k:<22}{v['clips']:>7.0f}{v['seconds']:>8.2f}{v['clips_per_s']:>10.2f}{v['frames_per_s']:>10.1f}"
              f"{v['cpu_ms_per_clip']:>13.1f}")
    if args.breakdown:
        print(f"\nCPU ms per clip by process (median of {len(rounds)}; 'exited': processes that ended, after their "
              "last sighting)")
        for k, roles in res["cpu_ms_per_clip_by_role"].items():
            print(f"{k:<22}" + "  ".join(f"{role} {ms:.1f}" for role, ms in
                                          sorted(roles.items(), key=lambda x: -x[1]) if abs(ms) >= 0.05))
        last = rounds[-1]
        for k, v in last.items():
            workers = [p for p in v["processes"] if p["role"] in ("worker", "child")]
            if workers:
                print(f"{k:<22}last round, per worker: " + ", ".join(
                    f"{p['title'] or p['pid']} {p['cpu_ms_per_clip']:.1f}" for p in workers))
    print()
    for k, v in res["ratios"].items():
        print(f"{k:<48}{v['median']:>8.2f}   ({v['min']:.2f}-{v['max']:.2f})")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in res['load_average'])}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
