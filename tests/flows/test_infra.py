"""What can be checked of infra/ and prefect.yaml without a cluster: every file parses, has the
kinds and keys its tool needs, and agrees with the profiles and the flows it serves."""

from __future__ import annotations

import inspect
import json
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import ray
import yaml

from tests.support.annotate_inputs import REPO
from tests.support.flows import BIN

INFRA = REPO / "infra"
SDXL = yaml.safe_load((REPO / "configs" / "sdxl.yaml").read_text())


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(path: Path) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents(path)}


def test_autoscaler_cluster_follows_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert {"cpu", "gpu"} <= set(types)
    assert "--dashboard-port=8265" in " ".join(cluster["head_start_ray_commands"])


def test_kuberay_cluster_has_cpu_and_gpu_worker_groups():
    manifests = by_kind(INFRA / "ray" / "raycluster.yaml")
    cluster = manifests[("RayCluster", "ifadapter")]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8265 in [p["containerPort"] for p in head["ports"]]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for name, group in groups.items():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus is not None) == (name == "gpu")
        assert container["image"] == head["image"]
    claim = manifests[("PersistentVolumeClaim", "ifadapter-data")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_vllm_servers_serve_the_models_and_url_the_profile_names():
    manifests = by_kind(INFRA / "vllm" / "vllm.yaml")
    captioner = SDXL["annotate"]["captioner"]
    url = urlparse(captioner["url"])
    service = manifests[("Service", url.hostname)]
    assert service["spec"]["ports"][0]["port"] == url.port
    deployment = manifests[("Deployment", url.hostname)]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert f"--model={captioner['model']}" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e for e in container["env"]}
    assert env[captioner["api_key_env"]]["valueFrom"]["secretKeyRef"]["name"] == "vllm-api-key"
    judge = manifests[("Deployment", "vlm-judge")]["spec"]["template"]["spec"]["containers"][0]
    assert "--model=OpenGVLab/InternVL3-8B-hf" in judge["args"]
    script = (INFRA / "vllm" / "serve.sh").read_text()
    assert f"vllm serve {captioner['model']}" in script


def test_prefect_server_and_worker_manifests():
    manifests = by_kind(INFRA / "prefect" / "prefect.yaml")
    server = manifests[("Deployment", "prefect-server")]["spec"]["template"]["spec"]
    assert server["containers"][0]["command"][:3] == ["prefect", "server", "start"]
    worker = manifests[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    command = worker["containers"][0]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == "ifadapter"
    assert ("Service", "prefect-server") in manifests


def test_shell_scripts_parse():
    for script in sorted(INFRA.rglob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_dockerfile_installs_torch_first_under_the_constraints():
    lines = [
        line.strip() for line in (INFRA / "Dockerfile").read_text().splitlines() if "pip" in line
    ]
    torch = next(i for i, line in enumerate(lines) if "torch torchvision" in line)
    project = next(i for i, line in enumerate(lines) if '-e ".[dev]"' in line)
    assert torch < project
    assert "-c constraints.txt" in lines[torch] and "-c constraints.txt" in lines[project]
    assert "check_env.py" in (INFRA / "Dockerfile").read_text()


def test_prefect_yaml_deployments_match_the_flows():
    from prefect.client.schemas.schedules import CronSchedule

    from flows import pipeline

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert {"demo", "sdxl", "retrain"} <= set(deployments)
    signature = inspect.signature(pipeline.pipeline.fn)
    for deployment in deployments.values():
        path, name = deployment["entrypoint"].split(":")
        assert (REPO / path).is_file() and getattr(pipeline, name).name == "ifadapter-pipeline"
        signature.bind(**deployment["parameters"])  # every parameter is one the flow takes
        assert deployment["work_pool"]["name"] == "ifadapter"
    cron = deployments["retrain"]["schedules"][0]
    CronSchedule(cron=cron["cron"], timezone=cron["timezone"])
    assert deployments["retrain"]["parameters"]["stages"] == ["cache", "train", "evaluate"]


def test_prefect_deploy_cli_is_there():
    result = subprocess.run(
        [str(BIN / "prefect"), "deploy", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--all" in result.stdout
