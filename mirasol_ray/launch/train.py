"""Driver side of training: build the datasets and the TorchTrainer, run it, write the run's summary and plots.

Never touches tensors. Runs against the cluster in ``RAY_ADDRESS``, or a local Ray it starts.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from mirasol_ray import storage
from mirasol_ray.config import Config


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False, log_to_driver: bool = True) -> bool:
    """Connect to ``RAY_ADDRESS`` or start a local Ray (dashboard on 127.0.0.1 when asked). ``log_to_driver=False``
    leaves the workers' output in Ray's log files. Returns True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env} if env else None, log_to_driver=log_to_driver)
    else:
        port = None
        if dashboard:
            # Ray's workers find the State API by auto-detection, which fails when several Ray instances run on one
            # machine; tell them where ours is. Ray Train's cleaner of the placement groups of stopped runs (Tune
            # trials) asks it (ray#54305).
            port = _free_port()
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env={"env_vars": env} if env else None, configure_logging=False, log_to_driver=log_to_driver)
    return True


def _free_port() -> int:
    import socket

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
                pid_dir: str = "") -> dict[str, Any]:
    """The one plain dict that crosses from the driver to the workers."""
    return {"cfg": cfg.to_dict(), "run_uri": uri, "counter": counter, "label_set": label_set, "has_val": has_val,
            "pid_dir": pid_dir}


def plot_curves(records: list[dict[str, Any]], png: str, title: str = "") -> str | None:
    """Learning curves (loss parts, validation metrics) from metrics.jsonl records into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return None
    loss_keys = [k for k in records[0] if k in ("loss", "text", "latent", "cls")]
    val_keys = sorted({k for r in records for k in r.get("val", {})} - {"loss"})  # the loss goes beside training's
    fig, axes = plt.subplots(1, 2 if val_keys else 1, figsize=(11 if val_keys else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for k in loss_keys:
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot(*zip(*pts), label=k)
    pts = [(r["step"], r["val"]["loss"]) for r in records if "loss" in r.get("val", {})]
    if pts:
        ax.plot(*zip(*pts), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title or "training loss")
    if val_keys:
        ax = axes[0, 1]
        for k in val_keys:
            pts = [(r["step"], r["val"][k]) for r in records if k in r.get("val", {})]
            ax.plot(*zip(*pts), marker="o", label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("validation metric")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    data = _png_bytes(fig)
    plt.close(fig)
    storage.write_bytes(png, data)
    return png


def _png_bytes(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def read_metrics(uri: str, endpoint_url: str = "") -> list[dict[str, Any]]:
    path = storage.join(uri, "metrics.jsonl")
    if not storage.exists(path, endpoint_url):
        return []
    return [json.loads(ln) for ln in storage.read_text(path, endpoint_url).splitlines() if ln.strip()]


def check_inputs(cfg: Config) -> None:
    """Fail early, naming the URL: the training shards exist, and ``train.init_from`` resolves (to its model.pt)."""
    from mirasol_ray.data.pipeline import expand_shard_urls
    from mirasol_ray.train.checkpoint import resolve_checkpoint

    if not cfg.data.train:
        raise ValueError("data.train is empty: give the training shards with --set data.train=URL")
    expand_shard_urls(cfg.data.train, cfg.storage.endpoint_url)
    if cfg.train.init_from:
        cfg.train.init_from = resolve_checkpoint(cfg.train.init_from, cfg.storage.endpoint_url)


def build_trainer(cfg: Config, name: str, uri: str, *, pid_dir: str = "", callbacks: list | None = None,
                  checkpoint_config=None):
    """The run's datasets and its ``TorchTrainer`` (scaling, storage, checkpoints), ready to ``fit()``; and the
    skip counter of its decode tasks. One Ray Train run: ``mirasol train`` and each trial of a sweep build theirs
    here. Needs a connected Ray."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from mirasol_ray.data.pipeline import (
        decoded_dataset,
        find_manifest,
        make_skip_counter,
        reshuffle_blocks_each_epoch,
        train_data_config,
    )
    from mirasol_ray.train.checkpoint import latest_checkpoint_dir, read_meta, resolve_checkpoint

    manifest = find_manifest(cfg.data.train, cfg.storage.endpoint_url) or {}
    label_set = manifest.get("label_set")
    counter, counter_name = make_skip_counter(f"mirasol-skips-{name}")
    datasets = {"train": decoded_dataset(cfg.data.train, cfg.data, train=True, counter_name=counter_name,
                                         label_set=label_set, endpoint_url=cfg.storage.endpoint_url)}
    if cfg.data.val:
        datasets["val"] = decoded_dataset(cfg.data.val, cfg.data, train=False, counter_name=counter_name,
                                          label_set=label_set, endpoint_url=cfg.storage.endpoint_url)
    last = latest_checkpoint_dir(uri, cfg.storage.endpoint_url)
    done = read_meta(resolve_checkpoint(last, cfg.storage.endpoint_url), cfg.storage.endpoint_url).get(
        "step", 0) if last else 0
    if cfg.data.cache and done >= cfg.train.steps:
        print(f"run {name} is already at step {done} of {cfg.train.steps}: nothing to decode", flush=True)
    elif cfg.data.cache:
        t0 = time.perf_counter()
        datasets = {k: ds.materialize() for k, ds in datasets.items()}
        rows = {k: ds.count() for k, ds in datasets.items()}
        # a new block order every epoch (docs/PERFORMANCE.md, "The demo": temporal 0.68 -> 0.95 in-memory)
        datasets["train"] = reshuffle_blocks_each_epoch(datasets["train"], cfg.data.seed)
        print(f"decoded into the object store (data.cache): {rows} rows in {time.perf_counter() - t0:.0f} s",
              flush=True)
    fs, root_path = storage.pyarrow_fs(cfg.storage.root, cfg.storage.endpoint_url)
    storage.write_text(storage.join(uri, "config.yaml"), cfg.to_yaml(), cfg.storage.endpoint_url)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker=_entry,
        train_loop_config=loop_config(cfg, uri, counter_name, label_set, "val" in datasets, pid_dir),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        datasets=datasets,
        dataset_config=train_data_config(cfg.scaling.data_cpu_limit),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root_path,
            storage_filesystem=fs if storage.is_remote(cfg.storage.root) else None,
            checkpoint_config=checkpoint_config or ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer, counter


