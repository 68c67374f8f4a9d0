"""Our training metrics through Ray's metrics API (``ray.util.metrics``), so they appear beside Ray's own system
metrics on the same Prometheus endpoint and Grafana dashboards (docs/CLUSTER.md, "Watching it run").

Rank 0 sets one gauge per numeric metric of each ``metrics.jsonl`` record (:class:`~mirasol_ray.train.loop.RunLog`):
``mirasol_train_<name>`` (loss and its parts, learning rate, samples/s, tokens/s, data-wait fraction, step time,
elapsed time) and ``mirasol_val_<name>`` / ``mirasol_train_eval_<name>`` for an evaluation's metrics, each tagged
with the run's name (``storage.name``). Ray's metrics agent on each node exports them with its own at
``/metrics`` (the node's metrics export port). A gauge holds the last value: the history stays in
``metrics.jsonl`` and TensorBoard."""

from __future__ import annotations

import logging
import re
from typing import Any

from ray.util.metrics import Gauge

PREFIX = "mirasol_"
SKIPPED = ("step", "epoch")
"""Record keys that are positions, not measurements (the step is the x axis of every plot)."""
NESTED = ("val", "train_eval", "epochs")
"""Record keys holding an evaluation's metrics (name -> value), or a mixture's epochs of each set (set -> epochs)."""

log = logging.getLogger(__name__)


def metric_name(*parts: str) -> str:
    """A Prometheus-safe metric name: ``mirasol_`` + the parts joined by ``_``, other characters as ``_``."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", "_".join(parts))


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The metric names and values of one ``metrics.jsonl`` record that are exported: top-level numbers as
    ``mirasol_train_<key>``, an evaluation's as ``mirasol_<val|train_eval>_<key>``; booleans, strings, lists and
    the step/epoch are not measurements."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out = {metric_name("train", k): float(v) for k, v in record.items() if k not in SKIPPED and number(v)}
    for group in NESTED:
        for k, v in (record.get(group) or {}).items():
            if number(v):
                out[metric_name(group, k)] = float(v)
    return out


class TrainGauges:
    """The run's gauges, made on first use of each metric name, all tagged ``run``."""

    def __init__(self, run: str):
        self.run = run
        self.gauges: dict[str, Gauge] = {}

    def set(self, record: dict[str, Any]) -> None:
        """Set every exported metric of ``record``. Metrics are informative: an error here is logged, never
        raised into training."""
        try:
            for name, value in numeric_metrics(record).items():
                gauge = self.gauges.get(name)
                if gauge is None:
                    gauge = self.gauges[name] = Gauge(name, description=f"mirasol-ray training metric {name}",
                                                      tag_keys=("run",))
                gauge.set(value, tags={"run": self.run})
        except Exception as e:  # noqa: BLE001
            log.warning("Ray metrics export failed (training continues): %s", str(e).splitlines()[0][:200])
