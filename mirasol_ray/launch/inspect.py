"""``mirasol data inspect URL``: run the real decode pipeline over a dataset and report what came out.

Counts samples seen, decoded and skipped (by reason; whole shards that cannot be read by file name), the texts
cut to fit ``data.max_prompt_len`` / ``data.max_target_len`` (per kind, with a warning line), the
shapes/dtypes/bytes of a decoded row, and, when ``--png PATH`` is given, writes a contact sheet there: for a few
rows, each snippet's frames (titled with its time span) above its log-mel spectrogram (frequency against time in
seconds), and the clip's texts. Without
``--png`` nothing is written (no file appears in the current folder or anywhere the user did not name). A few clips
are decoded unless told otherwise (:data:`DEFAULT_LIMIT`), with the dataset's own tokenizer when it has one.
"""

from __future__ import annotations

import os
import posixpath
import time
from typing import Any

import numpy as np
import ray

from mirasol_ray import storage
from mirasol_ray.config import is_byte_tokenizer, load_config, parse_overrides
from mirasol_ray.data.pipeline import (
    SHARD_REASONS,
    decoded_dataset,
    describe_skips,
    expand_shard_urls,
    find_manifest,
    make_skip_counter,
    read_skips,
    samples_seen,
    shards_failed,
)
from mirasol_ray.data.rows import truncation_warning
from mirasol_ray.data.schema import TENSOR_COLUMNS
from mirasol_ray.data.text import get_tokenizer
from mirasol_ray.launch import console
from mirasol_ray.launch.plots import plt
from mirasol_ray.launch.train import ensure_ray

SHEET_ROWS = 3
DEFAULT_LIMIT = 16
"""Samples ``data inspect`` decodes unless told otherwise (``--limit 0``: all): enough for shapes, skips and a
contact sheet in seconds."""


def dataset_tokenizer(shards: list[str], manifest: dict[str, Any] | None) -> str:
    """The tokenizer file a dataset carries, "" when none: the one its manifest names (relative to the shards'
    folder; a split's manifest names ``../tokenizer.json``), else ``tokenizer.json`` in the shards' folder or the one
    above it (where ``shards synth`` and ``shards build --tokenizer learn`` put it, above the split folders)."""
    if not shards:
        return ""
    folder = posixpath.dirname(shards[0]) if storage.is_remote(shards[0]) else os.path.dirname(shards[0])
    parent = posixpath.dirname(folder) if storage.is_remote(folder) else os.path.dirname(folder)
    named = str((manifest or {}).get("tokenizer") or "")
    candidates = []
    if named:
        candidates.append(storage.join(parent, named[3:]) if named.startswith("../") else storage.join(folder, named))
    candidates += [storage.join(folder, "tokenizer.json"), storage.join(parent, "tokenizer.json")]
    return next((c for c in candidates if storage.exists(c)), "")


def clip_texts(row: dict[str, Any], tok, limit: int = 4) -> list[str]:
    """A decoded row's texts as a person reads them (``prompt -> target``), at most ``limit``; none without a
    tokenizer or text columns."""
    if tok is None or "text_mask" not in row:
        return []
    out = []
    for k in np.flatnonzero(row["text_mask"])[:limit]:
        prompt = tok.decode([int(t) for t, m in zip(row["prompt_ids"][k], row["prompt_mask"][k]) if m]).strip()
        target = tok.decode([int(t) for t, m in zip(row["target_ids"][k], row["target_mask"][k]) if m]).strip()
        out.append(f"{prompt} -> {target}" if prompt else target)
    return out


def mel_hz(n_mels: int, sample_rate: int) -> np.ndarray:
    """The centre frequency (Hz) of each of the ``n_mels`` HTK mel bins from 0 Hz to Nyquist
    (:func:`mirasol_ray.data.snippets.mel_filterbank`'s)."""
    top = 2595.0 * np.log10(1.0 + sample_rate / 2 / 700.0)
    return 700.0 * (10.0 ** (np.linspace(0.0, top, n_mels + 2)[1:-1] / 2595.0) - 1.0)


