"""Checks of deploy/k8s: each overlay built with kustomize, validated against the Kubernetes schemas,
then held to Sophia's rules (security context, probes, resources, Secrets, config, scaling, GPU)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate

from libs.config import ConfigError, load_config
from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from tools.deploy_check.common import DEPLOY, SERVICE_IMAGES, SERVICES, load_yaml_documents, run, tool

K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
# The oldest Kubernetes the manifests are written for (StatefulSet PVC retention, gRPC probes).
KUBERNETES_VERSION = "1.30.0"
_SECRET_NAME = re.compile(r"(^|_)(KEY|SECRET|PASSWORD|TOKEN)$")
# Values that only exist in the cluster, so that the configuration check can load the rest.
_CLUSTER_SECRET_VALUES = {"SOPHIA_REDIS_URL": "redis://managed-redis.example:6379/0"}

Manifest = dict[str, Any]


def build(overlay: Path) -> list[Manifest]:
    """`kubectl kustomize` of an overlay (the config file lives outside deploy/k8s, hence the flag)."""
    result = run([tool("kubectl"), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)])
    if result.returncode != 0:
        raise ValueError(f"kustomize {overlay}: {result.stderr.strip()}")
    return load_yaml_documents(result.stdout)


def schema_problems(manifests: list[Manifest], version: str = KUBERNETES_VERSION) -> list[str]:
    problems = []
    for manifest in manifests:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"
            path = ".".join(str(part) for part in exc.path)
            problems.append(f"{where}: {path}: {exc.message}")
    return problems


def _named(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def _workloads(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] in ("Deployment", "StatefulSet")}


def _cron_pod(cron_job: Manifest) -> Manifest:
    return cron_job["spec"]["jobTemplate"]["spec"]["template"]


def _check_pod_security(name: str, workload: Manifest, *, probes: bool = True) -> list[str]:
    """`probes`: servers must have readiness and liveness probes; a job's pod has none."""
    problems = []
    template = workload["spec"]["template"] if "template" in workload["spec"] else _cron_pod(workload)
    pod = template["spec"]
    security = pod.get("securityContext", {})
    if security.get("runAsNonRoot") is not True or not security.get("runAsUser"):
        problems.append(f"{name}: the pod must run as a non-root uid (runAsNonRoot, runAsUser)")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: seccompProfile RuntimeDefault is missing")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: mounts a service account token it does not need")
    for container in pod["containers"]:
        where = f"{name}/{container['name']}"
        context = container.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: the root filesystem must be read-only")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities must drop ALL")
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(bound, {}))
            if missing:
                problems.append(f"{where}: resources.{bound} lacks {', '.join(sorted(missing))}")
        for probe in ("readinessProbe", "livenessProbe") if probes else ():
            if probe not in container:
                problems.append(f"{where}: no {probe}")
        if ":" not in container["image"]:
            problems.append(f"{where}: image {container['image']!r} has no tag")
    return problems


def _check_no_literal_secrets(manifests: list[Manifest]) -> list[str]:
    problems = [f"Secret/{m['metadata']['name']}: Secrets are created by operators, never in manifests"
                for m in manifests if m["kind"] == "Secret"]  # fmt: skip
    for name, config_map in _named(manifests, "ConfigMap").items():
        for key in config_map.get("data", {}):
            if _SECRET_NAME.search(key):
                problems.append(f"ConfigMap/{name}: {key} looks like a secret; use a Secret")
    pods = {name: workload["spec"]["template"]["spec"] for name, workload in _workloads(manifests).items()}
    pods.update({name: _cron_pod(job)["spec"] for name, job in _named(manifests, "CronJob").items()})
    for name, pod in pods.items():
        for container in pod["containers"]:
            for variable in container.get("env", []):
                if _SECRET_NAME.search(variable["name"]) and "value" in variable:
                    problems.append(f"{name}: {variable['name']} is written in the manifest; use a Secret")
    return problems


