"""Ray Data: shards -> decoded, fixed-shape clip rows, streamed to Ray Train workers.

The reader goes by the sample index (:mod:`mirasol_ray.data.index`): each sample is a byte range of its tar, so
the pipeline is a read of the ids of the samples wanted (:class:`ItemIds <_datasource_cls>`), in blocks of
:func:`block_sizes`, fused with a ``map_batches`` that fetches each block's samples (one ranged read each) and
decodes them (:func:`~mirasol_ray.data.rows.decode_sample_safe`) on fractional CPUs: one Ray task per block.
Blocks are up to ``data.decode_batch_size`` clips, not a whole tar (``read_webdataset`` makes one block per tar
and a DataFrame per sample: ray#65350), smaller at a pass's start and end, so every CPU has work from the first
second and the tail of an epoch is short, while the per-task cost is paid once per block in the steady state.

Two orders:

- :func:`decoded_dataset`: the dataset's canonical order (shards in order, samples in tar order). Evaluation,
  ``mirasol data inspect``, the benchmarks and ``data.cache`` read this way.
- :func:`train_batches`: training. Each Train worker builds its own pipeline for its share of each epoch's
  stream of positions (:class:`~mirasol_ray.data.index.ReadPosition`), with the order preserved, so what a worker
  sees is a pure function of (seed, epoch, number of workers, position) and a stopped run resumes exactly. With
  ``data.cache`` the rows come from the object store instead of the decoder, by the same positions.

A bad sample is skipped and counted by reason in a small named actor (:class:`SkipCounter`), which the driver,
``mirasol data inspect`` and the training metrics read; so is a bad shard (not a tar, truncated, unreadable), by
file name, when the index is built: one bad file never stops an epoch, and a truncated tar keeps the samples
before the cut.

The same actor counts the texts longer than ``data.max_prompt_len`` / ``data.max_target_len`` tokens (cut to
fit, the row kept), which the driver turns into one warning line (:func:`~mirasol_ray.data.rows.truncation_warning`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import uuid
from dataclasses import asdict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train
import torch
from ray.data import ExecutionOptions, ExecutionResources
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mirasol_ray import storage
from mirasol_ray.config import DataConfig
from mirasol_ray.data.decode import cut_message
from mirasol_ray.data.index import (
    SHARD_REASONS,
    ReadPosition,
    SampleIndex,
    StreamOrder,
    build_index,
    find_manifest,
    read_samples,
    resolve_shards,
    sample_rng,
)
from mirasol_ray.data.rows import count_lengths, decode_sample_safe
from mirasol_ray.data.schema import TENSOR_COLUMNS, row_spec

__all__ = ["expand_shard_urls", "find_manifest", "sample_index", "decoded_dataset", "train_batches",
           "make_skip_counter", "read_skips", "describe_skips", "shards_failed", "samples_seen", "SHARD_REASONS",
           "to_torch", "stack_rows", "split_by_set"]


def expand_shard_urls(url: str) -> list[str]:
    """The shard paths of ``url`` (see :func:`~mirasol_ray.data.index.resolve_shards`)."""
    return resolve_shards(url).paths


def _apply(fn, x):
    return fn(x)


RAY_SCAN_MIN_SHARDS = 64
"""Shards to scan (no offsets in a manifest) from which :func:`sample_index` spreads the scans over Ray tasks;
fewer are scanned by threads of this process, which answers in a fraction of a second where Ray's first tasks of
a run wait seconds for worker processes to start and import (a scan is a few small reads per shard)."""


def _ray_map(fn, items: list) -> list:
    """``map`` on Ray tasks (a quarter CPU each) when Ray is up and there are at least
    :data:`RAY_SCAN_MIN_SHARDS` items; otherwise on up to 16 threads of this process, in order."""

    if ray.is_initialized() and len(items) >= RAY_SCAN_MIN_SHARDS:
        task = ray.remote(num_cpus=0.25)(_apply)
        return ray.get([task.remote(fn, x) for x in items])
    if len(items) < 2:
        return list(map(fn, items))
    with concurrent.futures.ThreadPoolExecutor(min(16, len(items))) as pool:
        return list(pool.map(fn, items))


def sample_index(url: str) -> SampleIndex:
    """The sample index of the dataset at ``url``: from the manifest, or by scanning shards (in Ray tasks)."""
    return build_index(resolve_shards(url), map_fn=_ray_map)


# --------------------------------------------------------------------------------------------------------------
# Skip counting

_MAX_EXAMPLES = 5


def _counter_cls():
    @ray.remote(num_cpus=0)
    class SkipCounter:
        """Counts decoded samples, and skipped samples and shards by reason, across all read and decode tasks, and
        the texts cut to fit ``data.max_*_len`` (per kind, each sample once however many epochs read it: they are
        kept, so this is no skip); also holds the training progress rank 0 reports, which the driver draws
        (workers' output stays in log files)."""

        def __init__(self):
            self.decoded = 0
            self.rows = 0
            self.skipped: dict[str, int] = {}
            self.examples: dict[str, list[str]] = {}
            self.progress: dict[str, Any] = {}
            self.events: list[str] = []
            self.texts: dict[str, dict[str, int]] = {}
            self._counted: dict[str, bytearray] = {}  # per dataset URL: a bit per sample whose texts are counted

        def report_step(self, progress: dict[str, Any] | None, event: str = "") -> None:
            if progress is not None:  # None: an event alone
                self.progress = progress
            if event:
                self.events.append(event)

        def status(self, events_seen: int = 0) -> dict[str, Any]:
            return {"progress": dict(self.progress), "events": self.events[events_seen:],
                    "decoded": self.decoded, "skipped": dict(self.skipped)}

        def add(self, decoded: int, rows: int, skipped: dict[str, int], examples: dict[str, list[str]],
                texts: tuple[str, list[tuple[int, dict[str, dict[str, int]]]]] | None = None) -> None:
            if texts is not None:  # (url, [(sample, its count_lengths)]): each sample once, however often read
                url, per_sample = texts
                seen = self._counted.setdefault(url, bytearray())
                for sample, counts in per_sample:
                    byte, bit = divmod(sample, 8)
                    if byte >= len(seen):
                        seen.extend(bytes(max(byte + 1, 2 * len(seen)) - len(seen)))
                    if not seen[byte] >> bit & 1:
                        seen[byte] |= 1 << bit
                        _merge_lengths(self.texts, counts)
            self.decoded += decoded
            self.rows += rows
            for k, v in skipped.items():
                self.skipped[k] = self.skipped.get(k, 0) + v
            for k, v in examples.items():
                self.examples.setdefault(k, [])
                self.examples[k] = (self.examples[k] + v)[:_MAX_EXAMPLES]

        def snapshot(self) -> dict[str, Any]:
            return {"decoded": self.decoded, "rows": self.rows, "skipped": dict(self.skipped),
                    "examples": dict(self.examples), "truncation": {k: dict(v) for k, v in self.texts.items()}}

    return SkipCounter


def _merge_lengths(into: dict[str, dict[str, int]], counts: dict[str, dict[str, int]]) -> None:
    """Add :func:`~mirasol_ray.data.rows.count_lengths` output ``counts`` to ``into``, in place."""
    for kind, c in counts.items():
        t = into.setdefault(kind, {"texts": 0, "cut": 0, "longest": 0, "limit": c["limit"]})
        t["texts"] += c["texts"]
        t["cut"] += c["cut"]
        t["longest"] = max(t["longest"], c["longest"])
        t["limit"] = c["limit"]


def make_skip_counter(name: str | None = None):
    """A named skip-counter actor (lives as long as this driver); pass its name to :func:`decoded_dataset`."""

    name = name or f"mirasol-skips-{uuid.uuid4().hex[:8]}"
    # on the driver's node: losing another node of a cluster must not lose the count (nor fail the run)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return _counter_cls().options(name=name, get_if_exists=True, scheduling_strategy=here).remote(), name


def read_skips(counter) -> dict[str, Any]:
    return ray.get(counter.snapshot.remote())


def _count(counter_name: str, decoded: int, rows: int, skipped: dict[str, int],
           examples: dict[str, list[str]], texts: tuple[str, list] | None = None) -> None:
    """Add to the counter and wait until it holds the counts, so that whoever has seen this batch (or the end of
    the data) reads them in a snapshot: a fire-and-forget call could still be in flight when a run that formed no
    batch read the counter for its error line ("skipped: none")."""

    actor = counter_actor(counter_name)
    if actor is None:  # e.g. a bare run of the function: nothing to report to
        return
    try:
        ray.get(actor.add.remote(decoded, rows, skipped, examples, texts), timeout=120)
    except Exception:  # the driver (and its counter) is gone, or the cluster is stalled: counts are informative
        forget_counter(counter_name)


def counter_actor(counter_name: str) -> Any:
    """The :class:`SkipCounter` actor named ``counter_name`` (decode tasks count skips into it, training's rank 0
    reports its step and events to it), looked up in the GCS once per process, not once per block or step; None
    when there is none (outside Ray, where no Ray is started for it, or no such actor). The counter is
    informative: a caller whose call on it fails calls :func:`forget_counter` and carries on."""

    actor = _COUNTERS.get(counter_name)
    if actor is None:
        if not ray.is_initialized():
            return None
        try:
            actor = _COUNTERS[counter_name] = ray.get_actor(counter_name)
        except Exception:  # no such actor (ValueError), or the GCS unreachable
            return None
    return actor


def forget_counter(counter_name: str) -> None:
    """Drop the handle :func:`counter_actor` keeps: the next call looks the actor up afresh."""
    _COUNTERS.pop(counter_name, None)


_COUNTERS: dict[str, Any] = {}
"""Counter handles by name, per process (see :func:`counter_actor`)."""


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


def count_bad_shards(index: SampleIndex, counter_name: str) -> None:
    """Shards the index could not read whole go to the skip counter, once each, by reason
    (:data:`~mirasol_ray.data.index.SHARD_REASONS`), with their file names and what went wrong as examples."""
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for path, (reason, message) in sorted(index.bad_shards.items()):
        skipped[reason] = skipped.get(reason, 0) + 1
        examples.setdefault(reason, []).append(f"{path}: {message}")
    if skipped:
        _count(counter_name, 0, 0, skipped, {k: v[:_MAX_EXAMPLES] for k, v in examples.items()})


# --------------------------------------------------------------------------------------------------------------
# Decode stage


def empty_batch(cfg: DataConfig) -> dict[str, np.ndarray]:
    out = {k: np.zeros((0, *shape), dtype=dt) for k, (shape, dt) in row_spec(cfg).items()}
    out["key"] = np.zeros((0,), dtype=object)
    out["pos"] = np.zeros((0,), dtype=np.int64)
    return out


def stack_rows(rows: list[dict[str, Any]], cfg: DataConfig, spans: bool = False) -> dict[str, np.ndarray]:
    """Rows -> one numpy batch (``pos``: the stream position a row came from, -1 if none; with ``spans`` also
    ``snippet_seconds`` [S, 2], each snippet's time span in the video, zeros where a row has none)."""
    if not rows:
        return empty_batch(cfg)
    out = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in TENSOR_COLUMNS}
    out["key"] = np.array([r["key"] for r in rows], dtype=object)
    out["pos"] = np.array([int(r.get("pos", -1)) for r in rows], dtype=np.int64)
    if spans:
        none = np.zeros((cfg.num_snippets, 2), np.float32)
        out["snippet_seconds"] = np.stack([np.asarray(r.get("snippet_seconds", none), np.float32) for r in rows])
    return out


