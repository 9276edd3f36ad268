"""Deployment files: valid against their schemas (offline), consistent with the code, and their
commands actually run here against the test Redis and SeaweedFS."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import REPO
from servers import free_port, stop_process, wait_until

from shapfleet.api.cli import build_parser
from shapfleet.broker.settings import Limits, ServiceSettings

COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
KNOWN_VARIABLES = {f"SHAPFLEET_{f.name.upper()}" for f in dataclasses.fields(ServiceSettings) if f.name != "limits"} | \
                  {f"SHAPFLEET_{f.name.upper()}" for f in dataclasses.fields(Limits)}
QUEUES = {ServiceSettings().queue_plan, ServiceSettings().queue_shards, ServiceSettings().queue_reduce}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def manifests() -> list[tuple[str, dict]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def containers() -> list[tuple[str, dict]]:
    found = []
    for _, doc in manifests():
        if doc["kind"] == "Deployment":
            found += [(doc["metadata"]["name"], c) for c in doc["spec"]["template"]["spec"]["containers"]]
    return found


def test_compose_file_is_valid_against_the_compose_spec():
    result = subprocess.run([str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema",
                             "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_are_valid_against_kubernetes_schemas():
    version = kubernetes_validate.latest_version()
    kinds = set()
    for _, doc in manifests():
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked structurally below
        kubernetes_validate.validate(doc, version, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "ScaledObject"} <= kinds
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_keda_scales_the_gpu_workers_on_the_shards_queue():
    (scaled,) = [d for _, d in manifests() if d["kind"] == "ScaledObject"]
    gpu = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Deployment"}["shapfleet-worker-gpu"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["spec"]["scaleTargetRef"]["name"] == gpu["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    config = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "ConfigMap"}["shapfleet-config"]["data"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == config["SHAPFLEET_QUEUE_SHARDS"] == "shards"
    assert trigger["metadata"]["address"] in config["SHAPFLEET_REDIS_URL"]
    assert int(scaled["spec"]["cooldownPeriod"]) > 0
    assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    spec = gpu["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["terminationGracePeriodSeconds"] >= 600  # above the longest shard
    api = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Deployment"}["shapfleet-api"]
    probes = api["spec"]["template"]["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz" and probes["livenessProbe"]["httpGet"]["path"] == "/healthz"


def _check_command(command: list[str]) -> None:
    """Every command the deployment runs must exist in the code with these arguments."""
    program = command[0]
    if program == "shapfleet":
        args = build_parser().parse_args(command[1:])  # SystemExit on an unknown flag or command
        if args.command == "worker":
            assert set(args.queues.split(",")) <= QUEUES, command
    elif program == "gunicorn":
        module, _, attribute = command[-1].partition(":")
        assert importlib.util.find_spec(module) is not None and f"\n{attribute} = " in Path(
            importlib.util.find_spec(module).origin).read_text(), command
    elif program == "celery":
        assert importlib.util.find_spec(command[command.index("-A") + 1]) is not None, command
    else:
        assert program in ("redis-server", "mini"), command


def test_every_command_module_queue_and_variable_exists_in_the_code():
    services = compose()["services"]
    for name, service in services.items():
        command = service.get("command")
        if service.get("image", "").startswith("shapfleet:"):
            _check_command(command)
        for variable in service.get("environment", {}):
            assert variable in KNOWN_VARIABLES, (name, variable)
        if "healthcheck" in service and "celery" in " ".join(service["healthcheck"]["test"]):
            node = re.search(r"-d (\S+)@", " ".join(service["healthcheck"]["test"])).group(1)
            queues = command[command.index("--queues") + 1].split(",")
            assert node == "shapfleet-" + "-".join(queues), (name, node)  # the name `shapfleet worker` gives
    for variable in compose()["x-shapfleet-environment"]:
        assert variable in KNOWN_VARIABLES, variable
    for name, container in containers():
        _check_command(container["command"])
        for entry in container.get("env", []):
            assert entry["name"] in KNOWN_VARIABLES, (name, entry["name"])
    for _, doc in manifests():
        if doc["kind"] in ("ConfigMap", "Secret"):
            for variable in doc.get("data", doc.get("stringData", {})):
                assert variable in KNOWN_VARIABLES, variable
    # The watchdog (deadlines, stalled jobs, retention) runs wherever the stack runs.
    assert "--beat" in services["worker-cpu"]["command"]
    assert any("--beat" in container["command"] for _, container in containers())
    gpu = services["worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--concurrency" in gpu["command"] and gpu["command"][gpu["command"].index("--concurrency") + 1] == "1"
    assert gpu["profiles"] == ["gpu"] and services["worker-shards-cpu"]["profiles"] == ["cpu"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--appendfsync everysec" in redis_command and "noeviction" in redis_command


def test_dockerfile_stages():
    text = DOCKERFILE.read_text()
    stages = {m.group(1): m.start() for m in re.finditer(r"^FROM \S+ AS (\S+)", text, flags=re.M)}
    assert {"cpu", "gpu", "build-cpu", "build-gpu"} <= set(stages)
    for stage in ("cpu", "gpu"):
        start = stages[stage]
        following = [p for p in stages.values() if p > start]
        body = text[start:min(following) if following else len(text)]
        assert re.search(r"^USER 10001", body, flags=re.M), stage  # non-root
        assert "pip install" not in body and "build-essential" not in body and "gcc" not in body, stage
        _check_command(json.loads(re.search(r"^CMD (.+)$", body, flags=re.M).group(1)))
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (REPO / source).exists(), source
    assert "onnxruntime-gpu" in text and "nvidia/cuda" in text


@pytest.mark.service
def test_the_containers_commands_run_here(service_settings, tmp_path):
    """Run the compose file's API, worker and Flower-app commands against the test servers."""
    services = compose()["services"]
    env = {**os.environ, **service_settings.replace(api_keys="deploy-key:ops").environment()}
    port = free_port()
    api_command = [a.replace("0.0.0.0:8000", f"127.0.0.1:{port}") for a in services["api"]["command"]]
    bin_dir = Path(sys.executable).parent
    started = []

    def start(command: list[str], log: str) -> subprocess.Popen:
        executable = str(bin_dir / command[0]) if (bin_dir / command[0]).exists() else command[0]
        with open(tmp_path / log, "wb") as out:
            process = subprocess.Popen([executable, *command[1:]], env=env, cwd=tmp_path, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        return process

    try:
        start(api_command, "api.log")
        plan_reduce = start(services["worker-cpu"]["command"], "worker-cpu.log")
        shards = start(services["worker-gpu"]["command"], "worker-gpu.log")  # CPU onnxruntime here
        for process, log in ((plan_reduce, "worker-cpu.log"), (shards, "worker-gpu.log")):
            wait_until(lambda: process.poll() is None and b" ready." in (tmp_path / log).read_bytes(), 90, log)

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                return response.status == 200

        wait_until(ready, 60, "api")
        # Flower's command loads this app; `inspect ping` through the same app reaches both workers.
        flower_app = services["flower"]["command"][services["flower"]["command"].index("-A") + 1]
        ping = subprocess.run([str(bin_dir / "celery"), "-A", flower_app, "inspect", "ping", "--timeout", "10"],
                              env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert ping.returncode == 0 and "shapfleet-plan-reduce@" in ping.stdout and "shapfleet-shards@" in ping.stdout, ping
        # And the three together serve a job.
        from shapfleet.api.client import Client

        client = Client(f"http://127.0.0.1:{port}", "deploy-key")
        job = client.submit([REPO / "examples" / "circle.png"], model=REPO / "examples" / "shapes.onnx",
                            settings={"segmenter": "grid", "grid": "4x4", "nsamples": 200})
        assert client.wait(job["id"], timeout=120)["status"] == "succeeded"
    finally:
        for process in started:
            stop_process(process)
