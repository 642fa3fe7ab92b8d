"""Checks of deploy/monitoring: Prometheus configs, rules and their promtool unit tests, the Grafana
dashboards' JSON and PromQL, and which metric names they all use (the scrape test compares those with
what a live mesh exports: tests/integration/test_metrics_exported.py)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from libs.config import REPO_ROOT, load_config
from tools.deploy_check.common import DEPLOY, relative, run, tool
from tools.deploy_check.promql import metric_names, substitute_grafana_variables

MONITORING = DEPLOY / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
PROMETHEUS_CONFIGS = (PROMETHEUS_DIR / "prometheus-compose.yml", PROMETHEUS_DIR / "prometheus-k8s.yml")
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
ADAPTER_RULES = MONITORING / "prometheus-adapter.yaml"
# Series Prometheus makes itself for every target, not exported by the services.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_QUERY_INDEX = re.compile(r'"dashboard:query_(\d+)"')


def _promtool(*arguments: str) -> list[str]:
    result = run([tool("promtool"), *arguments])
    if result.returncode == 0:
        return []
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def rule_groups(paths: list[Path] = RULES) -> list[dict[str, Any]]:
    return [group for path in paths for group in yaml.safe_load(path.read_text())["groups"]]


def alert_names(paths: list[Path] = RULES) -> set[str]:
    return {rule["alert"] for group in rule_groups(paths) for rule in group["rules"] if "alert" in rule}


def untested_alerts(rules: list[Path] = RULES, tests: list[Path] = RULE_TESTS) -> list[str]:
    """Alerts that no promtool test expects to fire."""
    fired = set()
    for path in tests:
        for case in yaml.safe_load(path.read_text()).get("tests", []):
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    return [
        f"alert {name} has no promtool test that makes it fire" for name in sorted(alert_names(rules) - fired)
    ]


def dashboard_expressions(paths: list[Path] = DASHBOARDS) -> list[tuple[str, str]]:
    """(where, expr) for every query of every panel."""
    found = []
    for path in paths:
        dashboard = json.loads(path.read_text())
        for panel in dashboard.get("panels", []):
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel.get('title')}", target.get("expr", "")))
    return found


def dashboard_problems(paths: list[Path] = DASHBOARDS) -> list[str]:
    problems = []
    uids = set()
    for path in paths:
        try:
            dashboard = json.loads(path.read_text())
        except ValueError as exc:
            problems.append(f"{path.name}: not JSON: {exc}")
            continue
        if dashboard.get("uid") in uids:
            problems.append(f"{path.name}: uid {dashboard.get('uid')!r} is used twice")
        uids.add(dashboard.get("uid"))
        ids = [panel.get("id") for panel in dashboard.get("panels", [])]
        if len(ids) != len(set(ids)):
            problems.append(f"{path.name}: panel ids repeat")
        for panel in dashboard.get("panels", []):
            if panel.get("type") == "row":
                continue
            where = f"{path.name}: panel {panel.get('title')!r}"
            if panel.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{where}: must use the $datasource variable")
            if not panel.get("targets") or not all(t.get("expr") for t in panel["targets"]):
                problems.append(f"{where}: has a query without an expression")
    # Grafana's variables replaced, each query must be PromQL that Prometheus accepts.
    expressions = dashboard_expressions(paths)
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard:query_{index}", "expr": substitute_grafana_variables(expr)}
                    for index, (_, expr) in enumerate(expressions)
                ],
            }
        ]
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as file:
        yaml.safe_dump(rules, file)
        file.flush()
        failures = _promtool("check", "rules", file.name)
    located = [(_QUERY_INDEX.search(line), line) for line in failures]
    problems += [f"{expressions[int(m.group(1))][0]}: {line.split(': ', 1)[-1]}" for m, line in located if m]
    if failures and not any(m for m, _ in located):
        problems += [f"dashboards: {line}" for line in failures]
    return problems


def metric_uses() -> tuple[dict[str, set[str]], set[str]]:
    """Every metric name the rules, dashboards and adapter rules select, with where; and the names
    the recording rules define (they exist once Prometheus evaluates them)."""
    uses: dict[str, set[str]] = {}

    def add(expr: str, where: str) -> None:
        for name in metric_names(expr):
            uses.setdefault(name, set()).add(where)

    recorded = set()
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                add(rule["expr"], f"{relative(path)}: {rule.get('alert') or rule.get('record')}")
                if "record" in rule:
                    recorded.add(rule["record"])
    for where, expr in dashboard_expressions():
        add(expr, where)
    for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]:
        add(rule["seriesQuery"], relative(ADAPTER_RULES))
    return uses, recorded


_KUBERNETES_SD_ROLES = frozenset({"node", "service", "pod", "endpoints", "endpointslice", "ingress"})


def prometheus_config_problems(path: Path) -> list[str]:
    """promtool's check of a Prometheus config. Debian's promtool is built without Kubernetes service
    discovery, so a `kubernetes_sd_configs` block is checked here (role, namespaces) and replaced by a
    static target for promtool, which still checks everything else (relabelling included)."""
    config = yaml.safe_load(path.read_text())
    problems = []
    for job in config.get("scrape_configs", []):
        for discovery in job.pop("kubernetes_sd_configs", None) or ():
            if discovery.get("role") not in _KUBERNETES_SD_ROLES:
                problems.append(f"{path.name}: job {job['job_name']}: unknown role {discovery.get('role')!r}")
            names = discovery.get("namespaces", {}).get("names", [])
            if not all(isinstance(name, str) and name for name in names):
                problems.append(f"{path.name}: job {job['job_name']}: namespaces.names must be names")
            job.setdefault("static_configs", []).append({"targets": ["kubernetes-pod:9464"]})
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as file:
        yaml.safe_dump(config, file)
        file.flush()
        problems += [
            line.replace(file.name, path.name)
            for line in _promtool("check", "config", "--syntax-only", file.name)
        ]
    return problems


# Recording rules that restate a setting the services do not export: (section, key) in config/sophia.yaml.
CONFIG_THRESHOLDS = {"sophia:cache_max_entries_per_tenant": ("cache", "max_entries_per_tenant")}
CONFIG_FILE = REPO_ROOT / "config" / "sophia.yaml"
_VECTOR = re.compile(r"^\s*vector\(\s*([0-9.e+]+)\s*\)\s*$")


def config_threshold_problems(paths: list[Path] = RULES, config_file: Path = CONFIG_FILE) -> list[str]:
    config = load_config(environ={"SOPHIA_CONFIG": str(config_file)})
    rules = [rule for group in rule_groups(paths) for rule in group["rules"]]
    records = {rule["record"]: rule["expr"] for rule in rules if "record" in rule}
    problems = []
    for record, (section, key) in CONFIG_THRESHOLDS.items():
        wanted = getattr(getattr(config, section), key)
        found = _VECTOR.match(str(records.get(record, "")))
        if not found or float(found.group(1)) != float(wanted):
            problems.append(
                f"{record} must be vector({wanted}) like {section}.{key} in {relative(config_file)}, "
                f"not {records.get(record)!r}"
            )
    return problems


def check_all() -> dict[str, list[str]]:
    config_problems = []
    for path in PROMETHEUS_CONFIGS:
        config_problems += prometheus_config_problems(path)
    uses, recorded = metric_uses()
    undefined = [
        f"{name} is used ({', '.join(sorted(where))}) but no recording rule defines it"
        for name, where in sorted(uses.items())
        if ":" in name and name not in recorded
    ]
    return {
        "Prometheus: configs": config_problems,
        "Prometheus: rules": _promtool("check", "rules", *map(str, RULES)) + undefined,
        "Prometheus: thresholds equal config/sophia.yaml": config_threshold_problems(),
        "Prometheus: promtool unit tests": _promtool("test", "rules", *map(str, RULE_TESTS)),
        "Prometheus: every alert has a firing test": untested_alerts(),
        "Grafana: dashboards": dashboard_problems(),
    }
