"""``mirasol eval`` (Ray Data batch inference) and ``mirasol predict`` (one video, no Ray).

Evaluation is the decode pipeline feeding ``map_batches`` over an actor pool whose actors each hold the model
(on a GPU each when the cluster has them), so scoring a large benchmark scales with the cluster like training.
The decode geometry comes from the checkpoint's own run config, so a checkpoint is all it needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from mirasol_ray import storage
from mirasol_ray.config import Config, DataConfig, from_dict, parse_overrides
from mirasol_ray.train.metrics import aggregate

RECORD_COLUMNS = ("key", "task", "qtype", "pred", "target", "correct")


def checkpoint_config(checkpoint: str, overrides: list[str] | None = None, endpoint_url: str = ""
                      ) -> tuple[str, Config, list[str] | None]:
    """(model.pt URI, the run's Config with ``--set`` overrides, label set) for a checkpoint URI.

    The tokenizer is the checkpoint's own copy (see :mod:`mirasol_ray.train.checkpoint`), not the path the run was
    trained with, which need not exist here."""
    from mirasol_ray.config import _deep_update
    from mirasol_ray.train.checkpoint import read_meta, resolve_checkpoint, tokenizer_spec

    model_uri = resolve_checkpoint(checkpoint, endpoint_url)
    meta = read_meta(model_uri, endpoint_url)
    raw = meta.get("run_config") or {}
    raw = json.loads(json.dumps(raw))  # a deep copy
    if "tokenizer" in meta:  # checkpoints from before tokenizers travelled with them keep the run's path
        raw.setdefault("data", {})["tokenizer"] = tokenizer_spec(model_uri, meta, endpoint_url)
    _deep_update(raw, parse_overrides(overrides))
    return model_uri, from_dict(raw), meta.get("label_set")


class Predictor:
    """Actor for ``map_batches``: loads the model once, turns decoded rows into prediction records."""

    def __init__(self, model_uri: str, endpoint_url: str, data_cfg: dict[str, Any], precision: str,
                 label_set: list[str] | None, beam_size: int = 1):
        import torch

        from mirasol_ray.data.text import get_tokenizer
        from mirasol_ray.train.checkpoint import load_model_from

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model_from(model_uri, endpoint_url).to(self.device).eval()
        self.tok = get_tokenizer(data_cfg["tokenizer"])
        self.precision, self.label_set, self.beam_size = precision, label_set, beam_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mirasol_ray.data.pipeline import to_torch
        from mirasol_ray.train.step import predict_batch

        if len(batch["key"]) == 0:
            return {c: np.zeros((0,), dtype=object) for c in RECORD_COLUMNS}
        recs = predict_batch(self.model, to_torch(batch), self.tok, self.device, self.precision,
                             beam_size=self.beam_size, label_set=self.label_set)
        return {c: np.array([r[c] for r in recs], dtype=bool if c == "correct" else object) for c in RECORD_COLUMNS}


def evaluate(checkpoint: str, data_url: str, *, overrides: list[str] | None = None, batch_size: int = 16,
             num_actors: int = 1, beam_size: int = 1, num_cpus: int | None = None, records_out: str = ""
             ) -> dict[str, Any]:
    """Task metrics of a checkpoint over the shards at ``data_url``; per-row records optionally to JSONL."""
    import ray

    from mirasol_ray.data.pipeline import decoded_dataset, expand_shard_urls, make_skip_counter, read_skips
    from mirasol_ray.launch.train import ensure_ray

    endpoint_url = os.environ.get("AWS_ENDPOINT_URL", "")
    model_uri, cfg, label_set = checkpoint_config(checkpoint, overrides, endpoint_url)
    expand_shard_urls(data_url)
    started = ensure_ray(num_cpus)
    try:
        counter, name = make_skip_counter()
        ds = decoded_dataset(data_url, cfg.data, train=False, counter_name=name, label_set=label_set)
        use_gpu = ray.cluster_resources().get("GPU", 0) >= num_actors
        preds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"model_uri": model_uri, "endpoint_url": endpoint_url,
                                   "data_cfg": dataclasses.asdict(cfg.data), "precision": cfg.train.precision,
                                   "label_set": label_set, "beam_size": beam_size},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
        )
        records = []
        for b in preds.iter_batches(batch_size=256, batch_format="numpy"):
            for i in range(len(b["key"])):
                records.append({c: (bool(b[c][i]) if c == "correct" else str(b[c][i])) for c in RECORD_COLUMNS})
        ray.get(counter.snapshot.remote())
        skips = read_skips(counter)
    finally:
        if started:
            ray.shutdown()
    if records_out:
        storage.write_text(records_out, "".join(json.dumps(r) + "\n" for r in records))
    return {"checkpoint": model_uri, "data": data_url, "rows": len(records), "metrics": aggregate(records),
            "skipped": skips["skipped"]}


def predict(checkpoint: str, video: str, question: str = "", options: list[str] | None = None,
            overrides: list[str] | None = None) -> dict[str, Any]:
    """Answer (or caption, or pick an option) for one video file; no Ray."""
    import torch

    from mirasol_ray.data.pipeline import stack_rows, to_torch
    from mirasol_ray.data.rows import decode_sample
    from mirasol_ray.data.text import get_tokenizer
    from mirasol_ray.train.checkpoint import load_model_from
    from mirasol_ray.train.step import predict_batch

    if not os.path.isfile(video):
        raise FileNotFoundError(f"video not found: {video}")
    model_uri, cfg, label_set = checkpoint_config(checkpoint, overrides)
    ext = os.path.splitext(video)[1].lstrip(".").lower() or "mp4"
    meta: dict[str, Any] = {}
    if options:
        meta.update({"mc_question": question, "options": options, "answer_idx": 0})
        task = "mcqa"
    elif question:
        meta.update({"question": question, "answer": "?"})
        task = "qa"
    else:
        meta["caption"] = "?"
        task = "caption"
    data_cfg: DataConfig = dataclasses.replace(cfg.data, task=task)
    with open(video, "rb") as f:
        sample = {"__key__": os.path.basename(video).split(".")[0], ext: f.read(), "json": json.dumps(meta).encode()}
    rows = decode_sample(sample, data_cfg, train=False, rng=np.random.default_rng(0))
    batch = to_torch(stack_rows(rows[:1], data_cfg))
    model = load_model_from(model_uri)
    rec = predict_batch(model, batch, get_tokenizer(data_cfg.tokenizer), torch.device("cpu"), "fp32",
                        label_set=label_set)[0]
    return {"video": video, "task": task, "question": question, "options": options or [], "answer": rec["pred"]}
