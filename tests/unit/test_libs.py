"""The shared runtime: config validation, deadlines, log redaction, metrics."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from libs import deadline
from libs.background import Background
from libs.config import ConfigError, load_config
from libs.errors import DeadlineExceeded
from libs.logs import JsonFormatter, redact, register_secret, request_id_var
from libs.telemetry import SummedCounter


def test_reference_config_loads_with_no_environment():
    config = load_config(environ={})
    assert config.services.gateway.port == 50051
    assert config.auth.admin_key == ""
    assert config.auth.tenants["dev"].api_keys[0].key == "sk-sophia-dev"
    assert config.routing.default_chain == ["smollm2-135m-instruct"]


def test_environment_interpolation_and_overrides():
    config = load_config(
        environ={
            "SOPHIA_DEV_KEY": "sk-from-the-environment",
            "SOPHIA__SERVICES__ROUTER__PORT": "6052",
            "SOPHIA__CACHE__MAX_TEMPERATURE": "0.5",
        }
    )
    assert config.auth.tenants["dev"].api_keys[0].key == "sk-from-the-environment"
    assert config.services.router.port == 6052
    assert config.cache.max_temperature == 0.5


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"SOPHIA__SERVICES__GATEWAY__PORT": "abc"}, "services.gateway.port"),
        ({"SOPHIA__SERVICES__GATEWAY__PORT": "70000"}, "services.gateway.port"),
        ({"SOPHIA__SERVICES__GATEWAY__PROT": "1"}, "services.gateway.prot"),
        ({"SOPHIA__ROUTING__DEFAULT_CHAIN": "[nope]"}, "routing.default_chain"),
        ({"SOPHIA__ROUTING__DEFAULT_EMBEDDING_MODEL": "smollm2-135m-instruct"}, "default_embedding_model"),
        ({"SOPHIA__MODELS__X__PROVIDER": "missing"}, "models.x.provider"),
        ({"SOPHIA__PROVIDERS__P__TYPE": "openai"}, "base_url"),
        # A tenant id the ledger and the admin API refuse would be served and never billed.
        ({"SOPHIA__AUTH__TENANTS__ACME:PROD__API_KEYS": "[]"}, "auth.tenants"),
        ({"SOPHIA__AUTH__TENANTS__TEAM{EU}__API_KEYS": "[]"}, "auth.tenants"),
    ],
)
def test_config_errors_name_the_key(environ, named):
    with pytest.raises(ConfigError) as raised:
        load_config(environ=environ)
    assert named in str(raised.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_required_variable_without_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('auth: {admin_key: "${MUST_BE_SET}"}\n')
    with pytest.raises(ConfigError, match=r"auth\.admin_key: environment variable MUST_BE_SET"):
        load_config(path, environ={})


def test_outbound_timeout_follows_the_callers_deadline():
    token = deadline.start(None)
    try:
        assert deadline.outbound_timeout(margin=0.05, cap=30) == 30
    finally:
        deadline.reset(token)
    token = deadline.start(2.0)
    try:
        assert 1.9 < deadline.outbound_timeout(margin=0.05, cap=30) <= 1.95
        assert deadline.outbound_timeout(margin=0.05, cap=0.5) == 0.5
    finally:
        deadline.reset(token)
    token = deadline.start(0.01)
    try:
        with pytest.raises(DeadlineExceeded):
            deadline.outbound_timeout(margin=0.05, cap=30)
    finally:
        deadline.reset(token)


def test_logs_are_json_with_request_id_and_without_secrets():
    register_secret("provider-secret-value-123")
    formatter = JsonFormatter("gateway")
    token = request_id_var.set("req-42")
    try:
        record = logging.makeLogRecord(
            {
                "msg": "calling with %s and Bearer abc.def",
                "args": ("provider-secret-value-123",),
                "levelname": "INFO",
            }
        )
        line = json.loads(formatter.format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "req-42"
    assert line["service"] == "gateway"
    assert "provider-secret-value-123" not in line["msg"]
    assert "abc.def" not in line["msg"]
    assert redact("key sk-live-abcdefgh123") == "key [redacted]"


async def test_background_work_outlives_the_request_deadline():
    token = deadline.start(0.001)
    seen = []

    async def work():
        seen.append(deadline.remaining())

    try:
        background = Background()
        background.spawn(work())
        await background.drain(1.0)
    finally:
        deadline.reset(token)
    await asyncio.sleep(0)
    assert seen == [None]


def test_a_summed_counter_is_collected_as_a_cumulative_monotonic_sum_per_attribute_set():
    reader = InMemoryMetricReader()
    counter = SummedCounter(MeterProvider(metric_readers=[reader]).get_meter("t"), "t.tokens", unit="{token}")

    def collected() -> tuple[bool, dict[tuple, float]]:
        (metric,) = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
        points = {tuple(sorted(p.attributes.items())): p.value for p in metric.data.data_points}
        return metric.data.is_monotonic, points

    counter.add(3, {"model": "a", "direction": "input"})
    counter.add(4, {"model": "a", "direction": "input"})
    counter.add(5, {"model": "b", "direction": "input"})
    assert collected() == (
        True,
        {(("direction", "input"), ("model", "a")): 7, (("direction", "input"), ("model", "b")): 5},
    )
    counter.add(1, {"model": "b", "direction": "input"})
    assert (
        collected()[1][(("direction", "input"), ("model", "b"))] == 6
    )  # cumulative, not since the last read
