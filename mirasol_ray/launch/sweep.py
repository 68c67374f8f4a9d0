"""``mirasol sweep``: a Ray Tune sweep whose trials are whole Ray Train fine-tuning runs.

The Ray 2.60 pattern for Tune over Train V2 (FIELD_NOTES): each trial is a Tune function (:func:`_trial`) that
builds its run's ``TorchTrainer`` with :func:`mirasol_ray.launch.train.build_trainer` (the same as ``mirasol
train``) and calls ``fit()``; a ``TuneReportCallback`` in the run's ``RunConfig`` hands every report (metrics and
the checkpoint's path) to Tune, where ASHA compares trials. Only plain dicts cross to a trial: the sampled values
and the sweep's spec (the base config as a dict).

A sweep folder (``--storage`` / ``--name``, local or ``s3://``)::

    sweep.json           the spec (metric, mode, space, base config) and every trial's status, written by the driver
    trials/<trial_id>/   each trial's Ray Train run: checkpoints (best ``train.keep_checkpoints`` by the metric, and
                         the latest), config.yaml, metrics.jsonl, TensorBoard events
    tune_<trial_id>/     Tune's files of the trial (result.json: every report), Tune's experiment state

A trial evaluates at every ``train.eval_every`` steps and checkpoints at each evaluation, so every value ASHA sees
has its checkpoint. ``--resume`` restores the sweep with ``Tuner.restore``: finished and stopped trials stay as they
are; unfinished ones start again, and their Train run continues from its newest complete checkpoint (same run
folder). Tune does not keep ASHA's rungs across a restore: resumed trials are compared only with results reported
after it. ``--resume-or-start`` continues the sweep ``--name`` if its folder holds one, else starts it: the
entrypoint for a job that may be submitted again (``cluster/kuberay/rayjob-sweep.yaml``). The driver holds the sweep
folder's lease (``lease.json``): a second live driver on it is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import time
import typing
from typing import Any

import ray
import ray._private.worker
import ray.train
import yaml
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from mirasol_ray import storage
from mirasol_ray.config import Config, ConfigError, from_dict, load_config
from mirasol_ray.launch import console
from mirasol_ray.launch.lease import RunLease
from mirasol_ray.launch.results import (
    SWEEP_FILE,
    TRIALS_DIR,
    _fmt,
    check_metric,
    default_mode,
    flatten,
    format_table,
    main_metric,
    print_results,
    read_results,
)
from mirasol_ray.launch.train import build_trainer, check_inputs, ensure_ray, run_uri, training_error
from mirasol_ray.train.prepare import load_prepared
from mirasol_ray.train.prepare import prepare as prepare_config

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
TRIAL_DRIVER_CPUS = 0.01
"""What a trial's own process (the Tune function that runs ``fit()``) reserves: next to nothing, so the CPUs go to
the Train workers and the data pipeline; ``--max-concurrent`` bounds how many trials run at once."""


# ----------------------------------------------------------------------------------------------------------------
# The search space


@dataclasses.dataclass(frozen=True)
class Param:
    """One swept config key: ``train.lr: {loguniform: [1e-4, 3e-3]}``."""

    key: str
    kind: str
    args: tuple

    def domain(self):
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def probe_values(self) -> list:
        """Values that must all make a valid config: the ends of a range, every choice."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "args": list(self.args)}


def _field_type(key: str) -> Any:
    section, _, name = key.partition(".")
    hints = typing.get_type_hints(Config)
    if section not in hints or not dataclasses.is_dataclass(hints[section]):
        return None
    return typing.get_type_hints(hints[section]).get(name)


