"""The ``mirasol`` command. Each subcommand parses its arguments here and calls one function elsewhere.

Bad input (a missing file, an unknown config key, an unreadable URL) ends with a one-line reason on stderr and a
non-zero exit; a traceback is shown only with ``MIRASOL_DEBUG=1``. Results go to stdout (with ``--json``, one JSON
object and nothing else); phase lines and progress bars to stderr; library logs to files
(:mod:`mirasol_ray.launch.console`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

FORMAT_NAMES = ("jsonl", "msrvtt-qa", "activitynet-qa", "activitynet-captions", "nextqa-mc", "nextqa-oe",
                "kinetics-sounds", "vggsound", "epic-sounds")
"""``shards build`` formats (the help lists them without importing the converters)."""
STORAGE_SET_HELP = "the S3 endpoint to read and write with (default: AWS_ENDPOINT_URL from the environment)"
"""``--set`` of the commands that have no config of their own (``results``, ``export``)."""
SET_HELP = "override one config value, e.g. train.steps=100 (repeatable; unknown keys are errors)"
OVERWRITE_HELP = ("replace the shards already in --out (by default a folder holding shards is refused); the old "
                  "build's files the new one does not rewrite are deleted")


def _cmd_shards_synth(args: argparse.Namespace) -> int:
    from mirasol_ray.data.synthetic import synthesize

    manifest = synthesize(args.out, args.num_clips, seed=args.seed, shard_size=args.shard_size,
                          val_fraction=args.val_fraction, progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote {manifest['num_samples']} clips in {len(manifest['shards'])} shards to {args.out}")
    return 0


def _cmd_shards_build(args: argparse.Namespace) -> int:
    from mirasol_ray import storage
    from mirasol_ray.data.shards import run_build
    from mirasol_ray.launch import console

    if args.vocab_size is not None and args.tokenizer != "learn":
        raise ValueError("--vocab-size is the size of a learnt tokenizer: give --tokenizer learn too")
    labels = None
    if args.labels:
        with open(args.labels, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
    if args.in_process and (args.num_cpus is not None or args.address):
        raise ValueError("--in-process runs without Ray: --num-cpus and --address do not apply")
    build = run_build(args.format, args.annotations, args.videos, args.out, shard_size=args.shard_size,
                      transcode=args.transcode, gop=args.gop, progress=not args.quiet, split=args.split,
                      labels=labels, answer_vocab=args.answer_vocab, overwrite=args.overwrite,
                      tokenizer=args.tokenizer, use_ray=not args.in_process, num_cpus=args.num_cpus,
                      address=args.address or None, report=console,
                      **({"vocab_size": args.vocab_size} if args.vocab_size is not None else {}))
    manifest = build.manifest
    skipped = sum(manifest.get("skipped", {}).values())
    splits = ", ".join(f"{k} {v['num_samples']}" for k, v in manifest["splits"].items())
    print(f"wrote {manifest['num_samples']} samples ({splits}) in {len(manifest['shards'])} shards to {args.out}"
          f" ({skipped} skipped{': ' + json.dumps(manifest['skipped']) if skipped else ''})")
    if manifest.get("tokenizer"):
        path = storage.join(args.out, manifest["tokenizer"])
        print(f"wrote {path} ({manifest['tokenizer_vocab_size']} tokens): train with --set data.tokenizer={path}")
    missing = [s for s in manifest.get("skipped_items", []) if s.endswith(": missing_video")]
    if missing:
        print(f"missing videos ({manifest['skipped'].get('missing_video', 0)}; all listed in the manifest): "
              + ", ".join(m.rsplit(":", 1)[0] for m in missing[:5]) + (" ..." if len(missing) > 5 else ""))
    rate = f", {build.clips / build.seconds:.1f} clips/s" if build.seconds > 0 and build.clips else ""
    print(f"built {build.built_shards} shards from {build.clips} clips in {build.seconds:.1f} s{rate}"
          + (f"; kept {build.kept_shards} complete shards of an earlier run" if build.kept_shards else "")
          + (": " + ", ".join(f"{node} {n} clips" for node, n in build.nodes.items()) if build.nodes else ""))
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from mirasol_ray.launch.inspect import inspect_dataset, print_report

    report = inspect_dataset(args.url, config=args.config, overrides=args.set, limit=args.limit,
                             png=args.png, num_cpus=args.num_cpus)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    if not report["decoded"]:
        from mirasol_ray.data.pipeline import describe_skips

        snap = {"decoded": 0, "skipped": report["skipped"], "examples": report["skipped_examples"]}
        print(f"mirasol: error: no clip of {args.url} decoded: {describe_skips(snap)}", file=sys.stderr)
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mirasol_ray.launch.train import run_training
    from mirasol_ray.train.prepare import load_prepared

    cfg = load_prepared(args.config, args.set)
    summary = run_training(cfg, args.config)
    print(json.dumps(summary) if args.json else summary_text(summary))
    return 0


def summary_text(summary: dict) -> str:
    """A finished run's summary for a person: where it is, its steps and final loss (4 decimals), its newest and
    best checkpoints, what was decoded and skipped, the last evaluation, and where its plots and logs are."""
    from mirasol_ray.train.metrics import show_value

    skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())) or "none"
    best = summary.get("best_checkpoint")
    loss = "-" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    tensorboard = summary.get("tensorboard")
    return (f"run            {summary['run']}\n"
            f"steps          {summary['steps']}  (final loss {loss}, {summary['seconds']} s)\n"
            f"checkpoint     {summary['checkpoint']}\n"
            + (f"best           {best['uri']} (step {best['step']}, {best['metric']} "
               f"{show_value(best['metric'], best['value'])}, {best['mode']})\n" if best else "")
            + f"decoded        {summary['decoded']} clips; skipped: {skipped}\n"
            + metrics_table(summary["train_eval"], summary["val"])
            + f"learning curve {summary['learning_curve']}\n"
            + (f"tensorboard    tensorboard --logdir {tensorboard}\n" if tensorboard else "")
            + f"driver log     {summary['log']}")


def metrics_table(train: dict[str, float], held_out: dict[str, float]) -> str:
    """The last evaluation's metrics, on training clips (``train.eval_train_batches``) beside held-out ones; ""
    when the run had no validation. Scores (accuracy, token F1) in percent, as ``results`` and ``eval`` show them;
    the loss as it is."""
    from mirasol_ray.train.metrics import is_score

    if not held_out and not train:
        return ""
    names = list(held_out) + [k for k in train if k not in held_out]
    width = max(14, *(len(k) + 5 for k in names))

    def cell(d: dict[str, float], k: str) -> str:
        if k not in d:
            return f"{'-':>10}"
        return f"{100 * d[k]:>10.2f}" if is_score(f"val/{k}") else f"{d[k]:>10.4f}"

    return (f"{'metric':<{width}}{'train':>10}{'held-out':>10}\n"
            + "".join(f"{k + (' (%)' if is_score(f'val/{k}') else ''):<{width}}{cell(train, k)}{cell(held_out, k)}\n"
                      for k in names))


def _cmd_eval(args: argparse.Namespace) -> int:
    from mirasol_ray.launch.evaluate import evaluate, format_table

    data = args.data[0] if len(args.data) == 1 else args.data  # several: scored together and each apart
    res = evaluate(args.checkpoint, data, overrides=args.set + _look_sets(args), batch_size=args.batch_size,
                   num_actors=args.num_actors, beam_size=args.beam_size, records_out=args.records, out=args.out,
                   normalize=args.normalize, source=args.source, choice=args.checkpoint_choice)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_table(res))
        if res["skipped"]:
            print(f"skipped: {json.dumps(res['skipped'])}")
        if args.out:
            print(f"wrote {args.out}/results.json and results.csv")
    return 0


def _look_sets(args: argparse.Namespace) -> list[str]:
    """eval/predict's --windows and --views K as the data settings they are."""
    return ((["data.eval_windows=true"] if args.windows else [])
            + ([f"data.eval_views={args.views}"] if args.views != 1 else []))


