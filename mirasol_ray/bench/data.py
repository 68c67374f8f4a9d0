"""``mirasol bench data URL``: decode throughput of the data path, every variant measured in one run.

(a) bare: one process, webdataset tar iteration + :func:`decode_sample_safe`, no framework;
(b) ray: the real Ray Data pipeline (:func:`decoded_dataset`) with 1 and 2 CPUs;
(c) dataloader: webdataset + torch DataLoader, the same decode function, the same number of workers;
(d) ceiling: PyAV decodes every frame of every clip, no conversion (the decoder's floor cost);
(e) with ``--transcoded URL2``: the bare loop over shards built with ``--transcode`` from the same videos.
Ratios are taken between figures of this one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from typing import Any, Iterator

import numpy as np
import torch.utils.data

from mirasol_ray.config import load_config


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
    p.add_argument("--limit", type=int, default=0, help="at most N clips per variant")
    p.add_argument("--skip", nargs="*", default=[], choices=["bare", "ray", "dataloader", "ceiling"])
    p.add_argument("--json-out", default="", help="write the figures as JSON here")


def _tar_urls(url: str) -> list[str]:
    from mirasol_ray.data.pipeline import expand_shard_urls

    return expand_shard_urls(url)


def iter_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (member bytes by extension) from local tars, as webdataset groups them."""
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for s in ds:
        yield {k: v for k, v in s.items() if k != "__url__"}


def _frames_of(rows: list[dict]) -> int:
    return sum(int(r["snippet_mask"].sum()) * r["video"].shape[1] for r in rows[:1])


def bench_bare(urls: list[str], cfg, limit: int) -> dict[str, float]:
    from mirasol_ray.data.rows import decode_sample_safe

    rng = np.random.default_rng(0)
    n = frames = 0
    t0 = time.perf_counter()
    for sample in iter_samples(urls):
        rows, reason, _ = decode_sample_safe(sample, cfg.data, train=True, rng=rng)
        if reason is None:
            n += 1
            frames += _frames_of(rows)
        if limit and n >= limit:
            break
    dt = time.perf_counter() - t0
    return {"clips": n, "seconds": dt, "clips_per_s": n / dt, "frames_per_s": frames / dt}


class _DecodeIterable(torch.utils.data.IterableDataset):
    """An IterableDataset over tar shards; webdataset splits the shards between DataLoader workers."""

    def __init__(self, urls: list[str], data_cfg):
        super().__init__()
        self.urls, self.data_cfg = urls, data_cfg

    def __iter__(self):
        import torch.utils.data as tud

        from mirasol_ray.data.rows import decode_sample_safe

        info = tud.get_worker_info()
        rng = np.random.default_rng(0 if info is None else info.id)
        for sample in iter_samples(self.urls):  # webdataset gives each DataLoader worker its own shards
            rows, reason, _ = decode_sample_safe(sample, self.data_cfg, train=True, rng=rng)
            if reason is None:
                yield _frames_of(rows)