def parse_space(raw: Any, source: str = "space") -> list[Param]:
    """The space file's mapping -> params. Keys are ``section.key`` (or nested ``section: {key: ...}``); each value
    is ``{DISTRIBUTION: ARGS}``. A malformed entry is a ConfigError naming the file and the key."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: expected a mapping of config keys to distributions, e.g. "
                          "'train.lr: {loguniform: [1.0e-4, 3.0e-3]}'")
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if not prefix and "." not in str(k) and isinstance(v, dict) and not (
                    len(v) == 1 and next(iter(v)) in DISTRIBUTIONS):  # `train: {lr: ...}`
                walk(v, f"{key}.")
            else:
                flat[key] = v

    walk(raw, "")
    params = []
    for key, spec in flat.items():
        where = f"{source}: {key}"
        if "." not in key:
            raise ConfigError(f"{where}: keys are section.key (e.g. train.lr)")
        if key.startswith("storage."):
            raise ConfigError(f"{where}: storage is the sweep's own (--storage, --name), not a hyperparameter")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-4, 3.0e-3]}}; "
                              f"got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {kind!r} (use {', '.join(DISTRIBUTIONS)})")
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"{where}: {kind} takes a list, got {args!r}")
        if kind in ("loguniform", "uniform", "randint"):
            if len(args) != 2:
                raise ConfigError(f"{where}: {kind} takes [low, high], got {args!r}")
            try:
                lo, hi = (float(a) for a in args)  # YAML 1.1 reads 3e-3 (no dot) as a string
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {kind} takes two numbers, got {args!r}") from None
            if not lo < hi:
                raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")
            if kind == "randint":
                if not (lo.is_integer() and hi.is_integer()):
                    raise ConfigError(f"{where}: randint takes integers [low, high) , got {args!r}")
                args = (int(lo), int(hi))
            else:
                args = (lo, hi)
                tp = _field_type(key)
                if tp is not None and tp is not float:
                    raise ConfigError(f"{where}: {kind} samples real numbers but {key} takes "
                                      f"{getattr(tp, '__name__', tp)} (use randint or choice)")
        params.append(Param(key, kind, tuple(args)))
    return params


def _set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    node = raw.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: {section} is not a config section")
    node[name] = value


def _plain(value: Any) -> Any:
    """numpy scalars (Tune samples with numpy) -> Python numbers, so the config's types accept them."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)) else value


def apply_params(base: dict[str, Any], values: dict[str, Any]) -> Config:
    raw = copy.deepcopy(base)
    for key, value in values.items():
        _set_key(raw, key, _plain(value))
    return from_dict(raw)


def validate_space(params: list[Param], base: dict[str, Any], source: str = "space") -> None:
    """Build and prepare the config at every range end and every choice: an unknown key or a value the key cannot
    take (a ``train.freeze`` pattern that matches no parameter, say) is a ConfigError naming the key, before anything
    starts. The trials then take the prepared config with their values as they are."""
    for p in params:
        for value in p.probe_values():
            try:
                prepare_config(apply_params(base, {p.key: value}))  # e.g. train.freeze patterns: against the model
            except ConfigError as e:
                raise ConfigError(f"{source}: {p.key}: {e}") from None