def _environment(container: Manifest, config_maps: dict[str, Manifest]) -> dict[str, str]:
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        reference = source.get("configMapRef")
        if reference:
            environment.update(config_maps.get(reference["name"], {}).get("data", {}))
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = str(variable["value"])
        elif variable["name"] in _CLUSTER_SECRET_VALUES:
            environment[variable["name"]] = _CLUSTER_SECRET_VALUES[variable["name"]]
    return environment


def _headless_services(manifests: list[Manifest]) -> dict[str, dict[str, str]]:
    return {
        name: service["spec"].get("selector", {})
        for name, service in _named(manifests, "Service").items()
        if service["spec"].get("clusterIP") == "None"
    }


def _check_service_workload(service: str, workload: Manifest, manifests: list[Manifest], config_file: Path):
    """The container's command, image, ports, probes, certificate and configuration, as Sophia reads it."""
    problems = []
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if container.get("command") != ["python", "-m", f"services.{service}"]:
        problems.append(f"{service}: command must be python -m services.{service}")
    profile = SERVICE_IMAGES[service]
    if not re.search(rf"/sophia-{profile}(-cuda)?:", container["image"]):
        problems.append(f"{service}: runs {container['image']!r}, expected the sophia-{profile} image")
    environment = _environment(container, _named(manifests, "ConfigMap"))
    environment["SOPHIA_CONFIG"] = str(config_file)
    try:
        config = load_config(environ=environment)
    except ConfigError as exc:
        return [*problems, f"{service}: its environment is not a valid Sophia configuration: {exc}"]
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    if ports.get("grpc") != getattr(config.services, service).port:
        problems.append(f"{service}: containerPort grpc is not services.{service}.port")
    metrics_port = config.telemetry.prometheus_base_port + PROMETHEUS_PORT_OFFSETS[service]
    if not config.telemetry.prometheus_base_port or ports.get("metrics") != metrics_port:
        problems.append(f"{service}: containerPort metrics must be {metrics_port} (base + offset)")
    headless = _headless_services(manifests)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    for other in SERVICES:
        host = getattr(config.services, other).host
        if other == service:
            if host != "0.0.0.0":
                problems.append(f"{service}: must listen on 0.0.0.0, not {host!r}")
        elif host not in headless:
            problems.append(f"{service}: reaches {other} at {host!r}, which is no headless Service")
    own_selector = headless.get(service)
    if own_selector is None or any(labels.get(k) != v for k, v in own_selector.items()):
        problems.append(f"{service}: no headless Service named {service} selects its pods")
    if service in ("gateway", "router"):
        problems += _flags_file_problems(service, config.routing.flags_file, pod, manifests)
    secrets = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    if f"sophia-tls-{service}" not in secrets:
        problems.append(f"{service}: does not mount its own certificate (Secret sophia-tls-{service})")
    if service == "gateway":
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if container.get(probe, {}).get("grpc", {}).get("port") != config.services.gateway.port:
                problems.append(f"gateway: {probe} must be the native gRPC probe on its port")
    else:
        command = ["python", "/app/deploy/docker/healthcheck.py", service]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if container.get(probe, {}).get("exec", {}).get("command") != command:
                problems.append(f"{service}: {probe} must run {' '.join(command)}")
    return problems


