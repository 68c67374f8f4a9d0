"""The process's storage setting: configured once (driver from its config, workers from what the driver sends),
falling back to the standard AWS variables, used by every filesystem storage.py makes."""

from __future__ import annotations

import pickle

import pytest

from mirasol_ray import storage

AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture
def bare_env(monkeypatch):
    """No AWS endpoint or region in the environment, and nothing configured."""
    for k in AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    storage.configure()
    return monkeypatch


def test_empty_settings_fall_back_to_the_environment_in_order(bare_env):
    assert storage.settings() == {"endpoint_url": "", "region": ""}
    assert (storage.endpoint(), storage.region()) == ("", "")
    bare_env.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    bare_env.setenv("AWS_REGION", "eu-west-1")
    assert (storage.endpoint(), storage.region()) == ("http://generic:9000", "eu-west-1")
    bare_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")  # the service-specific one wins, as in boto
    bare_env.setenv("AWS_DEFAULT_REGION", "us-east-2")
    assert (storage.endpoint(), storage.region()) == ("http://s3-only:9000", "us-east-2")
    assert storage.settings() == {"endpoint_url": "", "region": ""}  # as configured, not as resolved


def test_configured_values_win_and_configuring_again_replaces_them(bare_env):
    bare_env.setenv("AWS_ENDPOINT_URL", "http://from-env:1")
    bare_env.setenv("AWS_DEFAULT_REGION", "us-east-2")
    storage.configure("http://from-config:2", "eu-central-1")
    assert storage.settings() == {"endpoint_url": "http://from-config:2", "region": "eu-central-1"}
    assert (storage.endpoint(), storage.region()) == ("http://from-config:2", "eu-central-1")
    storage.configure("https://other:3")
    assert (storage.endpoint(), storage.region()) == ("https://other:3", "us-east-2")
    storage.configure()
    assert storage.endpoint() == "http://from-env:1"


def test_every_filesystem_uses_the_configured_endpoint(bare_env):
    storage.configure("http://127.0.0.1:9", "eu-west-1")
    fs = storage.fsspec_fs("s3://bucket/x")
    assert fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}
    pa, path = storage.pyarrow_fs("s3://bucket/runs")
    assert path == "bucket/runs" and pa.region == "eu-west-1" and b"127.0.0.1:9" in pickle.dumps(pa)
    storage.configure("http://127.0.0.2:8")
    assert storage.fsspec_fs("s3://bucket/x").client_kwargs == {"endpoint_url": "http://127.0.0.2:8"}
    assert b"127.0.0.2:8" in pickle.dumps(storage.pyarrow_fs("s3://bucket/runs")[0])


def test_an_endpoint_that_is_not_an_http_url_is_refused(bare_env):
    with pytest.raises(ValueError, match="storage.endpoint_url must be an http:// or https:// URL, got '127.0.0.1:9'"):
        storage.configure("127.0.0.1:9")
    assert storage.settings()["endpoint_url"] == ""


def test_a_shard_scan_carries_the_settings_of_the_process_that_made_it(bare_env, tmp_path):
    """The index's scan runs in Ray tasks: it configures their process as the driver is configured."""
    from mirasol_ray.data.index import _ScanOne

    storage.configure("http://driver-endpoint:9")
    scan = pickle.loads(pickle.dumps(_ScanOne(str(tmp_path))))
    storage.configure()  # a fresh worker process
    (tmp_path / "a.tar").write_bytes(b"")
    scan(str(tmp_path / "a.tar"))
    assert storage.settings()["endpoint_url"] == "http://driver-endpoint:9"


def test_commands_without_a_config_take_the_endpoint_from_set(bare_env):
    from mirasol_ray.config import ConfigError
    from mirasol_ray.launch import configure_storage

    configure_storage(["storage.endpoint_url=http://given:1", "data.task=qa"])
    assert storage.settings()["endpoint_url"] == "http://given:1"
    configure_storage(["data.task=qa"])  # none given: the process keeps its setting
    assert storage.settings()["endpoint_url"] == "http://given:1"
    with pytest.raises(ConfigError, match="takes only storage.endpoint_url=URL here, got data"):
        configure_storage(["data.task=qa"], only_storage=True)
    with pytest.raises(ConfigError, match="got storage.root"):
        configure_storage(["storage.root=s3://b/r"], only_storage=True)