def read_space(path: str, base: dict[str, Any]) -> list[Param]:
    if not os.path.isfile(path) and not storage.is_remote(path):
        raise FileNotFoundError(f"space file not found: {path}")

    try:
        raw = yaml.safe_load(storage.read_text(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    params = parse_space(raw, path)
    validate_space(params, base, path)
    return params


# ----------------------------------------------------------------------------------------------------------------
# The trial


def _trial(values: dict[str, Any], spec: dict[str, Any]) -> None:
    """One trial: the base config with the sampled values, run as its own Ray Train run under ``trials/<id>``."""

    storage.configure(**spec["storage"])  # the driver's, before the config is read (it may name s3:// files)
    trial_id = tune.get_context().get_trial_id()
    raw = copy.deepcopy(spec["config"])
    raw["storage"]["root"], raw["storage"]["name"] = spec["trials_uri"], trial_id
    cfg = apply_params(raw, values)
    ray.data.DataContext.get_current().enable_progress_bars = False
    checkpoints = ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                             checkpoint_score_attribute=spec["metric"],
                                             checkpoint_score_order=spec["mode"])
    # no lease on a trial's run folder: Tune runs one instance of a trial at a time, and the sweep's driver holds
    # the sweep folder's lease
    trainer, counter = build_trainer(cfg, trial_id, run_uri(cfg, trial_id), callbacks=[TuneReportCallback()],
                                     checkpoint_config=checkpoints)
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise training_error(e) from e  # one line for the sweep's "failed" line, the trace in the trial's log
    finally:
        _log_events(trial_id, counter)


def _log_events(trial_id: str, counter) -> None:
    """The run's events (a resume from a checkpoint, ...) into the trial's log (its Ray worker's output), and the
    counter actor gone."""

    try:
        for event in ray.get(counter.status.remote(0), timeout=10)["events"]:
            print(f"trial {trial_id}: {event}", flush=True)
        ray.kill(counter)
    except Exception:  # informative only
        pass


def _trial_dirname(trial) -> str:
    return f"tune_{trial.trial_id}"


def trainable(spec: dict[str, Any], resources: dict[str, float]):
    """The trial function with what it needs of the spec bound to it (a plain dict in the object store)."""

    need = {k: spec[k] for k in ("config", "trials_uri", "metric", "mode", "storage")}
    return tune.with_resources(tune.with_parameters(_trial, spec=need), resources)


def error_reason(trace: str) -> str:
    """One line out of a failed trial's trace: Ray's out-of-memory verdict when there is one, else the last
    exception line (with the line after it when it ends in a colon, as Ray Train's "failed due to worker errors:")."""

    lines = [ln.strip() for ln in trace.splitlines() if ln.strip()]
    for ln in lines:
        if "running low on memory" in ln:
            return ln[:300]
    exc = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*")
    for i in range(len(lines) - 1, -1, -1):
        if exc.match(lines[i]):
            out, j = lines[i], i
            while out.endswith(":") and j + 1 < len(lines) and j < i + 3:  # the detail after "...errors:"
                j += 1
                out += f" {lines[j]}"
            return out[:300]
    return lines[-1][:300] if lines else ""


# ----------------------------------------------------------------------------------------------------------------
# Progress: one line per trial event, a table now and then; the trials' states kept in sweep.json


def _ledger_write(uri: str, ledger: dict[str, Any]) -> None:
    storage.write_text(storage.join(uri, SWEEP_FILE), json.dumps(ledger, indent=1))


class SweepProgress(Callback):
    """Prints a line when a trial starts, reports, is stopped early, finishes or fails, and a table of all
    trials every ``table_every_s``; records each trial's status in ``sweep.json``."""

    def __init__(self, uri: str, keys: list[str], metric: str, mode: str, max_steps: int,
                 scheduler: str, table_every_s: float = 60.0):
        self.uri, self.keys = uri, keys
        self.metric, self.mode, self.max_steps, self.scheduler = metric, mode, max_steps, scheduler
        self.table_every_s = table_every_s

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.total = total_num_samples or 0
        self.t0 = self.last_table = time.time()
        self.steps_here = 0  # steps trained since this driver started: the rate behind the ETA
        self.live: dict[str, dict[str, Any]] = {}
        self.ledger = json.loads(storage.read_text(storage.join(self.uri, SWEEP_FILE)))

    # -- helpers
    def _say(self, text: str) -> None:
        el = int(time.time() - self.t0)
        print(f"[{el // 3600}:{el % 3600 // 60:02d}:{el % 60:02d}] {text}", file=sys.stderr, flush=True)

    def _entry(self, trial) -> dict[str, Any]:
        t = self.ledger["trials"].setdefault(trial.trial_id, {"status": "pending", "starts": 0})
        t["config"] = {k: _plain(trial.config.get(k)) for k in self.keys}
        return t

    def _save(self) -> None:
        try:
            _ledger_write(self.uri, self.ledger)
        except Exception as e:  # never fail a sweep for its progress file; the next event writes it again
            logging.getLogger(__name__).warning("could not write %s: %s", SWEEP_FILE, e)

    def _values(self, trial) -> str:
        return " ".join(f"{k}={_fmt(_plain(trial.config.get(k)))}" for k in self.keys)

    def _metric_text(self, tid: str) -> str:
        t = self.ledger["trials"].get(tid, {})
        if t.get("last") is None:
            return f"{self.metric}=-"
        return f"{self.metric}={_fmt(t['last'])} (best {_fmt(t['best'])})"

    # -- Tune's hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        t = self._entry(trial)
        t["status"], t["starts"] = "running", t.get("starts", 0) + 1
        self.live[trial.trial_id] = {"step": t.get("steps", 0), "started": time.time(), "reported": False}
        again = f" (again: start {t['starts']}, its run continues from its last checkpoint)" if t["starts"] > 1 \
            else ""
        self._say(f"trial {trial.trial_id} started  {self._values(trial)}{again}")
        self._save()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t = self._entry(trial)
        flat = flatten(result)
        step = int(flat.get("step", 0))
        prev = self.live.setdefault(trial.trial_id, {"step": step, "started": time.time(), "reported": True})
        self.steps_here += max(0, step - prev["step"])
        prev["step"] = step
        t["steps"] = step
        first = ""
        if not prev["reported"]:  # the trial's start-up cost: Train workers, data pipeline, model, first steps
            prev["reported"] = True
            t.setdefault("first_report_s", []).append(round(time.time() - prev["started"], 1))
            first = f"  (first report {t['first_report_s'][-1]:.0f} s after its start)"
        value = flat.get(self.metric)
        if isinstance(value, (int, float)):
            t["last"] = float(value)
            if t.get("best") is None or (value > t["best"] if self.mode == "max" else value < t["best"]):
                t["best"], t["best_step"] = float(value), step
        self._say(f"trial {trial.trial_id} step {step}/{self.max_steps}  {self._metric_text(trial.trial_id)}{first}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        t = self._entry(trial)
        if t.get("steps", 0) < self.max_steps:
            t["status"] = "stopped"
            by = " by ASHA" if self.scheduler == "asha" else ""
            self._say(f"trial {trial.trial_id} stopped early{by} at step {t.get('steps', 0)}/{self.max_steps}"
                      f"  {self._metric_text(trial.trial_id)}")
        else:
            t["status"] = "finished"
            self._say(f"trial {trial.trial_id} finished  {self._metric_text(trial.trial_id)}")
        self.live.pop(trial.trial_id, None)
        self._save()

    def on_trial_error(self, iteration, trials, trial, **info):
        t = self._entry(trial)
        t["status"] = "failed"
        text = ""
        try:  # Tune writes the trace locally first (trial.error_file), and to storage later
            path = trial.error_file
            text = open(path).read() if path and os.path.exists(path) else str(trial.get_error() or "")
        except Exception:
            pass
        reason = error_reason(text)
        t["error"] = reason
        self.live.pop(trial.trial_id, None)
        self._say(f"trial {trial.trial_id} failed at step {t.get('steps', 0)}: {reason or 'see the logs'}")
        self._save()

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last_table >= self.table_every_s:
            self.last_table = time.time()
            print(self.table(trials), file=sys.stderr, flush=True)

    def on_experiment_end(self, trials, **info):
        self._save()

    def table(self, trials) -> str:
        rows = []
        counts: dict[str, int] = {}
        for tr in trials:
            t = self.ledger["trials"].get(tr.trial_id) or {"status": "pending"}
            status = t["status"] if tr.trial_id in self.ledger["trials"] else "pending"
            counts[status] = counts.get(status, 0) + 1
            rows.append({"trial_id": tr.trial_id, "config": {k: _plain(tr.config.get(k)) for k in self.keys},
                         "status": status, "steps": t.get("steps", 0), "best": t.get("best"),
                         "last": t.get("last"), "checkpoint": None})
        sign = -1.0 if self.mode == "max" else 1.0
        rows.sort(key=lambda r: (r["best"] is None, sign * (r["best"] or 0.0), r["trial_id"]))
        done_steps = sum(r["steps"] for r in rows)
        left = sum(self.max_steps - r["steps"] for r in rows if r["status"] in ("pending", "running"))
        left += self.max_steps * max(0, self.total - len(rows))
        el = time.time() - self.t0
        eta = ""
        if self.steps_here and left:
            s = int(left * el / self.steps_here)
            eta = f", at most ~{s // 60}m{s % 60:02d}s left (if no more trials stop early)"
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        head = (f"-- {summary} of {max(self.total, len(rows))} trials; {done_steps} steps done in "
                f"{int(el) // 60}m{int(el) % 60:02d}s{eta}")
        return head + "\n" + format_table({"trials": rows, "space": {k: {} for k in self.keys},
                                           "metric": self.metric, "max_steps": self.max_steps},
                                          checkpoints=False)


# ----------------------------------------------------------------------------------------------------------------
# The driver


def _raylet_messages_to_log() -> None:
    """The raylet's warnings to the driver ("N worker processes have been started", ...) into the driver's log
    (:func:`mirasol_ray.launch.console.quiet_libraries` takes the library loggers): Ray prints them from a
    background thread straight to stdout (``ray._private.worker.listen_error_messages``)."""

    raylet = logging.getLogger("ray.raylet_messages")

    def to_log(data, ignore_prefix=False):
        for line in data.get("lines", []):
            raylet.warning("(%s) %s", data.get("pid"), line)

    ray._private.worker.print_to_stdstream = to_log


def _per_trial(cfg: Config) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds: its workers, and what its data pipeline may take."""
    data = cfg.scaling.data_cpu_limit or (cfg.data.decode_cpus + 0.25)  # a decode task and a read task at once
    cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + data
    return cpus, float(cfg.scaling.num_workers if cfg.scaling.use_gpu else 0)


def _concurrency(cfg: Config) -> int:
    res = ray.cluster_resources()
    cpus, gpus = _per_trial(cfg)
    k = int(res.get("CPU", 1) // cpus)
    if gpus:
        k = min(k, int(res.get("GPU", 0) // gpus))
    return max(1, k)


def prepare(config: str, space: str, overrides: list[str] | None, *, metric: str = "", mode: str = "",
            storage_url: str = "", name: str = "", scheduler: str = "asha", num_samples: int = 1,
            grace_period: int = 0, reduction_factor: float = 2.0) -> dict[str, Any]:
    """Check everything a sweep needs before anything starts, and return its spec (what ``sweep.json`` holds)."""

    cfg = load_prepared(config, overrides)  # configures this process's storage from the config
    check_inputs(cfg)
    metric = metric or main_metric(cfg)
    check_metric(metric)
    mode = mode or default_mode(metric)
    if mode not in ("min", "max"):
        raise ValueError(f"--mode must be min or max, got {mode!r}")
    if scheduler not in ("asha", "fifo"):
        raise ValueError(f"--scheduler must be asha or fifo, got {scheduler!r}")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if metric.startswith("val/"):
        if not cfg.data.val or cfg.train.eval_every <= 0:
            raise ValueError(f"the metric {metric} needs validation during training: set data.val=URL and "
                             "train.eval_every=STEPS (or pass --metric loss)")
        cfg.train.checkpoint_every = cfg.train.eval_every  # every evaluation reported with its checkpoint
    elif cfg.train.checkpoint_every % cfg.train.log_every:
        raise ValueError(f"the metric {metric} is reported at checkpoints: train.checkpoint_every "
                         f"({cfg.train.checkpoint_every}) must be a multiple of train.log_every "
                         f"({cfg.train.log_every})")
    base = cfg.to_dict()
    params = read_space(space, base)
    first = min(cfg.train.checkpoint_every, cfg.train.steps)
    grace = grace_period or first
    if scheduler == "asha" and not 0 < grace <= cfg.train.steps:
        raise ValueError(f"--grace-period must be in 1..train.steps ({cfg.train.steps}), got {grace}")
    root = storage_url or cfg.storage.root
    if not storage.is_remote(root) and not root.startswith("file://"):
        root = os.path.abspath(root)
    base_name = os.path.splitext(os.path.basename(config))[0]
    name = name or f"sweep-{base_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return {
        "name": name, "root": root, "uri": storage.join(root, name), "config_name": config,
        "overrides": list(overrides or []), "config": base, "storage": storage.settings(),
        "space": {p.key: p.to_json() for p in params}, "metric": metric, "mode": mode, "scheduler": scheduler,
        "num_samples": num_samples, "grace_period": grace, "reduction_factor": reduction_factor,
        "max_steps": cfg.train.steps, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "trials": {},
    }


def sweep_header(spec: dict[str, Any], cfg, k: int, resume: bool, driver_log: str, logs: str) -> str:
    """The lines a sweep starts with: where it goes, how many trials (and how many at once), what each costs and
    where the logs are."""
    cpus, gpus = _per_trial(cfg)
    keys = list(spec["space"])
    return (f"sweep {spec['name']} -> {spec['uri']}\n  {'resuming' if resume else 'starting'} "
            f"{spec['num_samples']} trial(s), up to {k} at once: {len(keys)} swept key(s) ({', '.join(keys)}), "
            f"metric {spec['metric']} ({spec['mode']}), scheduler {spec['scheduler']} (a trial: "
            f"{cfg.scaling.num_workers} worker(s), ~{cpus:.2f} CPUs{f', {gpus:g} GPUs' if gpus else ''}; "
            f"{cfg.train.steps} steps, reporting and checkpointing every {cfg.train.checkpoint_every})\n"
            f"  logs: this driver's {driver_log}; the trials' (Ray's workers) {logs}")


def _fit(spec: dict[str, Any], resume: bool, *, num_cpus: int | None, max_concurrent: int, table_every_s: float,
         driver_log: str) -> tuple[float, SweepProgress]:
    """Start (or restore) the Tune experiment of the sweep and run it to its end; (seconds, the progress callback)."""

    uri = spec["uri"]
    cfg = from_dict(spec["config"])
    fs, root_path = storage.pyarrow_fs(spec["root"])
    remote = storage.is_remote(spec["root"])
    # The dashboard stays on (127.0.0.1): Ray Train's cleaner of a stopped trial's placement group asks the State
    # API whether the trial's controller is still alive (ray#54305); without it, freed workers never come back.
    console.say(f"sweep {spec['name']}: starting Ray ({os.environ.get('RAY_ADDRESS') or 'a local instance'})...")
    started = ensure_ray(num_cpus, dashboard=True)
    try:
        try:
            logs = ray._private.worker._global_node.get_logs_dir_path()
        except Exception:  # a client connection has no local session
            logs = "the cluster's Ray log folder"
        k = max_concurrent or _concurrency(cfg)
        keys = list(spec["space"])
        print(sweep_header(spec, cfg, k, resume, driver_log, logs), file=sys.stderr, flush=True)
        if not resume:
            _ledger_write(uri, {k2: v for k2, v in spec.items() if k2 not in ("trials_uri",)})
        progress = SweepProgress(uri, keys, spec["metric"], spec["mode"], spec["max_steps"],
                                 spec["scheduler"], table_every_s)
        resources = {"CPU": TRIAL_DRIVER_CPUS}
        tune_path = root_path.rstrip("/") + "/" + spec["name"] if remote else os.path.join(root_path, spec["name"])
        if resume and tune.Tuner.can_restore(tune_path, storage_filesystem=fs if remote else None):
            tuner = tune.Tuner.restore(tune_path, trainable=trainable(spec, resources), resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=fs if remote else None)
        else:  # a new sweep, or one stopped before Tune first saved its state: start it (again)
            sched = None
            if spec["scheduler"] == "asha":
                sched = tune.schedulers.ASHAScheduler(time_attr="step", max_t=spec["max_steps"],
                                                      grace_period=spec["grace_period"],
                                                      reduction_factor=spec["reduction_factor"])
            space_domains = {key: Param(key, p["kind"], tuple(p["args"])).domain()
                             for key, p in spec["space"].items()}
            tuner = tune.Tuner(
                trainable(spec, resources),
                param_space=space_domains,
                tune_config=tune.TuneConfig(metric=spec["metric"], mode=spec["mode"], scheduler=sched,
                                            num_samples=spec["num_samples"], max_concurrent_trials=k,
                                            trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(name=spec["name"], storage_path=root_path,
                                          storage_filesystem=fs if remote else None, callbacks=[progress],
                                          verbose=0),
            )
        t0 = time.perf_counter()
        # Tune's own progress output off: the new engine prints its header whatever the verbosity, the old one
        # honours verbose=0; SweepProgress prints the lines
        old_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        try:
            tuner.fit()
        finally:
            if old_output is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = old_output
        elapsed = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    return elapsed, progress


def sweep_mode(exists: bool, uri: str = "", *, resume: bool = False, resume_or_start: bool = False) -> str:
    """``"resume"`` or ``"start"``: what to do with the sweep folder ``uri`` that ``exists`` (holds a ``sweep.json``)
    or not.

    Plain (neither flag): start, and refuse an existing sweep (a new sweep never overwrites one). ``resume``:
    continue, and refuse a sweep that does not exist. ``resume_or_start``: continue the one that exists, else start
    it, which is what a job that may be submitted again needs (a retried or re-applied RayJob, ``ray job submit`` run
    twice): its first run starts the sweep, every later one continues it."""

    if resume and resume_or_start:
        raise ValueError("give --resume or --resume-or-start, not both")
    if resume_or_start:
        return "resume" if exists else "start"
    if resume:
        if not exists:
            raise FileNotFoundError(f"no sweep to resume at {uri} ({SWEEP_FILE} not found)")
        return "resume"
    if exists:
        raise ValueError(f"a sweep already exists at {uri}: --resume it (or --resume-or-start), or pick another "
                         "--name")
    return "start"


def check_same_sweep(existing: dict[str, Any], asked: dict[str, Any]) -> None:
    """With ``--resume-or-start``, the sweep found must be the one the command describes (the same space, metric,
    mode and scheduler): a different one under the same ``--name`` is a mistake, not something to continue."""

    for key in ("space", "metric", "mode", "scheduler"):
        if json.loads(json.dumps(existing.get(key))) != json.loads(json.dumps(asked.get(key))):
            raise ValueError(f"the sweep at {asked['uri']} was started with another {key} "
                             f"({json.dumps(existing.get(key))}, this command: {json.dumps(asked.get(key))}): pick "
                             "another --name, or --resume it as it is")


def run_sweep(config: str = "", space: str = "", overrides: list[str] | None = None, *, num_samples: int = 1,
              scheduler: str = "asha", max_concurrent: int = 0, metric: str = "", mode: str = "",
              storage_url: str = "", name: str = "", resume: bool = False, num_cpus: int | None = None,
              grace_period: int = 0, reduction_factor: float = 2.0, table_every_s: float = 60.0,
              resume_or_start: bool = False) -> dict[str, Any]:
    """Run (or with ``resume`` continue) a sweep; returns what ``mirasol results`` reads back from its folder.
    ``resume_or_start``: continue the sweep ``name`` if it exists, else start it (:func:`sweep_mode`)."""

    asked = None
    if resume_or_start:
        sweep_mode(False, resume=resume, resume_or_start=True)  # both flags: an error
        if not name:
            raise ValueError("--resume-or-start needs --name: a job submitted again finds its sweep by name")
        if not (config and space):
            raise ValueError("--resume-or-start needs --config and --space (to start the sweep if it does not "
                             "exist yet)")
        asked = prepare(config, space, overrides, metric=metric, mode=mode, storage_url=storage_url, name=name,
                        scheduler=scheduler, num_samples=num_samples, grace_period=grace_period,
                        reduction_factor=reduction_factor)
        exists = storage.exists(storage.join(asked["uri"], SWEEP_FILE))
        resume = sweep_mode(exists, asked["uri"], resume_or_start=True) == "resume"
        print(f"sweep {name}: {'continuing the sweep' if resume else 'no sweep yet, starting one'} at {asked['uri']}",
              file=sys.stderr, flush=True)

    if resume:
        if not name:
            raise ValueError("--resume needs the sweep's --name (and its --storage)")
        cfg = load_config(config, overrides) if config else None
        if cfg is not None:
            storage.configure(cfg.storage.endpoint_url)
        root = storage_url or (cfg.storage.root if cfg is not None else "runs")
        if not storage.is_remote(root) and not root.startswith("file://"):
            root = os.path.abspath(root)
        uri = storage.join(root, name)
        sweep_mode(storage.exists(storage.join(uri, SWEEP_FILE)), uri, resume=True)  # refuses a missing one
        spec = json.loads(storage.read_text(storage.join(uri, SWEEP_FILE)))
        if asked is not None:
            check_same_sweep(spec, asked)
        # where it is now, read with this process's storage settings (the trials get the same)
        spec["root"], spec["uri"], spec["storage"] = root, uri, storage.settings()
    else:
        spec = asked or prepare(config, space, overrides, metric=metric, mode=mode, storage_url=storage_url,
                                name=name, scheduler=scheduler, num_samples=num_samples, grace_period=grace_period,
                                reduction_factor=reduction_factor)
        uri = spec["uri"]
        sweep_mode(storage.exists(storage.join(uri, SWEEP_FILE)), uri)  # refuses an existing one
    spec["trials_uri"] = storage.join(uri, TRIALS_DIR)

    with RunLease(uri), console.quiet_libraries() as logs:  # one live driver per sweep folder
        driver_log = os.path.join(tempfile.gettempdir(), "mirasol", f"{spec['name']}-driver.log")
        logs.attach(driver_log)
        _raylet_messages_to_log()
        elapsed, progress = _fit(spec, resume, num_cpus=num_cpus, max_concurrent=max_concurrent,
                                 table_every_s=table_every_s, driver_log=driver_log)
    res = read_results(uri)
    unfinished = [t["trial_id"] for t in res["trials"] if t["status"] in ("running", "pending")]
    unfinished += ["not started"] * max(0, getattr(progress, "total", 0) - len(res["trials"]))
    print(f"\nsweep {'stopped' if unfinished else 'done'} after {elapsed / 60:.1f} min")
    print_results({**res, "plots": []})
    print(f"plots and JSON: mirasol results {uri}")
    if unfinished:
        raise KeyboardInterrupt(f"sweep {spec['name']} stopped with {len(unfinished)} trial(s) unfinished; the same "
                                "command with --resume (or --resume-or-start) continues it")
    return res
