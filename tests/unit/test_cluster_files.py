"""Offline validation of everything in cluster/: the launcher YAMLs with Ray's own schema and validator, the KubeRay
manifests against KubeRay's CRD schemas (types and unknown keys), and the Ray version the Dockerfile, the images and
rayVersion name against pyproject.toml's pin. A misspelt field anywhere fails here, not on a cluster.

Then what a platform engineer would check before `ray up` or `kubectl apply` (semantic checks of our own): every node
type that advertises a GPU boots a pinned image with a driver (or installs one and waits for it); the heads'
identities can run the autoscaler; token mode is in every container process's environment; every RayJob has a
deadline and a retry limit; GPU groups are pinned to a GPU product; the decode resource is declared where decoding
belongs; the Dockerfile installs exactly the lock, which agrees with pyproject.toml; no credential in any file."""

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


def _ray_container(pod: dict) -> dict:
    """The pod's Ray container (KubeRay's convention: the first; sidecars such as Fluent Bit follow it)."""
    c = pod["containers"][0]
    assert c["name"] in ("ray-head", "ray-worker"), c["name"]
    return c


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
        images += [_ray_container(pod)["image"] for pod in _pods(doc)]
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
        c = _ray_container(pod)
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
    # a retried or re-applied job continues the sweep it started: the same command works both times
    assert args.resume_or_start and not args.resume
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


# ---------------------------------------------------------------------------------------------------------------
# Semantic checks: what would fail on the first real cloud though every schema passes


def _launcher_gpus(provider: str, node_type: dict) -> int:
    """GPUs a launcher node type advertises: ``resources.GPU``, else what its machine has (AWS: Ray detects it from
    the instance type, p*/g* families; GCP: the machine type's or guestAccelerators' count)."""
    if node_type.get("resources", {}).get("GPU"):
        return int(node_type["resources"]["GPU"])
    nc = node_type["node_config"]
    if provider == "aws":
        return 1 if re.match(r"(p\d|g\d)", nc.get("InstanceType", "")) else 0
    return _gcp_machine_gpus(nc)


def _gcp_machine_gpus(node_config: dict) -> int:
    """GPUs of a GCP node: its guestAccelerators, else the count an accelerator-optimized machine type carries in its
    name (a3-highgpu-8g: 8; a2-ultragpu-4g: 4; g2-standard-N: 1)."""
    attached = sum(int(a.get("acceleratorCount", 1)) for a in node_config.get("guestAccelerators", []))
    if attached:
        return attached
    mt = node_config.get("machineType", "")
    m = re.match(r"a\d-\w+-(\d+)g$", mt)
    return int(m.group(1)) if m else (1 if mt.startswith("g2-") else 0)


def driver_problems(cfg: dict) -> list[str]:
    """Node types of a launcher config that advertise GPUs but would boot without a usable driver."""
    provider = cfg["provider"]["type"]
    out = []
    for name, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        if provider == "aws":
            # every node pins its AMI (Ray's default is an old Deep Learning AMI); GPU nodes the GPU-driver one
            if not re.fullmatch(r"ami-[0-9a-f]{8,17}", str(nc.get("ImageId", ""))):
                out.append(f"{name}: no pinned ImageId (ami-...): Ray would use its old default AMI")
            if _launcher_gpus(provider, t) and not any("nvidia-smi" in c for c in t.get("initialization_commands", [])):
                out.append(f"{name}: GPU node without a driver check before the container starts")
        else:
            if not _launcher_gpus(provider, t):
                continue
            disks = [d for d in nc.get("disks", []) if d.get("boot")]
            image = disks[0]["initializeParams"]["sourceImage"] if disks else ""
            meta = {i["key"]: i["value"] for i in nc.get("metadata", {}).get("items", [])}
            if "deeplearning-platform-release" not in image or "-nvidia-" not in image:
                out.append(f"{name}: GPU node not on a Deep Learning VM image with an NVIDIA driver branch: {image}")
            if str(meta.get("install-nvidia-driver", "")).lower() != "true":
                out.append(f"{name}: GPU node without install-nvidia-driver metadata")
            cmds = t.get("initialization_commands", cfg.get("initialization_commands", []))
            if not any("nvidia-smi" in c and "until" in c for c in cmds):
                out.append(f"{name}: GPU node does not wait for nvidia-smi before Ray starts")
            # a node type's own initialization_commands replace the global ones: keep them all
            missing = [c for c in cfg.get("initialization_commands", []) if c not in cmds]
            if missing:
                out.append(f"{name}: its initialization_commands drop the global ones: {missing}")
            if int(t["resources"].get("GPU", 0)) != _gcp_machine_gpus(nc):
                out.append(f"{name}: resources.GPU {t['resources'].get('GPU')} is not the machine's "
                           f"{_gcp_machine_gpus(nc)}")
    return out


