"""What a person sees: one line per phase and progress bars on stderr, results on stdout; everything else in files.

Where the rest goes:

- the driver's library logs (Ray's ``ray.*`` loggers, Ray Data's execution plans, Python warnings) go to one
  file: ``logs/driver.log`` in the run folder for ``mirasol train`` (copied there at the end when the run folder
  is on S3), else ``mirasol-driver.log`` in the Ray session's ``logs/`` folder;
- the workers' output (Ray Train workers, Ray Data tasks, actors) stays in the Ray session's ``logs/`` folder
  (``worker-*.out/err``): Ray is started with ``log_to_driver=False``;
- Ray's own processes log into the same session folder, as always;
- what the driver's native code writes to file descriptor 2 (the C++ core worker's "E" lines, e.g. Ray Data's
  ``core_worker.cc`` note about actor constructor arguments, ray#53727) goes to the driver's log file while
  :func:`native_stderr_to` holds it; Python's ``sys.stderr`` (bars, our messages) stays on the console.

Our own ``mirasol_ray.*`` warnings (e.g. an input skipped while building shards) stay on the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray
import ray.data  # noqa: F401  (installs Ray Data's logging config, which quiet_libraries adjusts)
from tqdm import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def say(message: str) -> None:
    """One phase line for a person (stderr: stdout carries only results, e.g. ``--json``)."""
    print(message, file=sys.stderr, flush=True)


class DeferredFileHandler(logging.Handler):
    """Holds records until :meth:`attach` names the file (the Ray session folder exists only after ``ray.init``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.path = ""
        self._held: list[logging.LogRecord] = []
        self._file: logging.FileHandler | None = None

    def attach(self, path: str) -> None:
        if self._file is not None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file = logging.FileHandler(path, delay=True)  # no empty files
        self._file.setFormatter(self.formatter)
        self.path = path
        for record in self._held:
            self._file.emit(record)
        self._held.clear()

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.emit(record)
        elif len(self._held) < 10_000:
            self._held.append(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def session_logs() -> str:
    """The ``logs`` folder of the Ray session this process is connected to ("" when there is none here)."""
    try:
        import ray

        node = ray._private.worker._global_node
        return os.path.join(node.get_session_dir_path(), "logs") if node is not None else ""
    except Exception:
        return ""


def attach_session_log(handler: DeferredFileHandler) -> str:
    """Send ``handler``'s records to ``mirasol-driver.log`` in the Ray session's logs folder; its path ("" when
    this process has no local Ray session, e.g. a Ray Client connection: the records are then held in memory)."""
    logs = session_logs()
    if logs:
        handler.attach(os.path.join(logs, "mirasol-driver.log"))
    return handler.path


@contextlib.contextmanager
def quiet_libraries() -> Iterator[DeferredFileHandler]:
    """Route library logging and warnings into one file (attached by the caller) for the duration.

    Ray Data installs its own console handler on ``ray.data`` (execution plans, "Starting execution ..."): it is
    detached here and put back afterwards, as are the other handlers this changes."""
    handler = DeferredFileHandler()
    root = logging.getLogger()
    saved_root = (root.level,)

    ray_data = logging.getLogger("ray.data")
    saved_data = list(ray_data.handlers)
    for h in saved_data:
        if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
            ray_data.removeHandler(h)
    ray_data.addHandler(handler)
    ray_logger = logging.getLogger("ray")
    saved_ray = (ray_logger.propagate, list(ray_logger.handlers))
    for h in saved_ray[1]:
        ray_logger.removeHandler(h)
    # to the root's handler below, not a handler of its own: ray.init(configure_logging=False) clears the "ray"
    # logger's handlers, and a logger with none that does not propagate falls to Python's last-resort handler
    # (stderr: the raylet's "N worker processes have been started" reached the console of a sweep)
    ray_logger.propagate = True
    root.addHandler(handler)  # with a handler here, Python no longer prints unhandled warnings to stderr
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    ours = logging.getLogger("mirasol_ray")
    ours.addHandler(console)  # and, by propagation, the file
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        ours.removeHandler(console)
        ray_data.removeHandler(handler)
        for h in saved_data:
            if h not in ray_data.handlers:
                ray_data.addHandler(h)
        for h in saved_ray[1]:
            ray_logger.addHandler(h)
        ray_logger.propagate = saved_ray[0]
        root.setLevel(saved_root[0])
        root.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def native_stderr_to(path: str) -> Iterator[None]:
    """For the duration, send what this process writes to file descriptor 2 below Python (Ray's C++ core worker
    logs its errors there, whatever its log folder) to the end of ``path``, while Python's ``sys.stderr`` keeps
    writing to where fd 2 went before. A no-op without a ``path``, or when ``sys.stderr`` is not fd 2's (a test's
    in-memory capture, which native writes never reached anyway)."""
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        on_fd2 = False
    if not path or not on_fd2:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(saved), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                        errors="backslashreplace")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    python_stderr, sys.stderr = sys.stderr, console
    try:
        yield
    finally:
        console.flush()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
        console.close()


class StepProgress:
    """Draws a run's training progress on stderr from the counter actor rank 0 reports to (a tqdm bar with ETA on
    a terminal; elsewhere a plain line at every tenth of the run), and prints the events the workers send (a
    resume, for instance). Runs in a thread beside ``trainer.fit()``."""

    def __init__(self, counter, steps: int, title: str, interval_s: float = 0.5):
        self.counter, self.steps, self.title, self.interval_s = counter, steps, title, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mirasol-progress", daemon=True)
        self.events: list[str] = []

    def __enter__(self) -> StepProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        tty = sys.stderr.isatty()
        bar = tqdm(total=self.steps, desc=self.title, unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=not tty)
        seen, shown_tenth, t0, first = 0, -1, time.time(), None
        try:
            while True:
                stopping = self._stop.wait(self.interval_s)
                try:
                    status: dict[str, Any] = ray.get(self.counter.status.remote(seen), timeout=10)
                except Exception:
                    if stopping:
                        return
                    continue
                for event in status["events"]:
                    self.events.append(event)
                    (bar.write if tty else say)(event)
                seen += len(status["events"])
                p = status["progress"]
                step = int(p.get("step", 0))
                if first is None and step:
                    first, t0 = step, time.time()
                if tty:
                    bar.n = step
                    if "loss" in p:
                        bar.set_postfix(loss=f"{p['loss']:.4f}", refresh=False)
                    bar.refresh()
                elif step and step * 10 // max(self.steps, 1) > shown_tenth:
                    shown_tenth = step * 10 // max(self.steps, 1)
                    rate = (step - (first or step)) / max(time.time() - t0, 1e-9)
                    eta = f", about {tqdm.format_interval((self.steps - step) / rate)} left" if rate > 0 else ""
                    loss = f", loss {p['loss']:.4f}" if "loss" in p else ""
                    say(f"{self.title}: step {step}/{self.steps}{loss}{eta}")
                if stopping:
                    return
        finally:
            bar.close()
