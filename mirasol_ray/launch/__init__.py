"""Driver side: training, sweeps, evaluation, results, job submission. Nothing here touches tensors."""

from __future__ import annotations

from mirasol_ray import storage
from mirasol_ray.config import ConfigError, parse_overrides


def configure_storage(overrides: list[str] | None, only_storage: bool = False) -> None:
    """Configure this process's storage (:func:`mirasol_ray.storage.configure`) from ``--set`` overrides, for a
    command that reads a checkpoint or a folder before it has a config (``eval``, ``predict``, ``export``,
    ``results``): their ``storage.endpoint_url=URL``; without one the process keeps its setting (in a new process,
    the environment's). ``only_storage``: the command has no config to override, and any other key is an error
    (otherwise the config built later checks the rest)."""

    raw = parse_overrides(overrides)
    given = raw.get("storage") if isinstance(raw.get("storage"), dict) else {}
    if only_storage:
        keys = [f"{k}.*" for k in raw if k != "storage"] + [f"storage.{k}" for k in given if k != "endpoint_url"]
        if keys:
            raise ConfigError(f"--set takes only storage.endpoint_url=URL here, got {keys[0]}")
    if given.get("endpoint_url"):
        storage.configure(str(given["endpoint_url"]), storage.settings()["region"])
