"""A driver's scratch folder: where the Train workers on its machine keep their temporary files (a checkpoint being
written, the metrics log), so that one ``rmtree`` on every exit path of the driver removes them all, even after the
workers were killed (Ctrl-C, a failed run) and could not clean up themselves. A driver killed outright leaves its
folder behind; the next driver on the machine removes folders whose owner is no longer running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import psutil

PREFIX = "mirasol-run-"


def process_gone(pid: int) -> bool:
    """No such process, or a zombie (dead, not yet reaped by its parent)."""

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _owner_gone(name: str) -> bool:
    m = re.match(rf"{PREFIX}(\d+)-", name)
    return bool(m) and process_gone(int(m.group(1)))


def sweep_stale(base: str | None = None) -> list[str]:
    """Remove scratch folders under ``base`` (the system temp folder) whose driver process is gone."""
    base = base or tempfile.gettempdir()
    removed = []
    for name in os.listdir(base):
        if name.startswith(PREFIX) and _owner_gone(name):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(name)
    return removed


@contextlib.contextmanager
def scratch_folder() -> Iterator[str]:
    """A fresh scratch folder for this driver, removed when the block exits, however it exits."""
    sweep_stale()
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