def _flags_file_problems(
    service: str, flags_file: str, pod: Manifest, manifests: list[Manifest]
) -> list[str]:
    """The feature flags come from a ConfigMap mounted in the pod (a relative path would read the
    image's copy, which only a new image changes)."""
    if not flags_file.startswith("/"):
        return [f"{service}: routing.flags_file {flags_file!r} is the image's copy, not a mounted ConfigMap"]
    container = pod["containers"][0]
    volumes = {v["name"]: v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    config_maps = _named(manifests, "ConfigMap")
    for mount in container.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        if mount["name"] in volumes and flags_file.startswith(directory):
            data = config_maps.get(volumes[mount["name"]], {}).get("data", {})
            if flags_file[len(directory) :] in data:
                return []
    return [f"{service}: routing.flags_file {flags_file} is in no ConfigMap mounted in its pod"]


BACKUP_COMMAND = ["sh", "/app/deploy/docker/backup.sh"]


def _check_backup(manifests: list[Manifest], config_file: Path) -> list[str]:
    """The backup CronJob (components/backup): secure like the services, one run at a time, the
    backup image's script, snapshots on a PVC, a valid configuration and the right to reach Redis."""
    cron_job = _named(manifests, "CronJob").get("redis-backup")
    if cron_job is None:
        return ["redis-backup: no CronJob (components/backup)"]
    problems = _check_pod_security("redis-backup", cron_job, probes=False)
    if cron_job["spec"].get("concurrencyPolicy") != "Forbid":
        problems.append("redis-backup: concurrencyPolicy must be Forbid (two copies of the dataset at once)")
    template = _cron_pod(cron_job)
    pod = template["spec"]
    container = pod["containers"][0]
    if container.get("command") != BACKUP_COMMAND or "/sophia-backup:" not in container["image"]:
        problems.append(f"redis-backup: must run {' '.join(BACKUP_COMMAND)} in the sophia-backup image")
    if template["metadata"].get("labels", {}).get("sophia.dev/redis-client") != "true":
        problems.append("redis-backup: its pod lacks the sophia.dev/redis-client label (Redis refuses it)")
    environment = _environment(container, _named(manifests, "ConfigMap"))
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}  # fmt: skip
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    claim = claims.get(mounts.get(environment.get("SOPHIA_BACKUP_DIR", "/backups"), ""))
    if claim is None or claim not in _named(manifests, "PersistentVolumeClaim"):
        problems.append("redis-backup: SOPHIA_BACKUP_DIR is not on a PersistentVolumeClaim of the overlay")
    try:
        load_config(environ={**environment, "SOPHIA_CONFIG": str(config_file)})
    except ConfigError as exc:
        problems.append(f"redis-backup: its environment is not a valid Sophia configuration: {exc}")
    return problems


def _check_mcp(workload: Manifest, manifests: list[Manifest], config_file: Path) -> list[str]:
    """The MCP server: its command and image, its HTTP port, and the edge and it finding each other."""
    container = workload["spec"]["template"]["spec"]["containers"][0]
    problems = []
    if container.get("command") != ["python", "-m", "services.mcp"]:
        problems.append("mcp: command must be python -m services.mcp")
    if "/sophia-mcp:" not in container["image"]:
        problems.append(f"mcp: runs {container['image']!r}, expected the sophia-mcp image")
    config_maps = _named(manifests, "ConfigMap")
    environment = {**_environment(container, config_maps), "SOPHIA_CONFIG": str(config_file)}
    try:
        config = load_config(environ=environment)
    except ConfigError as exc:
        return [*problems, f"mcp: its environment is not a valid Sophia configuration: {exc}"]
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    if config.mcp.host != "0.0.0.0" or ports.get("http") != config.mcp.port:
        problems.append(
            f"mcp: must listen on 0.0.0.0:{config.mcp.port} (mcp.host, mcp.port, containerPort http)"
        )
    headless = _headless_services(manifests)
    if config.services.gateway.host not in headless:
        problems.append(
            f"mcp: reaches the Gateway at {config.services.gateway.host!r}, which is no headless Service"
        )
    edge = _workloads(manifests).get("edge")
    if edge is not None:
        edge_environment = {**_environment(edge["spec"]["template"]["spec"]["containers"][0], config_maps)}
        edge_config = load_config(environ={**edge_environment, "SOPHIA_CONFIG": str(config_file)})
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = headless.get(edge_config.mcp.host)
        if selector is None or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(
                f"edge: reaches the MCP server at {edge_config.mcp.host!r}, which selects no mcp pod"
            )
    return problems


