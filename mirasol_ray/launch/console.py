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
        self.eta_s: float | None = None  # the caller's time left, when it knows better than the rate (set_eta)

    def set_eta(self, seconds: float | None) -> None:
        """Time left as the caller reckons it (work beside the counted units: validation, checkpoints); the bar
        then shows it in place of tqdm's own estimate from the rate alone."""
        if self.eta_s is None and seconds is not None and self.bar is not None:
            self.bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
        self.eta_s = seconds

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
            if self.eta_s is not None:
                postfix = f"about {tqdm.format_interval(self.eta_s)} left" + (f", {postfix}" if postfix else "")
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
            if self.total and self.eta_s is None:
                eta = f", about {tqdm.format_interval(max(self.total - self.n, 0) / r)} left"
        if self.eta_s is not None:
            eta = f", about {tqdm.format_interval(self.eta_s)} left"
        return f"{self.title}: {self.n}{of} {self.unit}{pct}{rate}{eta}" + (f", {postfix}" if postfix else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def time_left(progress: dict[str, Any], phase_elapsed_s: float = 0.0) -> float | None:
    """Seconds a run has left, from what rank 0 reports (:class:`mirasol_ray.train.loop.Pace`): the steps left at
    the measured seconds a step, plus each evaluation still to come at the last one's measured seconds (before the
    first, its clips at a training step's seconds a clip: a forward pass is cheaper than training's, decoding
    answers dearer), plus each checkpoint still to come at the last one's seconds. In a phase (the final
    validation, the last checkpoint) the time already spent in it comes off that phase's estimate, never below 0.
    ``None`` while there is nothing to measure a step by."""
    steps_left = max(int(progress.get("steps", 0)) - int(progress.get("step", 0)), 0)
    step_s = progress.get("step_s")
    if step_s is None and steps_left:
        return None
    eval_s = progress.get("eval_s")
    if eval_s is None and step_s and progress.get("eval_rows") and progress.get("rows_per_step"):
        eval_s = progress["eval_rows"] * step_s / progress["rows_per_step"]
    evals, ckpts = int(progress.get("evals_left", 0)), int(progress.get("ckpts_left", 0))
    eval_s, ckpt_s = float(eval_s or 0.0), float(progress.get("ckpt_s") or 0.0)
    phase = progress.get("phase", "")
    now = 0.0  # what is left of the phase under way
    if phase.startswith("validating") and evals:
        evals, now = evals - 1, max(eval_s - phase_elapsed_s, 0.0)
    elif phase.startswith("writing") and ckpts:
        ckpts, now = ckpts - 1, max(ckpt_s - phase_elapsed_s, 0.0)
    return steps_left * float(step_s or 0.0) + evals * eval_s + ckpts * ckpt_s + now


class StepProgress:
    """Draws a run's training progress on stderr from the counter actor rank 0 reports to (:class:`Progress`: a
    bar on a terminal, plain lines elsewhere), prints the events the workers send (a resume, "validating N clips"
    and "writing the checkpoint" at the last step, for instance), shows the phase under way beside the bar, and
    the time left by :func:`time_left` (evaluations and checkpoints to come included). Runs in a thread beside
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
        seen, phase, since = 0, "", time.time()
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
                if p.get("phase", "") != phase:
                    phase, since = p.get("phase", ""), time.time()
                bar.set_eta(time_left(p, time.time() - since))
                bar.update(step, ", ".join(([phase] if phase else [])
                                           + ([f"loss {p['loss']:.4f}"] if "loss" in p else [])))
                if stopping:
                    return
        finally:
            bar.close()
