"""A weighted mixture of two shard sets trained through Ray Train (issue 31): stopped mid-epoch and resumed, the run
sees exactly the rows the mixture's pure order gives an uninterrupted run; the metrics count each set's epochs;
validation scores each set apart (``val/<name>/...``) beside the whole, and ``mirasol results`` and ``mirasol eval``
show them. Sets built with different tokenizers are refused before anything starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mirasol_ray.config import load_config
from mirasol_ray.data.index import MixtureOrder, SampleIndex, read_samples
from mirasol_ray.data.pipeline import sample_index
from mirasol_ray.launch.train import read_metrics, run_training

BATCH, WORKERS, STOP, END, SEED = 2, 2, 3, 8, 5
"""Each step takes 2 rows per worker from 2 workers: 4 stream positions. Weights 3:1 over sets of 12 and 8 clips:
after 8 steps (32 positions) set a has given 24 (two epochs), set b 8 (one); the stop at step 3 is mid-epoch of
both."""


@pytest.fixture(scope="module")
def sets(synth_shards, tmp_path_factory):
    """Set a: the session's 12 synthetic clips; set b: 8 more (another seed), built with a's tokenizer; set
    ``other_tokenizer``: b with the tokenizer learnt from its own text."""
    from mirasol_ray.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("mixture")
    b = root / "b" / "shards"
    synthesize(str(b), 8, seed=11, shard_size=4, progress=False, workers=1)
    other = root / "other" / "shards"
    shutil.copytree(b, other)
    shutil.copyfile(Path(synth_shards["dir"]) / "tokenizer.json", b / "tokenizer.json")
    return {"a": synth_shards["dir"], "b": str(b), "other_tokenizer": str(other)}


def _cfg(train: list[tuple[str, int, str]], val: list[str], root: Path, name: str, steps: int, cache: bool = False):
    sets = ", ".join(f"{{path: '{p}', weight: {w}, name: {n}}}" for p, w, n in train)
    vals = ", ".join(f"{{path: '{p}', name: {n}}}" for p, n in val)
    return load_config("tiny", [
        f"data.train=[{sets}]", f"data.val=[{vals}]", f"storage.root={root}", f"storage.name={name}",
        f"train.steps={steps}", f"train.batch_size={BATCH}", "train.checkpoint_every=100", "train.log_every=1",
        "train.sample_log=true", "train.eval_train_batches=0", "data.task=caption", "data.segment_captions=false",
        "data.max_target_len=12", f"data.seed={SEED}", "data.decode_cpus=0.25", "data.decode_batch_size=2",
        f"scaling.num_workers={WORKERS}", f"scaling.cpus_per_worker={1 / WORKERS}", f"data.cache={cache}"])


def test_a_mixture_trains_resumes_exactly_and_scores_each_set(ray_local, sets, tmp_path, capsys, sample_log):
    from mirasol_ray.launch.evaluate import evaluate, format_table
    from mirasol_ray.launch.results import print_results, read_results

    a, b = sets["a"], sets["b"]
    train = [(a, 3, "a"), (b, 1, "b")]
    val = [(a, "a"), (b, "b")]
    with pytest.raises(ValueError, match=f"the shard sets {a} and {sets['other_tokenizer']} were built with "
                                         "different tokenizers"):
        run_training(_cfg([(a, 3, "a"), (sets["other_tokenizer"], 1, "b")], val, tmp_path, "refused", END))
    assert not (tmp_path / "refused").exists()

    # stopped after step 3, then the same command for 8 steps: it resumes from the step-3 checkpoint. The rest is read
    # from rows decoded once into the object store (data.cache): the order is the mixture's whichever source gives
    # the rows, so this one resume covers both sources without a third run
    assert run_training(_cfg(train, val, tmp_path, "mix", STOP))["steps"] == STOP
    summary = run_training(_cfg(train, val, tmp_path, "mix", END, cache=True))
    assert summary["steps"] == END
    run = tmp_path / "mix"

    # the rows of each step and worker: what the mixture's order gives the uninterrupted run, position for position
    indexes = [sample_index(a), sample_index(b)]
    index = SampleIndex.concat(indexes)
    keys = [s["__key__"] for s in read_samples(index.url, index.shards, index.refs(np.arange(len(index))))]
    order = MixtureOrder([12, 8], [3, 1], SEED)
    seen = sample_log(run)
    assert sorted(seen) == list(range(1, END + 1))
    for step in range(1, END + 1):
        for rank in range(WORKERS):
            first = WORKERS * BATCH * (step - 1) + rank
            expected = np.arange(first, first + WORKERS * BATCH, WORKERS)  # worker r takes the r-th, r+W-th, ...
            assert [p for p, _ in seen[step][rank]] == expected.tolist(), (step, rank)
            assert [k for _, k in seen[step][rank]] == [keys[s] for s in order.samples(expected)[0]], (step, rank)
    positions = np.array([p for s in seen.values() for rows in s.values() for p, _ in rows])
    assert np.bincount(order.locate(positions)[0]).tolist() == [24, 8]  # 3:1

    # epochs of each set in the metrics: set a ran out twice, b once, each at its own pace
    records = {r["step"]: r for r in read_metrics(str(run))}
    assert records[STOP]["epochs"] == {"a": 0.75, "b": 0.375}
    assert records[END]["epochs"] == {"a": 2.0, "b": 1.0} == summary["epochs"]

    # validation: the whole and each set apart
    last_val = records[END]["val"]
    assert {"caption", "loss", "a/caption", "a/loss", "b/caption", "b/loss"} <= set(last_val)
    assert summary["val"]["a/caption"] == last_val["a/caption"]
    assert min(last_val["a/caption"], last_val["b/caption"]) <= last_val["caption"] <= max(
        last_val["a/caption"], last_val["b/caption"])

    res = read_results(str(run))
    assert res["metric"] == "val/caption" and res["trials"][0]["sets"] == {"a": last_val["a/caption"],
                                                                           "b": last_val["b/caption"]}
    assert f"--data {a} --data {b}" in res["eval_command"]
    capsys.readouterr()
    print_results({**res, "plots": []})
    out = capsys.readouterr().out
    assert "last val/a/caption (%)" in out and "last val/b/caption (%)" in out

    ev = evaluate(str(run), [a, b], overrides=["data.segment_captions=false", "data.max_target_len=12"],
                  choice="last")
    assert set(ev["sets"]) == {"a", "b"}
    assert ev["sets"]["a"]["caption"]["count"] == 12 and ev["sets"]["b"]["caption"]["count"] == 8
    assert ev["metrics"]["caption"]["count"] == 20
    assert ev["sets"]["a"]["caption"]["value"] == pytest.approx(last_val["a/caption"])
    table = format_table(ev)
    assert "  a: caption" in table and "  b: caption" in table
