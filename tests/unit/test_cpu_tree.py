"""The benchmark's CPU accounting of a process tree (``mirasol_ray/bench/data.py``: ``CpuTree``), on real
processes: a child that ends during the measurement is counted once, under its role, whether or not its parent
waits for it (Ray's raylet ignores SIGCHLD, so its ended workers' CPU reaches no parent)."""

from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest

from mirasol_ray.bench.data import CpuTree

# The parent: starts the child, reaps it (or, ignoring SIGCHLD as the raylet does, lets the kernel reap it and
# lose its CPU times), then lives until its stdin closes.
PARENT = r"""
import signal, subprocess, sys
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[3]]).wait()
sys.stdin.read()
"""

# The child: burns CPU, says so through a FIFO with its CPU clock, waits to be told to go on (no CPU), burns
# again, says so, and exits when told.
CHILD = r"""
import os, sys, time
d = sys.argv[1]
def burn(seconds):
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass
def say(name, text):
    with open(os.path.join(d, name), "w") as f:
        f.write(text)
def hear(name):
    with open(os.path.join(d, name)) as f:
        return f.read()
burn(0.3)
say("ready1", f"{os.getpid()} {time.process_time()}")
hear("go")
burn(0.4)
say("ready2", str(time.process_time()))
hear("exit")
"""


def _read(path: str) -> str:
    with open(path) as f:  # a FIFO: blocks until the child writes
        return f.read()


def _write(path: str) -> None:
    with open(path, "w") as f:  # a FIFO: blocks until the child listens
        f.write("x")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sigchld, sighted", [("ignore", True), ("wait", True), ("wait", False)])
def test_a_child_that_ends_during_the_measurement_is_counted_once(tmp_path, sigchld, sighted):
    for name in ("ready1", "go", "ready2", "exit"):
        os.mkfifo(tmp_path / name)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, sigchld, CHILD, str(tmp_path)], stdin=subprocess.PIPE)
    try:
        pid, cpu1 = _read(str(tmp_path / "ready1")).split()
        # the child has used ~0.3 s before the measurement starts: none of it may count, nor be taken off
        tree = CpuTree(parent.pid, interval=3600).start()  # sightings only when the test asks (start, poll, stop)
        _write(str(tmp_path / "go"))
        cpu2 = float(_read(str(tmp_path / "ready2")))
        if sighted:
            tree.poll()
        gone = os.pidfd_open(int(pid))
        _write(str(tmp_path / "exit"))
        select.select([gone], [], [])  # readable once the child has ended
        os.close(gone)
        tree.stop()
    finally:
        parent.stdin.close()
        parent.wait()
    used = cpu2 - float(cpu1)  # the child's CPU during the measurement, bar its exit
    assert min(tree.by_role.values()) >= 0
    assert sum(tree.by_role.values()) == pytest.approx(tree.total)
    assert used - 0.03 <= tree.total <= used + 0.15, tree.by_role
    ended = [p for p in tree.processes if p["pid"] == int(pid)]
    if sighted:  # counted under its own role, and not a second time through the parent's reaped-children time
        assert tree.by_role["child"] >= used - 0.03 and ended and ended[0]["ended"]
    else:  # never seen after the start: its parent's reaped-children time holds it
        assert tree.by_role["exited"] >= used - 0.03 and not ended