def run_training(cfg: Config, config_name: str = "config", *, num_cpus: int | None = None,
                 pid_dir: str = "") -> dict[str, Any]:
    """Train per ``cfg`` on Ray Train; returns the run's summary (also written to ``summary.json``)."""
    import ray

    from mirasol_ray.data.pipeline import read_skips
    from mirasol_ray.train.checkpoint import latest_checkpoint_dir

    check_inputs(cfg)
    name = run_name(cfg, config_name)
    uri = run_uri(cfg, name)
    started = ensure_ray(num_cpus)
    # Progress is the workers' step lines; Ray Data's bars, drawn from a background actor, would garble them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        trainer, counter = build_trainer(cfg, name, uri, pid_dir=pid_dir)
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except SystemExit as e:
            # Ctrl-C: Ray Train's own SIGINT handler aborts the run, and waiting on the aborted controller raises
            # SystemExit(1) with no message; say what happened and how to go on
            raise KeyboardInterrupt(f"run {name} aborted; the same command with storage.name={name} resumes "
                                    "from its last checkpoint") from e
        elapsed = time.perf_counter() - t0
        skips = read_skips(counter)
    finally:
        if started:
            ray.shutdown()
    records = read_metrics(uri, cfg.storage.endpoint_url)
    plot = plot_curves(records, storage.join(uri, "plots", "learning_curve.png"), title=name)
    last = records[-1] if records else {}
    summary = {
        "run": uri,
        "stage": cfg.train.stage,
        "steps": last.get("step", 0),
        "final_loss": last.get("loss"),
        "val": (result.metrics or {}).get("val", {}),
        "checkpoint": latest_checkpoint_dir(uri, cfg.storage.endpoint_url),
        "decoded": skips["decoded"],
        "skipped": skips["skipped"],
        "seconds": round(elapsed, 1),
        "learning_curve": plot,
    }
    storage.write_text(storage.join(uri, "summary.json"), json.dumps(summary, indent=2), cfg.storage.endpoint_url)
    return summary


def _entry(config: dict[str, Any]) -> None:
    from mirasol_ray.train.loop import train_loop_per_worker

    train_loop_per_worker(config)
