"""The pipeline's decode stage asks for the `decode` custom resource exactly when the cluster has it (the decode
nodes of cluster/aws.yaml, gcp.yaml and the KubeRay decode groups declare it), else CPUs only; the read and the decode
ask for the same, so they still fuse into one task per block. No Ray is started: the cluster's resources are given."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from mirasol_ray.config import DataConfig
from mirasol_ray.data import pipeline
from mirasol_ray.data.pipeline import DECODE_RESOURCE, decode_resources


def test_decode_resource_only_where_the_cluster_has_it():
    cfg = DataConfig(decode_cpus=0.25)
    assert decode_resources(cfg, {"CPU": 256.0, "GPU": 16.0, DECODE_RESOURCE: 128.0}) == {DECODE_RESOURCE: 0.25}
    assert decode_resources(cfg, {"CPU": 8.0, "worker_node": 1.0}) == {}
    assert decode_resources(cfg, {"CPU": 8.0, DECODE_RESOURCE: 0.0}) == {}


def test_decode_resource_reads_the_live_cluster(monkeypatch):
    cfg = DataConfig(decode_cpus=0.5)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 72.0, DECODE_RESOURCE: 64.0})
    assert decode_resources(cfg) == {DECODE_RESOURCE: 0.5}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert decode_resources(cfg) == {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # no Ray yet: Ray Data starts a local one, no decode
    assert decode_resources(cfg) == {}


class _Recorder:
    """Stands in for Ray Data: records what the read and each map ask for."""

    def __init__(self):
        self.calls = []

    def read_datasource(self, ds, **kwargs):
        self.calls.append(("read", kwargs))
        return self

    def map_batches(self, fn, **kwargs):
        self.calls.append(("map", kwargs))
        return self


class _Index:
    shards, url = ["a.tar"], "/data"


@pytest.mark.parametrize("cluster, expect", [
    ({"CPU": 72.0, DECODE_RESOURCE: 64.0}, {DECODE_RESOURCE: 0.25}),
    ({"CPU": 8.0}, None),
])
@pytest.mark.parametrize("actors", [0, 2])
def test_read_and_decode_ask_for_the_same_resources(monkeypatch, cluster, expect, actors):
    rec = _Recorder()
    monkeypatch.setattr(pipeline.ray.data, "read_datasource", rec.read_datasource)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: cluster)
    cfg = DataConfig(decode_cpus=0.25, decode_actors=actors)
    items = {"sample": np.arange(10, dtype=np.int64)}
    pipeline._items_dataset(_Index(), items, cfg, train=False, counter_name="c", label_set=None)
    (read, r_kw), (mapped, m_kw) = rec.calls
    assert (read, mapped) == ("read", "map")
    assert r_kw["resources"] == m_kw["resources"] == expect
    assert r_kw["num_cpus"] == m_kw["num_cpus"] == 0.25