def _check_scaling(manifests: list[Manifest], config_file: Path) -> list[str]:
    problems = []
    workloads = _workloads(manifests)
    budgets = _named(manifests, "PodDisruptionBudget").values()
    pdb_selectors = [pdb["spec"]["selector"]["matchLabels"] for pdb in budgets]
    for name, workload in workloads.items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if name.endswith("-canary"):
            continue
        if not any(all(labels.get(k) == v for k, v in selector.items()) for selector in pdb_selectors):
            problems.append(f"{name}: no PodDisruptionBudget covers it")
    hpa = _named(manifests, "HorizontalPodAutoscaler").get("gateway")
    if hpa is None:
        return [*problems, "no HorizontalPodAutoscaler for the Gateway"]
    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) not in {(w["kind"], n) for n, w in workloads.items()}:
        problems.append(f"HPA gateway: targets {target['kind']}/{target['name']}, which does not exist")
    if not any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"]["metrics"]):
        problems.append("HPA gateway: does not scale on CPU")
    # One edge must be able to fill every Gateway replica the HPA may run: its circuit breaker admits
    # the config's per-replica limit times maxReplicas.
    edge = workloads.get("edge")
    if edge is not None:
        container = edge["spec"]["template"]["spec"]["containers"][0]
        environment = _environment(container, _named(manifests, "ConfigMap"))
        environment["SOPHIA_CONFIG"] = str(config_file)
        per_replica = load_config(environ={"SOPHIA_CONFIG": str(config_file)}).gateway.max_inflight_requests
        edge_limit = load_config(environ=environment).gateway.max_inflight_requests
        expected = per_replica * hpa["spec"]["maxReplicas"]
        if edge_limit != expected:
            problems.append(
                f"edge: admits {edge_limit} requests, expected {per_replica} x {hpa['spec']['maxReplicas']} "
                f"Gateway replicas = {expected} (SOPHIA__GATEWAY__MAX_INFLIGHT_REQUESTS)"
            )
    return problems


def _check_network(manifests: list[Manifest]) -> list[str]:
    policies = _named(manifests, "NetworkPolicy")
    deny = policies.get("default-deny")
    both = {"Ingress", "Egress"}
    if deny is None or deny["spec"].get("podSelector") != {} or set(deny["spec"]["policyTypes"]) != both:
        return ["NetworkPolicy default-deny (every pod, both directions) is missing"]
    problems = []
    for service in (*SERVICES, "edge", "mcp"):
        if service not in policies:
            problems.append(f"NetworkPolicy {service} is missing")
    return problems


def _check_canary(workloads: dict[str, Manifest]) -> list[str]:
    """The canary track is the stable Gateway's spec, at 0 replicas until a release scales it."""
    canary, stable = workloads.get("gateway-canary"), workloads.get("gateway")
    if canary is None or stable is None:
        return ["prod: the gateway-canary StatefulSet is missing"]
    problems = []
    if canary["spec"].get("replicas") != 0:
        problems.append(f"gateway-canary: {canary['spec'].get('replicas')} replicas; it ships at 0")
    if canary["spec"]["template"]["metadata"]["labels"].get("sophia.dev/track") != "canary":
        problems.append("gateway-canary: its pods must carry sophia.dev/track: canary")
    if canary["spec"]["template"]["spec"] != stable["spec"]["template"]["spec"]:
        problems.append("gateway-canary: its pod spec differs from the stable Gateway's")
    return problems


