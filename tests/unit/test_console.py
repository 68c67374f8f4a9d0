"""The console helpers: native writes to fd 2 go to a file while Python's stderr stays on the console."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_native_stderr_goes_to_the_log_and_python_stderr_stays(tmp_path):
    log = tmp_path / "driver.log"
    log.write_text("before\n")
    script = textwrap.dedent(f"""
        import os, sys
        from mirasol_ray.launch.console import native_stderr_to
        print("python before", file=sys.stderr)
        with native_stderr_to({str(log)!r}):
            os.write(2, b"[E core_worker.cc:2465] native inside\\n")  # as Ray's C++ logging writes
            print("python inside", file=sys.stderr)
        os.write(2, b"native after\\n")
        print("python after", file=sys.stderr)
        with native_stderr_to(""):  # no log file: nothing changes
            os.write(2, b"native unlogged\\n")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["python before", "python inside", "native after", "python after",
                                        "native unlogged"]
    assert log.read_text() == "before\n[E core_worker.cc:2465] native inside\n"  # appended, not replaced
