"""Ray Data: WebDataset shards -> decoded, fixed-shape snippet rows, streamed to Ray Train workers.

A tolerant WebDataset reader (raw member bytes, no unsafe deserialisation) -> ``map_batches(decode)`` on fractional
CPUs -> rows per :mod:`mirasol_ray.data.schema`. A bad sample is skipped and counted by reason in a small named
actor (:class:`SkipCounter`), which the driver, ``mirasol data inspect`` and the training metrics read; so is a bad
shard (not a tar, truncated, unreadable), by file name: one bad file never stops an epoch.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import asdict
from typing import Any

import numpy as np

from mirasol_ray import storage
from mirasol_ray.config import DataConfig
from mirasol_ray.data.schema import TENSOR_COLUMNS, row_spec

# --------------------------------------------------------------------------------------------------------------
# Finding shards


def _expand_braces(pattern: str) -> list[str]:
    from braceexpand import braceexpand  # a webdataset dependency

    return list(braceexpand(pattern))


def expand_shard_urls(url: str, endpoint_url: str = "") -> list[str]:
    """A folder, a glob, a brace list (``shard-{000..009}.tar``) or a single tar, local or ``s3://``, to the
    sorted list of tar paths (no scheme, as the pyarrow filesystem wants them). Raises FileNotFoundError naming
    the URL when nothing matches."""
    storage.check_bucket(url, endpoint_url)  # a missing bucket is named as such, not as "no shards"
    fs = storage.fsspec_fs(url, endpoint_url)
    found: list[str] = []
    for pattern in _expand_braces(url):
        path = storage.strip_scheme(pattern)
        if any(c in path for c in "*?["):
            found += [p for p in fs.glob(path) if p.endswith(".tar")]
        elif path.endswith(".tar"):
            if not fs.exists(path):
                raise FileNotFoundError(f"shard not found: {pattern}")
            found.append(path)
        elif fs.isdir(path):
            tars = [p for p in fs.find(path) if p.endswith(".tar")]
            top = [p for p in tars if posixpath.dirname(p.rstrip("/")) == path.rstrip("/")]
            found += top or tars
        else:
            raise FileNotFoundError(f"no shards at {pattern}")
    if not found:
        raise FileNotFoundError(f"no .tar shards found at {url}")
    # fsspec's s3 paths come back without a leading slash, as pyarrow wants them.
    return sorted(dict.fromkeys(p if not storage.is_s3(url) else p.lstrip("/") for p in found))


def find_manifest(url: str, endpoint_url: str = "") -> dict[str, Any] | None:
    """The ``manifest.json`` of the shard folder at ``url`` (or of its parent, for split subfolders)."""
    base = url
    for ch in "*?[{":
        if ch in base:
            base = base[: base.index(ch)]
    base = base.rstrip("/")
    if base.endswith(".tar"):
        base = posixpath.dirname(base)
    for cand in (base, posixpath.dirname(base)):
        if not cand:
            continue
        uri = storage.join(cand, "manifest.json")
        try:
            if storage.exists(uri, endpoint_url):
                return json.loads(storage.read_text(uri, endpoint_url))
        except (OSError, ValueError):
            continue
    return None


# --------------------------------------------------------------------------------------------------------------
# Skip counting

SHARD_REASONS = {
    "not_a_tar": "the shard file is not a tar archive (or is empty)",
    "truncated_shard": "the tar ends inside a member or header: the samples before the cut are kept",
    "unreadable_shard": "the shard cannot be opened or read (permissions, vanished file, storage error)",
    "bad_shard": "the tar breaks the WebDataset layout (e.g. a sample's members not adjacent): the message says how",
}
"""Reasons a whole shard (counted once, by file name) is skipped; sample-level ones are ``rows.SKIP_REASONS``."""

_MAX_EXAMPLES = 5


def _counter_cls():
    import ray

    @ray.remote(num_cpus=0)
    class SkipCounter:
        """Counts decoded samples, and skipped samples and shards by reason, across all read and decode tasks; also
        holds the training progress rank 0 reports, which the driver draws (workers' output stays in log files)."""

        def __init__(self):
            self.decoded = 0
            self.rows = 0
            self.skipped: dict[str, int] = {}
            self.examples: dict[str, list[str]] = {}
            self.progress: dict[str, Any] = {}
            self.events: list[str] = []

        def report_step(self, progress: dict[str, Any] | None, event: str = "") -> None:
            if progress is not None:  # None: an event alone
                self.progress = progress
            if event:
                self.events.append(event)

        def status(self, events_seen: int = 0) -> dict[str, Any]:
            return {"progress": dict(self.progress), "events": self.events[events_seen:],
                    "decoded": self.decoded, "skipped": dict(self.skipped)}

        def add(self, decoded: int, rows: int, skipped: dict[str, int], examples: dict[str, list[str]]) -> None:
            self.decoded += decoded
            self.rows += rows
            for k, v in skipped.items():
                self.skipped[k] = self.skipped.get(k, 0) + v
            for k, v in examples.items():
                self.examples.setdefault(k, [])
                self.examples[k] = (self.examples[k] + v)[:_MAX_EXAMPLES]

        def snapshot(self) -> dict[str, Any]:
            return {"decoded": self.decoded, "rows": self.rows, "skipped": dict(self.skipped),
                    "examples": dict(self.examples)}

    return SkipCounter


def make_skip_counter(name: str | None = None):
    """A named skip-counter actor (lives as long as this driver); pass its name to :func:`decoded_dataset`."""
    name = name or f"mirasol-skips-{uuid.uuid4().hex[:8]}"
    return _counter_cls().options(name=name, get_if_exists=True).remote(), name


def read_skips(counter) -> dict[str, Any]:
    import ray

    return ray.get(counter.snapshot.remote())


def _count(counter_name: str, decoded: int, rows: int, skipped: dict[str, int],
           examples: dict[str, list[str]]) -> None:
    """Add to the counter and wait until it holds the counts, so that whoever has seen this batch (or the end of
    the data) reads them in a snapshot: a fire-and-forget call could still be in flight when a run that formed no
    batch read the counter for its error line ("skipped: none")."""
    import ray

    try:
        actor = ray.get_actor(counter_name)
    except ValueError:  # no counter (e.g. a bare run of the function): nothing to report to
        return
    try:
        ray.get(actor.add.remote(decoded, rows, skipped, examples), timeout=120)
    except Exception:  # the driver (and its counter) is gone, or the cluster is stalled: counts are informative
        pass


def describe_skips(snap: dict[str, Any]) -> str:
    """``decoded 0 clips; skipped: corrupt 3 (a, b), not_a_tar 1 (x.tar: invalid header)``: one line from a
    :class:`SkipCounter` snapshot."""
    parts = []
    for reason, n in sorted(snap.get("skipped", {}).items()):
        ex = ", ".join(snap.get("examples", {}).get(reason, [])[:2])
        parts.append(f"{reason} {n}" + (f" (e.g. {ex})" if ex else ""))
    return f"decoded {snap.get('decoded', 0)} clips; skipped: " + ("; ".join(parts) or "none")


def shards_failed(snap: dict[str, Any]) -> int:
    """How many shards a snapshot counts as skipped whole."""
    return sum(n for reason, n in snap.get("skipped", {}).items() if reason in SHARD_REASONS)


def samples_seen(snap: dict[str, Any]) -> int:
    """Samples read (decoded or skipped), not counting shards skipped whole."""
    return snap["decoded"] + sum(n for r, n in snap["skipped"].items() if r not in SHARD_REASONS)


# --------------------------------------------------------------------------------------------------------------
# Reading shards


def _webdataset_source(paths: list[str], *, filesystem, shuffle, counter_name: str):
    """A WebDataset datasource (Ray's ``read_webdataset`` reader: raw member bytes, files shuffled and split into
    read tasks the same way) that skips a shard it cannot read, counting it by name, instead of failing the task:
    Ray's own raises inside the read task, and one bad file out of thousands then ends the whole dataset.

    Why a datasource and not a pre-check of every shard: the read stays one streaming pass (a shard is opened
    once, by the task that reads it), a truncated tar keeps the samples before the cut, and a shard that breaks
    mid-read on object storage is caught where it breaks. Transient storage errors (Ray's ``retried_io_errors``)
    are still raised, so Ray's read loop reopens the file and retries as it does for ``read_webdataset``.
    """
    import tarfile

    import pandas as pd
    from ray.data._internal.datasource.webdataset_datasource import (
        WEBDATASET_READ_CHUNK_SIZE,
        WebDatasetDatasource,
        _group_by_keys,
        _tar_file_iterator,
    )
    from ray.data._internal.util import matches_error
    from ray.data.datasource.file_meta_provider import DefaultFileMetadataProvider

    from mirasol_ray.data.decode import cut_message

    class TolerantWebDataset(WebDatasetDatasource):
        def __init__(self, *args, counter_name: str, **kwargs):
            super().__init__(*args, **kwargs)
            self._counter_name = counter_name
            self._unopened: dict[str, str] = {}

        def _skip(self, path: str, reason: str, error: BaseException) -> None:
            _count(self._counter_name, 0, 0, {reason: 1},
                   {reason: [cut_message(f"{path}: {error}", 300)]})

        def _open_input_source(self, filesystem, path: str, **open_args):
            import pyarrow as pa

            try:
                return super()._open_input_source(filesystem, path, **open_args)
            except Exception as e:  # counted once the read of this path begins (below)
                self._unopened[path] = cut_message(f"{type(e).__name__}: {e}", 200)
                return pa.BufferReader(b"")

        def _read_stream(self, stream, path: str):
            if path in self._unopened:
                self._skip(path, "unreadable_shard", OSError(self._unopened.pop(path)))
                return
            members, failure = 0, None
            rows: list[dict[str, Any]] = []

            def until_failure(files):
                # ends the member stream at a failure, so the sample before the cut is still grouped and kept
                nonlocal members, failure
                try:
                    for f in files:
                        members += 1
                        yield f
                except Exception as e:
                    failure = e

            try:
                for sample in _group_by_keys(until_failure(_tar_file_iterator(stream)), meta={"__url__": path}):
                    rows.append(sample)
                    if len(rows) >= WEBDATASET_READ_CHUNK_SIZE:
                        yield pd.DataFrame.from_records(rows)
                        rows = []
            except Exception as e:  # the layout itself is wrong (members of a sample not adjacent, duplicates)
                failure = failure or e
            if failure is not None:
                message = str(failure)
                if any(matches_error(p, message) for p in self._data_context.retried_io_errors or []):
                    raise failure  # transient: Ray's read loop reopens the file and replays it
                if isinstance(failure, tarfile.ReadError) and ("unexpected end" in message or "truncated" in message):
                    reason = "truncated_shard"
                elif isinstance(failure, tarfile.ReadError) and not members:
                    reason = "not_a_tar"
                elif isinstance(failure, OSError):
                    reason = "unreadable_shard"
                else:
                    reason = "bad_shard"
                self._skip(path, reason, failure)
            if rows:
                yield pd.DataFrame.from_records(rows)

    source = TolerantWebDataset(paths, decoder=None, filesystem=filesystem, shuffle=shuffle,
                                meta_provider=DefaultFileMetadataProvider(), file_extensions=["tar"],
                                ignore_missing_paths=True, counter_name=counter_name)
    gone = sorted(set(paths) - set(source._paths()))  # listed, then gone (or a dangling link) by the time of reading
    if gone:
        _count(counter_name, 0, 0, {"unreadable_shard": len(gone)},
               {"unreadable_shard": [f"{p}: not found" for p in gone[:_MAX_EXAMPLES]]})
    return source


# --------------------------------------------------------------------------------------------------------------
# Decode stage


def empty_batch(cfg: DataConfig) -> dict[str, np.ndarray]:
    out = {k: np.zeros((0, *shape), dtype=dt) for k, (shape, dt) in row_spec(cfg).items()}
    out["key"] = np.zeros((0,), dtype=object)
    return out


def stack_rows(rows: list[dict[str, Any]], cfg: DataConfig) -> dict[str, np.ndarray]:
    if not rows:
        return empty_batch(cfg)
    out = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in TENSOR_COLUMNS}
    out["key"] = np.array([r["key"] for r in rows], dtype=object)
    return out


