"""``mirasol submit``: run a ``jobs/`` entrypoint (or any script of the working directory) as a Ray job.

Through Ray's ``JobSubmissionClient``, with Ray's token authentication: the token comes from Ray's own lookup
(``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and travels only in the request's
``Authorization`` header; it is never printed.

The job's runtime env carries the working directory and nothing else: a job's ``env_vars`` override the cluster's
own environment, so a shell pointed at a local S3 would silently break S3 on the cluster. With ``storage_env``
(``--storage-env``) it also carries this shell's *non-secret* storage settings (the S3 endpoint and region), for a
cluster that has none of its own (the local cluster of ``mirasol cluster up`` inherits them anyway). Credentials
never travel with a job (not in its runtime env, its arguments or its logs): on a cluster they come from the
cluster's own environment (a Kubernetes Secret, an instance role; see docs/CLUSTER.md).

Like ``ray job submit``, a submission can reserve resources for the entrypoint (its CPUs, GPUs, memory, custom
resources), name its submission id (a second submission with the same id is refused by Ray: a safe retry) and
carry metadata (string keys and values).

The exit code follows the job's final status: 0 SUCCEEDED, 1 FAILED, 3 STOPPED (2 stays "bad input", as for every
``mirasol`` command).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ray.job_submission import JobSubmissionClient

from mirasol_ray.launch.cluster import auth_headers

JOBS = ("pretrain", "finetune", "evaluate", "build_shards", "benchmark", "sweep")
"""Names of the entrypoints in ``jobs/`` (``mirasol submit finetune ...`` runs ``python jobs/finetune.py ...``)."""

STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
"""The only variables a submitted job may take from this shell, and only with ``--storage-env``: where the object
store is, not who may use it."""

EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]
"""Never uploaded with the working directory (Ray also skips what .gitignore names)."""

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


class SubmitError(ValueError):
    """Bad input to ``mirasol submit`` (the message says what)."""


def entrypoint(job: str, args: list[str], working_dir: str) -> str:
    """The shell command the cluster runs: ``python jobs/NAME.py ARGS`` (quoted), for a job name or a script path
    inside the working directory."""
    wd = Path(working_dir).resolve()
    if job.replace("-", "_") in JOBS:
        script = Path("jobs") / f"{job.replace('-', '_')}.py"
    elif job.endswith(".py"):
        path = Path(job)
        full = (path if path.is_absolute() else Path.cwd() / path).resolve()
        try:
            script = full.relative_to(wd)
        except ValueError:
            raise SubmitError(f"{job} is not inside the working directory {wd} (the cluster only gets that "
                              "folder)") from None
    else:
        raise SubmitError(f"unknown job {job!r}: give one of {', '.join(JOBS)} or a .py script in {wd}")
    if not (wd / script).is_file():
        raise SubmitError(f"{script} not found in the working directory {wd}")
    return shlex.join(["python", script.as_posix(), *args])


def runtime_env(working_dir: str, storage_env: bool = False) -> dict[str, Any]:
    """The job's runtime env: the working directory; with ``storage_env``, this shell's :data:`STORAGE_ENV` too."""
    out: dict[str, Any] = {"working_dir": str(Path(working_dir).resolve()), "excludes": list(EXCLUDES)}
    env = {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)} if storage_env else {}
    if env:
        out["env_vars"] = env
    return out


def _metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in metadata.items()):
        raise SubmitError("--metadata-json must be a JSON object of strings, e.g. '{\"sweep\": \"ft-lr\"}'")
    return dict(metadata)


def submission(job: str, args: list[str], *, working_dir: str = ".", storage_env: bool = False,
               entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
               entrypoint_memory: int | None = None, entrypoint_resources: dict[str, float] | None = None,
               submission_id: str | None = None, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` for a job: the entrypoint, the runtime env, and
    what ``ray job submit`` also takes (``--entrypoint-num-cpus/-num-gpus/-memory/-resources``,
    ``--submission-id``, ``--metadata-json``); only what is given is passed, Ray's defaults stand for the rest."""
    for flag, value in (("--entrypoint-num-cpus", entrypoint_num_cpus), ("--entrypoint-num-gpus", entrypoint_num_gpus),
                        ("--entrypoint-memory", entrypoint_memory)):
        if value is not None and value < 0:
            raise SubmitError(f"{flag} must be >= 0, got {value}")
    if entrypoint_resources is not None and (
            not isinstance(entrypoint_resources, dict)
            or not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                       for k, v in entrypoint_resources.items())):
        raise SubmitError("--entrypoint-resources must be a JSON object of resource -> amount >= 0, e.g. "
                          "'{\"decode\": 1}'")
    if entrypoint_resources and {"CPU", "GPU", "memory"} & set(entrypoint_resources):
        raise SubmitError("--entrypoint-resources takes custom resources only: use --entrypoint-num-cpus, "
                          "--entrypoint-num-gpus or --entrypoint-memory")
    out: dict[str, Any] = {"entrypoint": entrypoint(job, args, working_dir),
                           "runtime_env": runtime_env(working_dir, storage_env)}
    optional = {"entrypoint_num_cpus": entrypoint_num_cpus, "entrypoint_num_gpus": entrypoint_num_gpus,
                "entrypoint_memory": entrypoint_memory, "entrypoint_resources": entrypoint_resources or None,
                "submission_id": submission_id or None, "metadata": _metadata(metadata)}
    out.update({k: v for k, v in optional.items() if v is not None})
    return out


