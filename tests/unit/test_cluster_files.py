"""Offline validation of everything in cluster/: the launcher YAMLs with Ray's own schema and validator, the KubeRay
manifests against KubeRay's CRD schemas (types and unknown keys), and the Ray version the Dockerfile, the images and
rayVersion name against pyproject.toml's pin. A misspelt field anywhere fails here, not on a cluster."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
ASSETS = REPO / "tests" / "assets" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFESTS = sorted(p.name for p in (CLUSTER / "kuberay").glob("ray*.yaml"))
LAUNCHER = ["aws.yaml", "gcp.yaml"]
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(path: Path):
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    out = {}
    for kind, name in CRDS.items():
        crd = _load(ASSETS / name)
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = v1["schema"]["openAPIV3Schema"]
    return out


def unknown_keys(node, schema: dict, path: str = "") -> list[str]:
    """Every key of ``node`` that ``schema`` does not declare, as a dotted path. Kubernetes would silently drop
    these (it prunes undeclared fields); a schema that keeps unknown fields, or declares none, is not walked."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(node, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in node.items():
            here = f"{path}.{k}" if path else str(k)
            if props is not None:
                if k not in props:
                    out.append(here)
                else:
                    out += unknown_keys(v, props[k], here)
            elif isinstance(extra, dict):
                out += unknown_keys(v, extra, here)
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(node):
            out += unknown_keys(v, schema["items"], f"{path}[{i}]")
    return out


def validate_manifest(doc: dict, schemas: dict[str, dict]) -> list[str]:
    """Problems with one KubeRay manifest: schema errors (types, enums, required fields) and undeclared keys."""
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in schemas:
        return [f"not a ray.io/v1 RayCluster or RayJob: {doc.get('apiVersion')} {doc.get('kind')}"]
    schema = schemas[doc["kind"]]
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    return errors + [f"{k}: not a field of {doc['kind']}" for k in unknown_keys(doc, schema)]


def _pyproject(pattern: str) -> str:
    """One quoted value from pyproject.toml (a regex: tomllib is Python 3.11+, and we support 3.10)."""
    m = re.search(pattern, (REPO / "pyproject.toml").read_text(), re.M)
    assert m, pattern
    return m.group(1)


def ray_pin() -> SpecifierSet:
    return SpecifierSet(_pyproject(r'^\s*"ray(?:\[[^\]]*\])?\s*([^"]+)",'))


def dockerfile_base() -> tuple[str, str]:
    """(Ray version, Python tag) of the Dockerfile's rayproject/ray base image."""
    m = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-(py3\d+)(-\w+)?\s*$", (CLUSTER / "Dockerfile").read_text(),
                  re.M)
    assert m, "cluster/Dockerfile must start FROM rayproject/ray:X.Y.Z-py3NN[-gpu]"
    return m.group(1), m.group(2)


