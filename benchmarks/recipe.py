"""The README's recipe for "Your own data", run as a user runs it, on a task it was never tuned on.

``python -m benchmarks.recipe`` from the repository's root, or ``mirasol bench recipe`` in a checkout. It
writes a user's data (MP4 files and JSONL annotations) of a task of its own, unlike the demo's
(:mod:`benchmarks.bars_beeps`: a bar moving up or down, the screen dark for one half, chords, buzzes, sweeps and
beeps; "how many beeps?", "which sound plays while the screen is dark?"), then runs the README's
commands (:data:`README_COMMANDS`, the "Your own data" block word for word) in that folder as separate ``mirasol``
processes: ``shards build --format jsonl ... --tokenizer learn``, ``train --config demo`` (pretraining),
``train`` fine-tuning with ``data.task=all`` and ``train.init_from``, ``eval``. The only additions: a third
split, ``test``, built and evaluated as ``val`` is (the README's recipe picks the fine-tuned checkpoint by its
``val`` score and then evaluates on ``val``; ``test`` is scored by nobody before the end), and ``--json`` /
``--out`` / ``--records`` on the commands so that their results (and each answer) can be read.

It reports held-out accuracy per question type against chance (``test``, and ``val`` as the README does), the
gap between training clips and held-out ones (the fine-tuning run's ``train_eval`` beside its ``val``), the time
of each command and the load average, into ``OUT/recipe.json`` and ``OUT/recipe.png``::

    python -m benchmarks.recipe --out /tmp/recipe --seed 0                # the README's recipe as written
    python -m benchmarks.recipe --out /tmp/recipe2 --set train.steps=400  # a departure, said in recipe.json

Ray: each ``mirasol`` command starts its own local Ray (all CPUs) unless ``RAY_ADDRESS`` is set, as a user's do.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

README_COMMANDS = [
    "mirasol shards build --format jsonl --annotations train.jsonl --videos ./videos --out data/mine/train "
    "--transcode 128 --tokenizer learn",
    "mirasol shards build --format jsonl --annotations val.jsonl --videos ./videos --out data/mine/val --transcode 128",
    "mirasol train --config demo --set data.train=data/mine/train --set data.val=data/mine/val "
    "--set data.tokenizer=data/mine/train/tokenizer.json --set storage.root=runs --set storage.name=mine-pre",
    "mirasol train --config demo --set data.train=data/mine/train --set data.val=data/mine/val "
    "--set data.tokenizer=data/mine/train/tokenizer.json --set storage.root=runs --set storage.name=mine-ft "
    "--set train.stage=finetune --set data.task=all --set train.init_from=runs/mine-pre --set train.steps=1000",
    "mirasol eval --checkpoint runs/mine-ft --data data/mine/val --set data.task=all",
]
"""README.md, "Your own data", as written there (continuation lines joined, comments dropped); a unit test keeps
the two the same."""
TEST_BUILD = ("mirasol shards build --format jsonl --annotations test.jsonl --videos ./videos --out data/mine/test "
              "--transcode 128")
TEST_EVAL = "mirasol eval --checkpoint runs/mine-ft --data data/mine/test --set data.task=all"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="an empty (or new) folder: the data, shards, runs and results go here")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed (the clips; the recipe's own seeds "
                                                       "stay the config's, as a user's do)")
    p.add_argument("--train-clips", type=int, default=480)
    p.add_argument("--val-clips", type=int, default=96, help="clips of val (and of test, unless --test-clips)")
    p.add_argument("--test-clips", type=int, default=-1, help="clips of the test split (0: none; default: --val-clips)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="added to both training commands: a departure from the README's recipe, recorded as one")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="added to the fine-tuning command only (a departure, recorded as one)")
    p.add_argument("--json", action="store_true", help="the results as one JSON object on stdout")


def commands(test: bool, both: list[str], finetune: list[str]) -> list[tuple[str, str]]:
    """(name, command line) in the order they run: the README's, the test split's build and evaluation, and the
    departures (``--set``) appended to the training commands."""
    extra = "".join(f" --set {shlex.quote(s)}" for s in both)
    ft_extra = extra + "".join(f" --set {shlex.quote(s)}" for s in finetune)
    build_train, build_val, pre, ft, ev = README_COMMANDS
    out = [("build train", build_train), ("build val", build_val)]
    if test:
        out.append(("build test", TEST_BUILD))
    out += [("pretrain", f"{pre}{extra} --json"), ("fine-tune", f"{ft}{ft_extra} --json"),
            ("eval val", f"{ev} --out results/val --records results/val/predictions.jsonl --json")]
    if test:
        out.append(("eval test", f"{TEST_EVAL} --out results/test --records results/test/predictions.jsonl --json"))
    return out


def _mirasol() -> list[str]:
    """The ``mirasol`` beside this Python (the venv's console script), else ``python -m mirasol_ray.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "mirasol")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "mirasol_ray.cli"]


def _run(name: str, line: str, cwd: str, log: Any) -> tuple[str, float]:
    """Run one command in ``cwd``: its stderr (progress, warnings) passes through to ours and into the log, its
    stdout is returned. A failure ends the bench naming the command."""
    argv = _mirasol() + shlex.split(line)[1:]
    log.write(f"$ {line}\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines = []
    assert proc.stderr is not None
    for chunk in proc.stderr:  # the progress bars (\r-separated) come through as they are drawn
        sys.stderr.write(chunk)
        sys.stderr.flush()
        err_lines.append(chunk)
        log.write(chunk)
    stdout = proc.stdout.read() if proc.stdout else ""
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    log.write(stdout + f"\n# exit {rc}, {seconds:.1f} s\n")
    log.flush()
    if rc != 0:
        last = next((ln.strip() for ln in reversed(err_lines) if ln.strip()), f"exit status {rc}")
        raise RuntimeError(f"the recipe's step '{name}' failed ({line}): {last}")
    return stdout, seconds


def _last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def _value(metrics: dict[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    if isinstance(v, dict):
        v = v.get("value")
    return None if v is None else round(float(v), 4)


def predicted_answers(records: str) -> dict[str, dict[str, int]]:
    """Per ``qa/<type>``: how often each answer was given (a model that answers one thing to everything shows
    here), from ``mirasol eval --records``."""
    from collections import Counter

    counts: dict[str, Counter] = {}
    if os.path.exists(records):
        with open(records, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r.get("task") == "qa":
                    counts.setdefault(f"qa/{r.get('qtype', 'other')}", Counter())[str(r.get("pred", ""))] += 1
    return {k: dict(c.most_common()) for k, c in counts.items()}


def qa_types() -> list[str]:
    from benchmarks.bars_beeps import CHANCE_BY_ANSWER_SPACE

    return list(CHANCE_BY_ANSWER_SPACE)


def table(res: dict[str, Any]) -> str:
    cols = ["train clips", "val", "test"] if res["test"] else ["train clips", "val"]
    lines = [f"{'question type':<16}" + "".join(f"{c:>12}" for c in cols)
             + f"{'chance':>9}{'held-out/chance':>17}{'train - held-out':>18}"]
    for key, row in res["tasks"].items():
        cells = [row.get("train_clips"), row.get("val"), row.get("test")][:len(cols)]
        best = row.get("test") if res["test"] else row.get("val")
        ratio = f"{best / row['chance']:.2f}" if best is not None and row["chance"] else "-"
        chance = "-" if row["chance"] is None else f"{row['chance']:.3f}"
        gap = f"{row['gap']:+.3f}" if row.get("gap") is not None else "-"
        lines.append(f"{key:<16}" + "".join(f"{'-' if c is None else f'{c:.3f}':>12}" for c in cells)
                     + f"{chance:>9}{ratio:>17}{gap:>18}")
    return "\n".join(lines)


def run_recipe(out: str, *, seed: int = 0, train_clips: int = 480, val_clips: int = 96, test_clips: int = -1,
               both: list[str] | None = None, finetune: list[str] | None = None, progress: bool = True
               ) -> dict[str, Any]:
    from benchmarks.bars_beeps import AUDIO_VIDEO_TYPES, write_dataset
    from mirasol_ray.launch.demo import results_plot

    both, finetune = list(both or []), list(finetune or [])
    test_clips = val_clips if test_clips < 0 else test_clips
    if min(train_clips, val_clips) <= 0 or test_clips < 0:
        raise ValueError("--train-clips and --val-clips must be positive (--test-clips >= 0)")
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty: give a new or empty folder to --out")
    os.makedirs(out, exist_ok=True)
    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    splits = {"train": train_clips, "val": val_clips, **({"test": test_clips} if test_clips else {})}
    print(f"[recipe] writing {sum(splits.values())} clips and their JSONL into {out} (seed {seed})",
          file=sys.stderr, flush=True)
    data = write_dataset(out, splits, seed=seed, progress=progress)
    seconds = {"generate": round(time.perf_counter() - t0, 1)}
    results: dict[str, dict[str, Any]] = {}
    with open(os.path.join(out, "recipe.log"), "w", encoding="utf-8") as log:
        for name, line in commands(bool(test_clips), both, finetune):
            print(f"[recipe] {line}", file=sys.stderr, flush=True)
            stdout, secs = _run(name, line, out, log)
            seconds[name] = round(secs, 1)
            if name in ("pretrain", "fine-tune", "eval val", "eval test"):
                results[name] = _last_json(stdout)
    load["end"] = [round(x, 2) for x in os.getloadavg()]
    seconds["all"] = round(time.perf_counter() - t0, 1)

    ft = results["fine-tune"]
    held_out = "test" if test_clips else "val"
    answers = predicted_answers(os.path.join(out, "results", held_out, "predictions.jsonl"))
    tasks: dict[str, dict[str, Any]] = {}
    for key in qa_types() + ["qa"]:
        row = {"chance": data[held_out]["chance"].get(key) if key != "qa" else None,
               "train_clips": _value(ft["train_eval"], key), "val_in_run": _value(ft["val"], key),
               "val": _value(results["eval val"]["metrics"], key),
               "test": _value(results["eval test"]["metrics"], key) if test_clips else None}
        if row["train_clips"] is not None and row[held_out] is not None:
            row["gap"] = round(row["train_clips"] - row[held_out], 4)
        row["predicted"] = answers.get(key, {})
        tasks[key] = row
    av = [f"qa/{t}" for t in AUDIO_VIDEO_TYPES]
    res = {
        "seed": seed, "clips": {k: v["clips"] for k, v in data.items()},
        "chance": {k: v["chance"] for k, v in data.items()},
        "tasks": tasks, "test": bool(test_clips),
        "audio_video_types": av,
        "commands": [line for _, line in commands(bool(test_clips), both, finetune)],
        "departures": {"both": both, "finetune": finetune},
        "pretrain": {k: results["pretrain"].get(k) for k in ("steps", "final_loss", "val", "train_eval", "truncation",
                                                             "best_checkpoint")},
        "finetune": {k: ft.get(k) for k in ("steps", "final_loss", "val", "train_eval", "truncation",
                                            "best_checkpoint", "checkpoint")},
        "evaluated": {k: {"checkpoint": results[k]["checkpoint"], "step": results[k]["step"],
                          "rows": results[k]["rows"], "truncation": results[k]["truncation"]}
                      for k in ("eval val", "eval test") if k in results},
        "seconds": seconds, "load_average": load, "cpus": os.cpu_count(),
    }
    with open(os.path.join(out, "recipe.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
    rows = [{"task": k, "value": v["test"] if test_clips else v["val"], "chance": v["chance"]}
            for k, v in tasks.items() if k != "qa"]
    series = {"training clips": [tasks[r["task"]]["train_clips"] or 0 for r in rows],
              "val (picks the checkpoint)": [tasks[r["task"]]["val"] or 0 for r in rows]}
    if test_clips:
        series["test (held out)"] = [tasks[r["task"]]["test"] or 0 for r in rows]
    results_plot(rows, os.path.join(out, "recipe.png"), series=series,
                 title=f"the README's recipe on bars & beeps ({train_clips} training clips, seed {seed})")
    return res


def run(args: argparse.Namespace) -> int:
    res = run_recipe(args.out, seed=args.seed, train_clips=args.train_clips, val_clips=args.val_clips,
                     test_clips=args.test_clips, both=args.set, finetune=args.finetune_set)
    if args.json:
        print(json.dumps(res))
        return 0
    s, load = res["seconds"], res["load_average"]
    print(table(res))
    print(f"\nfine-tuning: {res['finetune']['steps']} steps, final loss {res['finetune']['final_loss']}; "
          f"evaluated {res['evaluated']['eval val']['checkpoint']}")
    if res["departures"]["both"] or res["departures"]["finetune"]:
        print(f"departures from the README: {res['departures']}")
    print(f"{s['all']:.0f} s in all (" + ", ".join(f"{k} {v:.0f} s" for k, v in s.items() if k != "all")
          + f"); load average {load['start'][0]} at the start, {load['end'][0]} at the end, {res['cpus']} CPUs")
    print(f"wrote {os.path.join(os.path.abspath(args.out), 'recipe.json')}, recipe.png, recipe.log")
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks import run_as_script

    return run_as_script("python -m benchmarks.recipe", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