def _column_value(batch: dict[str, Any], col: str, i: int) -> Any:
    v = batch[col][i]
    return v if isinstance(v, (bytes, dict, str)) else None  # NaN/None: member absent (FIELD_NOTES)


def decode_batch(batch: dict[str, np.ndarray], *, data_cfg: dict[str, Any], train: bool,
                 label_set: list[str] | None, counter_name: str):
    """``map_batches`` function: a batch of raw WebDataset samples -> fixed-shape rows (yielded; nothing when every
    sample of the batch is skipped: an empty batch has no shape Arrow can store its tensor columns in).

    Only plain values come in (a config dict, the label set, the counter's name): no closures, no objects.
    """
    import torch

    from mirasol_ray.data.rows import decode_sample_safe

    cfg = DataConfig(**data_cfg)
    # One intra-op thread per decode task: the task holds a fraction of a CPU, and torch's default pool (one
    # thread per core) makes the log-mel step crawl when several tasks share the cores.
    torch.set_num_threads(max(1, int(cfg.decode_cpus)))
    rng = np.random.default_rng() if train else np.random.default_rng(cfg.seed)
    keys = batch["__key__"]
    rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    decoded = 0
    for i in range(len(keys)):
        sample = {"__key__": str(keys[i])}
        for col in batch:
            if col not in ("__key__", "__url__"):
                v = _column_value(batch, col, i)
                if v is not None:
                    sample[col] = v
        out, reason, detail = decode_sample_safe(sample, cfg, train=train, rng=rng, label_set=label_set)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            # an unexpected error keeps its (cut) message: the reason alone would not say what to fix
            examples.setdefault(reason, []).append(
                f"{sample['__key__']}: {detail}" if reason == "error" and detail else sample["__key__"])
            continue
        decoded += 1
        rows.extend(out)
    _count(counter_name, decoded, len(rows), skipped, examples)
    if rows:
        yield stack_rows(rows, cfg)


