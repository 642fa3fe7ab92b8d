"""The Kubernetes manifests (deploy/k8s): each overlay built with kustomize and validated against the
Kubernetes schemas, then Sophia's rules, each shown to catch the fault it is for."""

import copy

import pytest

from tools.deploy_check import kubernetes

BUILT = {overlay: kubernetes.build(kubernetes.K8S / "overlays" / overlay) for overlay in kubernetes.OVERLAYS}


def _workload(manifests, name):
    return next(
        m for m in manifests if m["kind"] in ("Deployment", "StatefulSet") and m["metadata"]["name"] == name
    )


def _container(manifests, name):
    return _workload(manifests, name)["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", kubernetes.OVERLAYS)
def test_each_overlay_is_valid_kubernetes_and_follows_the_rules(overlay):
    assert kubernetes.schema_problems(BUILT[overlay]) == []
    assert kubernetes.semantic_problems(overlay, BUILT[overlay]) == []


def test_the_overlays_differ_where_they_should():
    dev, prod = BUILT["dev"], BUILT["prod"]
    assert {m["metadata"]["namespace"] for m in dev if "namespace" in m["metadata"]} == {"sophia-dev"}
    assert _container(prod, "inference")["image"].startswith("registry.example.com/sophia/sophia-ml-cuda:")
    assert "nvidia.com/gpu" not in _container(dev, "inference")["resources"]["limits"]
    canary = _workload(prod, "gateway-canary")
    assert canary["spec"]["replicas"] == 0
    assert canary["spec"]["template"]["metadata"]["labels"]["sophia.dev/track"] == "canary"
    # The canary is the stable Gateway's spec: only the track label, image and replicas differ.
    stable = copy.deepcopy(_workload(prod, "gateway")["spec"]["template"]["spec"])
    assert canary["spec"]["template"]["spec"] == stable


def test_the_requests_per_second_component_builds():
    manifests = kubernetes.build_with_component("prod", "gateway-rps-autoscaling")
    assert kubernetes.schema_problems(manifests) == []
    assert kubernetes._check_rps_autoscaling(manifests) == []
    assert kubernetes._check_rps_autoscaling(BUILT["prod"]) != []