def _pods(doc: dict) -> list[dict]:
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``8Gi``, ``500M``, ``1000``) in bytes."""
    m = re.fullmatch(r"(\d+)([KMGT]i?)?", quantity)
    assert m, quantity
    unit = m.group(2) or ""
    return int(m.group(1)) * (1024 if unit.endswith("i") else 1000) ** (" KMGT".index(unit[:1] or " "))


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


# ---------------------------------------------------------------------------------------------------------------
# versions


def test_dockerfile_and_manifests_name_the_pinned_ray():
    version, py = dockerfile_base()
    assert version in ray_pin(), f"Dockerfile's Ray {version} is outside pyproject.toml's pin {ray_pin()}"
    requires = SpecifierSet(_pyproject(r'^requires-python\s*=\s*"([^"]+)"'))
    assert f"{py[2]}.{py[3:]}" in requires
    images = []
    for name in MANIFESTS:
        doc = _load(CLUSTER / "kuberay" / name)
        assert _cluster_spec(doc)["rayVersion"] == version, name
        images += [c["image"] for pod in _pods(doc) for c in pod["containers"]]
    for name in LAUNCHER:
        images.append(_load(CLUSTER / name)["docker"]["image"])
    assert images and all(img.endswith(f":ray{version}-{py}") for img in images), images


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_own_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(CLUSTER / name)
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}, "the head runs no work"
    assert {"gpu_worker", "decode_worker"} <= set(types)
    assert all(t.get("max_workers", 0) >= 1 for n, t in types.items() if n != cfg["head_node_type"])
    text = yaml.safe_dump(cfg)  # the settings, not the comments
    assert "RAY_AUTH_MODE=token" in text and "--dashboard-host=127.0.0.1" in text
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID)\s*=", text), "no credentials in a launcher file"


@pytest.mark.parametrize("mutate", [
    lambda c: c.__setitem__("max_worker", 3),                             # misspelt top-level key
    lambda c: c["docker"].__setitem__("imgae", "x"),                      # misspelt docker key
    lambda c: c["available_node_types"]["gpu_worker"].__setitem__("max_workers", "eight"),  # wrong type
])
def test_launcher_validator_catches_a_bad_field(mutate):
    import jsonschema as js
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(CLUSTER / "aws.yaml")
    mutate(cfg)
    with pytest.raises((js.ValidationError, ValueError)):
        validate_config(prepare_config(cfg))


# ---------------------------------------------------------------------------------------------------------------
# KubeRay


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_matches_the_crd(name, crd_schemas):
    doc = _load(CLUSTER / "kuberay" / name)
    assert validate_manifest(doc, crd_schemas) == []
    spec = _cluster_spec(doc)
    assert spec["authOptions"] == {"mode": "token"}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["decode"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    groups_in_order = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group, pod in zip(groups_in_order, _pods(doc)):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (c,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        # the object store lives in /dev/shm: the volume holds all of it
        assert _bytes(shm["sizeLimit"]) >= int(group["rayStartParams"]["object-store-memory"]), group
        assert "emptyDir" in volumes[mounts["/tmp/ray"]]
        # credentials only by reference to a Secret, never as a value in the manifest
        assert any(e.get("secretRef") for e in c.get("envFrom", [])) or any(
            e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", []))
        assert not [e for e in c.get("env", []) if e["name"].startswith("AWS_") and "SECRET" in e["name"]
                    and "value" in e]


@pytest.mark.parametrize("path, value, needle", [
    (("spec", "headGroupSpec", "rayStartParam"), {}, "spec.headGroupSpec.rayStartParam"),   # misspelt key
    (("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "imagePullPolice"), "Always",
     "spec.workerGroupSpecs[0].template.spec.containers[0].imagePullPolice"),             # in a pod template
    (("spec", "workerGroupSpecs", 0, "replicas"), "two", "replicas"),                      # wrong type
    (("spec", "authOptions", "mode"), "tokens", "authOptions.mode"),                       # not in the enum
])
def test_a_misspelt_or_mistyped_manifest_field_fails(crd_schemas, path, value, needle):
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    problems = validate_manifest(doc, crd_schemas)
    assert any(needle in p for p in problems), problems


def _entrypoint(name: str) -> list[str]:
    return shlex.split(_load(CLUSTER / "kuberay" / name)["spec"]["entrypoint"])


def _sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_finetune_rayjob_runs_a_valid_finetune_config():
    from mirasol_ray.config import load_config

    argv = _entrypoint("rayjob-finetune.yaml")
    assert argv[:2] == ["python", "jobs/finetune.py"] and (REPO / argv[1]).is_file()
    doc = _load(CLUSTER / "kuberay" / "rayjob-finetune.yaml")
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) == {"working_dir": "/home/ray/mirasol"}
    cfg = load_config(argv[argv.index("--config") + 1], _sets(argv) + ["train.stage=finetune"])
    assert cfg.train.init_from.startswith("s3://") and cfg.data.task == "finetune"
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get(
        "nvidia.com/gpu", 0)) for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == gpus, "one train worker per GPU of the job's cluster"


def test_sweep_rayjob_calls_jobs_sweep_with_mirasol_sweeps_arguments():
    """`python jobs/sweep.py --config NAME --space SPACE.yaml --storage s3://... --name NAME [--set ...]`: the
    entrypoint parses with `mirasol sweep`'s own parser, its space file passes the sweep's own check (every key and
    every range end builds a config), and each trial fine-tunes, validates and has weights to start from."""
    from mirasol_ray.cli import build_parser
    from mirasol_ray.config import load_config
    from mirasol_ray.launch.sweep import read_space

    argv = _entrypoint("rayjob-sweep.yaml")
    assert argv[:2] == ["python", "jobs/sweep.py"] and (REPO / argv[1]).is_file()
    args = build_parser().parse_args(["sweep", *argv[2:]])
    assert args.storage.startswith("s3://") and args.name and args.config
    cfg = load_config(args.config, args.set)
    params = read_space(str(REPO / args.space), cfg.to_dict())
    assert params, "the sweep searches something"
    assert cfg.train.stage == "finetune" and cfg.data.task == "finetune", "each trial fine-tunes"
    # trials are ranked on a validation metric: they must validate, more than once
    assert cfg.data.val and 0 < cfg.train.eval_every < cfg.train.steps
    cfg.check_start()  # from the pretrained run


def test_local_sh_runs_mirasol_cluster(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MIRASOL": str(Path(sys.executable).parent / "mirasol")}
    st = subprocess.run(["bash", str(CLUSTER / "local.sh"), "status", "--dir", str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 1 and "no local cluster running" in st.stdout, st.stdout + st.stderr
    bad = subprocess.run(["bash", str(CLUSTER / "local.sh"), "start"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "usage: cluster/local.sh up|down|status" in bad.stderr
