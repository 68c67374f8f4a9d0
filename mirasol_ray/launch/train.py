"""Driver side of training: build the datasets and the TorchTrainer, run it, write the run's summary and plots.

Never touches tensors. Runs against the cluster in ``RAY_ADDRESS``, or a local Ray it starts.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train.torch import TorchTrainer

from mirasol_ray import storage
from mirasol_ray.config import Config
from mirasol_ray.data.index import SampleIndex
from mirasol_ray.data.pipeline import (
    count_bad_shards,
    decoded_dataset,
    describe_skips,
    expand_shard_urls,
    find_manifest,
    make_skip_counter,
    read_skips,
    sample_index,
    train_data_config,
)
from mirasol_ray.data.rows import truncation_warning
from mirasol_ray.data.schema import manifest_qtypes
from mirasol_ray.launch import console
from mirasol_ray.launch.lease import RunLease
from mirasol_ray.launch.plots import plot_curves
from mirasol_ray.launch.results import check_metric, checkpoint_score, read_metrics
from mirasol_ray.launch.scratch import scratch_folder
from mirasol_ray.train.checkpoint import (
    best_checkpoint_dir,
    check_model_file,
    describe_choice,
    latest_checkpoint_dir,
    prune_checkpoints,
    read_meta,
    resolve_choice,
)
from mirasol_ray.train.loop import train_loop_per_worker
from mirasol_ray.train.prepare import check_sets, mixture_label_set


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False) -> bool:
    """Connect to ``RAY_ADDRESS`` or start a local Ray (dashboard on 127.0.0.1 when asked).
    Returns True when this call started Ray.

    Nothing of the driver's environment is handed to Ray: the workers of an embedded Ray inherit it (credentials
    included) from the processes ``ray.init`` starts, and a cluster's workers have the cluster's own. A runtime
    env would put the AWS keys into Ray's logs and dashboard. The workers' output stays in Ray's session logs
    (``log_to_driver=False``); the console shows what :mod:`mirasol_ray.launch.console` draws."""

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False, configure_logging=False)
    else:
        port, env = None, None
        if dashboard:
            # Ray's workers find the State API by auto-detection, which fails when several Ray instances run on one
            # machine; tell them where ours is (no secret). Ray Train's cleaner of the placement groups of stopped
            # runs (Tune trials) asks it (ray#54305).
            port = _free_port()
            env = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env=env, log_to_driver=False, configure_logging=False)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_name(cfg: Config, config_name: str) -> str:
    if cfg.storage.name:
        return cfg.storage.name
    base = os.path.splitext(os.path.basename(config_name))[0]
    return f"{base}-{cfg.train.stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_uri(cfg: Config, name: str) -> str:
    root = cfg.storage.root
    if not storage.is_remote(root) and not root.startswith("file://"):
        root = os.path.abspath(root)
    return storage.join(root, name)


def loop_config(cfg: Config, uri: str, counter: str, label_set: list[str] | None, has_val: bool,
                train_data: dict[str, Any], pid_dir: str = "", lease: str = "", scratch: str = "",
                score: dict[str, str] | None = None, has_train_eval: bool = False,
                qtypes: list[str] | None = None, eval_sets: dict[str, list] | None = None) -> dict[str, Any]:
    """The one plain dict that crosses from the driver to the workers. ``train_data``: ``{"index": the sample
    index as arrays, "cpu_limit": CPUs each worker's decode pipeline may use}``, or with ``data.cache``
    ``{"cache": object refs of the decoded rows, "num_samples": N}``; for a mixture also ``"sets"``: each set's
    ``{"name", "size", "weight"}``, in the index's order. ``eval_sets``: per evaluated dataset (``val``,
    ``train_eval``) made of several sets, ``[name, the set's first row]`` of each, scored apart. ``score``: the checkpoints' scoring
    (``{"metric", "mode"}``, or None), which goes into each checkpoint's meta.json. ``qtypes``: the question type
    names the train and val manifests list, for per-type validation metrics. ``storage``: this process's
    :func:`~mirasol_ray.storage.settings`, which each worker configures before it reads anything."""
    return {"cfg": cfg.to_dict(), "run_uri": uri, "counter": counter, "label_set": label_set, "has_val": has_val,
            "has_train_eval": has_train_eval, "train_data": train_data, "pid_dir": pid_dir, "lease": lease,
            "scratch": scratch, "score": score, "qtypes": qtypes or [], "storage": storage.settings(),
            "eval_sets": eval_sets or {}}


def train_eval_index(index, cfg: Config):
    """The training clips scored beside validation (``train.eval_train_batches``): a fixed subset of the sample
    index, ``eval_train_batches * batch_size`` clips per worker, drawn with ``data.seed`` and kept in the dataset's
    order (reads stay sequential within a shard). None when off."""

    n = min(len(index), cfg.train.eval_train_batches * cfg.train.batch_size * cfg.scaling.num_workers)
    if not n:
        return None
    pick = np.sort(np.random.default_rng([cfg.data.seed, 0x7472_6576]).choice(len(index), n, replace=False))
    return SampleIndex(index.url, index.shards, index.shard[pick], index.start[pick], index.end[pick])


def _set_index(url: str, counter, counter_name: str) -> SampleIndex:
    """The sample index of one shard set, its bad shards counted; an error naming it when none could be read."""
    index = sample_index(url)
    count_bad_shards(index, counter_name)
    if not len(index):
        raise ValueError(f"no shard of {url} could be read: {describe_skips(read_skips(counter))}")
    return index


def _set_starts(sets: list, index: SampleIndex, shards_per_set: list[int]) -> list[list]:
    """``[name, first row]`` of each set in ``index``: the sets' indexes concatenated
    (:meth:`~mirasol_ray.data.index.SampleIndex.concat`), or a subset of that in order."""
    first_shard = np.cumsum([0] + shards_per_set[:-1])
    return [[s.name, int(i)] for s, i in zip(sets, np.searchsorted(index.shard, first_shard, side="left"))]


def data_cpus_per_worker(cfg: Config) -> float:
    """CPUs each Train worker's decode pipeline may hold: ``scaling.data_cpu_limit`` (or what the workers leave
    of the cluster) shared between the workers, never below one decode task."""

    total = cfg.scaling.data_cpu_limit or max(0.0, ray.cluster_resources().get("CPU", 0.0)
                                              - cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    return max(cfg.data.decode_cpus, total / cfg.scaling.num_workers)


def check_inputs(cfg: Config) -> None:
    """Fail early, naming the URL: the run can start (:meth:`Config.check_start`: a fine-tuning run has task rows
    and weights to start from), ``train.checkpoint_metric`` is a metric the run reports, the training (and
    validation) shards exist, and ``train.init_from`` resolves to a loadable model file (a run folder: its best
    checkpoint, named on the console)."""

    if not cfg.data.train:
        raise ValueError("data.train is empty: give the training shards with --set data.train=URL")
    shard_urls = [s.path for s in cfg.data.train_sets + cfg.data.val_sets]
    for url in (*shard_urls, cfg.storage.root, cfg.data.tokenizer, cfg.train.init_from):
        storage.check_access(url)  # seconds, naming the URL, before minutes of a library's retries
    for key, sets in (("data.train", cfg.data.train_sets), ("data.val", cfg.data.val_sets)):
        if len({storage.is_s3(s.path) for s in sets}) > 1:  # one index reads them all (SampleIndex.concat)
            raise ValueError(f"{key}: its sets are on different storage ({', '.join(s.path for s in sets)}): put them "
                             "all on local disk or all on s3://")
    # Relative local files are the driver's: Ray Train's workers run in folders of their own, where
    # data.tokenizer=data/mine/train/tokenizer.json or train.init_from=runs/pre were not found (the README's own
    # commands failed so). The shards' URLs are made absolute when they are expanded.
    for part, key in ((cfg.data, "tokenizer"), (cfg.train, "init_from"), (cfg.model, "video_init"),
                      (cfg.model, "audio_init"), (cfg.model, "text_init")):
        value = getattr(part, key)
        if value and value != "byte" and "://" not in value:
            setattr(part, key, os.path.abspath(os.path.expanduser(value)))
    if cfg.data.tokenizer not in ("", "byte") and "://" not in cfg.data.tokenizer \
            and not os.path.isfile(cfg.data.tokenizer):
        raise FileNotFoundError(f"data.tokenizer: no such file {cfg.data.tokenizer}")
    if cfg.tokenizer_unread():  # the workers would build a model without a vocabulary
        raise ValueError(f"{cfg.tokenizer_unread()[0]} is unread: the config was not prepared "
                         "(mirasol_ray.train.prepare.prepare reads data.tokenizer before a run starts)")
    cfg.check_start()
    t = cfg.train
    if t.stage == "finetune" and t.freeze_av_steps >= t.steps > 0:
        console.say(f"warning: train.freeze_av_steps={t.freeze_av_steps} >= train.steps={t.steps}: the audio-video "
                    "path is held still for the whole run and only the text decoder learns; raise train.steps "
                    "(the demo fine-tunes 1000) or lower train.freeze_av_steps")
    metric = cfg.train.checkpoint_metric
    if metric:
        try:
            check_metric(metric)
        except ValueError as e:
            raise ValueError(f"train.checkpoint_metric: {e}") from None
        if metric.startswith(("val/", "train_eval/")) and not cfg.data.val:
            raise ValueError(f"train.checkpoint_metric={metric} is measured at validation passes: set data.val=URL")
    for url in shard_urls:
        expand_shard_urls(url)
    check_sets(cfg)  # prepare's check, again: a config built in code reaches here without prepare
    if cfg.train.init_from:
        given = cfg.train.init_from
        cfg.train.init_from, chosen = resolve_choice(given)
        check_model_file(cfg.train.init_from)
        if chosen is not None:  # a run folder: say which of its checkpoints
            console.say(f"train.init_from={given}: its {describe_choice(chosen)}")


def training_error(e: BaseException) -> Exception:
    """A failed ``fit()`` as one line naming the worker and what it raised (Ray's own text runs to hundreds of
    lines); the worker's traceback is in Ray's session logs."""
    failures = getattr(e, "worker_failures", None) or {}
    if not failures:
        first = next((ln for ln in str(e).splitlines() if ln.strip() and "Training failed" not in ln),
                     type(e).__name__)
        return RuntimeError(f"training failed: {first[:300]}")
    rank, err = min(failures.items())
    while isinstance(getattr(err, "cause", None), BaseException):  # Ray's task-error wrappers
        err = err.cause
    first = next((ln for ln in str(err).splitlines() if ln.strip()), "")
    if type(err).__name__ == "NoBatchError":  # already says what happened and what was skipped
        return RuntimeError(first)
    return RuntimeError(f"training failed on worker rank {rank}: {type(err).__name__}: {first[:300]}")


def checkpoint_retention(cfg: Config):
    """Ray Train's ``CheckpointConfig`` of a run: the best ``train.keep_checkpoints`` by the run's checkpoint score
    (:func:`~mirasol_ray.launch.results.checkpoint_score`) and the newest; the newest few when unscored."""

    score = checkpoint_score(cfg)
    if score is None:
        return ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)
    return ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                      checkpoint_score_attribute=score["metric"],
                                      checkpoint_score_order=score["mode"])


def build_trainer(cfg: Config, name: str, uri: str, *, pid_dir: str = "", lease: str = "", scratch: str = "",
                  callbacks: list | None = None, checkpoint_config=None):
    """The run's datasets and its ``TorchTrainer`` (scaling, storage, checkpoints), ready to ``fit()``; and the
    counter actor of its decode tasks and progress. One Ray Train run: ``mirasol train`` and each trial of a sweep
    build theirs here. ``lease``: the token of the run folder's lease (workers stop marking checkpoints complete
    once another run holds it), "" when nothing leases the folder. ``checkpoint_config``: Ray Train's retention
    (default :func:`checkpoint_retention`); its score attribute is what makes a checkpoint the best, recorded in
    each checkpoint's meta.json. With validation data, a fixed subset of the training clips
    (:func:`train_eval_index`) is scored beside it as the ``train_eval`` dataset. Needs a connected Ray."""

    sets, val_sets = cfg.data.train_sets, cfg.data.val_sets
    if cfg.data.mixture:
        label_set = mixture_label_set([s.path for s in sets])
    else:
        label_set = (find_manifest(cfg.data.train) or {}).get("label_set")
    qtypes = sorted({q for s in sets + val_sets for q in manifest_qtypes(find_manifest(s.path))})
    counter, counter_name = make_skip_counter()  # this attempt's own: counts and progress start at zero
    indexes = [_set_index(s.path, counter, counter_name) for s in sets]
    index = SampleIndex.concat(indexes) if cfg.data.mixture else indexes[0]
    # the training set is not a Ray Train dataset: each worker reads its own share of the index (train_batches)
    train_data: dict[str, Any] = {"index": index.to_dict(), "cpu_limit": data_cpus_per_worker(cfg)}
    # a mixture: the workers' MixtureOrder, and the names their metrics give the sets (decoded or cached rows alike)
    mix = {"sets": [{"name": s.name, "size": len(i), "weight": s.weight} for s, i in zip(sets, indexes)]
           } if cfg.data.mixture else {}
    datasets = {}
    eval_sets: dict[str, list] = {}  # per evaluated dataset: [name, its first row] of each set scored apart
    if cfg.data.val:
        if isinstance(cfg.data.val, list):
            val_indexes = [_set_index(s.path, counter, counter_name) for s in val_sets]
            val_index = SampleIndex.concat(val_indexes)
            datasets["val"] = decoded_dataset(val_sets[0].path, cfg.data, train=False, counter_name=counter_name,
                                              label_set=label_set, index=val_index)
            eval_sets["val"] = _set_starts(val_sets, val_index, [len(i.shards) for i in val_indexes])
        else:
            datasets["val"] = decoded_dataset(cfg.data.val, cfg.data, train=False, counter_name=counter_name,
                                              label_set=label_set)
        subset = train_eval_index(index, cfg)
        if subset is not None:  # scored beside validation, decoded as validation is
            datasets["train_eval"] = decoded_dataset(sets[0].path, cfg.data, train=False, counter_name=counter_name,
                                                     label_set=label_set, index=subset)
            if cfg.data.mixture:
                eval_sets["train_eval"] = _set_starts(sets, subset, [len(i.shards) for i in indexes])
    last = latest_checkpoint_dir(uri)
    done = read_meta(storage.join(last, "model.pt")).get("step", 0) if last else 0
    if cfg.data.cache and done >= cfg.train.steps:
        console.say(f"run {name} is already at step {done} of {cfg.train.steps}: nothing to decode")
        train_data = {"cache": [], "num_samples": len(index)}
    elif cfg.data.cache:
        t0 = time.perf_counter()
        console.say("decoding into Ray's object store (data.cache)")
        # decoded once (epoch 0's frame positions), in the dataset's order; the workers then pick rows by sample
        # index in each epoch's order
        cached = decoded_dataset(sets[0].path, cfg.data, train=True, counter_name=counter_name,
                                 label_set=label_set, index=index)
        train_data = {"cache": cached.to_numpy_refs(), "num_samples": len(index)}
        datasets = {k: ds.materialize() for k, ds in datasets.items()}
        rows = read_skips(counter)["rows"]
        console.say(f"decoded into the object store (data.cache): {rows} rows in {time.perf_counter() - t0:.0f} s")
    train_data |= mix
    fs, root_path = storage.pyarrow_fs(cfg.storage.root)
    storage.write_text(storage.join(uri, "config.yaml"), cfg.to_yaml())
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if checkpoint_config is None:
        checkpoint_config = checkpoint_retention(cfg)
    attr = checkpoint_config.checkpoint_score_attribute
    score = {"metric": attr, "mode": checkpoint_config.checkpoint_score_order} if attr else None
    trainer = TorchTrainer(
        train_loop_per_worker=_entry,
        train_loop_config=loop_config(cfg, uri, counter_name, label_set, "val" in datasets, train_data, pid_dir, lease,
                                      scratch, score=score, has_train_eval="train_eval" in datasets, qtypes=qtypes,
                                      eval_sets=eval_sets),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.scaling.placement_strategy),
        datasets=datasets,
        dataset_config=train_data_config(cfg.scaling.data_cpu_limit),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root_path,
            storage_filesystem=fs if storage.is_remote(cfg.storage.root) else None,
            checkpoint_config=checkpoint_config,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer, counter


def run_training(cfg: Config, config_name: str = "config", *, num_cpus: int | None = None,
                 pid_dir: str = "") -> dict[str, Any]:
    """Train per ``cfg`` on Ray Train; returns the run's summary (also written to ``summary.json``).

    Before anything starts: the shards and ``train.init_from`` resolve, the run folder is writable and this run
    holds its lease (a second live run on it is refused). Phase lines and a progress bar go to stderr; the
    driver's library logs to ``logs/driver-*.log`` in the run folder (:mod:`mirasol_ray.launch.console`)."""

    storage.configure(cfg.storage.endpoint_url)
    check_inputs(cfg)
    name = run_name(cfg, config_name)
    uri = run_uri(cfg, name)
    storage.check_output(uri, "dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with RunLease(uri) as lease, scratch_folder() as scratch, console.quiet_libraries() as logs:
        local_log = storage.join(uri, "logs", f"driver-{stamp}.log")
        logs.attach(os.path.join(scratch, "driver.log") if storage.is_remote(uri) else storage.strip_scheme(local_log))
        prune_checkpoints(uri, cfg.train.keep_checkpoints)  # leftovers of a run stopped mid-upload
        last = latest_checkpoint_dir(uri)
        done = read_meta(storage.join(last, "model.pt")).get("step", 0) if last else 0
        console.say(f"run {uri}: {cfg.train.stage}, {cfg.train.steps} steps on {cfg.scaling.num_workers} worker(s)"
                    + (f", from its checkpoint at step {done}" if last else "") + f"; logs: {local_log}")
        if not ray.is_initialized():
            console.say(f"starting Ray ({os.environ.get('RAY_ADDRESS') or 'a local instance'})...")
        started = ensure_ray(num_cpus)
        ray.data.DataContext.get_current().enable_progress_bars = False
        counter = None
        try:
            console.say("building the data pipeline (shard index" + (", validation sets" if cfg.data.val else "")
                        + ")...")
            trainer, counter = build_trainer(cfg, name, uri, pid_dir=pid_dir, lease=lease.token, scratch=scratch)
            console.say(f"starting {cfg.scaling.num_workers} training worker(s) (Ray Train)...")
            t0 = time.perf_counter()
            try:
                with console.StepProgress(counter, cfg.train.steps, name):
                    result = trainer.fit()
            except SystemExit as e:
                # Ctrl-C: Ray Train's own SIGINT handler aborts the run, and waiting on the aborted controller
                # raises SystemExit(1) with no message; say what happened and how to go on
                raise KeyboardInterrupt(f"run {name} aborted; the same command with storage.name={name} resumes "
                                        "from its last checkpoint") from e
            except ray.train.TrainingFailedError as e:
                raise training_error(e) from e
            elapsed = time.perf_counter() - t0
            skips = read_skips(counter)
            if truncation_warning(skips["truncation"], cfg.data.tokenizer):
                console.say(truncation_warning(skips["truncation"], cfg.data.tokenizer))
        finally:
            if counter is not None and not started:
                ray.kill(counter)
            if started:
                ray.shutdown()
            if storage.is_remote(uri) and os.path.exists(os.path.join(scratch, "driver.log")):
                try:
                    storage.write_bytes(local_log, open(os.path.join(scratch, "driver.log"), "rb").read())
                except Exception:  # the log is a convenience: never mask the run's own outcome
                    pass
        console.say("writing the summary and the learning curve...")
        prune_checkpoints(uri, cfg.train.keep_checkpoints)
        records = read_metrics(uri)
        plot = plot_curves(records, storage.join(uri, "plots", "learning_curve.png"), title=name)
        last = records[-1] if records else {}
        best = best_checkpoint_dir(uri)
        summary = {
            "run": uri,
            "stage": cfg.train.stage,
            "steps": last.get("step", 0),
            "final_loss": last.get("loss"),
            "val": (result.metrics or {}).get("val", {}),
            "train_eval": (result.metrics or {}).get("train_eval", {}),
            **({"epochs": last.get("epochs", {})} if cfg.data.mixture else {}),
            "checkpoint": latest_checkpoint_dir(uri),
            "best_checkpoint": best,
            "decoded": skips["decoded"],
            "skipped": skips["skipped"],
            "truncation": skips["truncation"],
            "seconds": round(elapsed, 1),
            "learning_curve": plot,
            "tensorboard": storage.RunDir(uri).tensorboard,
            "log": local_log,
        }
        storage.write_text(storage.join(uri, "summary.json"), json.dumps(summary, indent=2))
    return summary


def _entry(config: dict[str, Any]) -> None:
    train_loop_per_worker(config)