def decoded_dataset(url: str, cfg: DataConfig, *, train: bool, counter_name: str, label_set: list[str] | None = None,
                    endpoint_url: str = "", limit: int = 0, read_cpus: float = 0.25):
    """The Ray Data pipeline: shards at ``url`` -> rows per :mod:`mirasol_ray.data.schema`, bad shards and samples
    skipped and counted in the counter named ``counter_name``.

    Training shuffles the file order (seeded by ``cfg.seed``); decode tasks reserve ``cfg.decode_cpus`` CPUs
    each, so Train workers are never starved on small machines (FIELD_NOTES: the silent-hang trap).
    """
    import ray

    paths = expand_shard_urls(url, endpoint_url)
    fs, _ = storage.pyarrow_fs(url, endpoint_url)
    if label_set is None:
        manifest = find_manifest(url, endpoint_url) or {}
        label_set = manifest.get("label_set")
    shuffle = None
    if train and cfg.shuffle_files:
        from ray.data import FileShuffleConfig

        shuffle = FileShuffleConfig(seed=cfg.seed)
    ds = ray.data.read_datasource(_webdataset_source(paths, filesystem=fs, shuffle=shuffle, counter_name=counter_name),
                                  num_cpus=read_cpus)
    if limit:
        ds = ds.limit(limit)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"data_cfg": asdict(cfg), "train": train, "label_set": label_set, "counter_name": counter_name},
        batch_size=cfg.decode_batch_size,
        batch_format="numpy",
        num_cpus=cfg.decode_cpus,
        zero_copy_batch=True,
    )