def _check_overlay_specifics(overlay: str, manifests: list[Manifest]) -> list[str]:
    problems = []
    workloads = _workloads(manifests)
    if overlay == "prod":
        pod = workloads["inference"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        if str(container["resources"].get("limits", {}).get("nvidia.com/gpu")) != "1":
            problems.append("prod inference: must ask for nvidia.com/gpu: 1")
        if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
            problems.append("prod inference: must tolerate the GPU pool's nvidia.com/gpu taint")
        if not pod.get("nodeSelector"):
            problems.append("prod inference: must select the GPU node pool")
        shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if not shm or mounts.get("/dev/shm") != shm[0]["name"]:
            problems.append("prod inference: needs a memory-backed /dev/shm")
        if "redis" in workloads:
            problems.append("prod: Redis is managed outside the cluster, not a workload here")
        problems += _check_canary(workloads)
        for name, workload in workloads.items():
            labels = workload["spec"]["template"]["metadata"]["labels"]
            if labels.get("sophia.dev/redis-client") == "true":
                env = workload["spec"]["template"]["spec"]["containers"][0].get("env", [])
                url = next((v for v in env if v["name"] == "SOPHIA_REDIS_URL"), None)
                if url is None or "secretKeyRef" not in url.get("valueFrom", {}):
                    problems.append(f"prod {name}: SOPHIA_REDIS_URL must come from a Secret")
    if overlay == "dev":
        redis = workloads.get("redis")
        if redis is None:
            return [*problems, "dev: the Redis StatefulSet is missing"]
        arguments = " ".join(redis["spec"]["template"]["spec"]["containers"][0].get("args", []))
        if "--appendonly yes" not in arguments or "--appendfsync always" not in arguments:
            problems.append("dev redis: must run with --appendonly yes --appendfsync always")
        if not redis["spec"].get("volumeClaimTemplates"):
            problems.append("dev redis: its data must be on a PersistentVolumeClaim")
    return problems


def semantic_problems(overlay: str, manifests: list[Manifest]) -> list[str]:
    config_map = next(
        (m for m in manifests if m["kind"] == "ConfigMap" and "sophia.yaml" in m.get("data", {})), None
    )
    if config_map is None:
        return ["no ConfigMap carries sophia.yaml"]
    workloads = _workloads(manifests)
    problems = []
    with tempfile.TemporaryDirectory() as directory:
        config_file = Path(directory) / "sophia.yaml"
        config_file.write_text(config_map["data"]["sophia.yaml"])
        for name, workload in workloads.items():
            problems += _check_pod_security(name, workload)
        for service in SERVICES:
            if service not in workloads:
                problems.append(f"{service}: no workload")
                continue
            problems += _check_service_workload(service, workloads[service], manifests, config_file)
        if "mcp" in workloads:
            problems += _check_mcp(workloads["mcp"], manifests, config_file)
        else:
            problems.append("mcp: no workload")
        problems += _check_scaling(manifests, config_file)
        problems += _check_backup(manifests, config_file)
    problems += _check_no_literal_secrets(manifests)
    problems += _check_network(manifests)
    return problems + _check_overlay_specifics(overlay, manifests)


def build_with_component(overlay: str, component: str) -> list[Manifest]:
    """An overlay with an optional component added, as an operator would add it."""
    with tempfile.TemporaryDirectory() as directory:

        def relative(path: Path) -> str:
            return os.path.relpath(path, directory)

        (Path(directory) / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [{relative(K8S / 'overlays' / overlay)}]\n"
            f"components: [{relative(K8S / 'components' / component)}]\n"
        )
        return build(Path(directory))


def _check_rps_autoscaling(manifests: list[Manifest]) -> list[str]:
    hpa = _named(manifests, "HorizontalPodAutoscaler").get("gateway", {})
    metrics = hpa.get("spec", {}).get("metrics", ())
    names = [metric.get("pods", {}).get("metric", {}).get("name") for metric in metrics]
    if "sophia_gateway_requests_per_second" not in names:
        return ["components/gateway-rps-autoscaling: the HPA has no requests-per-second metric"]
    return []


def check_all() -> dict[str, list[str]]:
    results = {}
    for overlay in OVERLAYS:
        manifests = build(K8S / "overlays" / overlay)
        results[f"k8s {overlay}: Kubernetes {KUBERNETES_VERSION} schemas"] = schema_problems(manifests)
        results[f"k8s {overlay}: security, probes, config, scaling, network"] = semantic_problems(
            overlay, manifests
        )
    with_rps = build_with_component("prod", "gateway-rps-autoscaling")
    rps_problems = [*schema_problems(with_rps), *_check_rps_autoscaling(with_rps)]
    results["k8s prod + gateway-rps-autoscaling"] = rps_problems
    return results
