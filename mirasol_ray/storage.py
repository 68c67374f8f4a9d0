"""The one place that turns URIs into filesystems, and the run-directory layout.

Accepted: a local path, ``file:///abs/path``, ``s3://bucket/prefix``. The S3 endpoint and region are set once per
process with :func:`configure` (the driver from its config, each Ray worker from the plain settings the driver
sends it: :func:`settings`); what is left empty falls back to the standard AWS variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``; ``AWS_DEFAULT_REGION``, ``AWS_REGION``). Every read and write below uses that setting: no
function takes an endpoint. Credentials never come from here: no object made here holds one, and each process
resolves its own from its environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import tempfile
from dataclasses import dataclass
from urllib.parse import urlparse

import botocore.exceptions
import botocore.session
import fsspec
import pyarrow.fs as pafs
from botocore.config import Config as BotoConfig


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


_settings: dict[str, str] = {"endpoint_url": "", "region": ""}
"""This process's storage settings as configured; empty values fall back to the environment when resolved."""


def configure(endpoint_url: str = "", region: str = "") -> None:
    """Set this process's S3 endpoint and region (empty: the AWS variables of the environment, read when used).

    The driver calls it once its config is loaded (``storage.endpoint_url``); each Ray worker that reads or writes
    storage calls it with the :func:`settings` the driver sent it. Calling it again replaces the setting."""
    if endpoint_url and urlparse(endpoint_url).scheme not in ("http", "https"):
        raise ValueError(f"storage.endpoint_url must be an http:// or https:// URL, got {endpoint_url!r}")
    _settings.update(endpoint_url=endpoint_url, region=region)  # fsspec caches filesystems by these options


def settings() -> dict[str, str]:
    """``{"endpoint_url": ..., "region": ...}`` as configured: what a driver sends its workers in their plain config
    (neither is a credential), for them to :func:`configure` with."""
    return dict(_settings)


