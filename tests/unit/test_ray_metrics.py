"""Which numbers of a metrics.jsonl record go to Ray's metrics, under which names (no Ray started)."""

from __future__ import annotations

from mirasol_ray.train.ray_metrics import metric_name, numeric_metrics


def test_a_records_numbers_become_prometheus_safe_gauge_names():
    record = {"step": 40, "epoch": 1, "loss": 2.5, "text": 1.5, "lr": 3e-4, "samples_per_s": 120.0,
              "data_wait_fraction": 0.02, "step_time_s": 0.4, "elapsed_s": 16.0, "skipped": {"corrupt": 1},
              "nodes": ["abc"], "val": {"qa": 0.41, "loss": 2.1, "name": "x"}, "val_rows": 64,
              "train_eval": {"qa": 0.5}, "flag": True}
    got = numeric_metrics(record)
    assert got == {
        "mirasol_train_loss": 2.5, "mirasol_train_text": 1.5, "mirasol_train_lr": 3e-4,
        "mirasol_train_samples_per_s": 120.0, "mirasol_train_data_wait_fraction": 0.02,
        "mirasol_train_step_time_s": 0.4, "mirasol_train_elapsed_s": 16.0, "mirasol_train_val_rows": 64.0,
        "mirasol_val_qa": 0.41, "mirasol_val_loss": 2.1, "mirasol_train_eval_qa": 0.5,
    }
    assert metric_name("val", "qa/what") == "mirasol_val_qa_what"