def sheet_labels(row: dict[str, Any], sample_rate: int) -> dict[str, Any]:
    """What the contact sheet writes around one row's snippets: ``spans``, each snippet's time span under its
    frames (``0.0-2.0 s``; ``(pad)`` for padding; no span when the row carries none); ``extents``, each
    spectrogram's time axis in seconds (``(start, end)``, or ``None`` without spans: then log-mel frames);
    ``time_label`` and ``freq_label``, the axes' titles; ``freq_ticks``, (mel bin, ``"1k"``-style Hz) pairs a few
    bins apart for the frequency axis."""
    S, M = row["audio"].shape[:2]
    seconds = row.get("snippet_seconds")
    spans, extents = [], []
    for s in range(S):
        pad = not bool(row["snippet_mask"][s])
        if seconds is not None and not pad and float(seconds[s][1]) > float(seconds[s][0]):
            a, b = float(seconds[s][0]), float(seconds[s][1])
            spans.append(f"{a:.1f}-{b:.1f} s")
            extents.append((a, b))
        else:
            spans.append("(pad)" if pad else "")
            extents.append(None)
    hz = mel_hz(M, sample_rate)
    ticks = [(int(b), f"{hz[b] / 1000:.1f}k" if hz[b] >= 1000 else f"{hz[b]:.0f}")
             for b in np.linspace(0, M - 1, min(M, 5)).round().astype(int)]
    return {"spans": spans, "extents": extents,
            "time_label": "time (s)" if any(extents) else "time (log-mel frame)",
            "freq_label": "frequency (Hz, mel scale)", "freq_ticks": ticks}


