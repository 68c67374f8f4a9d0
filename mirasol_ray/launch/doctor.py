"""``mirasol doctor``: what is installed and what works on this machine, one line each, OK or what to do.

Checks torch (and CUDA, the GPUs it sees), the decoders (decord, PyAV and its H.264/AAC codecs), Ray (and whether
the cluster ``RAY_ADDRESS`` names answers on its port), object storage (which of the standard variables are set,
never their values; with ``--storage URL`` a probe write there), WordNet (NExT-OE's WUPS), and TensorBoard (to view
a run's logs). Nothing is started: no local Ray, no download.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import av
import decord
import ray
import torch

import mirasol_ray
from mirasol_ray import storage
from mirasol_ray.train.metrics import WORDNET_DIR, WordNetMissing, wordnet

OK, WARN, FAIL = "ok", "warn", "FAIL"


def _torch() -> tuple[str, str]:
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return OK, (f"torch {torch.__version__}, CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s) "
                    f"({', '.join(names)})")
    return WARN, (f"torch {torch.__version__}: no CUDA GPU visible here (training runs on CPU with gloo; for GPUs "
                  "install a CUDA build of torch and check nvidia-smi)")


def _decoders() -> tuple[str, str]:
    missing = [c for c in ("h264", "aac") if c not in av.codecs_available]
    extra = [c for c in ("hevc", "vp9", "av1", "libdav1d") if c in av.codecs_available]
    line = (f"decord {decord.__version__}, PyAV {av.__version__} (FFmpeg decoders: "
            f"{', '.join(c for c in ('h264', 'aac') if c not in missing)}{', ' + ', '.join(extra) if extra else ''})")
    if missing:
        return FAIL, line + f"; missing {', '.join(missing)}: reinstall PyAV from its wheels (pip install av)"
    return OK, line


def _ray() -> tuple[str, str]:
    address = os.environ.get("RAY_ADDRESS", "")
    if not address:
        return OK, f"Ray {ray.__version__}; RAY_ADDRESS unset: commands start a local Ray on this machine"
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if address == "auto" or not parsed.hostname or not parsed.port:
        return OK, f"Ray {ray.__version__}; RAY_ADDRESS={address}: commands connect there (ray status shows it)"
    try:  # the head answers on that port: no Ray client is started, nothing is sent
        socket.create_connection((parsed.hostname, parsed.port), timeout=3).close()
    except OSError as e:
        return FAIL, (f"Ray {ray.__version__}; RAY_ADDRESS={address} does not answer ({e.strerror or e}): start "
                      "the cluster (mirasol cluster up, ray start --head) or unset RAY_ADDRESS for a local Ray")
    return OK, f"Ray {ray.__version__}; RAY_ADDRESS={address} answers: commands run on that cluster"


def _storage(url: str) -> tuple[str, str]:
    present = [k for k in (*storage.CREDENTIAL_VARIABLES, *storage.ENDPOINT_VARIABLES) if os.environ.get(k)]
    absent = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL") if k not in present]
    line = (f"storage variables set: {', '.join(present) or 'none'}"
            + (f"; unset: {', '.join(absent)}" if absent else ""))
    if not url:
        return OK, line + " (--storage s3://BUCKET/PREFIX tries a write there)"
    try:
        storage.check_access(url)
        probe = storage.join(url, f".mirasol-doctor-{uuid.uuid4().hex[:8]}")
        storage.write_bytes(probe, b"ok")
        ok = storage.read_bytes(probe) == b"ok"
        storage.fsspec_fs(probe).rm_file(storage.strip_scheme(probe))
    except Exception as e:  # the line says what failed
        return FAIL, line + f"; writing to {url} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return (OK, line + f"; wrote, read back and removed a file in {url}") if ok else (
        FAIL, line + f"; a file written to {url} read back different")


def _wordnet() -> tuple[str, str]:
    try:
        wordnet()
    except WordNetMissing as e:
        return WARN, f"WordNet: {e} (needed only for NExT-OE's WUPS)"
    return OK, f"WordNet 3.0 at {os.environ.get('MIRASOL_WORDNET') or WORDNET_DIR} (NExT-OE's WUPS)"


def _tensorboard() -> tuple[str, str]:
    if importlib.util.find_spec("tensorboard") is None:  # the viewer of the runs' logs: only whether it is there
        return WARN, ("TensorBoard is not installed: runs write their logs (RUN/tensorboard) all the same; to view "
                      "them pip install 'mirasol-ray[tensorboard]' then tensorboard --logdir RUN/tensorboard")
    return OK, "TensorBoard installed: tensorboard --logdir RUN/tensorboard"


def run_checks(storage_url: str = "") -> list[dict[str, Any]]:
    """Each check as ``{"check", "status" (ok | warn | FAIL), "detail", "seconds"}``."""
    checks: list[tuple[str, Callable[[], tuple[str, str]]]] = [
        ("torch", _torch), ("decoders", _decoders), ("ray", _ray), ("storage", lambda: _storage(storage_url)),
        ("wordnet", _wordnet), ("tensorboard", _tensorboard)]
    out = [{"check": "mirasol", "status": OK,
            "detail": f"mirasol-ray {mirasol_ray.__version__}, Python {platform.python_version()} "
                      f"on {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs", "seconds": 0.0}]
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            status, detail = fn()
        except Exception as e:  # a check that breaks is itself the finding
            status, detail = FAIL, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out.append({"check": name, "status": status, "detail": detail,
                    "seconds": round(time.perf_counter() - t0, 2)})
    return out


def format_checks(checks: list[dict[str, Any]]) -> str:
    return "\n".join(f"{c['status']:<5} {c['check']:<12} {c['detail']}" for c in checks)
