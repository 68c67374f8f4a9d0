"""``mirasol bench build``: clips/s of ``shards build --transcode`` as Ray work, on 1 and 2 CPUs (``--cpus``), against
the same per-clip function in a plain ``multiprocessing.Pool`` of as many processes, on the same clips.

The clips are synthetic (:func:`~mirasol_ray.data.synthetic.generate_clip`: real MP4s of 2-4 s, several sizes and
frame rates, with audio), written once to a local folder with a jsonl of their names. For each CPU count:

- ``ray``: a local Ray of that many CPUs, its workers warmed by a build of a few clips, then
  :func:`~mirasol_ray.data.shards.run_build` timed from call to return (plan, clip tasks, shard tasks, manifest);
- ``pool``: a ``multiprocessing.Pool`` (spawn) of that many processes, warmed the same way, mapping
  :func:`~mirasol_ray.data.shards.make_clip` over the same clips in order while this process packs each shard
  with :func:`~mirasol_ray.data.shards.pack_shard`: the same work without Ray. Its shards are compared with the
  build's, member by member: the members that differ are printed and listed in the JSON (``differing_members``).

Each figure is the best of ``--repeats`` runs (the run least disturbed by other work on the machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator

import ray

from mirasol_ray import storage
from mirasol_ray.data.formats import FORMATS, Source, VideoRoot
from mirasol_ray.data.shards import ClipOptions, ShardJob, make_clip, pack_shard, plan_shards, run_build
from mirasol_ray.data.synthetic import generate_clip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clips", type=int, default=48, help="synthetic clips to build (default 48)")
    p.add_argument("--cpus", default="1,2", help="CPU counts to compare, comma-separated (default 1,2)")
    p.add_argument("--transcode", type=int, default=128, metavar="HEIGHT", help="re-encode height (default 128)")
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per figure; the best is kept (default 1)")
    p.add_argument("--json-out", default="", help="write the figures as JSON here")


WARM_CLIPS = 4
"""Clips of the warm-up build that starts the workers (and imports the decoder) before a timed run."""


def _dataset(work: str, clips: int) -> tuple[str, str]:
    """The clips, ``ann.jsonl`` naming them all and ``warm.jsonl`` the first :data:`WARM_CLIPS`."""
    videos = os.path.join(work, "videos")
    os.makedirs(videos)
    lines = []
    for i in range(clips):
        data, _ = generate_clip(seed=0, index=i)
        with open(os.path.join(videos, f"clip{i:05d}.mp4"), "wb") as v:
            v.write(data)
        lines.append(json.dumps({"video": f"clip{i:05d}.mp4", "task": "cls", "label": str(i % 4)}) + "\n")
    for name, n in (("ann.jsonl", clips), ("warm.jsonl", WARM_CLIPS)):
        with open(os.path.join(work, name), "w") as f:
            f.writelines(lines[:n])
    return os.path.join(work, "ann.jsonl"), videos


def _members(out: str) -> dict[str, bytes]:
    """Every member of every shard in ``out``, by shard and name."""
    found = {}
    for n in sorted(os.listdir(out)):
        if n.endswith(".tar"):
            with tarfile.open(os.path.join(out, n)) as tar:
                found |= {f"{n}/{m.name}": tar.extractfile(m).read() for m in tar.getmembers()}
    return found


def _time_ray(ann: str, videos: str, out: str, cpus: int, args: argparse.Namespace) -> float:
    """Seconds of one build on a local Ray of ``cpus`` CPUs, its workers already started."""
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        run_build("jsonl", os.path.join(os.path.dirname(ann), "warm.jsonl"), videos, out + "-warm", shard_size=1,
                  transcode=args.transcode, progress=False, use_ray=True, overwrite=True)
        t0 = time.perf_counter()
        run_build("jsonl", ann, videos, out, shard_size=args.shard_size, transcode=args.transcode, progress=False,
                  use_ray=True, overwrite=True)  # all the CPUs of the Ray it finds
        return time.perf_counter() - t0
    finally:
        ray.shutdown()


def _time_pool(ann: str, videos: str, out: str, cpus: int, args: argparse.Namespace) -> float:
    """Seconds of the same work in a ``multiprocessing.Pool`` of ``cpus`` processes, already started."""
    root = VideoRoot(videos)
    shards, _ = plan_shards(FORMATS["jsonl"](Source(ann, root)).records, root, videos, args.shard_size, False)
    opts = ClipOptions(args.transcode, 32, 16000)
    jobs = [(job, opts) for sh in shards for job in sh.clips]
    os.makedirs(out, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(cpus) as pool:
        pool.map(_make_clip_args, jobs[:WARM_CLIPS], chunksize=1)  # starts and warms the processes
        t0 = time.perf_counter()
        made = pool.imap(_make_clip_args, jobs, chunksize=1)
        for sh in shards:
            pack_shard(out, sh, _take(made, sh))
        return time.perf_counter() - t0


def _make_clip_args(job_opts: tuple) -> tuple[dict[str, str], bytes]:
    return make_clip(*job_opts)


def _take(made: Iterator, shard: ShardJob) -> Iterator:
    for _ in shard.clips:
        yield next(made)


def run(args: argparse.Namespace) -> int:
    cpus = [int(c) for c in args.cpus.split(",") if c.strip()]
    if not cpus or min(cpus) <= 0:
        raise ValueError(f"--cpus must list positive CPU counts, got {args.cpus!r}")
    if args.clips <= 0 or args.repeats <= 0:
        raise ValueError("--clips and --repeats must be positive")
    if ray.is_initialized():
        raise RuntimeError("bench build starts its own local Ray for each CPU count: run it without one")
    figures: dict[str, dict[str, float]] = {"ray": {}, "pool": {}}
    differ: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="mirasol-bench-build-") as work:
        ann, videos = _dataset(work, args.clips)
        for n in cpus:
            best_ray = min(_time_ray(ann, videos, os.path.join(work, f"ray{n}"), n, args)
                           for _ in range(args.repeats))
            best_pool = min(_time_pool(ann, videos, os.path.join(work, f"pool{n}"), n, args)
                            for _ in range(args.repeats))
            built, pooled = _members(os.path.join(work, f"ray{n}")), _members(os.path.join(work, f"pool{n}"))
            if built.keys() != pooled.keys():
                raise RuntimeError(f"the Pool's shards hold other samples than the build's on {n} CPUs")
            differ[str(n)] = sorted(k for k in built if built[k] != pooled[k])
            if differ[str(n)]:
                print(f"warning: {len(differ[str(n)])} of {len(built)} members differ between the build's shards and "
                      f"the Pool's on {n} CPUs: {', '.join(differ[str(n)][:5])}", flush=True)
            figures["ray"][str(n)] = args.clips / best_ray
            figures["pool"][str(n)] = args.clips / best_pool
            print(f"{n} CPU{'s' if n > 1 else ''}: build (Ray) {figures['ray'][str(n)]:.2f} clips/s, "
                  f"multiprocessing.Pool {figures['pool'][str(n)]:.2f} clips/s", flush=True)
    out = {"clips": args.clips, "transcode": args.transcode, "shard_size": args.shard_size, "repeats": args.repeats,
           "clips_per_s": figures, "differing_members": differ, "load_average": os.getloadavg(),
           "cpu_count": os.cpu_count()}
    lo, hi = str(min(cpus)), str(max(cpus))
    if lo != hi:
        out["ray_speedup"] = figures["ray"][hi] / figures["ray"][lo]
        print(f"build on {hi} CPUs / on {lo}: {out['ray_speedup']:.2f}x")
    out["ray_vs_pool"] = {n: figures["ray"][n] / figures["pool"][n] for n in figures["ray"]}
    print("build / Pool: " + ", ".join(f"{v:.2f}x on {n} CPU(s)" for n, v in out["ray_vs_pool"].items()))
    if args.json_out:
        storage.write_text(args.json_out, json.dumps(out, indent=2))
    return 0