def contact_sheet(rows: list[dict[str, np.ndarray]], path: str, title: str = "", tok=None,
                  sample_rate: int = 16000) -> str:
    """Three bands per row: for each snippet s, its F frames side by side, titled with its time span; below them
    its [M, T] log-mel (time in seconds across, frequency in Hz up: :func:`sheet_labels`; the first snippet's axes
    titled); below that the clip's texts (decoded with ``tok``)."""

    if not rows:
        raise ValueError("no decoded rows to draw")
    S, F = rows[0]["video"].shape[:2]
    fig, axes = plt.subplots(3 * len(rows), S, figsize=(2.8 * S, 4.6 * len(rows) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": [1.3, 2.2, 1.3] * len(rows)})
    for r, row in enumerate(rows):
        labels = sheet_labels(row, sample_rate)
        for s in range(S):
            frames = np.concatenate(list(row["video"][s]), axis=1)  # (H, F*W, 3)
            ax = axes[3 * r, s]
            ax.imshow(frames)
            ax.set_axis_off()
            ax.set_title(f"{row['key']} snippet {s}\n{labels['spans'][s]}".rstrip(), fontsize=7)
            ax = axes[3 * r + 1, s]
            extent = labels["extents"][s]
            M = row["audio"][s].shape[0]
            ax.imshow(row["audio"][s], origin="lower", aspect="auto", cmap="magma",
                      extent=(extent[0], extent[1], -0.5, M - 0.5) if extent else None)
            ax.set_yticks([b for b, _ in labels["freq_ticks"]], [t for _, t in labels["freq_ticks"]] if s == 0
                          else [])
            ax.tick_params(labelsize=6)
            if s == 0:
                ax.set_ylabel(labels["freq_label"], fontsize=7)
            ax.set_xlabel(labels["time_label"] if s == 0 else "", fontsize=7)
            if extent is None and labels["time_label"] == "time (s)":  # padding among timed snippets: no frame scale
                ax.set_xticks([])
            if not bool(row["audio_present"]):
                ax.set_title("no audio", fontsize=7)
            axes[3 * r + 2, s].set_axis_off()
        texts = clip_texts(row, tok)
        axes[3 * r + 2, 0].text(0, 0.55, "\n".join(t[:150] for t in texts) or "(no texts)", fontsize=7, va="top",
                                ha="left", transform=axes[3 * r + 2, 0].transAxes, clip_on=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.5 / (4.6 * len(rows) + 0.6), bottom=0.02, hspace=0.35,
                        wspace=0.12)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def inspect_dataset(url: str, config: str = "tiny", overrides: list[str] | None = None, limit: int = DEFAULT_LIMIT,
                    png: str = "", num_cpus: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the decode pipeline over at most ``limit`` samples of ``url`` (0: all) and report. The texts are
    tokenized with the dataset's own tokenizer (:func:`dataset_tokenizer`) unless ``data.tokenizer`` is set.
    Raises (one line) when no shard at all can be read; a report with ``decoded == 0`` is the caller's to judge
    (``mirasol data inspect`` exits non-zero)."""

    cfg = load_config(config, overrides)
    storage.configure(cfg.storage.endpoint_url)
    storage.check_access(url)
    shards = expand_shard_urls(url)  # a clear error before Ray starts if there is nothing there
    if png:
        storage.check_output(png, "file")  # before the work, not after it
    manifest = find_manifest(url)
    if is_byte_tokenizer(cfg.data.tokenizer) and "tokenizer" not in (parse_overrides(overrides).get("data") or {}):
        found = dataset_tokenizer(shards, manifest)
        if found:
            cfg.data.tokenizer = found
            if progress:
                console.say(f"tokenizer: {found}, the dataset's (--set data.tokenizer=byte for bytes)")
    available = (manifest or {}).get("num_samples")
    total = min(limit, available) if limit and available else limit or available or None
    with console.quiet_libraries() as logs:
        if progress and not ray.is_initialized():
            console.say(f"starting Ray ({os.environ.get('RAY_ADDRESS') or 'a local instance'})...")
        started = ensure_ray(num_cpus)
        console.attach_session_log(logs)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            counter, name = make_skip_counter()
            ds = decoded_dataset(url, cfg.data, train=False, counter_name=name, limit=limit, spans=bool(png))
            t0 = time.perf_counter()
            rows_out = 0
            sheet: list[dict[str, np.ndarray]] = []
            shapes: dict[str, Any] = {}
            if progress:
                console.say(f"decoding {total or 'the'} clips of {len(shards)} shard(s)"
                            + (f" (--limit {limit}; 0 for all {available})" if limit and available
                               and available > limit else "") + "...")
            bar = console.Progress(f"decoding {len(shards)} shard(s)", total, "clips") if progress else None
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n = len(batch["key"])
                if not n:
                    continue
                if not shapes:
                    shapes = {k: {"shape": list(batch[k].shape[1:]), "dtype": str(batch[k].dtype)}
                              for k in TENSOR_COLUMNS}
                    shapes["_bytes_per_row"] = int(sum(batch[k][0].nbytes for k in TENSOR_COLUMNS))
                for i in range(n):
                    if len(sheet) < SHEET_ROWS and not any(
                            r["key"].split("#")[0] == str(batch["key"][i]).split("#")[0] for r in sheet):
                        sheet.append({k: batch[k][i] for k in ("video", "audio", "audio_present", "snippet_mask",
                                                               "text_mask", "prompt_ids", "prompt_mask", "target_ids",
                                                               "target_mask", "snippet_seconds") if k in batch}
                                     | {"key": str(batch["key"][i])})
                rows_out += n
                if bar is not None:
                    bar.update(samples_seen(read_skips(counter)))
            if bar is not None:
                bar.close()
            elapsed = time.perf_counter() - t0
            ray.get(counter.snapshot.remote())  # flush: fire-and-forget adds queued before this call
            snap = read_skips(counter)
            ray.kill(counter)
        finally:
            if started:
                ray.shutdown()
    if shards_failed(snap) >= len(shards):
        raise ValueError(f"no shard of {url} could be read: {describe_skips(snap)}")
    bytes_per_row = shapes.pop("_bytes_per_row", 0)
    skipped = snap["skipped"]
    report = {
        "url": url,
        "shards": len(shards),
        "samples": samples_seen(snap),
        "decoded": snap["decoded"],
        "rows": rows_out,
        "skipped": skipped,
        "skipped_examples": snap["examples"],
        "truncation": snap["truncation"],
        "tokenizer": cfg.data.tokenizer or "byte",
        "truncation_warning": truncation_warning(snap["truncation"], cfg.data.tokenizer),
        "shards_skipped": {r: n for r, n in skipped.items() if r in SHARD_REASONS},
        "shapes": shapes,
        "bytes_per_row": bytes_per_row,
        "seconds": round(elapsed, 2),
        "contact_sheet": None,
        "log": logs.path or None,
    }
    if sheet and png:
        report["contact_sheet"] = contact_sheet(sheet, png, title=url, tok=get_tokenizer(cfg.data.tokenizer or "byte"),
                                                sample_rate=cfg.data.sample_rate)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"dataset        {report['url']}  ({report['shards']} shards)")
    print(f"samples        {report['samples']}  (decoded {report['decoded']}, rows {report['rows']}, "
          f"{report['seconds']} s)")
    if report["skipped"]:
        for reason, n in sorted(report["skipped"].items()):
            ex = ", ".join(report["skipped_examples"].get(reason, [])[:3])
            print(f"skipped        {reason}: {n}  (e.g. {ex})")
    else:
        print("skipped        none")
    print(f"tokenizer      {report.get('tokenizer', 'byte')}")
    print(report["truncation_warning"] or "texts cut      none")
    for k, v in report["shapes"].items():
        print(f"  {k:<14} {v['dtype']:<8} {v['shape']}")
    print(f"bytes/row      {report['bytes_per_row']:,}")
    if report["contact_sheet"]:
        print(f"contact sheet  {report['contact_sheet']}")
    elif report["decoded"]:
        print("contact sheet  (none written: pass --png FILE)")