@pytest.mark.parametrize("name", LAUNCHER)
def test_every_gpu_node_type_boots_with_a_driver(name):
    cfg = _load(CLUSTER / name)
    assert any(_launcher_gpus(cfg["provider"]["type"], t) for t in cfg["available_node_types"].values())
    assert driver_problems(cfg) == []


@pytest.mark.parametrize("name, mutate, says", [
    ("aws.yaml", lambda c: c["available_node_types"]["gpu_worker"]["node_config"].pop("ImageId"), "no pinned ImageId"),
    ("aws.yaml", lambda c: c["available_node_types"]["gpu_worker"]["node_config"].__setitem__("ImageId",
                                                                                          "latest_dlami"),
     "no pinned ImageId"),
    ("gcp.yaml", lambda c: c["available_node_types"]["gpu_worker"]["node_config"].pop("metadata"),
     "install-nvidia-driver"),
    ("gcp.yaml", lambda c: c["available_node_types"]["gpu_worker"].pop("initialization_commands"), "nvidia-smi"),
    ("gcp.yaml", lambda c: c["available_node_types"]["gpu_worker"]["resources"].__setitem__("GPU", 4),
     "is not the machine's 8"),
])
def test_driver_check_catches_a_gpu_node_without_one(name, mutate, says):
    cfg = _load(CLUSTER / name)
    mutate(cfg)
    assert any(says in p for p in driver_problems(cfg)), driver_problems(cfg)


@pytest.mark.parametrize("name", LAUNCHER)
def test_token_mode_is_in_every_container_process_environment(name):
    cfg = _load(CLUSTER / name)
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert not any("worker_run_options" in t.get("docker", {}) or "head_run_options" in cfg["docker"]
                   for t in cfg["available_node_types"].values()), "per-type run options would need it too"


def test_aws_head_role_can_run_the_autoscaler_and_reach_the_bucket():
    import json

    cfg = _load(CLUSTER / "aws.yaml")
    types = cfg["available_node_types"]
    profile = {n: t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] for n, t in types.items()}
    head = profile.pop(cfg["head_node_type"])
    workers = set(profile.values())
    assert head not in workers, "the workers need no EC2 rights: their profile is not the head's"
    policy = json.loads((CLUSTER / "iam" / "aws-head-policy.json").read_text())
    allowed = {}
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        for action in [st["Action"]] if isinstance(st["Action"], str) else st["Action"]:
            allowed.setdefault(action, []).extend([st["Resource"]] if isinstance(st["Resource"], str)
                                                  else st["Resource"])
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
                   "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "iam:PassRole", "s3:GetObject",
                   "s3:PutObject", "s3:ListBucket"):
        assert action in allowed, action
    # PassRole exactly for the role the workers' instance profile holds
    assert all(r.endswith(tuple(f"role/{w}" for w in workers)) or r.endswith(tuple(f"instance-profile/{w}"
                                                                                for w in workers))
               for r in allowed["iam:PassRole"]), allowed["iam:PassRole"]
    worker = json.loads((CLUSTER / "iam" / "aws-worker-policy.json").read_text())
    worker_actions = {a for st in worker["Statement"] for a in st["Action"]}
    assert worker_actions and all(a.startswith("s3:") for a in worker_actions), "workers: the bucket only"
    trust = json.loads((CLUSTER / "iam" / "aws-ec2-trust.json").read_text())
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


