"""One live run per run folder: ``lease.json`` in the run folder (local or S3), kept fresh by a heartbeat.

A second ``mirasol train`` on the same run folder while the first is alive is refused, naming the holder; a lease
whose holder is gone is taken over: at once when the holder ran on this machine and its process is dead (a killed
driver), else once its heartbeat is older than :data:`STALE_S`. Train workers check the token before they mark a
checkpoint complete, so a run that lost its lease stops writing.

Object stores have no atomic "create if absent" here, so the lease is written and read back: two drivers starting
within the same instant could both pass on S3. Locally, creation is atomic (``O_EXCL``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import psutil

from mirasol_ray import storage
from mirasol_ray.launch.scratch import process_gone
from mirasol_ray.train.checkpoint import LEASE_FILE, lease_token, read_lease

__all__ = ["LEASE_FILE", "RunInUseError", "RunLease", "lease_token", "read_lease"]

HEARTBEAT_S = 10.0
STALE_S = 60.0
"""A holder on another machine whose heartbeat is older than this is taken to be gone."""


class RunInUseError(RuntimeError):
    """Another live run holds the run folder's lease."""


def _started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(holder: dict[str, Any], now: float) -> bool:
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        started = _started(pid)
        if started is None or process_gone(pid):
            return False
        return abs(started - float(holder.get("started") or 0)) < 2.0  # the same process, not a reused pid
    return now - float(holder.get("heartbeat", 0)) < STALE_S


class RunLease:
    """``with RunLease(uri):`` holds the run folder for this process; raises :class:`RunInUseError` when another
    live run holds it."""

    def __init__(self, run_uri: str, heartbeat_s: float = HEARTBEAT_S):
        self.run_uri, self.heartbeat_s = run_uri, heartbeat_s
        self.token = uuid.uuid4().hex
        self.uri = storage.join(run_uri, LEASE_FILE)
        self.taken_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "started": _started(os.getpid()), "heartbeat": time.time()}

    def _write(self) -> None:
        storage.write_text(self.uri, json.dumps(self._record()))

    def acquire(self) -> RunLease:
        holder = read_lease(self.run_uri)
        if holder and holder.get("token") != self.token and _alive(holder, time.time()):
            age = time.time() - float(holder.get("heartbeat", 0))
            raise RunInUseError(
                f"run folder {self.run_uri} is in use by another run (pid {holder.get('pid')} on "
                f"{holder.get('host')}, heartbeat {age:.0f} s ago): wait for it to end, or use another "
                f"storage.name (its {LEASE_FILE} is taken over once stale)")
        if holder is None and not storage.is_remote(self.run_uri):
            path = storage.strip_scheme(self.uri)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:  # atomic: of two runs starting together, one creates the file
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return self.acquire()
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
        else:
            self._write()
        if lease_token(self.run_uri) != self.token:
            raise RunInUseError(f"run folder {self.run_uri} was taken by another run starting at the same time")
        self.taken_over = holder
        self._thread = threading.Thread(target=self._beat, name="mirasol-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if lease_token(self.run_uri) != self.token:
                    return  # taken over: the workers see it and stop marking checkpoints
                self._write()
            except Exception:  # a missed beat is not fatal; the next one may get through
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if lease_token(self.run_uri) == self.token:
                fs = storage.fsspec_fs(self.uri)
                fs.rm(storage.strip_scheme(self.uri))
        except Exception:  # the next run takes a dead holder's lease over anyway
            pass

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
