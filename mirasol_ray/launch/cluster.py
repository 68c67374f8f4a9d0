"""``mirasol cluster up|down|status``: a real multi-node Ray cluster on one machine.

A head node and N worker nodes, each a separate ``ray start`` (its own raylet, object store, agents and ports),
the way a cluster's machines would run them: for trying ``mirasol submit`` and multi-node training before a
cloud cluster, and for the tests. Nothing here is a launcher of our own: each node is Ray's ``ray start --block``,
kept running in its own process group, and stopped with SIGTERM (the node shuts its processes down).

- Token authentication is on: ``up`` writes a fresh token into the cluster folder (mode 0600) and every node
  and client finds it through ``RAY_AUTH_TOKEN_PATH``. The token is never printed.
- The dashboard (and the job API behind it) binds 127.0.0.1; every port is chosen free (none of Ray's fixed
  defaults), so several clusters and test runs can share a machine. Ray 2.60 turns ``--node-ip-address=127.0.0.1``
  into the machine's own address for multi-node clusters and opens its gRPC servers (GCS, raylets, object
  managers, agents) on all interfaces, with no option to narrow them; the token guards them.
- The nodes get the environment ``up`` runs in (e.g. ``AWS_*`` for S3), as a cluster's machines get theirs from
  an instance role or a Kubernetes Secret: a submitted job needs no credentials of its own.

The cluster folder (``--dir``, default ``~/.mirasol/cluster``) holds ``cluster.json`` (addresses, ports, process
ids), ``auth_token``, and each node's ``ray start`` log; Ray's own logs are under the ``temp_dir`` it names.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
from ray._raylet import AuthenticationTokenLoader
from ray.util.state.api import StateApiClient
from ray.util.state.common import ListApiOptions, StateResource

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
DEFAULT_DIR = "~/.mirasol/cluster"
WORKER_PORTS = 100
"""Ports in each node's worker range (one per worker process: tasks, actors, the job's driver)."""
NODE_START_TIMEOUT_S = 300.0
"""A deadline for a node to come up (it ends waiting for the event, it is not waited out)."""


class ClusterError(RuntimeError):
    """The local cluster cannot do what was asked (the message says why)."""


# ---------------------------------------------------------------------------------------------------------------
# ports and processes


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _worker_port_range(taken: set[int]) -> tuple[int, int]:
    """A run of WORKER_PORTS free ports below the kernel's ephemeral range (where nothing else picks ports)."""
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 32000 - WORKER_PORTS)
        ports = range(lo, lo + WORKER_PORTS)
        if not taken.intersection(ports) and all(_port_is_free(p) for p in ports):
            return lo, lo + WORKER_PORTS - 1
    raise ClusterError(f"no run of {WORKER_PORTS} free ports for Ray's worker processes in 20000-32000")


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in a process group."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel (zombies count as alive there)
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _ray_binary() -> str:
    cand = Path(sys.executable).parent / "ray"
    found = str(cand) if cand.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command was not found next to this Python or on PATH (pip install ray)")
    return found


# ---------------------------------------------------------------------------------------------------------------
# state


def cluster_dir(path: str | None = None) -> Path:
    return Path(os.path.expanduser(path or os.environ.get("MIRASOL_CLUSTER_DIR") or DEFAULT_DIR)).absolute()