def _look_arguments(parser: argparse.ArgumentParser) -> None:
    looks = parser.add_mutually_exclusive_group()
    looks.add_argument("--windows", action="store_true",
                       help="a video longer than the preset's span (data.clip_seconds, the preset's snippets x frames "
                            "over it) is scored in consecutive non-overlapping windows of that span, ceil(length / "
                            "span) of them, the last padded; one window spans the whole video when it fits (always "
                            "with clip_seconds 0). Answers merged by averaging: options' and labels' log-likelihoods "
                            "(the head's log-softmax) over the windows; generated answers: predict scores every "
                            "window's answer in every window and keeps the best mean log-likelihood, eval keeps the "
                            "answer most windows give")
    looks.add_argument("--views", type=int, default=1, metavar="K",
                       help="K temporal views per video (MMAction2's multi-view testing): spans evenly spread over "
                            "the video (or, when it is no longer than the span, K frame offsets), scores averaged; "
                            "eval reports the one-view (centred) figure beside")


def _cmd_predict(args: argparse.Namespace) -> int:
    from mirasol_ray.launch.evaluate import predict

    res = predict(args.checkpoint, args.video, question=args.question, options=args.options,
                  overrides=args.set + _look_sets(args))
    print(json.dumps(res) if args.json else res["answer"])
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mirasol_ray.launch import configure_storage
    from mirasol_ray.train.checkpoint import export

    configure_storage(args.set, only_storage=True)
    res = export(args.checkpoint, args.out)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"wrote {res['out']}: step {res['step']}, {res['parameters'] / 1e6:.1f}M parameters, "
              f"{res['bytes'] / 2**20:.1f} MiB, from {res['checkpoint']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mirasol_ray.launch.demo import run_demo

    run_demo(args.out, num_clips=args.num_clips, pretrain_steps=args.pretrain_steps,
             finetune_steps=args.finetune_steps, config=args.config, overrides=args.set, seed=args.seed,
             num_cpus=args.num_cpus)
    return 0


