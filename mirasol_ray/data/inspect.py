"""``mirasol data inspect URL``: run the real decode pipeline over a dataset and report what came out.

Counts samples seen, decoded and skipped (by reason), the shapes/dtypes/bytes of a decoded row, and writes a
contact sheet PNG: for a few rows, each snippet's frames beside its log-mel spectrogram.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from mirasol_ray.config import load_config
from mirasol_ray.data.schema import TENSOR_COLUMNS

SHEET_ROWS = 3


def contact_sheet(rows: list[dict[str, np.ndarray]], path: str, title: str = "") -> str:
    """One block per row: for each snippet s, its F frames side by side, and below them the [M, T] log-mel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no decoded rows to draw")
    S, F = rows[0]["video"].shape[:2]
    fig, axes = plt.subplots(2 * len(rows), S, figsize=(2.6 * S, 2.4 * len(rows) * 2), squeeze=False)
    for r, row in enumerate(rows):
        for s in range(S):
            frames = np.concatenate(list(row["video"][s]), axis=1)  # (H, F*W, 3)
            ax = axes[2 * r, s]
            ax.imshow(frames)
            ax.set_axis_off()
            valid = bool(row["snippet_mask"][s])
            ax.set_title(f"{row['key']} s{s}" + ("" if valid else " (pad)"), fontsize=7)
            ax = axes[2 * r + 1, s]
            ax.imshow(row["audio"][s], origin="lower", aspect="auto", cmap="magma")
            ax.set_axis_off()
            if not bool(row["audio_present"]):
                ax.set_title("no audio", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def inspect_dataset(url: str, config: str = "tiny", overrides: list[str] | None = None, limit: int = 0,
                    png: str = "", num_cpus: int | None = None, progress: bool = True) -> dict[str, Any]:
    import ray

    from mirasol_ray.data.pipeline import decoded_dataset, expand_shard_urls, make_skip_counter, read_skips
    from mirasol_ray.launch.train import ensure_ray

    cfg = load_config(config, overrides)
    expand_shard_urls(url)  # a clear error before Ray starts if there is nothing there
    started = ensure_ray(num_cpus)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        counter, name = make_skip_counter()
        ds = decoded_dataset(url, cfg.data, train=False, counter_name=name, limit=limit)
        t0 = time.perf_counter()
        rows_out = 0
        sheet: list[dict[str, np.ndarray]] = []
        shapes: dict[str, Any] = {}
        for batch in ds.iter_batches(batch_size=cfg.data.decode_batch_size, batch_format="numpy"):
            n = len(batch["key"])
            if not n:
                continue
            if not shapes:
                shapes = {k: {"shape": list(batch[k].shape[1:]), "dtype": str(batch[k].dtype)}
                          for k in TENSOR_COLUMNS}
                shapes["_bytes_per_row"] = int(sum(batch[k][0].nbytes for k in TENSOR_COLUMNS))
            for i in range(n):
                if len(sheet) < SHEET_ROWS and not any(r["key"].split("#")[0] == str(batch["key"][i]).split("#")[0]
                                                       for r in sheet):
                    sheet.append({k: batch[k][i] for k in ("video", "audio", "audio_present", "snippet_mask")}
                                 | {"key": str(batch["key"][i])})
            rows_out += n
        elapsed = time.perf_counter() - t0
        ray.get(counter.snapshot.remote())  # flush: fire-and-forget adds queued before this call
        snap = read_skips(counter)
        ray.kill(counter)
    finally:
        if started:
            ray.shutdown()
    bytes_per_row = shapes.pop("_bytes_per_row", 0)
    skipped = snap["skipped"]
    report = {
        "url": url,
        "samples": snap["decoded"] + sum(skipped.values()),
        "decoded": snap["decoded"],
        "rows": rows_out,
        "skipped": skipped,
        "skipped_examples": snap["examples"],
        "shapes": shapes,
        "bytes_per_row": bytes_per_row,
        "seconds": round(elapsed, 2),
        "contact_sheet": None,
    }
    if sheet:
        report["contact_sheet"] = contact_sheet(sheet, png or "contact_sheet.png", title=url)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"dataset        {report['url']}")
    print(f"samples        {report['samples']}  (decoded {report['decoded']}, rows {report['rows']}, "
          f"{report['seconds']} s)")
    if report["skipped"]:
        for reason, n in sorted(report["skipped"].items()):
            ex = ", ".join(report["skipped_examples"].get(reason, [])[:3])
            print(f"skipped        {reason}: {n}  (e.g. {ex})")
    else:
        print("skipped        none")
    for k, v in report["shapes"].items():
        print(f"  {k:<14} {v['dtype']:<8} {v['shape']}")
    print(f"bytes/row      {report['bytes_per_row']:,}")
    if report["contact_sheet"]:
        print(f"contact sheet  {report['contact_sheet']}")