def endpoint() -> str:
    """The S3 endpoint this process uses: the configured one, else ``AWS_ENDPOINT_URL_S3``, else
    ``AWS_ENDPOINT_URL``; "" for the AWS default."""
    return (_settings["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or "")


def region() -> str:
    """The S3 region this process uses: the configured one, else ``AWS_DEFAULT_REGION``, else ``AWS_REGION``."""
    return _settings["region"] or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or ""


def s3fs_options() -> dict:
    """Keyword arguments for an fsspec ``s3`` filesystem (s3fs) with this process's endpoint and region."""
    client: dict[str, str] = {}
    if endpoint():
        client["endpoint_url"] = endpoint()
    if region():
        client["region_name"] = region()
    return {"client_kwargs": client} if client else {}


def fsspec_fs(uri: str) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri`` (s3fs for s3://, local otherwise). Use with :func:`strip_scheme` paths."""
    if is_s3(uri):
        # no listing cache: other processes (Ray workers, another driver) write the same run folders
        return fsspec.filesystem("s3", use_listings_cache=False, **s3fs_options())
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")
    return fsspec.filesystem("file")


def pyarrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it (no scheme), as Ray Train/Data want them.

    The filesystem carries the endpoint and region only, never credentials: Ray pickles it into its tasks and
    its run state, and pyarrow resolves keys itself wherever the object is used (its default chain: the
    ``AWS_*`` variables of that process, ``~/.aws``, instance roles). The workers of an embedded Ray inherit the
    driver's environment; a cluster's workers use the cluster's own.
    """
    path = strip_scheme(uri)
    if is_s3(uri):
        kwargs = {}
        if endpoint():
            parsed = urlparse(endpoint())
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        if region():
            kwargs["region"] = region()
        return pafs.S3FileSystem(**kwargs), path
    return pafs.LocalFileSystem(), path


def bucket(uri: str) -> str:
    """``s3://bucket/prefix`` -> ``bucket``."""
    return strip_scheme(uri).split("/", 1)[0]


class StorageError(RuntimeError):
    """Object storage cannot be used as asked (no credentials, no endpoint answering): one line that names the URL
    and what to do."""


CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                        "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE")
"""Where credentials come from (botocore's and pyarrow's default chain), for messages and ``mirasol doctor``."""
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


def _endpoint_shown() -> str:
    return endpoint() or "AWS S3 (no AWS_ENDPOINT_URL)"


def explain(e: BaseException, uri: str) -> Exception | None:
    """A storage failure of ``uri`` as one line naming it and what to do, or None when ``e`` is not one:
    credentials missing or refused, an endpoint that does not answer (the hint ``AWS_ENDPOINT_URL`` for
    S3-compatible stores), a bucket that does not exist, a permission that is missing."""
    name = bucket(uri) if is_s3(uri) else uri
    if isinstance(e, botocore.exceptions.NoCredentialsError) or type(e).__name__ == "NoCredentialsError":
        return StorageError(f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                            f"AWS_PROFILE) in this environment")
    if isinstance(e, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                      botocore.exceptions.ConnectionClosedError)) or type(e).__name__ in (
            "EndpointConnectionError", "ConnectTimeoutError"):
        hint = ("is the server running at that URL?" if endpoint() else
                "for an S3-compatible store (MinIO, SeaweedFS, Ceph, R2) set AWS_ENDPOINT_URL=http://HOST:PORT "
                "or --set storage.endpoint_url=URL")
        return StorageError(f"cannot reach the S3 endpoint {_endpoint_shown()} for {uri}: {hint}")
    if isinstance(e, botocore.exceptions.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404") or status == 404:
            return FileNotFoundError(f"bucket {name!r} does not exist at {_endpoint_shown()} ({uri})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return StorageError(f"the S3 credentials were refused for {uri} ({code}): check AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY")
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            return PermissionError(f"access denied to bucket {name!r} ({uri}): the credentials in this environment "
                                   "are refused or lack s3:ListBucket on it")
    return None


@functools.lru_cache(maxsize=64)
def _checked(uri_bucket: str, settings_key: tuple[str, str], credentials: tuple) -> None:
    """One fast probe of a bucket per process and setting (see :func:`check_access`)."""
    session = botocore.session.get_session()
    # credentials: the environment's chain, but a machine without any must not wait on the instance metadata
    # service (1 s, once; botocore's own default is 1 s x 1, raised by AWS_METADATA_SERVICE_* variables)
    session.set_config_variable("metadata_service_timeout", 1)
    session.set_config_variable("metadata_service_num_attempts", 1)
    client = session.create_client(
        "s3", endpoint_url=settings_key[0] or None, region_name=settings_key[1] or None,
        config=BotoConfig(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"}))
    client.head_bucket(Bucket=uri_bucket)


def check_access(uri: str) -> None:
    """For an ``s3://`` URI, one request (no retries, a 3 s connect timeout) that shows its bucket can be used,
    so a command fails in seconds, before Ray starts, naming the URL and what to do (:func:`explain`), instead of
    after minutes of retries deep inside a library. A no-op for local paths; done once per bucket and setting.
    Only what it can name stops the command: any other answer (a 403, which a HEAD gives without saying whether
    the right or the keys are missing; a region redirect; an odd bucket name) is left to the operation itself."""
    if not is_s3(uri):
        return
    creds = tuple(os.environ.get(k, "") != "" for k in CREDENTIAL_VARIABLES)  # presence only: no value is kept
    try:
        _checked(bucket(uri), (endpoint(), region()), creds)
    except Exception as e:
        if isinstance(e, botocore.exceptions.ClientError) \
                and e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            return
        better = explain(e, uri)
        if better is not None:
            raise better from None


def check_bucket(uri: str) -> None:
    """The same fast probe as :func:`check_access`, where a caller asks only "does this bucket exist?" (before
    naming a missing object, or writing a checkpoint): one implementation, so every command names a missing bucket,
    an endpoint that does not answer or absent credentials the same way, in seconds."""
    check_access(uri)


def check_output(uri: str, kind: str = "file") -> None:
    """Fail before any work, naming the location, when ``uri`` cannot be written: ``kind`` is ``file`` (must not be
    an existing folder) or ``dir`` (must not be an existing file). Local parents are created, and a probe file
    shows the folder is writable; on S3 the bucket must exist and a probe object is written and removed."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be file or dir, got {kind!r}")
    if is_remote(uri):
        check_bucket(uri)
        fs = fsspec_fs(uri)
        path = strip_scheme(uri)
        if kind == "dir" and fs.isfile(path):
            raise FileExistsError(f"{uri} is an existing file, not a folder")
        if kind == "file" and fs.isdir(path):
            raise IsADirectoryError(f"{uri} is an existing folder, not a file")
        probe = (path.rstrip("/") if kind == "dir" else posixpath.dirname(path)) + f"/.mirasol-probe-{os.getpid()}"
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except (OSError, PermissionError) as e:
            raise PermissionError(f"cannot write to {uri}: {e}") from None
        return
    path = strip_scheme(uri)
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{uri} is an existing file, not a folder")
    if kind == "file" and os.path.isdir(path):
        raise IsADirectoryError(f"{uri} is an existing folder, not a file")
    folder = path if kind == "dir" else os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".mirasol-probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write to {uri}: {e.strerror or e}") from None


def exists(uri: str) -> bool:
    return fsspec_fs(uri).exists(strip_scheme(uri))


def read_bytes(uri: str) -> bytes:
    fs = fsspec_fs(uri)
    path = strip_scheme(uri)
    if not fs.exists(path):
        check_bucket(uri)
        raise FileNotFoundError(f"not found: {uri}")
    if fs.isdir(path):
        raise IsADirectoryError(f"{uri} is a folder, not a file")
    with fs.open(path, "rb") as f:
        return f.read()


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: once, and put back at once
    os.umask(mask)
    return mask


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``uri`` whole. A reader never sees it half-written: an object store's PUT replaces the object at once,
    and a local file is written beside its place and renamed over it (a lease read mid-heartbeat, a crash
    mid-write)."""
    path = strip_scheme(uri)
    if is_remote(uri):
        with fsspec_fs(uri).open(path, "wb") as f:
            f.write(data)
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def listdir(uri: str, dirs_only: bool = False) -> list[str]:
    """Names (not paths) directly under ``uri`` (only folders with ``dirs_only``); empty if it does not exist."""
    fs = fsspec_fs(uri)
    path = strip_scheme(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
                  if not dirs_only or e.get("type") == "directory")


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
