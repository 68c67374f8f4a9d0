"""The strict-load rule for checkpoints: a checkpoint's tensors (names and shapes) against a model's.

Used by both kinds of checkpoint (``model.pt``: :mod:`mirasol_ray.train.checkpoint`; sharded:
:mod:`mirasol_ray.train.sharded`): a resume must hold exactly the model's tensors, and ``train.init_from`` follows
``model.init_strict``. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import torch

HEAD_PREFIX = "cls_head."
"""The classification head (``model.cls_mode=head``): sized by the fine-tuning run's label set, so the checkpoint
``train.init_from`` names may lack it or hold it for another set; it then starts as initialised."""


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors are not the model's (by name or shape): the message names them in one line."""


Shapes = dict[str, tuple[int, ...] | None]
"""Tensor name -> shape (None: a value that is not a tensor, e.g. a module's extra state)."""


def shapes_of(state: dict[str, Any]) -> Shapes:
    """Names and shapes of a state dict's entries (a DTensor's shape is the whole tensor's, not this rank's part)."""
    return {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in state.items()}


def compare_tensors(saved: Shapes, own: Shapes) -> dict[str, list[str]]:
    """``{"missing": the model's tensors the checkpoint lacks, "unexpected": the checkpoint's the model lacks,
    "mismatched": both hold, with other shapes}``, each sorted by name."""
    return {"missing": sorted(set(own) - set(saved)), "unexpected": sorted(set(saved) - set(own)),
            "mismatched": sorted(k for k in set(own) & set(saved) if saved[k] != own[k])}


def describe_differences(diff: dict[str, list[str]], saved: Shapes, own: Shapes, limit: int = 4) -> str:
    """``missing a.w, a.b; unexpected c.w; c.b is (3, 4) in the checkpoint, (5, 4) in the model (and 2 more)``: the
    first ``limit`` differences of :func:`compare_tensors`, in one line."""
    items = ([f"missing {k}" for k in diff["missing"]] + [f"unexpected {k}" for k in diff["unexpected"]]
             + [f"{k} is {saved[k]} in the checkpoint, {own[k]} in the model" for k in diff["mismatched"]])
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def require_same_tensors(source: str, saved: Shapes, own: Shapes) -> None:
    """Raise :class:`CheckpointMismatch` naming the differences when checkpoint ``source`` does not hold exactly
    the model's tensors, with their shapes (resume: a tensor silently left as initialised would be a wrong run)."""
    diff = compare_tensors(saved, own)
    if any(diff.values()):
        raise CheckpointMismatch(f"checkpoint {source} does not match the model: "
                                 f"{describe_differences(diff, saved, own)}")


def init_plan(source: str, saved: Shapes, own: Shapes, strict: bool) -> dict[str, list[str]]:
    """Which tensors ``train.init_from`` takes from checkpoint ``source``: ``{"load": names, "missing": the model's
    tensors left as initialised, "unexpected": the checkpoint's not loaded}``. The classification head
    (:data:`HEAD_PREFIX`) may differ; any other difference raises :class:`CheckpointMismatch` naming it when
    ``strict`` (``model.init_strict``, as for pretrained parts), else that tensor is left as initialised."""
    diff = compare_tensors(saved, own)
    other = {part: [k for k in names if not k.startswith(HEAD_PREFIX)] for part, names in diff.items()}
    if strict and any(other.values()):
        raise CheckpointMismatch(f"train.init_from {source}: {describe_differences(other, saved, own)}; set "
                                 "model.init_strict=false to load the rest and leave these as initialised")
    return {"load": sorted(k for k in set(own) & set(saved) if saved[k] == own[k]),
            "missing": sorted(diff["missing"] + diff["mismatched"]),
            "unexpected": sorted(diff["unexpected"] + diff["mismatched"])}