def test_gcp_head_service_account_can_run_the_autoscaler():
    cfg = _load(CLUSTER / "gcp.yaml")
    types = cfg["available_node_types"]
    accounts = {n: t["node_config"]["serviceAccounts"][0]["email"] for n, t in types.items()}
    head = accounts.pop(cfg["head_node_type"])
    assert head not in set(accounts.values())
    roles = [ln.strip() for ln in (CLUSTER / "iam" / "gcp-head-roles.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert {"roles/compute.instanceAdmin.v1", "roles/iam.serviceAccountUser",
            "roles/secretmanager.secretAccessor"} <= set(roles)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_decode_nodes_declare_the_decode_resource_per_cpu(name):
    cfg = _load(CLUSTER / name)
    types = cfg["available_node_types"]
    decode = types["decode_worker"]
    cpus = decode["resources"].get("CPU") or {"c7i.16xlarge": 64}[decode["node_config"]["InstanceType"]]
    assert decode["resources"]["decode"] == cpus, "one decode unit per vCPU (tasks ask data.decode_cpus of it)"
    assert decode["min_workers"] >= 1, "the decode resource exists only while a decode node is up"
    assert not any("decode" in t["resources"] for n, t in types.items() if n != "decode_worker")


def test_rayjobs_have_a_deadline_a_retry_limit_and_a_submission_mode():
    for name in MANIFESTS:
        doc = _load(CLUSTER / "kuberay" / name)
        if doc["kind"] != "RayJob":
            continue
        spec = doc["spec"]
        assert spec.get("activeDeadlineSeconds", 0) > 0, f"{name}: a hung job would hold its GPUs forever"
        assert spec.get("backoffLimit", 0) >= 1, f"{name}: a lost head is never retried"
        assert spec.get("preRunningDeadlineSeconds", 0) > 0, name
        assert spec.get("shutdownAfterJobFinishes") is True and spec.get("ttlSecondsAfterFinished", 0) > 0, name
        assert spec.get("submissionMode") == "SidecarMode", name
        # KubeRay refuses SidecarMode with a submitter config or a restarting head
        assert "submitterConfig" not in spec and "submitterPodTemplate" not in spec, name
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert head.get("restartPolicy", "Never") == "Never", name


def test_gpu_groups_are_pinned_to_a_gpu_product_and_decode_groups_declare_decode():
    for name in MANIFESTS:
        doc = _load(CLUSTER / "kuberay" / name)
        for g in _cluster_spec(doc)["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            start = g.get("rayStartParams", {})
            declared = yaml.safe_load(yaml.safe_load(start["resources"])) if "resources" in start else {}
            if "nvidia.com/gpu" in limits:
                assert "nvidia.com/gpu.product" in pod.get("nodeSelector", {}), f"{name} {g['groupName']}"
                assert "decode" not in declared, f"{name} {g['groupName']}: decoding belongs on the CPU pods"
            else:
                assert declared.get("decode") == int(limits["cpu"]), f"{name} {g['groupName']}: one unit per CPU"


def test_raycluster_has_gcs_fault_tolerance_and_an_optional_spot_gpu_group():
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    ft = doc["spec"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]
    assert "value" not in ft["redisPassword"], "the Redis password only by reference to a Secret"
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    spot = groups["gpu-spot"]
    assert spot["minReplicas"] == 0 and "nvidia.com/gpu" in spot["template"]["spec"]["containers"][0]["resources"][
        "limits"]
    # the decode resource exists only while a decode pod is up: keep one
    assert groups["decode"]["minReplicas"] >= 1


# ---------------------------------------------------------------------------------------------------------------
# The image and its lock


def _lock() -> dict[str, str]:
    """name -> version of every package in cluster/requirements.lock (names normalised as PEP 503 does)."""
    out = {}
    for ln in (CLUSTER / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", ln)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def _pyproject_deps() -> list[str]:
    """The runtime dependencies and the image's extra (tokenizers) of pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S).group(1)
    extra = re.search(r"^tokenizers = \[(.*?)\]", text, re.M | re.S).group(1)
    return re.findall(r'"([^"]+)"', deps) + re.findall(r'"([^"]+)"', extra)


def test_the_lock_holds_every_dependency_of_pyproject_the_same_ray_and_python():
    from packaging.requirements import Requirement

    lock = _lock()
    assert len(lock) > 50, "the lock holds the whole closure, not just the direct dependencies"
    for dep in _pyproject_deps():
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in lock, f"{req.name} is not locked"
        assert lock[name] in req.specifier, f"{req.name}=={lock[name]} does not satisfy pyproject's {req.specifier}"
    version, py = dockerfile_base()
    assert lock["ray"] == version, "the lock's Ray is the base image's"
    header = (CLUSTER / "requirements.lock").read_text().split("\n\n")[0]
    assert f"--python-version {py[2]}.{py[3:]}" in header and f"Python {py[2]}.{py[3:]}" in header
    text = (CLUSTER / "requirements.lock").read_text()
    pinned = [ln for ln in text.splitlines() if re.match(r"^[A-Za-z0-9].*==", ln)]
    assert all(ln.rstrip().endswith("\\") for ln in pinned), "every pin carries its hashes (--require-hashes)"


def test_the_dockerfile_installs_exactly_the_lock_checks_it_and_runs_as_non_root():
    text = (CLUSTER / "Dockerfile").read_text()
    runs = [" ".join(r.split()) for r in re.findall(r"^RUN ((?:.*\\\n)*.*)$", text, re.M)]
    runs = [r.replace("\\ ", "") for r in runs]
    installs = [r for r in runs if "pip install" in r]
    assert any("--require-hashes -r cluster/requirements.lock" in r and "pip check" in r for r in installs), installs
    # any other install resolves nothing: the lock is the only source of packages
    assert all("-r cluster/requirements.lock" in r or "--no-deps" in r for r in installs), installs
    assert re.search(r"^COPY .*cluster/requirements\.lock", text, re.M)
    assert any("wordnet-base" in r for r in runs), "WordNet for NExT-OE's WUPS"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"


# ---------------------------------------------------------------------------------------------------------------
# No credential anywhere

CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{30,}",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GCP service-account key": r"\"private_key_id\"\s*:",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "a literal password": r"(?im)^\s*(requirepass|password)\s*[:=]\s*\S+",
    "a literal secret value in a manifest": r"(?m)^\s*-\s*name:\s*\S*(SECRET|PASSWORD|TOKEN)\S*\s*\n\s*value:",
}


def credential_findings(text: str) -> list[str]:
    return [what for what, pattern in CREDENTIAL_PATTERNS.items() if re.search(pattern, text)]


def test_no_credential_in_any_cluster_file_or_the_runbook():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()] + [REPO / "docs" / "CLUSTER.md"]
    assert len(files) > 10
    found = {str(p.relative_to(REPO)): credential_findings(p.read_text()) for p in files}
    assert {k: v for k, v in found.items() if v} == {}


@pytest.mark.parametrize("planted", [
    "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "-----BEGIN RSA PRIVATE KEY-----",
    "  redisPassword:\n    password: hunter2hunter2",
    "              - name: AWS_SECRET_ACCESS_KEY\n                value: abc",
])
def test_the_credential_check_finds_a_planted_one(planted):
    assert credential_findings(planted)


def test_podmonitors_scrape_ports_the_raycluster_names():
    """monitoring.yaml's head PodMonitor scrapes the autoscaler's and dashboard's ports raycluster.yaml opens
    (`metrics` is KubeRay's own, on every Ray container), and the head tells the dashboard where Grafana is."""
    with open(CLUSTER / "kuberay" / "monitoring.yaml") as f:
        monitors = {d["metadata"]["name"]: d for d in yaml.load_all(f, Loader=_Loader)}
    assert {d["kind"] for d in monitors.values()} == {"PodMonitor"}
    head = monitors["ray-head-monitor"]["spec"]
    workers = monitors["ray-workers-monitor"]["spec"]
    assert head["selector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert workers["selector"]["matchLabels"] == {"ray.io/node-type": "worker"}
    assert [e["port"] for e in workers["podMetricsEndpoints"]] == ["metrics"]
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    (c,) = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in c["ports"]} | {"metrics"}
    assert {e["port"] for e in head["podMetricsEndpoints"]} <= ports
    env = {e["name"] for e in c["env"]}
    assert {"RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= env


def test_rayjob_pods_ship_rays_logs_to_s3():
    """Every pod of a RayJob (whose cluster is deleted after the job) runs the Fluent Bit sidecar on the Ray
    container's /tmp/ray, with the config log-shipping.yaml defines and S3 credentials only from the Secret."""
    with open(CLUSTER / "kuberay" / "log-shipping.yaml") as f:
        (cm,) = list(yaml.load_all(f, Loader=_Loader))
    conf = cm["data"]["fluent-bit.conf"]
    assert "Path              /tmp/ray/session_latest/logs/*" in conf and re.search(r"Name\s+s3", conf)
    for name in MANIFESTS:
        doc = _load(CLUSTER / "kuberay" / name)
        if doc["kind"] != "RayJob":
            continue
        for pod in _pods(doc):
            ray_c = _ray_container(pod)
            (fb,) = [c for c in pod["containers"] if c["name"] == "fluentbit"]
            ray_tmp = [m["name"] for m in ray_c["volumeMounts"] if m["mountPath"] == "/tmp/ray"]
            assert [m["name"] for m in fb["volumeMounts"] if m["mountPath"] == "/tmp/ray"] == ray_tmp
            config = {v["name"]: v for v in pod["volumes"]}["fluentbit-config"]
            assert config["configMap"]["name"] == cm["metadata"]["name"]
            assert fb["envFrom"] == [{"secretRef": {"name": "mirasol-s3"}}]
            assert not any("value" in e and "SECRET" in e["name"] for e in fb.get("env", []))
