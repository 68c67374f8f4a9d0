"""Our training metrics reach Ray's own metrics endpoint: a run's log (RunLog, as rank 0 of a Train run writes it)
inside a Ray worker of a local Ray, then a scrape of that node's Prometheus endpoint finds the run's loss, throughput
and validation metrics, tagged with the run's name, beside Ray's own."""

from __future__ import annotations

import socket
import time
import urllib.request

import ray

from mirasol_ray.train.loop import RunLog


@ray.remote(num_cpus=0)
class _Rank0:
    def __init__(self, run_uri: str):
        self.log = RunLog(run_uri, 0)

    def write(self, record: dict) -> None:
        self.log.write(record)

    def close(self) -> None:
        self.log.close(sync=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_metrics_appear_on_rays_metrics_endpoint(no_local_ray, tmp_path):
    port = _free_port()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 500})
    try:
        rank0 = _Rank0.remote(str(tmp_path / "runs" / "watched-run"))
        ray.get(rank0.write.remote({"step": 10, "epoch": 0, "loss": 1.25, "samples_per_s": 42.0,
                                    "data_wait_fraction": 0.03, "step_time_s": 0.5, "val": {"qa": 0.5}}))
        want = {"ray_mirasol_train_loss": 1.25, "ray_mirasol_train_samples_per_s": 42.0,
                "ray_mirasol_train_data_wait_fraction": 0.03, "ray_mirasol_train_step_time_s": 0.5,
                "ray_mirasol_val_qa": 0.5}
        found: dict[str, float] = {}
        deadline = time.time() + 60
        while time.time() < deadline and set(found) != set(want):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            for line in text.splitlines():
                name = line.split("{", 1)[0]
                if name in want and 'run="watched-run"' in line:
                    found[name] = float(line.rsplit(" ", 1)[1])
            time.sleep(0.5)
        assert found == want
        assert "ray_node_cpu_utilization" in text or "ray_component_cpu_percentage" in text  # beside Ray's own
        ray.get(rank0.close.remote())
    finally:
        ray.shutdown()