# -- presets, config show, doctor: look before running ---------------------------------------------------------


def format_params(n: int) -> str:
    """``2.92B``, ``299M``, ``14.5M``, ``2.07M``: three significant digits."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


_PARAMS_BY_MODEL: dict[str, int] = {}


def preset_params(names: list[str]) -> dict[str, int]:
    """Each preset's parameter count, its model built on the meta device (nothing allocated); presets with the same
    model (the fine-tuning ones) are built once."""
    from mirasol_ray.config import load_config
    from mirasol_ray.model.mirasol import param_breakdown

    by_model = _PARAMS_BY_MODEL
    out = {}
    for name in names:
        model = load_config(name, []).model
        key = json.dumps(model.to_dict(), sort_keys=True, default=str)
        if key not in by_model:
            by_model[key] = param_breakdown(model)["total"]
        out[name] = by_model[key]
    return out


def _cmd_presets(args: argparse.Namespace) -> int:
    from mirasol_ray.config import preset_names, preset_purpose

    names = preset_names()
    params = preset_params(names)
    rows = [{"name": n, "params": params[n], "purpose": preset_purpose(n)} for n in names]
    if args.json:
        print(json.dumps(rows))
    else:
        width = max(len(r["name"]) for r in rows) + 2
        print("\n".join(f"{r['name']:<{width}}{format_params(r['params']) + ' params':>13}  {r['purpose']}"
                         for r in rows))
        print("\nmirasol config show --config NAME prints one resolved; a YAML path works wherever NAME does")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    if args.checkpoint:
        if args.config or args.check:
            raise ValueError("--checkpoint shows that checkpoint's own config: --config and --check do not apply")
        from mirasol_ray.launch.evaluate import checkpoint_config

        model_uri, cfg, _ = checkpoint_config(args.checkpoint, args.set, args.checkpoint_choice)
        source = f"the run config inside {model_uri}"
    else:
        if not args.config:
            raise ValueError("give --config NAME_OR_PATH (mirasol presets lists the names) or --checkpoint URL")
        from mirasol_ray.train.prepare import load_prepared

        cfg = load_prepared(args.config, args.set)
        source = f"--config {args.config}"
        if args.check:
            from mirasol_ray.launch.train import check_inputs

            check_inputs(cfg)  # what mirasol train checks before Ray starts; it makes local paths absolute, as runs do
    header = [f"# {source}"] + [f"# --set {item}" for item in args.set]
    if args.check:
        header.append("# --check: the run's start checks passed (shards, tokenizer, init_from, storage)")
    print("\n".join(header) + "\n" + mark_overrides(cfg.to_yaml().rstrip("\n"), args.set))
    return 0


def mark_overrides(text: str, overrides: list[str]) -> str:
    """``text`` (a config as YAML) with ``  # --set`` after each line whose value a ``--set`` gave, so that what did
    not come from the preset stands out."""
    keys = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    out, path = [], []
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        depth = (len(line) - len(stripped)) // 2
        key = stripped.split(":", 1)[0] if ":" in stripped and not stripped.startswith("- ") else None
        if key is not None:
            path = path[:depth] + [key]
            if ".".join(path) in keys:
                line += "  # --set"
        out.append(line)
    return "\n".join(out)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from mirasol_ray.launch.doctor import FAIL, format_checks, run_checks

    checks = run_checks(args.storage)
    print(json.dumps(checks) if args.json else format_checks(checks))
    return 1 if any(c["status"] == FAIL for c in checks) else 0


def _add_look_commands(sub) -> None:
    pr = sub.add_parser("presets", aliases=["configs"], help="the named configs, each with its size (parameters) and what it is for")
    pr.add_argument("--json", action="store_true", help="one JSON list of {name, params, purpose} on stdout")
    pr.set_defaults(func=_cmd_presets)

    cf = sub.add_parser("config", help="look at a config: mirasol config show").add_subparsers(
        dest="config_cmd", required=True, metavar="ACTION")
    cs = cf.add_parser("show", help="the resolved config (preset + --set, or a checkpoint's) as YAML",
                       description="Prints the config a run of --config with these --set overrides would record in "
                                   "its config.yaml (the tokenizer's vocabulary and pretrained architectures "
                                   "resolved), without starting Ray. With --check, also the run's start checks.")
    cs.add_argument("--config", default="", help="preset name (mirasol presets) or YAML path")
    cs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    cs.add_argument("--checkpoint", default="",
                    help="show this checkpoint's own run config instead (run folder, checkpoint folder or model.pt)")
    cs.add_argument("--checkpoint-choice", default="best", choices=("best", "last"),
                    help="which checkpoint of a run folder --checkpoint names (as mirasol eval)")
    cs.add_argument("--check", action="store_true",
                    help="also run mirasol train's start checks (shards exist, tokenizer and init_from load, "
                         "storage answers): a non-zero exit names what a run would refuse")
    cs.set_defaults(func=_cmd_config_show)

    dr = sub.add_parser("doctor", help="what is installed and works here: torch/CUDA, decoders, Ray, storage, "
                                       "WordNet, TensorBoard")
    dr.add_argument("--storage", default="", metavar="URL",
                    help="also write, read back and remove a small file here (s3://BUCKET/PREFIX or a folder)")
    dr.add_argument("--json", action="store_true", help="one JSON list of the checks on stdout")
    dr.set_defaults(func=_cmd_doctor)


# -- sweep, results ---------------------------------------------------------------------------------------------


def _cmd_sweep(args: argparse.Namespace) -> int:
    from mirasol_ray.launch.sweep import run_sweep

    if not args.resume and not (args.config and args.space):
        raise ValueError("mirasol sweep needs --config and --space (or --resume --name NAME)")
    if args.resume and args.resume_or_start:
        raise ValueError("give --resume or --resume-or-start, not both")
    res = run_sweep(args.config, args.space, args.set, num_samples=args.num_samples, scheduler=args.scheduler,
                    max_concurrent=args.max_concurrent, metric=args.metric, mode=args.mode, storage_url=args.storage,
                    name=args.name, resume=args.resume, num_cpus=args.num_cpus, grace_period=args.grace_period,
                    reduction_factor=args.reduction_factor, table_every_s=args.table_every,
                    resume_or_start=args.resume_or_start)
    return 0 if any(t["status"] == "finished" for t in res["trials"]) else 1


def _cmd_results(args: argparse.Namespace) -> int:
    from mirasol_ray.launch import configure_storage
    from mirasol_ray.launch.results import print_results, results, to_json

    configure_storage(args.set, only_storage=True)
    res = results(args.url, out=args.out, metric=args.metric, mode=args.mode)
    if args.json:
        print(json.dumps(to_json(res)))
    else:
        print_results(res)
    return 0


def _add_sweep_commands(sub) -> None:
    w = sub.add_parser("sweep", help="Ray Tune sweep over fine-tuning runs (each trial a Ray Train run)",
                       description="Each trial is a whole Ray Train run of --config with values drawn from "
                                   "--space; ASHA stops weak trials early. Results: mirasol results STORAGE/NAME.")
    w.add_argument("--config", default="", help="preset name or YAML path (the base of every trial)")
    w.add_argument("--space", default="", help="YAML: config key -> {loguniform|uniform|randint|choice|grid: [...]}")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base config")
    w.add_argument("--num-samples", type=int, default=1,
                   help="samples of the random keys (each grid point is run this many times)")
    w.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha: stop weak trials early (default); fifo: run every trial to its end")
    w.add_argument("--max-concurrent", type=int, default=0,
                   help="trials at once (default: as many as the cluster's CPUs/GPUs hold)")
    w.add_argument("--metric", default="",
                   help="reported metric to optimise: val/qa, val/loss, loss, ... (default: the data's main "
                        "validation metric)")
    w.add_argument("--mode", choices=("max", "min"), default="", help="default: min for losses, else max")
    w.add_argument("--grace-period", type=int, default=0,
                   help="ASHA: steps before a trial can be stopped (default: its first evaluation)")
    w.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the best 1/N at each rung")
    w.add_argument("--storage", default="", help="where the sweep folder goes (default: the config's storage.root)")
    w.add_argument("--name", default="", help="the sweep's folder name (default: sweep-CONFIG-TIME)")
    w.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep --name: finished trials stay, unfinished ones continue")
    w.add_argument("--resume-or-start", action="store_true",
                   help="continue the sweep --name if it exists, else start it (for a job that may be submitted "
                        "again: a retried or re-applied RayJob)")
    w.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    w.add_argument("--table-every", type=float, default=60.0, help="seconds between progress tables")
    w.set_defaults(func=_cmd_sweep)

    r = sub.add_parser("results", help="table, JSON and plots of a run or sweep folder (local or s3://), no Ray",
                       description="Reads only the small result files (never downloads checkpoints).")
    r.add_argument("url", help="a sweep folder or a run folder, local or s3://")
    r.add_argument("--json", action="store_true", help="one JSON object on stdout")
    r.add_argument("--out", default="", help="write the PNGs (learning curves; a sweep's hyperparameters) into "
                                              "this folder (default: none written)")
    r.add_argument("--metric", default="", help="rank by this metric (default: the sweep's, or the run's main one)")
    r.add_argument("--mode", choices=("max", "min"), default="",
                   help="whether higher or lower --metric is better (default: min for losses, else max)")
    r.add_argument("--set", action="append", default=[], metavar="storage.endpoint_url=URL", help=STORAGE_SET_HELP)
    r.set_defaults(func=_cmd_results)


def _cmd_bench(args: argparse.Namespace) -> int:
    if not hasattr(args, "bench_run"):
        raise RuntimeError(f"mirasol bench {args.bench_cmd} is a research tool: it lives in the repository's "
                           f"benchmarks/ folder, not in the installed package (in a checkout: python -m "
                           f"benchmarks.{args.bench_cmd}, or mirasol bench after pip install -e .)")
    return args.bench_run(args)


# --- submit, cluster: jobs on a Ray cluster ---------------------------------------------------------------------


def _cmd_submit(args: argparse.Namespace) -> int:
    from mirasol_ray.launch import submit

    given = [n for n in ("status", "stop", "logs") if getattr(args, n)]
    if len(given) > 1 or (given and args.job):
        raise ValueError("give a job to submit, or one of --status/--stop/--logs ID")
    if args.status:
        return submit.job_status(args.status, args.address)
    if args.stop:
        return submit.stop(args.stop, args.address)
    if args.logs:
        return submit.logs(args.logs, args.address, follow=bool(args.follow))
    if not args.job:
        raise ValueError("give a job (" + ", ".join(submit.JOBS) + ") or a script, e.g. "
                         "mirasol submit finetune --config base --set ...")
    return submit.submit(args.job, args.args, address=args.address, working_dir=args.working_dir,
                         follow=args.follow is not False, storage_env=args.storage_env,
                         entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
                         entrypoint_memory=args.entrypoint_memory, entrypoint_resources=args.entrypoint_resources,
                         submission_id=args.submission_id, metadata=args.metadata_json)


def run_job(doc: str, command: list[str], argv: list[str], owned: tuple[str, ...] = ()) -> int:
    """A ``jobs/`` entrypoint: ``mirasol COMMAND ARGV`` plus the ``--set`` overrides the job owns (``owned``, e.g.
    ``train.stage=finetune``); ``--help`` shows the job's docstring, then the command's options."""
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip() + "\n", flush=True)
        try:
            return main([*command, "--help"])
        except SystemExit as e:
            return int(e.code or 0)
    for item in owned:
        key = item.split("=", 1)[0]
        if any(a.split("=", 1)[0].removeprefix("--set").strip() == key for a in argv if "=" in a):
            print(f"mirasol: error: this job sets {item} itself; leave {key} out", file=sys.stderr)
            return 2
    return main([*command, *argv, *(x for item in owned for x in ("--set", item))])


def _cmd_cluster(args: argparse.Namespace) -> int:
    from mirasol_ray.launch import cluster

    if args.action == "up":
        state = cluster.up(args.dir, workers=args.workers, head_cpus=args.head_cpus, worker_cpus=args.worker_cpus,
                           worker_gpus=args.worker_gpus, object_store_memory=args.object_store_memory)
        st = cluster.status(state["dir"])
    elif args.action == "down":
        stopped = cluster.down(args.dir)
        print("stopped the local cluster" if stopped else f"no local cluster in {cluster.cluster_dir(args.dir)}")
        return 0
    else:
        st = cluster.status(args.dir)
    if args.json:
        print(json.dumps(st))
    else:
        cluster.print_status(st)
    return 0 if st["running"] else 1


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``mirasol`` parser for ``argv`` (default: this process's arguments). The one place imports are kept off
    a CLI path on purpose: each command's modules (Ray, torch, the pipeline) are imported when that command runs,
    and a ``mirasol bench`` tool's module (which defines its own options) only when ``argv`` names that tool, so
    ``--help`` and the light commands start without loading torch."""
    argv = sys.argv[1:] if argv is None else argv
    wanted_bench = argv[1] if len(argv) > 1 and argv[0] == "bench" else None
    p = argparse.ArgumentParser(prog="mirasol", description="Mirasol3B-style multimodal models on Ray.")
    p.add_argument("--version", action="version", version=f"mirasol-ray {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # shards
    shards = sub.add_parser("shards", help="write WebDataset shards").add_subparsers(dest="shards_cmd", required=True)
    s = shards.add_parser("synth", help="synthetic dataset of real MP4 clips with a time-aligned audio-video task")
    s.add_argument("--out", required=True, help="output folder or s3:// URI")
    s.add_argument("--num-clips", type=int, required=True, help="clips to generate (each a real MP4 file)")
    s.add_argument("--seed", type=int, default=0, help="draws the clips (the same seed gives the same bytes)")
    s.add_argument("--shard-size", type=int, default=64, help="clips per .tar shard (default 64)")
    s.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction as a val/ split")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.add_argument("--quiet", action="store_true", help="no progress on stderr")
    s.set_defaults(func=_cmd_shards_synth)

    b = shards.add_parser("build", help="convert videos + annotations on disk into shards")
    b.add_argument("--format", required=True, help=f"annotation format: {', '.join(FORMAT_NAMES)}")
    b.add_argument("--annotations", required=True,
                   help="annotation file, or the folder holding the benchmark's files as distributed")
    b.add_argument("--videos", required=True, help="the dataset's video folder as distributed (clips are found "
                                                   "by the names the dataset gives them, in any subfolder)")
    b.add_argument("--split", default="", help="build only this split (default: every split the files hold, "
                                               "each into its own folder under --out)")
    b.add_argument("--labels", default="", metavar="FILE",
                   help="keep only these classes, one a line (Kinetics-Sounds: its Kinetics classes)")
    b.add_argument("--answer-vocab", type=int, default=0, metavar="K",
                   help="open-ended QA: keep in train only questions whose answer is among the K most frequent "
                        "training answers (other splits stay whole; the manifest lists the vocabulary)")
    b.add_argument("--out", required=True, help="output folder or s3:// URI")
    b.add_argument("--shard-size", type=int, default=100, help="samples per .tar shard (default 100)")
    b.add_argument("--transcode", type=int, default=None, metavar="HEIGHT",
                   help="re-encode at this height with a short keyframe interval (fast decode)")
    b.add_argument("--gop", type=int, default=None, help="keyframe interval for --transcode (frames)")
    b.add_argument("--tokenizer", choices=("learn",), default="",
                   help="learn a BPE tokenizer from the annotations' text (the training split's when there is one) "
                        "into OUT/tokenizer.json, as shards synth does; train with --set "
                        "data.tokenizer=OUT/tokenizer.json (default: none; runs use the byte tokenizer, one token a "
                        "byte, so a caption of 75 bytes needs data.max_target_len >= 77)")
    b.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="entries of the learnt tokenizer (default 512; its 259 byte and special tokens "
                        "included): whole words of the text become single tokens")
    b.add_argument("--num-cpus", type=int, default=None, metavar="N",
                   help="CPUs for the clips' Ray tasks: those of the local Ray started, or at most N clips at once "
                        "on a cluster (default: all)")
    b.add_argument("--address", default="", help="the Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    b.add_argument("--in-process", action="store_true",
                   help="make the clips one at a time in this process, without Ray (same output)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (by default the same command resumes its build there, keeping "
                        "the complete shards, and anything else is refused); the old build's files the new one "
                        "does not rewrite are deleted")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")
    b.set_defaults(func=_cmd_shards_build)

    # data
    data = sub.add_parser("data", help="look at a dataset").add_subparsers(dest="data_cmd", required=True)
    i = data.add_parser("inspect", help="count, decode a few, report skips, write a contact sheet")
    i.add_argument("url", help="shard folder, glob, brace list or s3:// URI")
    i.add_argument("--config", default="tiny", help="preset or YAML giving the decode geometry")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    i.add_argument("--limit", type=int, default=16, help="decode at most N samples (default 16, a few in seconds; "
                   "0: all)")
    i.add_argument("--png", default="", help="write a contact sheet (frames beside spectrograms) to this PNG "
                   "(default: none is written)")
    i.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    i.add_argument("--json", action="store_true", help="one JSON object on stdout")
    i.set_defaults(func=_cmd_data_inspect)

    # demo, train, eval, predict
    d = sub.add_parser("demo", help="the main job: synth data, pretrain, fine-tune, evaluate (local Ray)")
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--num-clips", type=int, default=960, help="synthetic clips to generate (default 960)")
    d.add_argument("--pretrain-steps", type=int, default=None, help="default: the config's train.steps (200)")
    d.add_argument("--finetune-steps", type=int, default=None,
                   help="default: 6.5 x the pretraining steps (1,300)")
    d.add_argument("--config", default="demo", help="preset or YAML of both runs (default demo)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    d.add_argument("--seed", type=int, default=0,
                   help="draws the clips, the initial weights, the order and the frame positions (default 0)")
    d.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="pretrain or fine-tune on Ray Train (RAY_ADDRESS or a local Ray)",
                       description="Pretrain or fine-tune (train.stage) on Ray Train, on the cluster in RAY_ADDRESS "
                                   "or a local Ray. mirasol config show --config NAME --set ... --check prints the "
                                   "config it would record and runs its start checks without Ray.",
                       epilog="presets (mirasol presets says what each is for): " + ", ".join(_preset_names()))
    t.add_argument("--config", required=True, help="preset name (listed below) or YAML path")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    t.add_argument("--json", action="store_true", help="the run's summary as one JSON object on stdout")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="task metrics of a checkpoint over a dataset (Ray Data batch inference)")
    e.add_argument("--checkpoint", required=True,
                   help="run folder (its best checkpoint by the run's validation metric; see --checkpoint-choice), "
                        "checkpoint folder or model.pt (local/s3)")
    e.add_argument("--checkpoint-choice", default="best", choices=("best", "last"),
                   help="which checkpoint of a run folder: the best by the run's validation metric (the newest when "
                        "none was scored), or the newest")
    e.add_argument("--data", required=True, action="append",
                   help="shards to evaluate on; given several times, the sets are scored together and each apart")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config (e.g. data.task=qa)")
    e.add_argument("--batch-size", type=int, default=16, help="clips per model call (default 16)")
    e.add_argument("--num-actors", type=int, default=1, help="model replicas (one GPU each when available)")
    e.add_argument("--beam-size", type=int, default=1,
                   help="beam search width for generated answers and captions (default 1: greedy)")
    e.add_argument("--records", default="", help="write per-row predictions (JSONL) here")
    e.add_argument("--out", default="", help="folder (local or s3://) to write results.json and results.csv into")
    e.add_argument("--normalize", default="", choices=("vqa", "exact", "squad"),
                   help="open-ended answers before exact match: vqa (VQA v2's normalisation; the default for a "
                        "benchmark), exact (the strings as they are) or squad (lower case, no punctuation or "
                        "articles: what validation during training uses; the default for other data); results.json "
                        "names the one applied")
    e.add_argument("--source", default="",
                   help="the benchmark (a shards build format) when the shards' manifest does not say")
    e.add_argument("--json", action="store_true", help="the results as one JSON object on stdout")
    _look_arguments(e)
    e.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("predict", help="answer / caption / option for one video file")
    pr.add_argument("--checkpoint", required=True,
                    help="run folder (its best checkpoint), checkpoint folder or model.pt (local/s3)")
    pr.add_argument("video", help="a video file (mp4, webm, mkv, avi, mov)")
    pr.add_argument("--question", default="", help="ask this question (default: caption the clip)")
    pr.add_argument("--options", nargs="+", default=None, metavar="OPTION",
                    help="answer --question by picking one of these (multiple choice)")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the checkpoint's config (e.g. storage.endpoint_url=URL)")
    pr.add_argument("--json", action="store_true", help="one JSON object (video, task, question, answer) on stdout")
    _look_arguments(pr)
    pr.set_defaults(func=_cmd_predict)

    # submit, cluster
    sb = sub.add_parser("submit", help="run a jobs/ entrypoint as a Ray job on a cluster (token auth); its exit "
                        "code follows the job's final status",
                        description="Submit JOB (pretrain, finetune, evaluate, build_shards, benchmark, sweep, or a .py "
                        "script in the working directory) with its ARGS to the Ray cluster at --address (else "
                        "RAY_API_SERVER_ADDRESS or RAY_ADDRESS), follow its logs, and exit 0 SUCCEEDED, "
                        "1 FAILED, 3 STOPPED. The job gets the working directory (with --storage-env also this "
                        "shell's S3 endpoint and region), never credentials: workers take those from the "
                        "cluster's own environment.")
    sb.add_argument("--address", default=None, help="the cluster's dashboard URL, e.g. http://HEAD:8265")
    sb.add_argument("--working-dir", default=".", help="uploaded with the job (default: here)")
    sb.add_argument("--storage-env", action="store_true",
                    help="also send this shell's AWS_ENDPOINT_URL/AWS_DEFAULT_REGION/AWS_REGION (never credentials); "
                         "without it the job uses the cluster's own storage settings")
    sb.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the entrypoint")
    sb.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the entrypoint")
    sb.add_argument("--entrypoint-memory", type=int, default=None, help="memory (bytes) reserved for the entrypoint")
    sb.add_argument("--entrypoint-resources", type=json.loads, default=None, metavar="JSON",
                    help="custom resources for the entrypoint, e.g. '{\"decode\": 1}'")
    sb.add_argument("--submission-id", default=None,
                    help="the job's id (Ray refuses a second submission with the same id)")
    sb.add_argument("--metadata-json", type=json.loads, default=None, metavar="JSON",
                    help="metadata for the job, a JSON object of strings")
    fw = sb.add_mutually_exclusive_group()
    fw.add_argument("--follow", dest="follow", action="store_true", default=None,
                    help="stream the job's logs until it ends (the default when submitting)")
    fw.add_argument("--no-follow", dest="follow", action="store_false", help="print the job id and return")
    sb.add_argument("--status", metavar="ID", help="print a job's status")
    sb.add_argument("--stop", metavar="ID", help="stop a job")
    sb.add_argument("--logs", metavar="ID", help="print a job's logs (with --follow: until it ends)")
    sb.add_argument("job", nargs="?",
                    help="pretrain | finetune | evaluate | build_shards | benchmark | sweep | path/to/script.py")
    sb.add_argument("args", nargs=argparse.REMAINDER, help="the job's own arguments")
    sb.set_defaults(func=_cmd_submit)

    cl = sub.add_parser("cluster", help="a multi-node Ray cluster on this machine: up | down | status",
                        description="A head and N worker nodes as separate Ray nodes on this machine (ray start, "
                        "free ports, dashboard on 127.0.0.1, token auth on). The nodes inherit this shell's "
                        "environment (S3 endpoint and credentials), as a cluster's machines have theirs.")
    cl.add_argument("action", choices=["up", "down", "status"],
                    help="up: start the nodes; down: stop them; status: what runs")
    cl.add_argument("--dir", default=None, help="state folder (default: $MIRASOL_CLUSTER_DIR or ~/.mirasol/cluster)")
    cl.add_argument("--workers", type=int, default=1, help="worker nodes (up)")
    cl.add_argument("--head-cpus", type=float, default=2, help="logical CPUs of the head node (up)")
    cl.add_argument("--worker-cpus", type=float, default=2, help="logical CPUs of each worker node (up)")
    cl.add_argument("--worker-gpus", type=int, default=0, help="GPUs of each worker node (up)")
    cl.add_argument("--object-store-memory", type=int, default=None, help="bytes per node (up; default: Ray's)")
    cl.add_argument("--json", action="store_true", help="one JSON object on stdout")
    cl.set_defaults(func=_cmd_cluster)

    x = sub.add_parser("export", help="one self-contained model file (weights, config, tokenizer, label set) "
                                      "from a checkpoint, sharded or not")
    x.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or model file (local/s3)")
    x.add_argument("--out", required=True, help="the file to write (local path or s3:// URI)")
    x.add_argument("--json", action="store_true", help="one JSON object on stdout")
    x.add_argument("--set", action="append", default=[], metavar="storage.endpoint_url=URL", help=STORAGE_SET_HELP)
    x.set_defaults(func=_cmd_export)

    _add_sweep_commands(sub)
    _add_look_commands(sub)

    # bench
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_cmd", required=True)
    for name, module, help_ in (("data", "mirasol_ray.bench.data", "decode pipeline throughput"),
                                ("model", "mirasol_ray.bench.model", "model FLOPs/memory scaling"),
                                ("decode", "mirasol_ray.bench.decode",
                                 "decode cost against frames sampled from long videos"),
                                ("step", "mirasol_ray.bench.step", "train-step speed in plain torch"),
                                ("rows", "mirasol_ray.bench.rows",
                                 "clip rows against one row per text: bytes, FLOPs, samples/s"),
                                ("train", "mirasol_ray.bench.train",
                                 "end-to-end samples/s: Ray Data + Ray Train against a torch DataLoader loop"),
                                ("trial", "mirasol_ray.bench.trial", "a sweep trial's start-up, to its first step"),
                                ("build", "mirasol_ray.bench.build",
                                 "shards build --transcode clips/s on 1 and 2 CPUs, against a multiprocessing.Pool"),
                                # research tools: the checkout's benchmarks/ folder, not the package
                                ("learn", "benchmarks.learn",
                                 "the demo's recipe in plain torch on clips in memory: accuracy per task and kind"),
                                ("recipe", "benchmarks.recipe",
                                 "the README's recipe for your own data, run through the CLI on a task of its own "
                                 "it was never tuned on: held-out accuracy per question type against chance"),
                                ("lucidrains", "benchmarks.lucidrains",
                                 "forward+backward time against lucidrains' mirasol-pytorch at matched dimensions")):
        if module.startswith("benchmarks.") and benchmarks_dir() is None:
            # a wheel install: the name stays, and any use of it (--help too) says where the tool lives
            stub = bench.add_parser(name, help=help_, add_help=False, prefix_chars="\0")
            stub.add_argument("args", nargs="*")
            stub.set_defaults(func=_cmd_bench)
            continue
        bp = bench.add_parser(name, help=help_)
        mod = _lazy(module) if name == wanted_bench else None
        if mod is not None:
            mod.add_arguments(bp)
            bp.set_defaults(func=_cmd_bench, bench_run=mod.run)
    return p


