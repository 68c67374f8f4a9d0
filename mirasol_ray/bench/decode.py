"""``mirasol bench decode``: what decoding costs as the frames sampled from a long video grow (issue 33).

The paper's regime is minutes of video read as up to 128 snippets of 4 frames (512 frames). This measures, on the
same long videos, the training decode (:func:`~mirasol_ray.data.rows.decode_av`: frames at the snippet plan's times,
resized by the decoder, audio read once per clip and turned into each snippet's log-mel) at each ``--frames``
count, against decoding every frame of the video at the same size (the cost a decoder that cannot seek would pay
for any count). Two encodings of the same videos:

- ``delivered``: as a camera or a download gives them (x264's default keyframe interval, 250 frames);
- ``transcoded``: re-encoded as ``mirasol shards build --transcode`` does it
  (:func:`~mirasol_ray.data.shards.transcode_video`, keyframes every ``DEFAULT_GOP`` frames).

Each (encoding, frame count) runs in a fresh process (spawned), one thread, after one untimed warm-up clip; its CPU
seconds over the timed clips give CPU ms per clip (which a busy machine disturbs far less than wall time), and its
peak resident memory above what it held before the first decode gives the decode's memory. The rule the issue
sets: the cost per clip grows at most linearly with the frames sampled (512 frames <= 16x the cost of 32), never
with the video's length; the table prints the ratio to the smallest count and to every frame.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import time
from typing import Any

import numpy as np
import torch

from mirasol_ray.config import DataConfig, load_config
from mirasol_ray.data.decode import Video
from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.rows import decode_av
from mirasol_ray.data.shards import DEFAULT_GOP, transcode_video
from mirasol_ray.launch.plots import plt

ENCODINGS = ("delivered", "transcoded")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="where the test videos are written (kept: a second run reuses them)")
    p.add_argument("--minutes", type=float, default=3.0, help="length of each test video")
    p.add_argument("--clips", type=int, default=3, help="test videos (every measurement decodes all of them)")
    p.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of the test videos as delivered")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--frames", type=int, nargs="+", default=[32, 128, 512],
                   help="frames sampled per clip (snippets = frames / the preset's data.frames_per_snippet)")
    p.add_argument("--config", default="tiny_long", help="preset/YAML giving the decode geometry")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--transcode-height", type=int, default=128, help="--transcode HEIGHT for the transcoded copy")
    p.add_argument("--json-out", default="", help="write the results here (default FOLDER/decode.json)")


def make_videos(folder: str, n: int, minutes: float, width: int, height: int, fps: int, transcode_height: int
                ) -> dict[str, list[str]]:
    """``n`` videos of ``minutes`` (H.264 + AAC, the encoder's default keyframe interval): shapes moving over a
    drifting texture, a tone that changes every few seconds; and each re-encoded as ``shards build --transcode``
    would. Existing files are kept."""

    os.makedirs(folder, exist_ok=True)
    out: dict[str, list[str]] = {e: [] for e in ENCODINGS}
    num_frames, sr = int(round(minutes * 60 * fps)), 16000
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        path = os.path.join(folder, f"long{i:02d}.mp4")
        if not os.path.exists(path):
            rng = np.random.default_rng(i)
            base = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
            base = base[:height, :width]
            frames = np.empty((num_frames, height, width, 3), np.uint8)
            for t in range(num_frames):
                f = np.roll(base, (t // 2, t * 3), axis=(0, 1))
                cy, cx = height / 2 + height / 3 * np.sin(t / 40 + i), (t * 5 + 70 * i) % width
                f[(yy - cy) ** 2 + (xx - cx) ** 2 < (height / 7) ** 2] = (220, 40, 40)
                frames[t] = f
            seconds = num_frames / fps
            tone = 300 + 100 * (np.floor(np.arange(int(seconds * sr)) / (sr * 3)) % 5)
            audio = (0.3 * np.sin(2 * np.pi * np.cumsum(tone) / sr)).astype(np.float32)
            data = encode_av(frames, fps, audio, sr)
            del frames
            with open(path + ".part", "wb") as fh:
                fh.write(data)
            os.replace(path + ".part", path)
        out["delivered"].append(path)
        tpath = os.path.join(folder, f"long{i:02d}-t{transcode_height}.mp4")
        if not os.path.exists(tpath):
            with open(path, "rb") as src:
                data = transcode_video(src, transcode_height, DEFAULT_GOP, 16000)
            with open(tpath + ".part", "wb") as fh:
                fh.write(data)
            os.replace(tpath + ".part", tpath)
        out["transcoded"].append(tpath)
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_mib(reset: bool = False) -> float:
    """This process's peak resident memory (Linux ``VmHWM``: a spawned child's own, where ``ru_maxrss`` would keep
    the parent's across exec); ``reset`` first lowers the peak to the current size (``/proc/self/clear_refs``)."""
    if reset:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")) / 1024  # kB


def measure(paths: list[str], cfg_dict: dict[str, Any], frames: int) -> dict[str, Any]:
    """In a process of its own: decode every clip of ``paths`` at ``frames`` sampled frames (0: every frame of the
    video, through the same reader at the same size, no audio), after one untimed warm-up clip."""

    torch.set_num_threads(1)  # one intra-op thread, as a decode task has
    cfg = DataConfig(**cfg_dict)
    blobs = [open(p, "rb").read() for p in paths]

    def one(data: bytes, seed: int) -> None:
        if frames:
            decode_av(data, None, cfg, train=True, rng=np.random.default_rng(seed))
        else:
            with Video(data, cfg.height, cfg.width, num_threads=1) as v:
                for first in range(0, v.num_frames, 256):  # every frame, 256 at a time (bounded memory)
                    idx = np.arange(first, min(first + 256, v.num_frames))
                    v.read(v.frame_starts[idx])

    rss0 = _peak_mib(reset=True)  # imports done, the clips' bytes read: what the decode adds is above this
    one(blobs[0], 0)
    cpu0, t0 = _cpu(), time.perf_counter()
    for i, data in enumerate(blobs):
        one(data, i + 1)
    cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
    return {"frames": frames, "clips": len(blobs), "cpu_ms_per_clip": 1000 * cpu / len(blobs),
            "clips_per_s": len(blobs) / wall, "peak_mib": _peak_mib(), "peak_growth_mib": _peak_mib() - rss0}


def _in_child(paths: list[str], cfg: DataConfig, frames: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(measure, paths, dict(cfg.__dict__), frames).result()


def run(args: argparse.Namespace) -> int:
    width, height = (int(x) for x in args.size.lower().split("x"))
    base = load_config(args.config, args.set).data
    fps_snippet = base.frames_per_snippet
    bad = [f for f in args.frames if f <= 0 or f % fps_snippet]
    if bad:
        raise ValueError(f"--frames {bad}: each must be a positive multiple of data.frames_per_snippet={fps_snippet}")
    print(f"making {args.clips} videos of {args.minutes:g} min ({width}x{height} {args.fps} fps) in {args.folder} "
          f"(kept for the next run)...", flush=True)
    videos = make_videos(args.folder, args.clips, args.minutes, width, height, args.fps, args.transcode_height)
    results: dict[str, list[dict[str, Any]]] = {}
    for enc in ENCODINGS:
        results[enc] = []
        for frames in [*sorted(args.frames), 0]:
            cfg = DataConfig(**{**base.__dict__, "num_snippets": max(1, frames // fps_snippet),
                                "clip_seconds": 0.0})
            what = f"{frames} frames" if frames else "every frame"
            print(f"  {enc}: {what}...", flush=True)
            results[enc].append(_in_child(videos[enc], cfg, frames))
    report = {"config": args.config, "geometry": {"height": base.height, "width": base.width,
                                                  "frames_per_snippet": fps_snippet},
              "videos": {"count": args.clips, "minutes": args.minutes, "size": args.size, "fps": args.fps,
                         "frames": int(round(args.minutes * 60 * args.fps)),
                         "delivered_gop": "x264 default (250)", "transcoded": {"height": args.transcode_height,
                                                                               "gop": DEFAULT_GOP}},
              "results": results}
    _print(report)
    out = args.json_out or os.path.join(args.folder, "decode.json")
    with open(out, "w") as fh:
        json.dump(report, fh, indent=1)
    png = os.path.splitext(out)[0] + ".png"
    _plot(report, png)
    print(f"results: {out}\nplot:    {png}")
    return 0


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Cost of the largest sampled count over the smallest (the linear bound: their frame ratio), and over every
    frame."""
    sampled = [r for r in rows if r["frames"]]
    every = next(r for r in rows if not r["frames"])
    lo, hi = sampled[0], sampled[-1]
    return {"largest_over_smallest": hi["cpu_ms_per_clip"] / lo["cpu_ms_per_clip"],
            "frame_ratio": hi["frames"] / lo["frames"],
            "largest_over_every_frame": hi["cpu_ms_per_clip"] / every["cpu_ms_per_clip"]}


def _print(report: dict[str, Any]) -> None:
    v = report["videos"]
    print(f"\n{v['count']} videos of {v['minutes']:g} min ({v['frames']} frames each), decoded to "
          f"{report['geometry']['height']}x{report['geometry']['width']}, CPU ms per clip (one thread):")
    print(f"{'encoding':<11} {'frames':>11} {'CPU ms/clip':>12} {'x smallest':>11} {'x every':>8} {'clips/s':>8} "
          f"{'peak MiB':>9} {'+decode':>8}")
    for enc, rows in report["results"].items():
        every = next(r for r in rows if not r["frames"])["cpu_ms_per_clip"]
        smallest = rows[0]["cpu_ms_per_clip"]
        for r in rows:
            print(f"{enc:<11} {r['frames'] or 'every frame':>11} {r['cpu_ms_per_clip']:>12.0f} "
                  f"{r['cpu_ms_per_clip'] / smallest:>11.2f} {r['cpu_ms_per_clip'] / every:>8.2f} "
                  f"{r['clips_per_s']:>8.2f} {r['peak_mib']:>9.0f} {r['peak_growth_mib']:>8.0f}")
        q = ratios(rows)
        verdict = "within" if q["largest_over_smallest"] <= q["frame_ratio"] else "OVER"
        print(f"{'':<11} {rows[-2]['frames']} frames cost {q['largest_over_smallest']:.1f}x {rows[0]['frames']} "
              f"({verdict} the linear bound {q['frame_ratio']:.0f}x) and {q['largest_over_every_frame']:.2f}x "
              f"every frame")


def _plot(report: dict[str, Any], png: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for enc, rows in report["results"].items():
        sampled = [r for r in rows if r["frames"]]
        line, = ax.plot([r["frames"] for r in sampled], [r["cpu_ms_per_clip"] for r in sampled], "o-", label=enc)
        every = next(r for r in rows if not r["frames"])["cpu_ms_per_clip"]
        ax.axhline(every, color=line.get_color(), ls="--", lw=1, label=f"{enc}: every frame")
    first = report["results"][ENCODINGS[0]][0]
    xs = np.array(sorted(r["frames"] for r in report["results"][ENCODINGS[0]] if r["frames"]), float)
    ax.plot(xs, first["cpu_ms_per_clip"] * xs / xs[0], ":", color="grey", label="linear from the smallest")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames sampled per clip")
    ax.set_ylabel("CPU ms per clip")
    v = report["videos"]
    ax.set_title(f"decode of {v['minutes']:g}-minute videos ({v['frames']} frames)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
