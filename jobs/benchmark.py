"""Ray job entrypoint: one of the paper's benchmarks from its official files to the paper's table, in one job:
build the shards, fine-tune with the benchmark's preset, evaluate (results.json, results.csv, the table).

    ray job submit --working-dir . -- python jobs/benchmark.py --benchmark msrvtt-qa \
        --annotations /data/MSRVTT-QA --videos /data/MSRVTT/videos/all --out s3://bucket/msrvtt-qa \
        --init-from s3://bucket/runs/pretrain --set train.steps=20000

Writes ``OUT/shards/<split>/``, the run ``OUT/runs/finetune_<benchmark>`` and ``OUT/results/``. Extra ``shards
build`` arguments go after ``--build`` (e.g. ``--build --labels ks_classes.txt``); ``--set`` applies to training.
"""

import argparse
import sys

from mirasol_ray.cli import main

# benchmark -> (split to train on, split validated on during training or None, split the results are reported on)
SPLITS = {
    "msrvtt-qa": ("train", "val", "test"),
    "activitynet-qa": ("train", "val", "test"),
    "nextqa-mc": ("train", "val", "val"),
    "nextqa-oe": ("train", "val", "val"),
    "kinetics-sounds": ("train", None, "val"),
    "vggsound": ("train", None, "test"),
    "epic-sounds": ("train", None, "validation"),
}


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jobs/benchmark.py")
    p.add_argument("--benchmark", required=True, choices=sorted(SPLITS))
    p.add_argument("--annotations", required=True)
    p.add_argument("--videos", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--init-from", default="", help="pretrained checkpoint to fine-tune")
    p.add_argument("--transcode", default="224", help="height the clips are re-encoded at")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--build", nargs=argparse.REMAINDER, default=[], help="extra shards build arguments")
    a = p.parse_args(argv)
    train, val, test = SPLITS[a.benchmark]
    out = a.out.rstrip("/")
    preset = "finetune_" + a.benchmark.replace("-", "_")
    rc = main(["shards", "build", "--format", a.benchmark, "--annotations", a.annotations, "--videos", a.videos,
               "--out", f"{out}/shards", "--transcode", a.transcode, *a.build])
    if rc:
        return rc
    sets = [f"data.train={out}/shards/{train}", f"storage.root={out}/runs", f"storage.name={preset}"]
    sets += [f"data.val={out}/shards/{val}"] if val else []
    sets += [f"train.init_from={a.init_from}"] if a.init_from else []
    rc = main(["train", "--config", preset, *[x for s in sets + a.set for x in ("--set", s)]])
    if rc:
        return rc
    return main(["eval", "--checkpoint", f"{out}/runs/{preset}", "--data", f"{out}/shards/{test}",
                 "--out", f"{out}/results"])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
