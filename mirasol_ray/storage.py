"""The one place that turns URIs into filesystems, and the run-directory layout.

Accepted: a local path, ``file:///abs/path``, ``s3://bucket/prefix``. S3 endpoint and credentials come from the
standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``) or an explicit ``endpoint_url`` from the config; never from code.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def strip_scheme(uri: str) -> str:
    """``s3://b/p`` -> ``b/p``; ``file:///x`` -> ``/x``; a local path -> its absolute form."""
    if is_s3(uri):
        return uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        return urlparse(uri).path
    if "://" in uri:
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    if uri.startswith("file://"):
        return "file://" + os.path.join(strip_scheme(uri), *parts)
    return os.path.join(uri, *parts)


def endpoint(endpoint_url: str = "") -> str:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def fsspec_fs(uri: str, endpoint_url: str = "") -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri`` (s3fs for s3://, local otherwise). Use with :func:`strip_scheme` paths."""
    if is_s3(uri):
        ep = endpoint(endpoint_url)
        kwargs = {"client_kwargs": {"endpoint_url": ep}} if ep else {}
        # no cached listings: runs change under us (checkpoints appear while we watch for them)
        kwargs["use_listings_cache"] = False
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs.setdefault("client_kwargs", {})["region_name"] = region
        return fsspec.filesystem("s3", **kwargs)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")
    return fsspec.filesystem("file")


def pyarrow_fs(uri: str, endpoint_url: str = "") -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it (no scheme), as Ray Train/Data want them."""
    path = strip_scheme(uri)
    if is_s3(uri):
        ep = endpoint(endpoint_url)
        kwargs = {}
        if ep:
            parsed = urlparse(ep)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        # Credentials from the driver's environment travel with the (pickled) filesystem to Ray workers, whose
        # environment may lack them; without them pyarrow's default chain applies (instance roles, ~/.aws).
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
            if os.environ.get("AWS_SESSION_TOKEN"):
                kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        return pafs.S3FileSystem(**kwargs), path
    return pafs.LocalFileSystem(), path


def exists(uri: str, endpoint_url: str = "") -> bool:
    return fsspec_fs(uri, endpoint_url).exists(strip_scheme(uri))


def read_bytes(uri: str, endpoint_url: str = "") -> bytes:
    fs = fsspec_fs(uri, endpoint_url)
    path = strip_scheme(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"not found: {uri}")
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes, endpoint_url: str = "") -> None:
    fs = fsspec_fs(uri, endpoint_url)
    path = strip_scheme(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_text(uri: str, endpoint_url: str = "") -> str:
    return read_bytes(uri, endpoint_url).decode("utf-8")


def write_text(uri: str, text: str, endpoint_url: str = "") -> None:
    write_bytes(uri, text.encode("utf-8"), endpoint_url)


def listdir(uri: str, endpoint_url: str = "") -> list[str]:
    """Names (not paths) directly under ``uri``; empty if it does not exist."""
    fs = fsspec_fs(uri, endpoint_url)
    path = strip_scheme(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


@dataclass(frozen=True)
class RunDir:
    """Layout of one run directory (under ``storage.root/name``)::

        config.yaml  metrics.jsonl  summary.json  tensorboard/  plots/  checkpoint_*/ (Ray Train)
    """

    uri: str

    @property
    def config(self) -> str:
        return join(self.uri, "config.yaml")

    @property
    def metrics(self) -> str:
        return join(self.uri, "metrics.jsonl")

    @property
    def summary(self) -> str:
        return join(self.uri, "summary.json")

    @property
    def tensorboard(self) -> str:
        return join(self.uri, "tensorboard")

    @property
    def plots(self) -> str:
        return join(self.uri, "plots")
