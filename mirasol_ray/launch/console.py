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


def terminal_width() -> int:
    """Columns of the terminal stderr draws on; 0 when stderr is not a terminal or reports no width (a bar would
    draw nothing there: :class:`Progress` prints plain lines instead)."""
    try:
        if not sys.stderr.isatty():
            return 0
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Progress:
    """A count toward ``total`` on stderr: a tqdm bar (with its ETA) on a terminal that has columns; elsewhere (a
    file, a CI or Ray job log, a 0-column terminal) a plain line at every tenth of ``total`` and at least every
    ``every_s`` seconds, with the rate and the time left."""

    def __init__(self, title: str, total: int | None, unit: str, every_s: float = 30.0):
        self.title, self.total, self.unit, self.every_s = title, total, unit, every_s
        self.bar = tqdm(total=total, desc=title, unit=unit, file=sys.stderr, dynamic_ncols=True) \
            if terminal_width() else None
        self.n, self._tenth, self._t0, self._shown = 0, 0, time.time(), time.time()
        self._first: tuple[int, float] | None = None

    def write(self, message: str) -> None:
        """A line above the bar (or a plain line)."""
        (self.bar.write if self.bar is not None else say)(message)

    def update(self, n: int, postfix: str = "") -> None:
        """The count is now ``n``; ``postfix`` (e.g. ``loss 2.1``) goes with it."""
        n = int(n)
        if self._first is None and n:
            self._first = (n, time.time())  # the rate counts from the first progress, not from start-up
        self.n = n
        if self.bar is not None:
            self.bar.n = n
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.refresh()
            return
        tenth = n * 10 // self.total if self.total else 0
        now = time.time()
        if n and (tenth > self._tenth or now - self._shown >= self.every_s):
            self._tenth, self._shown = max(tenth, self._tenth), now
            say(self.line(postfix))

    def line(self, postfix: str = "") -> str:
        """``title: 30/100 clips (30%), 2.5 clips/s, about 0:28 left[, postfix]``."""
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        rate = eta = ""
        if self._first is not None and self.n > self._first[0]:
            r = (self.n - self._first[0]) / max(time.time() - self._first[1], 1e-9)
            rate = f", {r:.3g} {self.unit}/s"
            if self.total:
                eta = f", about {tqdm.format_interval(max(self.total - self.n, 0) / r)} left"
        return f"{self.title}: {self.n}{of} {self.unit}{pct}{rate}{eta}" + (f", {postfix}" if postfix else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepProgress:
    """Draws a run's training progress on stderr from the counter actor rank 0 reports to (:class:`Progress`: a
    bar on a terminal, plain lines elsewhere), prints the events the workers send (a resume, for instance), and
    says when the steps are done and the final evaluation and checkpoint are being written. Runs in a thread beside
    ``trainer.fit()``."""

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
        bar = Progress(self.title, self.steps, "steps")
        seen, finishing = 0, False
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
                    bar.write(event)
                seen += len(status["events"])
                p = status["progress"]
                step = int(p.get("step", 0))
                bar.update(step, f"loss {p['loss']:.4f}" if "loss" in p else "")
                if step >= self.steps > 0 and not finishing and not stopping:
                    finishing = True
                    bar.write(f"{self.title}: {self.steps} steps done; writing the last checkpoint")
                if stopping:
                    return
        finally:
            bar.close()