def decode_items(batch: dict[str, np.ndarray], *, items: dict[str, np.ndarray], shards: list[str], url: str,
                 storage_settings: dict[str, str], data_cfg: dict[str, Any], train: bool,
                 label_set: list[str] | None, counter_name: str, spans: bool = False
                 ) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` function: the item ids of a block (``batch["id"]``) -> decoded rows (``spans``: with each
    snippet's time span, :func:`stack_rows`).

    ``items`` holds, per item: ``sample``, ``shard``, ``start``, ``end`` (where to read it), ``pos`` (its
    stream position, carried to the rows) and ``epoch`` (for the sample's random choices). Only plain values
    come in (arrays, a config dict, the counter's name, the :func:`mirasol_ray.storage.settings` of the process
    that built the dataset): no closures, no objects. The rows are yielded, nothing
    when every sample of the block is skipped (an empty batch has no shape Arrow can store its tensor columns in).
    """

    storage.configure(**storage_settings)  # this task's process reads the shards as the dataset's builder does
    cfg = DataConfig(**data_cfg)
    # One intra-op thread per decode task: the task holds a fraction of a CPU, and torch's default pool (one
    # thread per core) makes the log-mel step crawl when several tasks share the cores.
    torch.set_num_threads(max(1, int(cfg.decode_cpus)))
    ids = np.asarray(batch["id"], dtype=np.int64)
    refs = {k: items[k][ids] for k in ("shard", "start", "end")}
    samples = read_samples(url, shards, refs)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    texts: list[tuple[int, dict[str, dict[str, int]]]] = []  # (sample, its texts' truncation counts)
    decoded = 0
    for j, sample in enumerate(samples):
        i = int(ids[j])
        if isinstance(sample, Exception):
            reason, key = "unreadable", f"{shards[int(items['shard'][i])]}@{int(items['start'][i])}"
            detail = cut_message(f"{type(sample).__name__}: {sample}")
        else:
            key = str(sample.get("__key__", ""))
            rng = sample_rng(cfg.seed, int(items["epoch"][i]), key)
            out, reason, detail = decode_sample_safe(sample, cfg, train=train, rng=rng, label_set=label_set)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            # an unexpected error keeps its (cut) message: the reason alone would not say what to fix
            examples.setdefault(reason, []).append(
                f"{key}: {detail}" if reason in ("error", "unreadable") and detail else key)
            continue
        decoded += 1
        for row in out:
            row["pos"] = int(items["pos"][i])
        rows.extend(out)
        texts.append((int(items["sample"][i]), count_lengths((n for r in out for n in r["text_lengths"]), cfg)))
    _count(counter_name, decoded, len(rows), skipped, examples, (url, texts))
    if rows:
        yield stack_rows(rows, cfg, spans=spans)


class DecodeItems:
    """:func:`decode_items` as an actor-pool callable (``data.decode_actors``): the same function, in a process
    that stays up for the whole pass."""

    def __call__(self, batch: dict[str, np.ndarray], **kwargs) -> Iterator[dict[str, np.ndarray]]:
        return decode_items(batch, **kwargs)


def _id_block(lo: int, hi: int) -> list:
    return [pa.table({"id": np.arange(lo, hi, dtype=np.int64)})]


BLOCK_BYTES = 64 << 20
"""Decoded bytes per decode task that ``data.decode_batch_size=0`` aims at."""
MAX_BLOCK = 64
"""The most clips per decode task ``data.decode_batch_size=0`` picks. A task costs ~25 ms of CPU beyond its decode
and leaves its CPU idle 20-130 ms until Ray Data starts the next one (its scheduling loop polls task completions
every 0.1 s: docs/HISTORY.md, "The data path"), which at 16 clips a task was 6-14% of the wall clock of real 10 s clips and more
of small ones; at 64 it is a quarter of that, while the ramp of :func:`block_sizes` keeps a pass's first and last
blocks small."""


def decode_block(cfg: DataConfig) -> int:
    """Clips per decode task in the steady state: ``data.decode_batch_size``, or when 0 as many rows as fit in
    :data:`BLOCK_BYTES` (from the schema's shapes), between 1 and :data:`MAX_BLOCK`."""
    if cfg.decode_batch_size:
        return cfg.decode_batch_size
    row = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in row_spec(cfg).values())
    return int(min(MAX_BLOCK, max(1, BLOCK_BYTES // max(row, 1))))


def block_sizes(n: int, size: int) -> list[int]:
    """How many items each decode task takes, in order, for ``n`` items and blocks of ``size``
    (:func:`decode_block`): ``size`` in the middle, ramping up from ``size // 8`` at the start (2, 2, 4, 4,
    8, 8, 16 ... for 16) and down again at the end, so every CPU has work within the first clips' decode time and
    the epoch's last blocks end close together, while the per-task cost (a Ray task, its scheduling in the driver,
    a skip-counter call: ~25 ms of CPU in all on a 2-core machine, and the CPU's idle wait for the next task:
    docs/HISTORY.md, "The data path") is paid once per ``size`` clips in the steady state. Sums to ``n``."""
    size = max(1, size)
    ramp, step = [], max(1, size // 8)
    while step < size:
        ramp += [step, step]
        step *= 2
    head: list[int] = []
    left = n
    for b in ramp:  # each ramp block is taken at both ends, while the items last
        if left < 2 * b:
            break
        head.append(b)
        left -= 2 * b
    middle = [] if left == 0 else [len(part) for part in np.array_split(np.arange(left), math.ceil(left / size))]
    return head + middle + head[::-1]


def _datasource_cls():
    class ItemIds(Datasource):
        """The ids ``0..n-1`` in blocks of :func:`block_sizes`, each made by its own read task (nothing is put in
        the object store up front, whatever ``n``)."""

        def __init__(self, n: int, block: int):
            self.n = n
            self.bounds = np.cumsum([0, *block_sizes(n, block)]).tolist()

        def estimate_inmemory_data_size(self) -> int:
            return 8 * self.n

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
                           ) -> list:

            schema = pa.schema([("id", pa.int64())])
            return [ReadTask(functools.partial(_id_block, lo, hi),
                             BlockMetadata(num_rows=hi - lo, size_bytes=8 * (hi - lo), input_files=None,
                                           exec_stats=None),
                             schema=schema, per_task_row_limit=per_task_row_limit)
                    for lo, hi in zip(self.bounds[:-1], self.bounds[1:])]

    return ItemIds


def _item_ids(n: int, block: int):
    return _datasource_cls()(n, block)


METADATA_ENV = "RAY_DATA_METADATA_PREFETCH_ON_THREAD"
"""Ray Data's switch between fetching a finished block's metadata on a background thread (its default) and in
its scheduling loop (see :func:`_complete_tasks_inline`)."""


def _complete_tasks_inline() -> None:
    """Let Ray Data's executor in this process see a decode task finish in the scheduling-loop turn that sees its
    block, not one turn later.

    Ray Data 2.60 fetches each block's metadata on a background thread by default and counts the task as running,
    holding its CPU, until a later turn of the loop (which waits up to 0.1 s for task completions) has taken that
    metadata: measured on 2 CPUs, a decode worker sat idle 120-240 ms between two tasks, against 20-130 ms with
    the fetch inline (docs/HISTORY.md, "The data path"). Our blocks are few and their metadata small and local, so the inline
    fetch costs the loop nothing noticeable. Ray reads the switch from the environment once, at import; the executor
    reads its module copy whenever it starts a dataset, which is what is set here (in the process that runs the
    executor: the driver, or a Train worker). A value the user put in the environment is left alone."""

    if METADATA_ENV in os.environ:
        return
    try:
        from ray.data._internal.execution import metadata_fetcher
    except ImportError:  # another Ray version: its default stands
        return
    if hasattr(metadata_fetcher, "_PREFETCH_ON_THREAD"):
        metadata_fetcher._PREFETCH_ON_THREAD = False


DECODE_RESOURCE = "decode"
"""The custom resource that marks a cluster's decode nodes (``cluster/aws.yaml``, ``gcp.yaml``, the KubeRay
``decode`` groups declare it, one unit per vCPU). Where the cluster has it, every decode task asks for
``data.decode_cpus`` of it besides the CPUs, so decoding runs on those nodes only; where it has none (a laptop,
the local cluster, a cluster without decode nodes), decode tasks ask for CPUs alone and run wherever CPUs are free."""


def decode_resources(cfg: DataConfig, cluster: dict[str, float] | None = None) -> dict[str, float]:
    """The custom resources a decode task asks for: ``{"decode": data.decode_cpus}`` when the cluster
    (``cluster``, default ``ray.cluster_resources()``) has the ``decode`` resource, else none (CPUs only)."""
    if cluster is None:
        cluster = ray.cluster_resources() if ray.is_initialized() else {}
    if cluster.get(DECODE_RESOURCE, 0) > 0:
        return {DECODE_RESOURCE: float(cfg.decode_cpus)}
    return {}


def _items_dataset(index: SampleIndex, items: dict[str, np.ndarray], cfg: DataConfig, *, train: bool,
                   counter_name: str, label_set: list[str] | None, spans: bool = False):
    """Ray Data: the items (rows of ``items``) in blocks of :func:`block_sizes`, decoded."""

    _complete_tasks_inline()
    n = len(items["sample"])
    # The item ids come from a read of our own that reserves what a decode task reserves, so Ray Data fuses it with
    # the decode: one task per block. ``ray.data.range``'s read tasks reserve a whole CPU each and do not fuse with a
    # fractional-CPU map: every block cost two tasks, and where a Train worker or another trial held the rest of the
    # CPUs the read could never start (a sweep of 2 trials on 2 CPUs hung).
    # Read and decode ask for the same resources (the CPUs, and the decode nodes' resource where the cluster has
    # one: decode_resources), so they still fuse into one task.
    ids = _item_ids(n, decode_block(cfg))
    res = decode_resources(cfg) or None
    ds = ray.data.read_datasource(ids, num_cpus=cfg.decode_cpus, resources=res,
                                  override_num_blocks=max(1, len(ids.bounds) - 1))
    kwargs = {"items": items, "shards": index.shards, "url": index.url, "storage_settings": storage.settings(),
              "data_cfg": asdict(cfg), "train": train, "label_set": label_set, "counter_name": counter_name}
    if spans:
        kwargs["spans"] = True
    if cfg.decode_actors:
        return ds.map_batches(DecodeItems, fn_kwargs=kwargs, batch_size=None, batch_format="numpy",
                              num_cpus=cfg.decode_cpus, resources=res, zero_copy_batch=True,
                              compute=ray.data.ActorPoolStrategy(size=cfg.decode_actors))
    return ds.map_batches(decode_items, fn_kwargs=kwargs, batch_size=None, batch_format="numpy",
                          num_cpus=cfg.decode_cpus, resources=res, zero_copy_batch=True)


def decoded_dataset(url: str, cfg: DataConfig, *, train: bool, counter_name: str, label_set: list[str] | None = None,
                    limit: int = 0, index: SampleIndex | None = None, spans: bool = False):
    """The Ray Data pipeline in the dataset's canonical order: shards at ``url`` (or ``index``) -> rows per
    :mod:`mirasol_ray.data.schema`, each with ``pos`` = the sample's index. ``limit``: the first N samples. Bad
    shards (found while indexing ``url``; a caller passing ``index`` counts its own) and samples are skipped and
    counted in the counter named ``counter_name``. ``spans``: each row also has ``snippet_seconds`` (each
    snippet's time span in the video, for ``mirasol data inspect``'s contact sheet).

    ``train`` picks the random frame positions of training (those of epoch 0, from ``data.seed`` and each key);
    otherwise the deterministic ones of evaluation. Decode tasks reserve ``cfg.decode_cpus`` CPUs each, so Train
    workers are never starved on small machines (FIELD_NOTES: the silent-hang trap).
    """
    if index is None:
        index = sample_index(url)
        count_bad_shards(index, counter_name)
    if label_set is None:
        label_set = (find_manifest(url) or {}).get("label_set")
    n = min(len(index), limit) if limit else len(index)
    samples = np.arange(n, dtype=np.int64)
    items = {**index.refs(samples), "pos": samples, "epoch": np.zeros(n, np.int64)}
    return _items_dataset(index, items, cfg, train=train, counter_name=counter_name, label_set=label_set,
                          spans=spans)


# --------------------------------------------------------------------------------------------------------------
# Training: each worker reads its share of the stream


class DecodeSource:
    """Rows of a training worker decoded on demand: one order-preserving Ray Data pipeline over the worker's
    positions of one epoch, or of as many whole epochs as make ``span_samples`` of them (a small dataset's).

    A pipeline's start costs seconds in which the step waits (Ray Data plans it, then runs a single task for ~1 s:
    docs/HISTORY.md, "The data path"); a pipeline per epoch of a few hundred clips paid that every few dozen steps."""

    span_samples = 4096
    """:func:`train_batches` gives one call of :meth:`batches` whole epochs until they hold this many samples."""

    def __init__(self, index: SampleIndex, cfg: DataConfig, *, counter_name: str, label_set: list[str] | None,
                 cpu_limit: float = 0.0):
        self.index, self.cfg, self.counter_name = index, cfg, counter_name
        self.label_set, self.cpu_limit = label_set, cpu_limit

    def __len__(self) -> int:
        return len(self.index)

    def batches(self, positions: np.ndarray, samples: np.ndarray, epochs: np.ndarray, batch_size: int,
                prefetch_batches: int) -> Iterator[dict[str, np.ndarray]]:

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the worker's rows in the order of its positions
        ctx.enable_progress_bars = False
        if self.cpu_limit:
            ctx.execution_options.resource_limits = ExecutionResources(cpu=self.cpu_limit)
        items = {**self.index.refs(samples), "pos": positions, "epoch": epochs}  # each sample's epoch
        ds = _items_dataset(self.index, items, self.cfg, train=True, counter_name=self.counter_name,
                            label_set=self.label_set)
        yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches)


class CacheSource:
    """Rows decoded once before training (``data.cache``) and held in the object store, as ``chunks``: object
    refs of numpy batches (:func:`stack_rows` output, ``pos`` = sample index), looked up by sample index."""

    def __init__(self, chunks: list, num_samples: int):
        self.chunks = [ray.get(c) for c in chunks]  # zero-copy views of the object store on this node
        self.n = num_samples
        self.where: dict[int, list[tuple[int, int]]] = {}
        for c, chunk in enumerate(self.chunks):
            for r, sample in enumerate(chunk["pos"]):
                self.where.setdefault(int(sample), []).append((c, r))

    def __len__(self) -> int:
        return self.n

    def batches(self, positions: np.ndarray, samples: np.ndarray, epochs: np.ndarray, batch_size: int,
                prefetch_batches: int) -> Iterator[dict[str, np.ndarray]]:
        picked: list[tuple[int, int, int]] = []  # (chunk, row, position)
        for g, s in zip(positions.tolist(), samples.tolist()):
            picked += [(c, r, g) for c, r in self.where.get(s, [])]  # none: the sample failed to decode
        for i in range(0, len(picked), batch_size):
            part = picked[i:i + batch_size]
            batch = {k: np.stack([self.chunks[c][k][r] for c, r, _ in part]) for k in self.chunks[part[0][0]]
                     if k != "pos"}
            batch["pos"] = np.array([g for _, _, g in part], np.int64)
            yield batch


def _concat(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return b if a is None else {k: np.concatenate([a[k], b[k]]) for k in b}


def _take(batch: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {k: v[lo:hi] for k, v in batch.items()}


class NoRowsError(RuntimeError):
    """:func:`train_batches` read a whole epoch of a worker's positions (after a resume: the rest of the first
    epoch and the whole next one) and got no row: the samples fail to decode (or give no text for ``data.task``),
    and reading on would loop forever."""


def train_batches(source, position: ReadPosition, *, rank: int, batch_size: int, seed: int,
                  shuffle: bool = True, prefetch_batches: int = 2, order=None) -> Iterator[dict[str, Any]]:
    """Torch batches of ``batch_size`` rows for worker ``rank`` of the dealing ``position`` (see
    :meth:`~mirasol_ray.data.index.ReadPosition.for_world`), from where it stands on, forever:
    epoch after epoch of the stream (module docstring of :mod:`mirasol_ray.data.index`), a batch crossing an
    epoch's end when it must. Each batch carries ``pos`` (stream positions of its rows), ``epoch`` and
    ``last_pos``: the last position this worker has wholly consumed with it (-1: none yet), what
    :meth:`~mirasol_ray.data.index.ReadPosition.advance` takes.

    ``order`` says which sample each stream position holds: the source's one dataset shuffled per epoch
    (:class:`~mirasol_ray.data.index.StreamOrder` of ``seed`` and ``shuffle``, the default), or a weighted mixture
    of several (:class:`~mirasol_ray.data.index.MixtureOrder`, whose passes of the stream stand for epochs here)."""
    if len(source) == 0:
        raise ValueError("the training dataset holds no samples")
    order = order if order is not None else StreamOrder(len(source), seed, shuffle)
    n = len(order)
    epoch = first_epoch = position.epoch(n)
    carry: dict[str, np.ndarray] | None = None
    empty = 0  # 2 per whole epoch in a row that gave this worker no row, 1 for a resumed run's partial first one
    last_done = position.last[rank]
    span_samples = getattr(source, "span_samples", 0)
    while True:
        # the epochs one call of source.batches reads: one, or for a source whose every call starts a pipeline
        # (DecodeSource), as many whole epochs as make span_samples of this worker's samples, once a row has come
        # (until then an epoch at a time: samples that never decode end the run after one epoch, counted once)
        span = span_samples if carry is not None else 0  # carry: a row has come in this stream
        parts: list[tuple[int, np.ndarray]] = []
        spanned = 0
        while not parts or (spanned < span and len(parts[-1][1])):
            e = epoch + len(parts)
            parts.append((e, position.worker_positions(e, n, rank)))
            spanned += len(parts[-1][1])
        positions = np.concatenate([p for _, p in parts])
        samples, epochs = order.samples(positions)  # each sample's index and its (own set's) epoch
        got = 0
        for batch in source.batches(positions, samples, epochs, batch_size, prefetch_batches):
            got += len(batch["pos"])
            carry = _concat(carry, batch)
            while len(carry["pos"]) >= batch_size:
                out = to_torch(_take(carry, 0, batch_size))
                carry = _take(carry, batch_size, len(carry["pos"]))
                # a sample counts as consumed once all its rows are (a clip of more than data.max_texts texts
                # gives several rows, which a batch boundary can split)
                pending = set(carry["pos"].tolist())
                done = [p for p in out["pos"].tolist() if p not in pending]
                last_done = max(done) if done else last_done
                out["epoch"], out["last_pos"] = int(out["pos"][-1]) // n, last_done  # its last row's epoch
                yield out
        whole = (epoch > first_epoch or len(parts) > 1
                 or (position.prefix <= epoch * n and position.last[rank] < epoch * n))
        empty = 0 if got or not len(positions) else empty + (2 if whole else 1)
        if empty >= 2:  # a whole epoch gave this worker no row: its samples fail to decode
            raise NoRowsError("no sample of this worker's share of an epoch decodes (see the skipped counts)")
        epoch += len(parts)


def _writable(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A numpy batch of rows -> torch tensors with the schema's dtypes (``key`` stays a list of str)."""

    # Ray hands out read-only views of its object store; torch wants memory it may write, so such arrays are copied
    # (one memcpy of the batch) rather than wrapped
    out: dict[str, Any] = {k: torch.from_numpy(_writable(batch[k])) for k in TENSOR_COLUMNS}
    out["key"] = [str(k) for k in batch["key"]]
    if "pos" in batch:
        out["pos"] = torch.as_tensor(np.asarray(batch["pos"], np.int64))
    return out


def split_by_set(batch: dict[str, Any], sets: list | None) -> list[tuple[str | None, dict[str, Any]]]:
    """A batch of an evaluated split made of several sets (``sets``: ``[name, first row]`` of each), as (set name,
    its rows) parts, in order; the whole batch, unnamed, when the split is one set."""
    if not sets:
        return [(None, batch)]
    starts = np.asarray([s for _, s in sets], np.int64)
    of = np.searchsorted(starts, np.asarray(batch["pos"]), side="right") - 1  # [B]: each row's set
    out = []
    for k in np.unique(of).tolist():
        idx = np.flatnonzero(of == k)
        if len(idx) == len(of):
            out.append((sets[k][0], batch))
            continue
        at = torch.as_tensor(idx)
        out.append((sets[k][0], {key: ([v[i] for i in idx.tolist()] if isinstance(v, list) else v[at])
                                 for key, v in batch.items()}))
    return out


def iter_worker_batches(shard, batch_size: int, *, prefetch_batches: int = 2, drop_last: bool = False):
    """Batches of a Train worker's dataset shard (``ray.train.get_dataset_shard(name)``, e.g. validation) as torch
    dicts. Tensors stay on the CPU (video uint8) and are moved by the step, so the host->device copy carries 1
    byte a pixel instead of 4."""
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches,
                                    drop_last=drop_last):
        yield to_torch(batch)


def train_data_config(data_cpu_limit: float = 0.0):
    """Ray Train's DataConfig for the datasets it hands out: ``val`` (and ``train_eval``, the training clips scored
    beside it) split between the workers row by row (every row exactly once: workers may get a row more or less,
    and each evaluates its own share); any other dataset whole. The training set is not among them: each worker
    reads its own share of the sample index (:func:`train_batches`).

    Rows come in the dataset's order (``preserve_order``), so one worker's evaluation batches are the same in every
    run and so are its metrics, to the last digit. With several workers, which rows each one gets depends on which
    asks first, so the batches, and the metrics' last digits, may differ between runs.

    ``data_cpu_limit`` caps the CPUs Ray Data may take while training (0: Ray's default, all CPUs not held by the
    workers)."""

    opts = ExecutionOptions(preserve_order=True)
    if data_cpu_limit:
        opts.resource_limits = ExecutionResources(cpu=data_cpu_limit)
    return _data_config_cls()(datasets_to_split=[], execution_options=opts)


def _data_config_cls():
    class SplitData(ray.train.DataConfig):
        """``val`` split with ``equal=False``, so validation scores every row once whatever the number of
        workers."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            whole = {k: v for k, v in datasets.items() if k not in EXACT_SPLIT}
            out = super().configure(whole, world_size, worker_handles, worker_node_ids, **kwargs)
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if name not in EXACT_SPLIT:
                    continue
                ds = ds.copy(ds)
                if ds.name is None:
                    ds.set_name(name)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i][name] = split
            return out

    return SplitData


EXACT_SPLIT = ("val", "train_eval")
"""Datasets split between the workers row by row with none dropped (see :func:`train_data_config`)."""