def bench_dataloader(urls: list[str], cfg, workers: int, limit: int) -> dict[str, float]:
    import torch.utils.data as tud

    dl = tud.DataLoader(_DecodeIterable(urls, cfg.data), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    n = frames = 0
    t0 = time.perf_counter()
    for f in dl:
        n += 1
        frames += int(f)
        if limit and n >= limit:
            break
    dt = time.perf_counter() - t0
    return {"clips": n, "seconds": dt, "clips_per_s": n / dt, "frames_per_s": frames / dt}


def bench_ray(url: str, cfg, cpus: int, limit: int) -> dict[str, float]:
    import ray

    from mirasol_ray.data.pipeline import decoded_dataset, make_skip_counter, read_skips

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        data_cfg = cfg.data
        data_cfg.decode_cpus = 1.0  # one decode task per CPU, as the bare loop and each DataLoader worker
        counter, name = make_skip_counter()
        # warm-up: start workers and import decoders before timing
        for _ in decoded_dataset(url, data_cfg, train=True, counter_name=name, limit=cpus).iter_batches(
                batch_size=1, batch_format="numpy"):
            pass
        ray.get(counter.snapshot.remote())
        before = read_skips(counter)["decoded"]
        frames = 0
        t0 = time.perf_counter()
        ds = decoded_dataset(url, data_cfg, train=True, counter_name=name, limit=limit)
        for batch in ds.iter_batches(batch_size=data_cfg.decode_batch_size, batch_format="numpy",
                                     prefetch_batches=4):
            frames += int(batch["snippet_mask"].sum()) * data_cfg.frames_per_snippet if len(batch["key"]) else 0
        dt = time.perf_counter() - t0
        ray.get(counter.snapshot.remote())
        n = read_skips(counter)["decoded"] - before
    finally:
        ray.shutdown()
    return {"clips": n, "seconds": dt, "clips_per_s": n / dt, "frames_per_s": frames / dt}


def bench_ceiling(urls: list[str], limit: int) -> dict[str, float]:
    """PyAV decodes every video frame of every clip; no colour conversion, no resize."""
    import av

    from mirasol_ray.data.rows import VIDEO_EXTENSIONS

    n = frames = 0
    t0 = time.perf_counter()
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
        if limit and n >= limit:
            break
    dt = time.perf_counter() - t0
    return {"clips": n, "seconds": dt, "clips_per_s": n / dt, "frames_per_s": frames / dt}


def make_videos(folder: str, n: int, transcode_height: int) -> tuple[str, str]:
    """``n`` 10 s 640x360 25 fps clips (H.264 + AAC, x264's default long GOP) of moving shapes over texture, as
    a user's videos would arrive, then ``mirasol shards build`` of them as they are and with ``--transcode``."""
    from mirasol_ray.data.encode import encode_av
    from mirasol_ray.data.shards import build_shards

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
            build_shards("jsonl", ann, videos, out, shard_size=max(1, n // 4), transcode=th, progress=False)
    return original, transcoded


def run(args: argparse.Namespace) -> int:
    if args.make:
        args.url, args.transcoded = make_videos(args.make, args.make_clips, args.make_height)
    if not args.url:
        raise ValueError("give a shard URL, or --make DIR")
    cfg = load_config(args.config, args.set)
    cfg.data.decode_threads = 1
    urls = _tar_urls(args.url)
    res: dict[str, Any] = {"url": args.url, "config": args.config, "overrides": args.set,
                           "machine": f"{os.cpu_count()} CPUs", "results": {}}
    r = res["results"]
    if "bare" not in args.skip:
        r["bare"] = bench_bare(urls, cfg, args.limit)
    if "ceiling" not in args.skip:
        r["ceiling_all_frames"] = bench_ceiling(urls, args.limit)
    if "dataloader" not in args.skip:
        for k in args.cpus:
            r[f"dataloader_{k}w"] = bench_dataloader(urls, cfg, k, args.limit)
    if "ray" not in args.skip:
        for k in args.cpus:
            r[f"ray_{k}cpu"] = bench_ray(args.url, load_config(args.config, args.set), k, args.limit)
    if args.transcoded:
        r["bare_transcoded"] = bench_bare(_tar_urls(args.transcoded), cfg, args.limit)

    ratios: dict[str, float] = {}
    if "bare" in r:
        for k in args.cpus:
            if f"ray_{k}cpu" in r:
                ratios[f"ray_{k}cpu_per_cpu / bare"] = r[f"ray_{k}cpu"]["clips_per_s"] / k / r["bare"]["clips_per_s"]
        if "ceiling_all_frames" in r:
            ratios["bare / ceiling (clips/s)"] = r["bare"]["clips_per_s"] / r["ceiling_all_frames"]["clips_per_s"]
        if "bare_transcoded" in r:
            ratios["transcoded / original (bare clips/s)"] = (r["bare_transcoded"]["clips_per_s"]
                                                             / r["bare"]["clips_per_s"])
    for k in args.cpus:
        if f"ray_{k}cpu" in r and f"dataloader_{k}w" in r:
            ratios[f"ray_{k}cpu / dataloader_{k}w"] = r[f"ray_{k}cpu"]["clips_per_s"] / r[f"dataloader_{k}w"][
                "clips_per_s"]
    res["ratios"] = ratios

    print(f"{'variant':<22}{'clips':>7}{'s':>8}{'clips/s':>10}{'frames/s':>10}")
    for k, v in r.items():
        print(f"{k:<22}{v['clips']:>7}{v['seconds']:>8.2f}{v['clips_per_s']:>10.2f}{v['frames_per_s']:>10.1f}")
    print()
    for k, v in ratios.items():
        print(f"{k:<42}{v:>8.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