def _preset_names() -> list[str]:
    from mirasol_ray.config import preset_names

    return preset_names()


def _version() -> str:
    import mirasol_ray

    return mirasol_ray.__version__


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every parser under ``parser`` that runs a command (those with no subcommands of their own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # an alias names the same parser
            yield from _leaf_parsers(child)


def benchmarks_dir(package_file: str | None = None) -> Path | None:
    """The repository's ``benchmarks/`` (research tools) when ``mirasol_ray`` (``package_file``: its
    ``__init__.py``) is imported from a checkout, e.g. ``pip install -e .``; ``None`` in a wheel install."""
    if package_file is None:
        import mirasol_ray

        package_file = mirasol_ray.__file__
    root = Path(package_file).resolve().parents[1]
    found = root / "benchmarks"
    return found if (found / "__init__.py").is_file() and (root / "pyproject.toml").is_file() else None


def _lazy(module: str):
    import importlib

    if module.startswith("benchmarks."):  # the checkout's root on the path: the tool's spawned processes import it too
        root = str(benchmarks_dir().parent)
        if root not in sys.path:
            sys.path.append(root)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise


def one_line(e: BaseException) -> str:
    """The error a person can act on, in one line: the innermost cause of Ray's wrappers, its first line."""
    from mirasol_ray.config import ConfigError

    seen = set()
    while id(e) not in seen:  # RayTaskError and friends carry the original as .cause
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException):
            e = inner
        else:
            break
    if hasattr(e, "worker_failures"):
        from mirasol_ray.launch.train import training_error

        e = training_error(e)
    plain = (ConfigError, FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError, ValueError,
             RuntimeError)
    kind = "" if type(e) in plain or isinstance(e, ConfigError) or type(e).__name__ == "RunInUseError" \
        else f"{type(e).__name__}: "
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{kind}{lines[0] if lines else type(e).__name__}"[:500]


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt("terminated")  # so every cleanup (temporary folders, the run's lease) runs


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = build_parser(argv)
    for leaf in _leaf_parsers(parser):  # an unknown option is reported with its own command's usage
        leaf.set_defaults(_parser=leaf)
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        print(f"mirasol: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback on request
        if os.environ.get("MIRASOL_DEBUG"):
            raise
        print(f"mirasol: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
