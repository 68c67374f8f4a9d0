"""Decode where it belongs: on a two-node local Ray cluster where only one node carries the `decode` resource (as
the decode nodes of cluster/aws.yaml, gcp.yaml and the KubeRay decode groups do), every decode task of the pipeline
runs on that node, though the other node (the driver's, with more CPUs) is free. Read back with Ray's state API."""

from __future__ import annotations

import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks

from mirasol_ray.config import DataConfig
from mirasol_ray.data.pipeline import DECODE_RESOURCE, decoded_dataset


@pytest.fixture()
def two_nodes(no_local_ray):
    """A head with 2 CPUs and no `decode`, a worker node with 1 CPU and `decode: 1`; the dashboard (127.0.0.1) on,
    for the state API."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1"})
    decode_node = cluster.add_node(num_cpus=1, resources={DECODE_RESOURCE: 1})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster, decode_node
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_every_decode_task_runs_on_the_node_with_the_decode_resource(two_nodes, synth_shards):
    cluster, decode_node = two_nodes
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = DataConfig(decode_cpus=0.5, decode_batch_size=2)  # 12 clips in blocks of <= 2: several tasks
    rows = decoded_dataset(synth_shards["dir"], cfg, train=False, counter_name="placement").take_all()
    assert len(rows) == synth_shards["num_clips"]
    deadline = time.time() + 30
    while True:  # task events reach the state API asynchronously
        tasks = [t for t in list_tasks(detail=True, limit=10000, raise_on_missing_output=False)
                 if "decode_items" in t.name and t.state == "FINISHED"]
        if len(tasks) >= 3 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert len(tasks) >= 3, [t.name for t in tasks]
    assert {t.node_id for t in tasks} == {decode_node.node_id}, (decode_node.node_id, cluster.head_node.node_id)
