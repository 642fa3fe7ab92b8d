"""Checks of deploy/compose/compose.yaml: the compose specification's schema, then what the schema
cannot know (each service's command, image, health check and configuration as Sophia reads it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from libs.config import ConfigError, load_config
from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from tools.deploy_check.common import DEPLOY, REPO_ROOT, SERVICE_IMAGES, SERVICES, relative, run, tool

COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
PROMETHEUS_CONFIG = DEPLOY / "monitoring" / "prometheus" / "prometheus-compose.yml"
HEALTHCHECK = "/app/deploy/docker/healthcheck.py"


def schema_problems(path: Path = COMPOSE_FILE) -> list[str]:
    """Validation against the compose specification's JSON schema (vendored by check-jsonschema)."""
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    if result.returncode == 0:
        return []
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _check_sophia_service(name: str, service: dict[str, Any], compose_names: set[str]) -> list[str]:
    problems = []
    where = f"service {name}"
    if service.get("command") != ["python", "-m", f"services.{name}"]:
        problems.append(f"{where}: command must be python -m services.{name}")
    if not (REPO_ROOT / "services" / name / "__main__.py").is_file():
        problems.append(f"{where}: services/{name}/__main__.py does not exist")
    profile = SERVICE_IMAGES[name]
    if f"/sophia-{profile}:" not in str(service.get("image", "")):
        problems.append(f"{where}: runs {service.get('image')!r}, expected the sophia-{profile} image")
    test = (service.get("healthcheck") or {}).get("test")
    if test != ["CMD", "python", HEALTHCHECK, name]:
        problems.append(f"{where}: health check must be {HEALTHCHECK} {name}")
    if service.get("read_only") is not True:
        problems.append(f"{where}: root filesystem not read-only")
    if "ALL" not in (service.get("cap_drop") or []):
        problems.append(f"{where}: capabilities not dropped")
    environment = _environment(service)
    try:
        config = load_config(environ=environment)
    except ConfigError as exc:
        return [*problems, f"{where}: its environment is not a valid Sophia configuration: {exc}"]
    for other in SERVICES:
        host = getattr(config.services, other).host
        expected = "0.0.0.0" if other == name else other
        if host != expected:
            problems.append(f"{where}: services.{other}.host is {host!r}, expected {expected!r}")
        if other != name and other not in compose_names:
            problems.append(f"{where}: {other} is not a compose service")
    if config.telemetry.prometheus_base_port == 0:
        problems.append(f"{where}: metrics are off (telemetry.prometheus_base_port 0)")
    return problems


def _check_prometheus(compose_dir: Path, services: dict[str, Any]) -> list[str]:
    problems = []
    prometheus = services.get("prometheus", {})
    mounted = {volume.split(":")[0] for volume in prometheus.get("volumes", []) if volume.startswith(".")}
    for source in mounted:
        if not (compose_dir / source).exists():
            problems.append(f"service prometheus: mounts {source}, which does not exist")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        job["job_name"]: [target for static in job.get("static_configs", []) for target in static["targets"]]
        for job in config.get("scrape_configs", [])
    }
    base = 9464  # SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT in the compose file
    for name in SERVICES:
        expected = f"{name}:{base + PROMETHEUS_PORT_OFFSETS[name]}"
        if targets.get(name) != [expected]:
            problems.append(
                f"{relative(PROMETHEUS_CONFIG)}: job {name} must scrape {expected}, not {targets.get(name)}"
            )
    return problems


def _check_mcp(service: dict[str, Any]) -> list[str]:
    problems = []
    if service.get("command") != ["python", "-m", "services.mcp"]:
        problems.append("service mcp: command must be python -m services.mcp")
    if "/sophia-mcp:" not in str(service.get("image", "")):
        problems.append(f"service mcp: runs {service.get('image')!r}, expected the sophia-mcp image")
    if (service.get("healthcheck") or {}).get("test") != ["CMD", "python", HEALTHCHECK, "mcp"]:
        problems.append(f"service mcp: health check must be {HEALTHCHECK} mcp")
    try:
        config = load_config(environ=_environment(service))
    except ConfigError as exc:
        return [*problems, f"service mcp: its environment is not a valid Sophia configuration: {exc}"]
    if config.mcp.host != "0.0.0.0":
        problems.append(f"service mcp: must listen on 0.0.0.0, not {config.mcp.host!r}")
    if config.services.gateway.host != "gateway":
        problems.append("service mcp: must reach the Gateway as gateway")
    return problems


def semantic_problems(document: dict[str, Any], compose_dir: Path = COMPOSE_FILE.parent) -> list[str]:
    services = document.get("services", {})
    names = set(services)
    required = (*SERVICES, "mcp", "redis", "edge", "prometheus", "grafana")
    problems = [f"service {name} is missing" for name in required if name not in names]
    for name in SERVICES:
        if name in services:
            problems += _check_sophia_service(name, services[name], names)
    redis = services.get("redis", {})
    command = " ".join(redis.get("command", []))
    if "--appendonly yes" not in command or "--appendfsync always" not in command:
        problems.append("service redis: must run with --appendonly yes --appendfsync always")
    if not any(str(volume).endswith(":/data") for volume in redis.get("volumes", [])):
        problems.append("service redis: its data directory /data is not on a volume")
    gateway = services.get("gateway", {})
    outbox = _environment(gateway).get("SOPHIA__GATEWAY__OUTBOX_DIR", "")
    if not outbox or not any(str(volume).endswith(f":{outbox}") for volume in gateway.get("volumes", [])):
        problems.append("service gateway: its usage journal (SOPHIA__GATEWAY__OUTBOX_DIR) is not on a volume")
    edge = services.get("edge", {})
    if edge.get("command") != ["python", "/app/deploy/docker/edge.py"]:
        problems.append("service edge: command must be python /app/deploy/docker/edge.py")
    edge_environment = _environment(edge)
    if edge_environment.get("SOPHIA__EDGE__HOST") != "0.0.0.0":
        problems.append("service edge: Envoy must listen on 0.0.0.0 (SOPHIA__EDGE__HOST)")
    if edge_environment.get("SOPHIA__SERVICES__GATEWAY__HOST") != "gateway":
        problems.append("service edge: must reach the Gateway as gateway")
    if edge_environment.get("SOPHIA__MCP__HOST") != "mcp":
        problems.append("service edge: must reach the MCP server as mcp (SOPHIA__MCP__HOST)")
    if "mcp" in services:
        problems += _check_mcp(services["mcp"])
    for source in (volume.split(":")[0] for volume in services.get("grafana", {}).get("volumes", [])):
        if source.startswith(".") and not (compose_dir / source).exists():
            problems.append(f"service grafana: mounts {source}, which does not exist")
    return problems + _check_prometheus(compose_dir, services)


def check_all() -> dict[str, list[str]]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    return {
        "compose: specification schema": schema_problems(),
        "compose: services, health checks, configuration": semantic_problems(document),
    }
