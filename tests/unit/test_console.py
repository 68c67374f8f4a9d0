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


def test_time_left_covers_validation_and_the_checkpoint():
    from mirasol_ray.launch.console import time_left

    # 19 of 20 steps at 2 s a step; the final validation measured at 40 s before, the checkpoint at 5 s
    p = {"step": 19, "steps": 20, "step_s": 2.0, "evals_left": 1, "eval_s": 40.0, "ckpts_left": 1, "ckpt_s": 5.0}
    assert time_left(p) == 2.0 + 40.0 + 5.0
    # no validation measured yet: its clips at a training step's seconds a clip (64 clips, 8 a step of 2 s)
    p2 = {**p, "eval_s": None, "eval_rows": 64, "rows_per_step": 8}
    assert time_left(p2) == 2.0 + 16.0 + 5.0
    # the last step: validating for 10 s so far, then the checkpoint; never below 0 once a phase overruns
    last = {**p, "step": 20, "phase": "validating 64 clips"}
    assert time_left(last, phase_elapsed_s=10.0) == 30.0 + 5.0
    assert time_left(last, phase_elapsed_s=100.0) == 5.0
    writing = {**last, "evals_left": 0, "phase": "writing the checkpoint"}
    assert time_left(writing, 2.0) == 3.0
    assert time_left({"step": 3, "steps": 20}) is None  # nothing to measure a step by yet
    assert time_left({"step": 20, "steps": 20}) == 0.0


def test_evaluations_and_checkpoints_to_come():
    from mirasol_ray.train.loop import due_between

    assert due_between(0, 20, 10) == 2  # steps 10 and 20
    assert due_between(0, 25, 10) == 3  # 10, 20 and the last
    assert due_between(19, 20, 0) == 1  # only the last
    assert due_between(20, 20, 10) == 0


def test_pace_reports_what_the_console_needs():
    from mirasol_ray.config import Config
    from mirasol_ray.train.loop import Pace

    cfg = Config()
    cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = 20, 0, 50
    cfg.train.eval_batches, cfg.train.batch_size, cfg.train.grad_accum = 2, 4, 1
    pace = Pace(cfg, start_step=0, world=2, has_eval=True, scored=False)
    assert pace.eval_clips() == "up to 16 clips"
    p = pace.progress(19, 1.0)
    assert (p["evals_left"], p["ckpts_left"], p["eval_rows"], p["rows_per_step"]) == (1, 1, 16, 8)
    last = pace.progress(20, 1.0, phase="validating up to 16 clips")
    assert (last["evals_left"], last["ckpts_left"]) == (1, 1)
    pace.evaluated(12.0, 15)
    assert pace.eval_clips() == "15 clips"
    done = pace.progress(20, 1.0, phase="writing the checkpoint")
    assert (done["evals_left"], done["ckpts_left"], done["eval_s"]) == (0, 1, 12.0)


def test_plain_progress_lines_carry_the_callers_time_left(capsys):
    from mirasol_ray.launch.console import Progress

    bar = Progress("run", 20, "steps")  # stderr is captured: plain lines
    bar.set_eta(65.0)
    bar.update(20, "validating 64 clips")
    err = capsys.readouterr().err
    assert "run: 20/20 steps (100%)" in err and "about 01:05 left" in err and "validating 64 clips" in err