# --------------------------------------------------------------------------------------------------------------
# Handing batches to Train workers


def _writable(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A numpy batch of rows -> torch tensors with the schema's dtypes (``key`` stays a list of str)."""
    import torch

    # Ray hands out read-only views of its object store; torch wants memory it may write, so such arrays are copied
    # (one memcpy of the batch) rather than wrapped
    out: dict[str, Any] = {k: torch.from_numpy(_writable(batch[k])) for k in TENSOR_COLUMNS}
    out["key"] = [str(k) for k in batch["key"]]
    return out


def iter_worker_batches(shard, batch_size: int, *, prefetch_batches: int = 2, local_shuffle_buffer_size: int = 0,
                        drop_last: bool = False):
    """Batches of a Train worker's dataset shard (``ray.train.get_dataset_shard(name)``) as torch dicts.

    Tensors stay on the CPU (video uint8) and are moved by the step, so the host->device copy carries 1 byte a
    pixel instead of 4."""
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches,
                                    drop_last=drop_last, local_shuffle_buffer_size=local_shuffle_buffer_size or None):
        yield to_torch(batch)


def reshuffle_blocks_each_epoch(ds, seed: int):
    """``ds`` (materialised) with its blocks in a new order on every pass: the permutations come from ``seed`` and
    the pass number (the blocks themselves are in task-completion order, which can vary from run to run). A cached
    dataset otherwise replays one order every epoch, clip by clip (the rows of a clip are adjacent): a worker's
    local shuffle buffer then only mixes neighbours, the same ones each epoch."""
    import ray.data

    return ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))


def train_data_config(data_cpu_limit: float = 0.0):
    """Ray Train's DataConfig: split ``train`` between workers (each sample once per epoch), leave others whole.

    ``data_cpu_limit`` caps the CPUs Ray Data may take while training (0: Ray's default, all CPUs not held by the
    workers)."""
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources

    opts = ExecutionOptions()
    if data_cpu_limit:
        opts.resource_limits = ExecutionResources(cpu=data_cpu_limit)
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options=opts)