def client(address: str | None = None):
    """A ``JobSubmissionClient`` for ``address`` (the dashboard URL, ``http://HEAD:8265``), else
    ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``, sending the token when there is one."""

    # Ray's client logs each upload and socket close at INFO on the console: a person wants the job's own output
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", "ray._private.runtime_env"):
        logging.getLogger(name).setLevel(logging.WARNING)

    headers = auth_headers()
    if not address and not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
        raise SubmitError("no cluster given: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS "
                          "(`mirasol cluster up` prints it for the local cluster)")
    # Ray lets the environment override the address argument; an explicit --address wins here
    with _env(RAY_API_SERVER_ADDRESS=address) if address else contextlib.nullcontext():
        try:
            return JobSubmissionClient(address, headers=headers)
        except ConnectionError as e:
            raise ConnectionError(f"cannot reach the Ray job API at {address or 'RAY_API_SERVER_ADDRESS'}: "
                                  f"{str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def submit(job: str, args: list[str], *, address: str | None = None, working_dir: str = ".",
           follow: bool = True, out=None, **options: Any) -> int:
    """Submit; with ``follow``, stream the job's logs and wait for its end. Returns the exit code. ``options``: the
    keyword arguments of :func:`submission` (``storage_env``, ``entrypoint_num_cpus``, ``submission_id``, ...)."""
    out = out or sys.stdout
    kwargs = submission(job, args, working_dir=working_dir, **options)
    c = client(address)
    job_id = c.submit_job(**kwargs)
    print(f"submitted {job_id}: {kwargs['entrypoint']}", file=out, flush=True)
    if not follow:
        print(f"follow it with: mirasol submit --logs {job_id} --follow", file=out, flush=True)
        return 0
    return follow_job(c, job_id, out=out)


def follow_job(c, job_id: str, out=None) -> int:
    """Stream a job's logs until it ends; the last line says how it ended (and why, when it failed)."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        try:
            asyncio.run(tail())
        except RuntimeError:  # the log stream broke (e.g. the head restarted): the status below still tells
            pass
        status = wait(c, job_id)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"stopped following {job_id}; it keeps running (mirasol submit --stop "
                                f"{job_id} stops it)") from None
    return report(c, job_id, status)


def wait(c, job_id: str, timeout: float | None = None) -> str:
    """Poll until the job is in a terminal state; returns that status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = c.get_job_status(job_id)
        if status.is_terminal():
            return str(status)
        if deadline is not None and time.monotonic() > deadline:
            return str(status)
        time.sleep(0.5)


def failure_reason(logs: str, message: str = "") -> str:
    """The line that says why a job failed: our own one-line error if the job printed one, else Ray's message."""
    lines = [ln.strip() for ln in logs.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("mirasol: ")]
    if ours:
        return ours[-1][len("mirasol: "):].removeprefix("error: ")
    return (message or (lines[-1] if lines else "")).splitlines()[0] if (message or lines) else ""


def report(c, job_id: str, status: str) -> int:
    """One last line on how the job ended; the exit code that goes with it."""
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", flush=True)
    else:
        info = c.get_job_info(job_id)
        why = failure_reason(c.get_job_logs(job_id), info.message or "") if status == "FAILED" else ""
        print(f"mirasol: job {job_id} {status}{': ' + why[:500] if why else ''}", file=sys.stderr, flush=True)
    return EXIT_CODES.get(status, 1)


def job_status(job_id: str, address: str | None = None) -> int:
    c = client(address)
    info = c.get_job_info(job_id)
    status = str(info.status)
    print(f"{job_id} {status}{': ' + info.message.splitlines()[0] if info.message else ''}", flush=True)
    return EXIT_CODES.get(status, 0)


def stop(job_id: str, address: str | None = None) -> int:
    c = client(address)
    stopped = c.stop_job(job_id)
    print(f"{job_id}: {'stop requested' if stopped else 'not running'} ({c.get_job_status(job_id)})", flush=True)
    return 0


def logs(job_id: str, address: str | None = None, follow: bool = False) -> int:
    c = client(address)
    if follow:
        return follow_job(c, job_id)
    sys.stdout.write(c.get_job_logs(job_id))
    sys.stdout.flush()
    return 0
