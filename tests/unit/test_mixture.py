"""Weighted mixtures of shard sets (issue 31): ``data.train`` as a list of sets, the mixture's training stream as a
pure function of the seed (shares within tolerance, each set's epochs at its own pace, exact resume), sets whose
label sets or tokenizers differ refused, and a split of several sets scored apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mirasol_ray.config import ConfigError, ShardSet, from_dict, load_config, set_name
from mirasol_ray.data.index import MixtureOrder, ReadPosition, SampleIndex, StreamOrder, round_counts
from mirasol_ray.data.pipeline import split_by_set, stack_rows, train_batches
from mirasol_ray.data.schema import row_spec
from mirasol_ray.launch.results import check_metric
from mirasol_ray.train.metrics import is_score

MIX = "data.train=[{path: s3://b/kinetics_sounds/train, weight: 3}, {path: s3://b/msrvtt_qa/train, weight: 1}]"


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_a_single_path_stays_a_string_and_a_list_is_a_mixture_of_named_sets():
    single = load_config("tiny", ["data.train=s3://b/kinetics_sounds/train"])
    assert single.data.train == "s3://b/kinetics_sounds/train" and not single.data.mixture
    assert single.data.train_sets == [ShardSet("s3://b/kinetics_sounds/train", 1.0, "kinetics_sounds")]

    cfg = load_config("tiny", [MIX, "data.val=[s3://b/kinetics_sounds/val, {path: s3://b/msrvtt_qa/val, name: qa_set}]"])
    assert cfg.data.mixture
    assert [(s.path, s.weight, s.name) for s in cfg.data.train_sets] == [
        ("s3://b/kinetics_sounds/train", 3.0, "kinetics_sounds"), ("s3://b/msrvtt_qa/train", 1.0, "msrvtt_qa")]
    assert [s.name for s in cfg.data.val_sets] == ["kinetics_sounds", "qa_set"]
    again = from_dict(cfg.to_dict())  # what a worker and a checkpoint rebuild
    assert again.data.train == cfg.data.train and again.data.val == cfg.data.val
    assert "weight: 3.0" in cfg.to_yaml()


@pytest.mark.parametrize("override, message", [
    ("data.train=[{path: a/x, wieght: 3}]", "unknown config key 'data.train[0].wieght'"),
    ("data.train=[{path: a/x, weight: 0}]", "data.train[0]: the weight of a/x must be a positive number"),
    ("data.train=[{weight: 2}]", "data.train[0]: a shard set needs a path"),
    ("data.train=[a/one/train, b/one/train]", "two sets are named 'one' (a/one/train, b/one/train)"),
    ("data.train=[]", "data.train: an empty list"),
    ("data.train=[3]", "data.train[0]: expected a path"),
    ("data.val=[{path: a/x, weight: 2}]", "validation sets take no weight"),
    ("data.train=[{path: a/x, name: qa}]", "set name 'qa' (a/x) is a metric's name"),
    ("data.train=[{path: a/x, name: a/b}]", "use letters, digits"),
])
def test_bad_sets_are_errors_naming_the_key_or_set(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        load_config("tiny", [override])


def test_a_set_is_named_after_its_path_without_split_words_globs_or_tars():
    assert set_name("s3://b/kinetics_sounds/train") == "kinetics_sounds"
    assert set_name("data/synth/train/") == "synth"
    assert set_name("/tmp/x/msrvtt-qa/shards/val") == "msrvtt-qa"
    assert set_name("s3://b/vgg/train/shard-{000..009}.tar") == "vgg"
    assert set_name("/d/ek sounds/part-000.tar") == "ek_sounds"
    assert set_name("train") == "train"  # nothing else to go by


# ---------------------------------------------------------------------------------------------------------------
# The mixture's stream: pure functions


def test_round_counts_are_the_weights_ratio():
    assert round_counts([3, 1]).tolist() == [3, 1]
    assert round_counts([0.7, 0.3]).tolist() == [7, 3]
    assert round_counts([6, 2, 2]).tolist() == [3, 1, 1]
    odd = round_counts([1 / 3, 2 / 3, 1e-6])  # no small exact ratio: MIX_ROUND positions, every set at least one
    assert odd.sum() == 1000 and odd[2] == 1 and abs(odd[0] / 1000 - 1 / 3) < 2e-3


class _Rows:
    """A training source over ``n`` samples (a mixture's, numbered across its sets), one row each (no Ray)."""

    def __init__(self, n: int):
        self.n, self.cfg = n, load_config("tiny").data

    def __len__(self) -> int:
        return self.n

    def batches(self, positions, samples, epochs, batch_size, prefetch_batches):
        spec = row_spec(self.cfg)
        rows = [{**{k: np.zeros(shape, dt) for k, (shape, dt) in spec.items()}, "key": f"s{s}:e{e}", "pos": int(g)}
                for g, s, e in zip(positions.tolist(), samples.tolist(), epochs.tolist())]
        yield stack_rows(rows, self.cfg)


def _keys(stream, steps: int) -> list[list[str]]:
    return [next(stream)["key"] for _ in range(steps)]


def test_each_step_draws_from_the_sets_in_proportion_over_1000_steps():
    """Weights 3:1, two workers of 4 rows each (8 rows a step): over 1,000 steps the first set's share of the rows
    is 0.75 within +-2% (it is exact at every round's end), and so is every step's."""
    sizes = [37, 11]
    order = MixtureOrder(sizes, [3, 1], seed=7)
    position = ReadPosition().for_world(2)
    streams = [train_batches(_Rows(sum(sizes)), position, rank=r, batch_size=4, seed=7, order=order)
               for r in range(2)]
    firsts = []
    for _ in range(1000):
        keys = [k for s in streams for k in next(s)["key"]]
        firsts.append(sum(int(k[1:].split(":")[0]) < sizes[0] for k in keys))
    share = sum(firsts) / (8 * 1000)
    assert abs(share - 0.75) <= 0.02, share
    assert share == 0.75  # 8,000 rows: 2,000 whole rounds of 4
    assert set(firsts) == {6}  # every step of 8 rows is two whole rounds of 3 + 1

    odd = MixtureOrder([50, 20, 9], [0.5, 0.3, 0.2], seed=1)
    sets, _ = odd.locate(np.arange(1000 * 8))
    assert np.allclose(np.bincount(sets) / len(sets), [0.5, 0.3, 0.2], atol=0.02)


def test_each_set_goes_through_its_epochs_at_its_own_pace():
    """The small set runs out first and starts its next epoch alone: within each of a set's epochs every sample
    comes once, and epochs_seen says how many epochs of each set a position has consumed."""
    sizes = [12, 8]
    order = MixtureOrder(sizes, [1, 3], seed=2)
    g = np.arange(96)  # 24 of the first set (2 epochs), 72 of the second (9 epochs)
    samples, epochs = order.samples(g)
    sets, local = order.locate(g)
    assert np.bincount(sets).tolist() == [24, 72]
    for k, n in enumerate(sizes):
        mine = sets == k
        assert (epochs[mine] == local[mine] // n).all()
        for e in np.unique(epochs[mine]):
            got = samples[mine & (epochs == e)] - order.offsets[k]
            assert sorted(got.tolist()) == list(range(n)), f"set {k} epoch {e}"
    assert order.epochs_seen(ReadPosition(96)).tolist() == [2.0, 9.0]
    assert order.epochs_seen(ReadPosition(10, (12, 14))).tolist() == pytest.approx(
        (np.bincount(sets[[*range(10), 12, 14]], minlength=2) / sizes).tolist())


def test_the_order_is_a_pure_function_of_the_seed_and_one_set_is_a_single_stream():
    a, b = MixtureOrder([30, 7], [2, 1], seed=4), MixtureOrder([30, 7], [2, 1], seed=4)
    g = np.arange(500)
    assert all(np.array_equal(x, y[::-1]) for x, y in zip(a.samples(g), b.samples(g[::-1])))  # random access
    assert not np.array_equal(a.samples(g)[0], MixtureOrder([30, 7], [2, 1], seed=5).samples(g)[0])
    one = MixtureOrder([17], [1.0], seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(one.samples(g), StreamOrder(17, 5).samples(g)))
    unshuffled = MixtureOrder([4, 4], [1, 1], seed=0, shuffle=False)
    assert unshuffled.samples(np.arange(8))[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_a_stopped_mixture_resumed_mid_epoch_sees_exactly_the_uninterrupted_rows():
    """Two workers, stopped after 5 steps (mid-epoch of both sets) and resumed from the checkpoint's position: the
    same rows, step for step, as the run that never stopped."""
    sizes = [9, 5]
    order = MixtureOrder(sizes, [3, 1], seed=3)

    def run(position: ReadPosition, steps: int):
        streams = [train_batches(_Rows(sum(sizes)), position, rank=r, batch_size=3, seed=3, order=order)
                   for r in range(2)]
        out, last = [], [-1, -1]
        for _ in range(steps):
            batches = [next(s) for s in streams]
            out.append([b["key"] for b in batches])
            last = [b["last_pos"] for b in batches]
        return out, position.advance(last)

    whole, _ = run(ReadPosition().for_world(2), 12)
    first, reached = run(ReadPosition().for_world(2), 5)
    stored = ReadPosition.from_dict(json.loads(json.dumps(reached.to_dict())))  # as a checkpoint keeps it
    rest, _ = run(stored.for_world(2), 7)
    assert first + rest == whole


# ---------------------------------------------------------------------------------------------------------------
# Sets that cannot share a run; a split of several sets scored apart


def _set(root, name: str, label_set=None, tokenizer: str | None = None) -> str:
    folder = root / name / "train"
    folder.mkdir(parents=True)
    manifest = {"shards": [], "num_samples": 0, "qtype_counts": {name: 1}}
    if label_set is not None:
        manifest["label_set"] = label_set
    if tokenizer is not None:
        (root / name / "tokenizer.json").write_text(tokenizer)
        manifest["tokenizer"] = "../tokenizer.json"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def test_sets_with_different_label_sets_or_tokenizers_are_refused_naming_them(tmp_path):
    from mirasol_ray.train.prepare import check_sets, mixture_label_set

    a = _set(tmp_path, "a", ["dog", "cat"], tokenizer='{"v": 1}')
    b = _set(tmp_path, "b", None, tokenizer='{"v": 1}')  # no labels (a QA set), the same tokenizer: fine
    c = _set(tmp_path, "c", ["dog", "car"])
    d = _set(tmp_path, "d", None, tokenizer='{"v": 2}')
    check_sets(load_config("tiny", [f"data.train=[{a}, {b}]"]))  # question types differ: fine
    assert mixture_label_set([b, a]) == ["dog", "cat"]
    with pytest.raises(ValueError, match=f"the shard sets {a} and {c} have different label sets") as e:
        check_sets(load_config("tiny", [f"data.train=[{a}, {c}]"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=f"the shard sets {a} and {d} were built with different tokenizers"):
        check_sets(load_config("tiny", [f"data.train=[{a}, {{path: {d}, weight: 2}}]"]))
    with pytest.raises(ValueError, match="different label sets"):  # validation sets too
        check_sets(load_config("tiny", [f"data.train={a}", f"data.val=[{a}, {c}]"]))
    check_sets(load_config("tiny", [f"data.train={c}"]))  # a single path reads nothing here


def test_a_batch_of_several_sets_splits_by_row_and_metrics_under_val_name_are_scores():
    batch = {"video": torch.arange(5)[:, None], "key": list("abcde"), "pos": torch.tensor([2, 3, 4, 5, 6])}
    parts = split_by_set(batch, [["x", 0], ["y", 4]])
    assert [(n, p["key"], p["video"][:, 0].tolist()) for n, p in parts] == [("x", ["a", "b"], [0, 1]),
                                                                            ("y", ["c", "d", "e"], [2, 3, 4])]
    assert split_by_set(batch, None) == [(None, batch)]
    assert split_by_set(batch, [["x", 0], ["y", 9]])[0][1] is batch
    for metric in ("val/kinetics_sounds/qa", "val/msrvtt_qa/qa/what", "train_eval/a/caption", "val/a/loss"):
        check_metric(metric)
    assert is_score("val/kinetics_sounds/qa") and not is_score("val/kinetics_sounds/loss")
    with pytest.raises(ValueError, match="unknown metric"):
        check_metric("val/a/accuracy")


def test_concatenated_indexes_number_samples_and_shards_one_set_after_the_other():
    a = SampleIndex("/d/a", ["/d/a/0.tar", "/d/a/1.tar"], np.array([0, 0, 1], np.int32), np.arange(3), np.arange(3) + 1)
    b = SampleIndex("/d/b", ["/d/b/0.tar"], np.array([0, 0], np.int32), np.arange(2), np.arange(2) + 1,
                    {"/d/b/x.tar": ("not_a_tar", "no")})
    both = SampleIndex.concat([a, b])
    assert len(both) == 5 and both.shards == a.shards + b.shards and both.shard.tolist() == [0, 0, 1, 2, 2]
    assert both.url == "/d/a" and both.bad_shards == b.bad_shards


def test_each_set_of_an_evaluated_split_starts_where_its_shards_do():
    """The rows of validation (the sets' indexes concatenated) and of the training clips scored beside it (a subset
    of the mixture's index, in order) are told apart by the first row of each set."""
    from mirasol_ray.launch.train import _set_starts

    a = SampleIndex("/d/a", ["/d/a/0.tar", "/d/a/1.tar"], np.array([0, 0, 1], np.int32), np.arange(3), np.arange(3) + 1)
    b = SampleIndex("/d/b", ["/d/b/0.tar"], np.array([0, 0], np.int32), np.arange(2), np.arange(2) + 1)
    both = SampleIndex.concat([a, b])
    sets = [ShardSet("/d/a", 3, "a"), ShardSet("/d/b", 1, "b")]
    assert _set_starts(sets, both, [2, 1]) == [["a", 0], ["b", 3]]
    pick = np.array([1, 3, 4])  # a subset in order: one clip of a, two of b
    subset = SampleIndex(both.url, both.shards, both.shard[pick], both.start[pick], both.end[pick])
    assert _set_starts(sets, subset, [2, 1]) == [["a", 0], ["b", 1]]


def test_the_epochs_of_each_set_are_exported_beside_the_other_metrics():
    from mirasol_ray.train.ray_metrics import numeric_metrics

    got = numeric_metrics({"step": 8, "epoch": 1, "loss": 2.0, "epochs": {"a": 2.0, "b": 1.0},
                           "val": {"a/caption": 0.5}})
    assert got["mirasol_epochs_a"] == 2.0 and got["mirasol_epochs_b"] == 1.0 and got["mirasol_val_a_caption"] == 0.5