def test_the_schema_check_refuses_a_misspelt_field():
    manifests = copy.deepcopy(BUILT["prod"])
    context = _container(manifests, "router")["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    assert any("readOnlyRootFileSystem" in p for p in kubernetes.schema_problems(manifests))


def _env(manifests, name, variable, value):
    _container(manifests, name).setdefault("env", []).append({"name": variable, "value": value})


def _pod(manifests, name):
    return _workload(manifests, name)["spec"]["template"]["spec"]


def _remove(manifests, kind, name):
    manifests.remove(next(m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name))


def _cron(manifests, name="redis-backup"):
    return next(m for m in manifests if m["kind"] == "CronJob" and m["metadata"]["name"] == name)


def _cron_container(manifests):
    return _cron(manifests)["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def _backups_on_empty_dir(manifests):
    volumes = _cron(manifests)["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    backups = next(v for v in volumes if v["name"] == "backups")
    backups.pop("persistentVolumeClaim")
    backups["emptyDir"] = {}


FAULTS = [
    ("prod", lambda m: _container(m, "router")["securityContext"].update(readOnlyRootFilesystem=False),
     "router/router: the root filesystem must be read-only"),
    ("prod", lambda m: _container(m, "cache")["securityContext"]["capabilities"].update(drop=[]),
     "cache/cache: capabilities must drop ALL"),
    ("prod", lambda m: _pod(m, "ledger")["securityContext"].pop("runAsNonRoot"),
     "ledger: the pod must run as a non-root uid"),
    ("prod", lambda m: _container(m, "edge")["resources"].pop("limits"), "edge/edge: resources.limits lacks"),
    ("prod", lambda m: _container(m, "ledger").pop("livenessProbe"), "ledger/ledger: no livenessProbe"),
    ("prod", lambda m: _env(m, "gateway", "OPENAI_API_KEY", "sk-live-123"),
     "gateway: OPENAI_API_KEY is written in the manifest"),
    ("prod", lambda m: m.append({"kind": "Secret", "metadata": {"name": "keys"}}),
     "Secrets are created by operators"),
    ("prod", lambda m: _env(m, "router", "SOPHIA__ROUTER__WEIGHTS", "1"),
     "router: its environment is not a valid Sophia configuration"),
    ("prod", lambda m: _env(m, "cache", "SOPHIA__SERVICES__CACHE__HOST", "127.0.0.1"),
     "cache: must listen on 0.0.0.0"),
    ("prod", lambda m: _env(m, "gateway", "SOPHIA__SERVICES__ROUTER__HOST", "router.internal"),
     "gateway: reaches router at 'router.internal', which is no headless Service"),
    ("prod", lambda m: _container(m, "gateway")["readinessProbe"].update(grpc={"port": 1}),
     "gateway: readinessProbe must be the native gRPC probe"),
    ("prod", lambda m: _container(m, "inference")["startupProbe"].update(exec={"command": ["true"]}),
     "inference: startupProbe must run"),
    ("prod", lambda m: _container(m, "ledger")["ports"][1].update(containerPort=9464),
     "ledger: containerPort metrics"),
    ("prod", lambda m: _env(m, "edge", "SOPHIA__GATEWAY__MAX_INFLIGHT_REQUESTS", "256"),
     "edge: admits 256 requests"),
    ("prod", lambda m: _remove(m, "PodDisruptionBudget", "ledger"), "ledger: no PodDisruptionBudget"),
    ("prod", lambda m: _remove(m, "NetworkPolicy", "default-deny"), "default-deny"),
    ("prod", lambda m: _container(m, "inference")["resources"]["limits"].pop("nvidia.com/gpu"),
     "nvidia.com/gpu: 1"),
    ("prod", lambda m: _pod(m, "inference").pop("tolerations"), "taint"),
    ("prod", lambda m: _container(m, "ledger")["env"].pop(),
     "prod ledger: SOPHIA_REDIS_URL must come from a Secret"),
    ("prod", lambda m: _workload(m, "gateway-canary")["spec"].update(replicas=3), "canary: 3 replicas"),
    ("prod", lambda m: _container(m, "gateway-canary")["env"].pop(), "gateway-canary: its pod spec differs"),
    ("prod", lambda m: _env(m, "mcp", "SOPHIA__MCP__PORT", "9000"), "mcp: must listen on 0.0.0.0:9000"),
    ("prod", lambda m: _env(m, "edge", "SOPHIA__MCP__HOST", "127.0.0.1"), "edge: reaches the MCP server"),
    ("prod", lambda m: _remove(m, "NetworkPolicy", "mcp"), "NetworkPolicy mcp is missing"),
    ("prod", lambda m: _env(m, "router", "SOPHIA__ROUTING__FLAGS_FILE", "config/flags.yaml"),
     "router: routing.flags_file 'config/flags.yaml' is the image's copy"),
    ("prod", lambda m: _env(m, "gateway", "SOPHIA__ROUTING__FLAGS_FILE", "/etc/sophia/flags/flags.yaml"),
     "gateway: routing.flags_file /etc/sophia/flags/flags.yaml is in no ConfigMap mounted"),
    ("dev", lambda m: _remove(m, "CronJob", "redis-backup"), "redis-backup: no CronJob"),
    ("prod", lambda m: _cron(m)["spec"].update(concurrencyPolicy="Allow"),
     "concurrencyPolicy must be Forbid"),
    ("prod", lambda m: _cron_container(m)["securityContext"].update(readOnlyRootFilesystem=False),
     "redis-backup/backup: the root filesystem must be read-only"),
    ("dev", lambda m: _cron(m)["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"].pop(
        "sophia.dev/redis-client"), "redis-backup: its pod lacks the sophia.dev/redis-client label"),
    ("dev", _backups_on_empty_dir, "SOPHIA_BACKUP_DIR is not on a PersistentVolumeClaim"),
    ("dev", lambda m: _cron_container(m)["env"].append({"name": "REDIS_PASSWORD", "value": "hunter2"}),
     "redis-backup: REDIS_PASSWORD is written in the manifest"),
    ("dev", lambda m: _cron_container(m).update(command=["python", "-m", "tools.backup", "create", "/tmp/x"]),
     "redis-backup: must run sh /app/deploy/docker/backup.sh"),
    ("dev", lambda m: _container(m, "redis").update(args=["redis-server"]), "dev redis: must run with"),
    ("dev", lambda m: _container(m, "gateway").update(image="sophia/sophia-core"), "has no tag"),
]  # fmt: skip


@pytest.mark.parametrize(("overlay", "edit", "expected"), FAULTS)
def test_sophia_rules_catch_each_fault(overlay, edit, expected):
    manifests = copy.deepcopy(BUILT[overlay])
    edit(manifests)
    problems = kubernetes.semantic_problems(overlay, manifests)
    assert any(expected in problem for problem in problems), problems
