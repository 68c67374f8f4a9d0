"""The command line a person lives in (issue 34): discoverable (--version, presets, config show, doctor, help text on
every option, a subcommand's own usage on a bad flag), one truth per figure (results' best is the checkpoint eval
takes; scores in percent everywhere), nothing written unless asked, never silent off a terminal, storage errors
in one line within seconds. No Ray: each runs the CLI's main in-process or as a short subprocess."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from mirasol_ray import cli, storage
from mirasol_ray.config import from_dict, load_config, preset_names
from mirasol_ray.launch import console
from mirasol_ray.launch.evaluate import format_table
from mirasol_ray.launch.inspect import dataset_tokenizer
from mirasol_ray.train.metrics import benchmark_results, show_value, table_rows

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 120, cwd: str = REPO):
    return subprocess.run([sys.executable, "-m", "mirasol_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


# -- discovery -----------------------------------------------------------------------------------------------------


def test_version_and_presets_each_with_its_purpose(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "mirasol-ray 0.1.0"
    assert cli.main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == preset_names()
    assert all(len(r["purpose"]) > 20 and "\n" not in r["purpose"] for r in rows), rows
    assert next(r for r in rows if r["name"] == "tiny")["purpose"].startswith("the test and smoke-run preset")
    assert cli.main(["configs"]) == 0  # the name for it
    assert capsys.readouterr().out.splitlines()[0].split()[:3] == ["base", "299M", "params"]
    # each preset's size, its model built on the meta device
    params = {r["name"]: r["params"] for r in rows}
    assert params["tiny"] < 5e6 and 1e7 < params["small"] < 2e7 and 2.8e9 < params["mirasol3b"] < 3e9
    assert next(r for r in rows if r["name"] == "tiny_long")["purpose"].endswith("its own stretch of audio.")


def test_parameter_counts_read_at_a_glance():
    assert [cli.format_params(n) for n in (2_917_958_048, 299_303_504, 14_483_560, 2_074_708, 950, 12_300)] == \
        ["2.92B", "299M", "14.5M", "2.07M", "950", "12.3k"]


def test_every_option_has_help_and_train_help_lists_the_presets(capsys):
    missing = [f"{leaf.prog} {a.option_strings or a.dest}" for leaf in cli._leaf_parsers(cli.build_parser(["-h"]))
               for a in leaf._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in preset_names()) and "mirasol presets" in out


def test_an_unknown_flag_shows_its_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--checkpoint", "x", "--data", "y", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.splitlines()[0].startswith("usage: mirasol eval ") and "unrecognized arguments: --bogus" in err
    with pytest.raises(SystemExit):
        cli.main(["config", "show", "--nope"])
    assert capsys.readouterr().err.startswith("usage: mirasol config show ")


def test_config_show_prints_the_config_a_run_would_use(capsys):
    assert cli.main(["config", "show", "--config", "tiny", "--set", "train.steps=7", "--set", "data.task=qa"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# --config tiny\n# --set train.steps=7\n# --set data.task=qa\n")
    assert "  steps: 7  # --set" in out.splitlines() and "  task: qa  # --set" in out.splitlines()
    assert sum(line.endswith("# --set") for line in out.splitlines()) == 2
    shown = from_dict(yaml.safe_load(out))
    assert shown == load_config("tiny", ["train.steps=7", "data.task=qa"]) and shown.train.steps == 7
    # --check: the run's start checks, the same refusal mirasol train gives, before any Ray
    assert cli.main(["config", "show", "--config", "tiny", "--check"]) == 2
    assert capsys.readouterr().err.strip() == ("mirasol: error: data.train is empty: give the training shards with "
                                               "--set data.train=URL")
    assert cli.main(["config", "show", "--config", "tiny", "--check", "--set", "data.train=/nonexistent/x"]) == 2
    assert "/nonexistent/x" in capsys.readouterr().err


def test_doctor_names_storage_variables_but_never_their_values(capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["doctor", "--json"]) == 0
    out = capsys.readouterr().out
    assert "sekrit-value-123" not in out
    checks = {c["check"]: c for c in json.loads(out)}
    assert set(checks) == {"mirasol", "torch", "decoders", "ray", "storage", "wordnet", "tensorboard"}
    assert "AWS_SECRET_ACCESS_KEY" in checks["storage"]["detail"].split("unset")[0]
    assert "AWS_ACCESS_KEY_ID" in checks["storage"]["detail"].split("unset")[1]
    assert checks["decoders"]["status"] == "ok" and "h264" in checks["decoders"]["detail"]


def test_help_is_fast_a_measure_not_a_limit():
    """--help of every command in a fresh process (the figure goes to the report; the limit is generous)."""
    commands = [[], ["train"], ["eval"], ["results"], ["data", "inspect"], ["config", "show"], ["doctor"],
                ["presets"], ["shards", "build"], ["sweep"]]
    times = {}
    for c in commands:
        t0 = time.perf_counter()
        proc = _run([*c, "--help"])
        times[" ".join(c) or "mirasol"] = time.perf_counter() - t0
        assert proc.returncode == 0 and proc.stdout.startswith("usage: mirasol"), proc.stderr
    print("--help seconds:", {k: round(v, 2) for k, v in times.items()})
    assert max(times.values()) < 10


# -- one truth per figure ----------------------------------------------------------------------------------------


def _checkpoint(run: str, name: str, step: int, qa: float) -> None:
    folder = os.path.join(run, name)
    os.makedirs(folder)
    meta = json.dumps({"step": step, "metrics": {"val": {"qa": qa, "loss": 1.0}},
                       "score": {"metric": "val/qa", "mode": "max"}})
    with open(os.path.join(folder, "meta.json"), "w") as f:
        f.write(meta)
    with open(os.path.join(folder, "complete.json"), "w") as f:
        json.dump({"step": step, "files": {"meta.json": len(meta)}}, f)


@pytest.fixture
def run_folder(tmp_path):
    """A run whose validation hit val/qa 1.0 twice (steps 1250 and 1300), as the demo's did: checkpoints at both."""
    run = tmp_path / "runs" / "finetune"
    run.mkdir(parents=True)
    cfg = load_config("tiny", ["data.train=/x/train", "data.val=/x/val", "data.task=qa", "train.steps=1300"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    rows = [{"step": s, "loss": 2.0 - s / 1000, "val": {"qa": q, "loss": 1.0}, "train_eval": {"qa": 1.0, "loss": 0.5}}
            for s, q in ((1200, 0.75), (1250, 1.0), (1300, 1.0))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _checkpoint(str(run), "checkpoint_2026-01-01_00-00-01.000000", 1250, 1.0)
    _checkpoint(str(run), "checkpoint_2026-01-01_00-00-02.000000", 1300, 1.0)
    return run


def test_results_best_is_the_checkpoint_eval_takes_in_percent_and_writes_nothing_unasked(run_folder, tmp_path,
                                                                                          capsys, monkeypatch):
    from mirasol_ray.train.checkpoint import best_checkpoint_dir

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert cli.main(["results", str(run_folder), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    t = res["trials"][0]
    eval_takes = best_checkpoint_dir(str(run_folder))  # what `mirasol eval --checkpoint RUN` loads
    assert t["best_step"] == t["checkpoint_step"] == eval_takes["step"] == 1300
    assert res["best"]["step"] == 1300 and res["best"]["checkpoint"] == eval_takes["uri"]
    assert res["plots"] == [] and os.listdir(cwd) == [], "nothing written without --out"

    assert cli.main(["results", str(run_folder)]) == 0
    out = capsys.readouterr().out
    assert "best val/qa (%)" in out and "100.00" in out
    assert "best checkpoint (step 1300, val/qa=100.00%)" in out
    assert "best: finetune val/qa=100.00% at step 1300" in out and "at step 1250" not in out
    assert "plots: none written (give --out DIR)" in out and os.listdir(cwd) == []

    plots = tmp_path / "plots"
    assert cli.main(["results", str(run_folder), "--json", "--out", str(plots)]) == 0
    assert json.loads(capsys.readouterr().out)["plots"] == [str(plots / "learning_curves.png")]
    assert os.listdir(cwd) == []
    png = (plots / "learning_curves.png").read_bytes()
    # a single run: the metric (held-out beside training clips) and the training loss, two panels of 6 in at 90 dpi
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1080


def test_eval_table_fills_every_column_in_percent_and_names_the_normalization_it_applied():
    records = [{"key": "a", "task": "qa", "qtype": "what", "pred": "The Dog.", "target": "dog", "correct": True,
                "rank": -1, "refs": []},
               {"key": "b", "task": "mcqa", "qtype": "other", "pred": "x", "target": "y", "correct": False,
                "rank": -1, "refs": []},
               {"key": "c", "task": "caption", "qtype": "other", "pred": "a red car", "target": "a red car",
                "correct": True, "rank": -1, "refs": []}]
    res = benchmark_results(records, "")  # the synthetic set: no benchmark protocol
    assert res["normalization"] == "squad"  # a value --normalize offers, the one validation uses
    table = table_rows(res, "run (step 4)")
    assert all(r["task"] for r in table), table
    assert {r["metric"]: r["value"] for r in table}["accuracy [qa]"] == 100.0
    assert benchmark_results(records, "", "exact")["normalization"] == "exact"
    assert {m["name"]: m["value"] for m in benchmark_results(records, "", "exact")["metrics"]}["accuracy [qa]"] == 0
    shown = format_table({"table": table, "benchmark": res})
    head = shown.splitlines()[0]
    assert "Metric value (%)" in head and "Paper (%)" in head
    assert all(line.split()[0] for line in shown.splitlines()[2:])
    choices = next(a for a in cli.build_parser(["eval"])._subparsers._group_actions[0].choices["eval"]._actions
                   if a.dest == "normalize").choices
    assert res["normalization"] in choices


def test_training_summary_rounds_the_loss_and_says_best_once():
    summary = {"run": "/r", "steps": 20, "final_loss": 4.7232232093811035, "seconds": 12.3, "checkpoint": "/r/c2",
               "best_checkpoint": {"uri": "/r/c1", "step": 10, "value": 0.8125, "metric": "val/qa", "mode": "max"},
               "decoded": 40, "skipped": {}, "train_eval": {"qa": 0.5, "loss": 2.25}, "val": {"qa": 0.75, "loss": 2.5},
               "learning_curve": "/r/plots/learning_curve.png", "tensorboard": "/r/tensorboard", "log": "/r/log"}
    text = cli.summary_text(summary)
    assert "final loss 4.7232," in text and "4.72322" not in text
    assert "best best" not in text and "best           /r/c1 (step 10, val/qa 81.25%, max)" in text
    assert "tensorboard    tensorboard --logdir /r/tensorboard" in text
    qa = next(line for line in text.splitlines() if line.startswith("qa"))
    assert qa.split() == ["qa", "(%)", "50.00", "75.00"]
    assert show_value("val/loss", 2.5) == "2.5" and show_value("train_eval/qa/what", 0.5) == "50.00%"


# -- never silent ------------------------------------------------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def fileno(self) -> int:
        return 2


@pytest.mark.parametrize("tty", [False, True])
def test_progress_prints_plain_lines_off_a_terminal_and_on_a_zero_column_one(monkeypatch, tty):
    err = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 24)))
    assert console.terminal_width() == 0
    bar = console.Progress("evaluating", 100, "clips", every_s=3600)
    for n in range(0, 101, 5):
        bar.update(n)
    bar.close()
    lines = err.getvalue().splitlines()
    assert [ln.split(":")[1].split()[0] for ln in lines] == [f"{k}/100" for k in range(10, 101, 10)]
    assert lines[-1].startswith("evaluating: 100/100 clips (100%)")
    assert "left" in lines[1]


# -- storage errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["no credentials", "no endpoint", "closed port"])
def test_storage_errors_are_one_line_naming_the_url_within_seconds(tmp_path, monkeypatch, capsys, case):
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    if case != "no credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    port = 0
    if case == "closed port":
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    storage.configure()
    url = "s3://no-such-bucket-h34/run"
    t0 = time.perf_counter()
    assert cli.main(["results", url]) == 2
    took = time.perf_counter() - t0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirasol: error: ") and url in lines[0], lines
    hint = {"no credentials": "AWS_ACCESS_KEY_ID", "no endpoint": "AWS_ENDPOINT_URL",
            "closed port": f"http://127.0.0.1:{port}"}[case]
    assert hint in lines[0]
    assert took < 10, f"{case}: {took:.1f} s"


def test_check_access_is_a_no_op_for_local_paths(tmp_path):
    storage.check_access(str(tmp_path / "nothing-here"))  # local paths: the command's own checks say more


# -- data inspect ----------------------------------------------------------------------------------------------


def test_inspect_finds_the_datasets_tokenizer_and_decodes_a_few_by_default(tmp_path):
    (tmp_path / "train").mkdir()
    shards = [str(tmp_path / "train" / "shard-000000.tar")]
    assert dataset_tokenizer(shards, {}) == ""
    (tmp_path / "tokenizer.json").write_text("{}")  # shards synth / build --tokenizer learn: above the splits
    assert dataset_tokenizer(shards, {}) == str(tmp_path / "tokenizer.json")
    (tmp_path / "train" / "mine.json").write_text("{}")
    assert dataset_tokenizer(shards, {"tokenizer": "mine.json"}) == str(tmp_path / "train" / "mine.json")
    args = cli.build_parser(["data", "inspect", "x"]).parse_args(["data", "inspect", "x"])
    assert args.limit == 16


def test_the_contact_sheet_shows_each_clips_texts(tmp_path):
    import numpy as np

    from mirasol_ray.data.text import get_tokenizer
    from mirasol_ray.launch.inspect import clip_texts, contact_sheet

    tok = get_tokenizer("byte")

    def padded(text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((2, 48), np.int32)
        mask = np.zeros((2, 48), bool)
        enc = tok.encode(text)
        ids[0, :len(enc)], mask[0, :len(enc)] = enc, True
        return ids, mask

    prompt, prompt_mask = padded("what colour is the circle?")
    target, target_mask = padded("red")
    row = {"key": "clip0", "video": np.zeros((2, 2, 16, 16, 3), np.uint8), "audio": np.zeros((2, 8, 4), np.float32),
           "audio_present": True, "snippet_mask": np.ones(2, bool), "text_mask": np.array([True, False]),
           "prompt_ids": prompt, "prompt_mask": prompt_mask, "target_ids": target, "target_mask": target_mask}
    assert clip_texts(row, tok) == ["what colour is the circle? -> red"]
    assert clip_texts(row, None) == []
    path = contact_sheet([row], str(tmp_path / "sheet.png"), title="t", tok=tok)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # each snippet's time span under its frames, the spectrogram's axes in seconds and Hz (issue 34)
    from mirasol_ray.launch.inspect import mel_hz, sheet_labels

    timed = {**row, "snippet_seconds": np.array([[0.0, 2.0], [2.0, 4.0]], np.float32),
             "snippet_mask": np.array([True, False])}
    labels = sheet_labels(timed, 16000)
    assert labels["spans"] == ["0.0-2.0 s", "(pad)"] and labels["extents"] == [(0.0, 2.0), None]
    assert labels["time_label"] == "time (s)" and labels["freq_label"].startswith("frequency (Hz")
    assert [b for b, _ in labels["freq_ticks"]] == [0, 2, 4, 5, 7] and labels["freq_ticks"][-1][1] == "5.9k"  # 8 bins
    assert sheet_labels(row, 16000)["time_label"] == "time (log-mel frame)"  # a row without spans
    hz = mel_hz(64, 16000)
    assert 0 < hz[0] < 100 and 7000 < hz[-1] < 8000 and (np.diff(hz) > 0).all()
    assert contact_sheet([timed], str(tmp_path / "timed.png"), tok=tok).endswith("timed.png")


def test_check_access_leaves_what_it_cannot_name_to_the_operation(monkeypatch):
    """A bucket name botocore refuses before any request (so also any answer but a 404 or no answer at all): no
    error from the probe; the read or write itself reports it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage.configure("http://127.0.0.1:9")
    storage.check_access("s3://not a bucket/x")


def test_doctor_says_when_the_cluster_in_ray_address_does_not_answer(monkeypatch):
    from mirasol_ray.launch.doctor import run_checks

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    ray_check = next(c for c in run_checks() if c["check"] == "ray")
    assert ray_check["status"] == "FAIL" and f"RAY_ADDRESS=127.0.0.1:{port} does not answer" in ray_check["detail"]
    with __import__("socket").socket() as s:  # a port that listens: it answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{s.getsockname()[1]}")
        assert next(c for c in run_checks() if c["check"] == "ray")["status"] == "ok"


def test_rows_carry_each_snippets_span_only_where_asked():
    """``data inspect`` asks the pipeline for ``snippet_seconds``; training's batches stay as they were."""
    import numpy as np

    from mirasol_ray.config import DataConfig
    from mirasol_ray.data.pipeline import stack_rows
    from mirasol_ray.data.schema import row_spec

    cfg = DataConfig()
    row = {k: np.zeros(shape, dt) for k, (shape, dt) in row_spec(cfg).items()} | {"key": "k", "pos": 3}
    spans = np.arange(2 * cfg.num_snippets, dtype=np.float32).reshape(cfg.num_snippets, 2)
    assert "snippet_seconds" not in stack_rows([row | {"snippet_seconds": spans}], cfg)
    batch = stack_rows([row | {"snippet_seconds": spans}, row], cfg, spans=True)
    np.testing.assert_array_equal(batch["snippet_seconds"][0], spans)
    assert not batch["snippet_seconds"][1].any()  # a row without spans: zeros (the sheet draws none)
