"""Decode where it belongs: on a two-node local Ray cluster where only one node carries the `decode` resource (as
the decode nodes of cluster/aws.yaml, gcp.yaml and the KubeRay decode groups do), every decode task of the pipeline
runs on that node, though the other node (the driver's, with more CPUs) is free. Read back with Ray's state API."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks

from mirasol_ray.config import DataConfig
from mirasol_ray.data.encode import encode_av
from mirasol_ray.data.pipeline import DECODE_RESOURCE, decoded_dataset
from mirasol_ray.data.shards import run_build


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


def test_every_decode_task_runs_on_the_node_with_the_decode_resource(two_nodes, synth_shards, tmp_path):
    """The pipeline's decode tasks, and `shards build`'s per-clip tasks (probe, cut, transcode) too."""
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

    # shards build: every clip transcoded on the decode node (the build's summary names the node of each clip)
    videos = tmp_path / "videos"
    videos.mkdir()
    lines = []
    for i in range(6):
        frames = np.full((8, 48, 64, 3), 40 * i, np.uint8)
        (videos / f"v{i}.mp4").write_bytes(encode_av(frames, 10, np.zeros(12800, np.float32), 16000, gop=8))
        lines.append(json.dumps({"video": f"v{i}.mp4", "task": "cls", "label": "ab"[i % 2]}))
    (tmp_path / "ann.jsonl").write_text("\n".join(lines) + "\n")
    build = run_build("jsonl", str(tmp_path / "ann.jsonl"), str(videos), str(tmp_path / "out"), shard_size=2,
                      transcode=32, progress=False, use_ray=True)
    assert build.clips == 6 and len(build.nodes) == 1
    assert next(iter(build.nodes)).endswith(f"({decode_node.node_id[:8]})"), (build.nodes, decode_node.node_id)
