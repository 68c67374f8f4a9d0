"""``mirasol bench train``'s CPU breakdown: which part of a variant each process of the tree is, and the window's
totals per sample."""

from __future__ import annotations

from types import SimpleNamespace

from mirasol_ray.bench.train import process_group, window_cpu


def _proc(role: str, title: str = "", cpu_s: float = 1.0) -> dict:
    return {"pid": 1, "role": role, "title": title, "cpu_s": cpu_s, "ended": False}


def test_process_group_names_the_trainer_the_decoders_and_rays_actors():
    assert process_group(_proc("driver")) == "driver"
    assert process_group(_proc("driver"), driver="trainer") == "trainer"  # the torch loop's own process
    assert process_group(_proc("child", "python")) == "decode"  # a DataLoader worker
    assert process_group(_proc("worker", "ray::RayTrainWorker.run")) == "trainer"
    assert process_group(_proc("worker", "ray::ReadItemIds->MapBatches(decode_items)")) == "decode"
    assert process_group(_proc("worker", "ray::MapBatches(DecodeItems)")) == "decode"
    assert process_group(_proc("worker", "ray::IDLE")) == "idle_ray_workers"
    assert process_group(_proc("worker", "ray::TrainController.run")) == "TrainController"
    assert process_group(_proc("raylet", "/x/raylet")) == "raylet"
    assert process_group(_proc("skip_counter", "ray::SkipCounter")) == "skip_counter"


def test_window_cpu_sums_by_group_per_sample():
    tree = SimpleNamespace(processes=[_proc("driver", cpu_s=2.0), _proc("child", cpu_s=3.0),
                                      _proc("child", cpu_s=1.0)],
                           by_role={"driver": 2.0, "child": 4.0, "exited": 0.5}, total=6.5)
    out = window_cpu(tree, samples=100, seconds=4.0, driver="trainer")
    assert out["cpus_busy"] == 6.5 / 4.0
    assert out["cpu_ms_per_sample"] == 65.0
    assert out["cpu_ms_per_sample_by_group"] == {"decode": 40.0, "trainer": 20.0, "exited": 5.0}
    assert list(out["cpu_ms_per_sample_by_group"]) == ["decode", "trainer", "exited"]  # largest first