def load_state(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    f = cluster_dir(str(path) if path else None) / STATE_FILE
    return json.loads(f.read_text()) if f.exists() else None


def _save_state(d: Path, state: dict[str, Any]) -> None:
    tmp = d / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(d / STATE_FILE)


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """What a client on this machine needs to use the cluster: ``ray.init``/``mirasol train`` use RAY_ADDRESS (the
    GCS), ``mirasol submit``/``ray job`` use RAY_API_SERVER_ADDRESS (the dashboard), both find the token."""
    return {"RAY_ADDRESS": state["gcs_address"], "RAY_API_SERVER_ADDRESS": state["dashboard_url"],
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token_path"]}


def node_env(state: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # `python` in a job's entrypoint is this Python (as the image's Python is on a cluster)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state["token_path"], RAY_USAGE_STATS_ENABLED="0")
    # Ray's own actors that look the cluster up without an address (Train's placement-group cleaner) must find
    # this one, not whichever other Ray runs on the machine, nor a cluster named in the caller's shell
    env.update(RAY_ADDRESS=state["gcs_address"], RAY_API_SERVER_ADDRESS=state["dashboard_url"])
    return env


# ---------------------------------------------------------------------------------------------------------------
# nodes


def _node_args(taken: set[int]) -> tuple[list[str], dict[str, Any]]:
    """The per-node flags of ``ray start``: every port chosen free, the node on 127.0.0.1."""
    names = ("object_manager", "node_manager", "runtime_env_agent", "metrics_export", "dashboard_agent_listen",
             "dashboard_agent_grpc")
    ports = dict(zip(names, _free_ports(len(names))))
    lo, hi = _worker_port_range(taken | set(ports.values()))
    ports["min_worker"], ports["max_worker"] = lo, hi
    args = ["--node-ip-address=127.0.0.1", f"--object-manager-port={ports['object_manager']}",
            f"--node-manager-port={ports['node_manager']}", f"--min-worker-port={lo}", f"--max-worker-port={hi}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--metrics-export-port={ports['metrics_export']}",
            f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
            f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
            "--disable-usage-stats", "--block"]
    return args, ports


def _taken(state: dict[str, Any]) -> set[int]:
    out = set()
    for node in [state.get("head") or {}, *state.get("workers", [])]:
        ports = node.get("ports", {})
        out.update(v for k, v in ports.items() if k not in ("min_worker", "max_worker"))
        if "min_worker" in ports:
            out.update(range(ports["min_worker"], ports["max_worker"] + 1))
    return out


def _start_node(d: Path, name: str, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    log_path = d / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(d), start_new_session=True)
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while True:  # `ray start` prints this once the node's processes are up and registered with the GCS
        text = log_path.read_text(errors="replace")
        if "Ray runtime started" in text:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                _stop_group(proc.pid)
            tail = "\n".join(text.splitlines()[-15:])
            raise ClusterError(f"node {name} did not start (ray start exited {proc.poll()}); {log_path}:\n{tail}")
        time.sleep(0.2)
    return {"name": name, "pid": proc.pid, "log": str(log_path)}


def _stop_group(pgid: int, timeout: float = 60.0) -> None:
    """SIGTERM the node's ``ray start --block`` (it stops its processes), then SIGKILL whatever is left."""
    try:
        os.kill(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_alive(node: dict[str, Any]) -> bool:
    return _group_alive(node["pid"])


def kill_node(node: dict[str, Any]) -> None:
    """SIGKILL every process of a node at once: the node is lost, as when a machine dies (tests use this)."""
    try:
        os.killpg(node["pid"], signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while _group_alive(node["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)


def up(path: str | None = None, *, workers: int = 1, head_cpus: float = 2, worker_cpus: float = 2,
       worker_gpus: int = 0, worker_resources: dict[str, float] | None = None,
       object_store_memory: int | None = None) -> dict[str, Any]:
    """Start the head if it is not running, then worker nodes until ``workers`` are alive. Returns the state.

    Worker nodes carry the custom resource ``worker_node: 1`` (plus ``worker_resources``), so work can be placed
    on them on purpose."""
    d = cluster_dir(path)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    state = load_state(d)
    if state and not node_alive(state["head"]):
        for w in state.get("workers", []):  # a worker without its head is no use
            if node_alive(w):
                _stop_group(w["pid"])
        state = None
    if state is None:
        token_path = d / TOKEN_FILE
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_new_authentication_token())
        # Ray's unix sockets live under its temp dir: keep that path short (AF_UNIX paths are limited to 107 bytes)
        temp_dir = tempfile.mkdtemp(prefix="mirasol-ray-", dir="/tmp")
        gcs, dash, client = _free_ports(3)
        args, ports = _node_args({gcs, dash, client})
        ports.update(gcs=gcs, dashboard=dash, ray_client=client)
        state = {"dir": str(d), "token_path": str(token_path), "temp_dir": temp_dir,
                 "gcs_address": f"127.0.0.1:{gcs}", "dashboard_url": f"http://127.0.0.1:{dash}", "workers": []}
        cmd = [_ray_binary(), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dash}", "--include-dashboard=true", f"--ray-client-server-port={client}",
               f"--temp-dir={temp_dir}", f"--num-cpus={head_cpus:g}", *args]
        if object_store_memory:
            cmd.append(f"--object-store-memory={object_store_memory}")
        state["head"] = {**_start_node(d, "head", cmd, node_env(state)), "ports": ports, "num_cpus": head_cpus}
        _save_state(d, state)
    state["workers"] = [w for w in state.get("workers", []) if node_alive(w)]
    used = {w["name"] for w in state["workers"]}
    while len(state["workers"]) < workers:
        name = next(f"worker-{i}" for i in range(1, 10_000) if f"worker-{i}" not in used)
        used.add(name)
        args, ports = _node_args(_taken(state))
        resources = {"worker_node": 1, **(worker_resources or {})}
        # a node's own temp dir: sharing the head's, each node's log monitor would stream every node's logs
        temp_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=state["temp_dir"])
        cmd = [_ray_binary(), "start", f"--address={state['gcs_address']}", f"--num-cpus={worker_cpus:g}",
               f"--resources={json.dumps(resources)}", f"--temp-dir={temp_dir}", *args]
        if worker_gpus:
            cmd.append(f"--num-gpus={worker_gpus}")
        if object_store_memory:
            cmd.append(f"--object-store-memory={object_store_memory}")
        state["workers"].append({**_start_node(d, name, cmd, node_env(state)), "ports": ports,
                                 "num_cpus": worker_cpus, "resources": resources, "temp_dir": temp_dir})
        _save_state(d, state)
    _save_state(d, state)
    return state


def down(path: str | None = None) -> bool:
    """Stop every node (workers first). Returns False when there was no cluster."""
    d = cluster_dir(path)
    state = load_state(d)
    if state is None:
        return False
    for node in [*state.get("workers", []), state["head"]]:
        _stop_group(node["pid"])
    (d / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(state.get("temp_dir", ""), ignore_errors=True)
    return True


def auth_headers(token_path: str = "") -> dict[str, str]:
    """``{"authorization": "Bearer ..."}`` from ``token_path``, or else Ray's own token lookup (``RAY_AUTH_TOKEN``,
    then the file in ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``) whatever ``RAY_AUTH_MODE`` says in
    this process; {} when there is no token."""
    if token_path:
        return {"authorization": "Bearer " + Path(token_path).read_text().strip()}

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    return dict(loader.get_token_for_http_header(ignore_auth_mode=True) or {})


def nodes(dashboard_url: str, token_path: str = "") -> list[dict[str, Any]]:
    """The cluster's nodes as Ray's State API lists them (node id, alive or dead, head or not, resources)."""

    client = StateApiClient(address=dashboard_url, headers=auth_headers(token_path))
    rows = client.list(StateResource.NODES, options=ListApiOptions(detail=True, limit=1000),
                       raise_on_missing_output=False)
    return [{"node_id": r["node_id"], "state": r["state"], "is_head": r["is_head_node"],
             "ip": r["node_ip"], "resources": r.get("resources_total", {})} for r in map(_as_dict, rows)]


def _as_dict(row: Any) -> dict[str, Any]:
    return row if isinstance(row, dict) else row.__dict__


def status(path: str | None = None) -> dict[str, Any]:
    """The cluster's state file, each node's process alive or not, and the nodes Ray knows (when it is up)."""
    d = cluster_dir(path)
    state = load_state(d)
    if state is None:
        return {"dir": str(d), "running": False}
    out = {**state, "running": node_alive(state["head"])}
    out["head"] = {**state["head"], "alive": node_alive(state["head"])}
    out["workers"] = [{**w, "alive": node_alive(w)} for w in state.get("workers", [])]
    if out["running"]:
        out["ray_nodes"] = nodes(state["dashboard_url"], state["token_path"])
    return out


def print_status(st: dict[str, Any]) -> None:
    if not st["running"]:
        print(f"no local cluster running (folder {st['dir']})")
        return
    print(f"local Ray cluster in {st['dir']}: dashboard {st['dashboard_url']}, GCS {st['gcs_address']}")
    for n in [st["head"], *st["workers"]]:
        print(f"  {n['name']:<10} pid {n['pid']:<8} {'alive' if n['alive'] else 'dead':<6} {n['num_cpus']:g} CPU"
              f"  log {n['log']}")
    for r in st.get("ray_nodes", []):
        res = ", ".join(f"{k}={v:g}" for k, v in sorted(r["resources"].items())
                        if not k.startswith(("node:", "memory", "object_store")))
        print(f"  ray node {r['node_id'][:12]} {r['state']:<6} {'head' if r['is_head'] else 'worker':<6} {res}")
    print("use it from this shell:")
    print("  export " + " ".join(f"{k}={v}" for k, v in client_env(st).items()))
