"""``mirasol bench trial``: what a sweep trial costs before it trains, from Tune starting it to its first step.

Runs ``mirasol sweep`` (FIFO, one trial at a time, so trials do not slow each other) over N identical trials (a
``train.seed`` grid) on synthetic clips, each ``--steps`` steps with a checkpoint and a report to Tune after every
step (metric: the training loss, no validation), and reads back per trial:

- ``first``: Tune starting the trial -> its first report, on the driver's clock: the trial's process, the Ray Train
  controller and worker group, the data pipeline up to the first batch, the model, step 1, its checkpoint;
- ``later``: the time between two later reports (Tune's ``time_this_iter_s``): one step with its checkpoint;
- ``overhead = first - later``: the start-up a trial pays before its first step; of it, ``to_loop``: before the
  train loop runs (trial process, Train controller, worker group, torch.distributed, the model) and ``loop_to_step1``:
  the loop's start to step 1 done (the data pipeline to the first batch, and step 1), from the run's
  ``metrics.jsonl`` (``elapsed_s`` of step 1).

Minimum and median over the trials; the minimum is the figure least disturbed by other work on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from mirasol_ray import storage
from mirasol_ray.data.synthetic import synthesize
from mirasol_ray.launch.sweep import run_sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--num-clips", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--data", default="", help="training shards (default: synthetic clips made here)")
    p.add_argument("--json-out", default="")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="mirasol-bench-trial-") as work:
        data = args.data
        if not data:
            data = os.path.join(work, "data")
            synthesize(data, args.num_clips, seed=0, shard_size=4, progress=False)
        space = os.path.join(work, "space.yaml")
        with open(space, "w") as f:
            f.write(f"train.seed: {{grid: {list(range(args.trials))}}}\n")
        sets = [f"data.train={data}", f"train.steps={args.steps}", "train.checkpoint_every=1", "train.log_every=1",
                "train.warmup_steps=1", *args.set]
        run_sweep(args.config, space, sets, scheduler="fifo", max_concurrent=1, metric="loss",
                  storage_url=os.path.join(work, "sweeps"), name="bench", num_cpus=args.num_cpus,
                  table_every_s=1e9)
        uri = os.path.join(work, "sweeps", "bench")
        ledger = json.loads(storage.read_text(os.path.join(uri, "sweep.json")))
        first, later, loop = [], [], []
        for tid, t in ledger["trials"].items():
            if t["status"] != "finished":  # e.g. killed for memory by other work on the machine
                print(f"left out: trial {tid} {t['status']} ({t.get('error', '')})")
                continue
            first += t.get("first_report_s", [])[:1]
            rows = [json.loads(ln) for ln in open(os.path.join(uri, f"tune_{tid}", "result.json")) if ln.strip()]
            later += [r["time_this_iter_s"] for r in rows[1:]]
            metrics = [json.loads(ln) for ln in open(os.path.join(uri, "trials", tid, "metrics.jsonl"))]
            loop += [metrics[0]["elapsed_s"]]
    if not first or not later:
        raise RuntimeError("no trial reported twice: raise --steps")
    step = statistics.median(later)
    out = {"trials": len(first), "steps": args.steps, "config": args.config, "set": args.set,
           "first_report_s": {"min": min(first), "median": statistics.median(first), "all": first},
           "later_report_s": {"min": min(later), "median": statistics.median(later)},
           "overhead_s": {"min": min(first) - step, "median": statistics.median(first) - step},
           "loop_to_step1_s": {"min": min(loop), "median": statistics.median(loop), "all": loop},
           "to_loop_s": {"median": statistics.median(f - lp - step for f, lp in zip(first, loop))},
           "load_average": os.getloadavg()}
    print(f"\ntrial start -> first report: min {min(first):.1f} s, median {statistics.median(first):.1f} s "
          f"({len(first)} trials); a later step + checkpoint + report: median {statistics.median(later):.2f} s; "
          f"start-up overhead: min {out['overhead_s']['min']:.1f} s, median {out['overhead_s']['median']:.1f} s "
          f"(load average {out['load_average'][0]:.1f}); of it, before the train loop: median "
          f"{out['to_loop_s']['median']:.1f} s, the loop's start to step 1 done: median "
          f"{out['loop_to_step1_s']['median']:.1f} s")
    if args.json_out:
        storage.write_text(args.json_out, json.dumps(out, indent=2))
    return 0
