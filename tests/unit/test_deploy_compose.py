"""The compose file (deploy/compose/compose.yaml): the compose specification's schema, then Sophia's own
rules for it, each shown to catch the fault it is for."""

import copy

import pytest
import yaml

from tools.deploy_check import compose

DOCUMENT = yaml.safe_load(compose.COMPOSE_FILE.read_text())


def test_the_compose_file_is_valid_and_consistent():
    assert compose.schema_problems() == []
    assert compose.semantic_problems(DOCUMENT) == []


def test_the_schema_check_refuses_an_unknown_key(tmp_path):
    bad = copy.deepcopy(DOCUMENT)
    bad["services"]["gateway"]["restart_policy"] = "always"
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert any("restart_policy" in line for line in compose.schema_problems(path))


def _broken(edit) -> list[str]:
    document = copy.deepcopy(DOCUMENT)
    edit(document["services"])
    return compose.semantic_problems(document)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda s: s["router"]["environment"].update(SOPHIA__SERVICES__ROUTER__HOST="127.0.0.1"),
            "service router: services.router.host is '127.0.0.1', expected '0.0.0.0'",
        ),
        (
            lambda s: s["ledger"]["environment"].update(SOPHIA__LEDGER__REDIS_TIMEOUT="2"),
            "service ledger: its environment is not a valid Sophia configuration",
        ),
        (lambda s: s["cache"].update(image="sophia/sophia-core:dev"), "expected the sophia-ml image"),
        (
            lambda s: s["inference"]["healthcheck"].update(test=["CMD", "true"]),
            "service inference: health check",
        ),
        (lambda s: s["gateway"].update(read_only=False), "service gateway: root filesystem not read-only"),
        (lambda s: s["gateway"]["environment"].pop("SOPHIA__GATEWAY__OUTBOX_DIR"), "usage journal"),
        (lambda s: s["redis"].update(command=["redis-server"]), "--appendfsync always"),
        (
            lambda s: s["edge"]["environment"].update(SOPHIA__SERVICES__GATEWAY__HOST="127.0.0.1"),
            "service edge: must reach the Gateway as gateway",
        ),
        (lambda s: s.pop("grafana"), "service grafana is missing"),
        (
            lambda s: s["edge"]["environment"].pop("SOPHIA__MCP__HOST"),
            "service edge: must reach the MCP server",
        ),
        (lambda s: s["mcp"]["environment"].update(SOPHIA__MCP__HOST="127.0.0.1"), "service mcp: must listen"),
        (lambda s: s["mcp"].update(image="sophia/sophia-core:dev"), "expected the sophia-mcp image"),
    ],
)
def test_sophia_rules_catch_each_fault(edit, expected):
    problems = _broken(edit)
    assert any(expected in problem for problem in problems), problems
