"""A mesh whose providers are fake provider processes, each with a fixed fault, for pipeline tests."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from libs.config import REPO_ROOT
from tests.support import free_port, free_port_block, mesh_environ
from tools.mesh import Mesh

CANARY_KEY = "sk-canary-5f1d2c9e8a7b6c5d4e3f2a1b"
DEV_KEY = "sk-pipeline-dev-key-01"
# A dev key that may use only fail500-gpt, whose fallback (good-gpt) it may not use.
SCOPED_KEY = "sk-pipeline-scoped-key-01"
BUDGET_KEY = "sk-pipeline-budget-key-01"
ADMIN_KEY = "sk-pipeline-admin-key-01"
# name → fault of the fake provider process behind it ("" = healthy)
FAKES = {
    "good": "",
    "fail500": "status:500",
    "fail429": "status:429",
    "fail400": "status:400",
    "hang": "hang",
    "drop": "drop_midstream",
    "wrongkey": "",
}


@dataclass
class PipelineMesh:
    mesh: Mesh
    fakes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.mesh.config.telemetry.prometheus_base_port}/metrics"

    @property
    def edge(self) -> str:
        return self.mesh.edge_url

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.mesh.log_dir.glob("*.log"))


def _config(ports: dict[str, int], outbox: Path) -> dict:
    base = yaml.safe_load((REPO_ROOT / "config" / "sophia.yaml").read_text())
    providers = {"local": {"type": "local"}}
    models = {
        "smollm2-135m-instruct": {"provider": "local", "kind": "chat"},
        "all-minilm-l6-v2": {"provider": "local", "kind": "embedding", "dimensions": 384},
    }
    for name, port in ports.items():
        providers[name] = {
            "type": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "api_key_env": "PIPELINE_PROVIDER_KEY",
            "timeout_seconds": 2.0 if name == "hang" else 30.0,
        }
        models[f"{name}-gpt"] = {"provider": name, "kind": "chat", "provider_model": "fake-gpt"}
    providers["claude"] = {
        "type": "anthropic",
        "base_url": f"http://127.0.0.1:{ports['good']}",
        "api_key_env": "PIPELINE_PROVIDER_KEY",
    }
    models["good-claude"] = {"provider": "claude", "kind": "chat", "provider_model": "fake-claude"}
    # An OpenAI text-embedding-3 style model: it returns fewer dimensions when asked.
    models["good-embedding"] = {
        "provider": "good",
        "kind": "embedding",
        "provider_model": "fake-embedding",
        "dimensions": 1536,
        "accepts_dimensions": True,
        "accepts_token_input": True,
    }
    # A hang with nothing to fall back to, and a provider timeout longer than any test deadline.
    providers["hang-slow"] = {**providers["hang"], "timeout_seconds": 60.0}
    models["hang-only"] = {"provider": "hang-slow", "kind": "chat", "provider_model": "fake-gpt"}
    fallbacks = {f"{name}-gpt": ["good-gpt"] for name in ("fail500", "fail429", "fail400", "hang", "drop")}
    return {
        # The isolated Redis of this mesh (SOPHIA_REDIS_URL), not a shared default port.
        **{k: base[k] for k in ("inference", "redis")},
        "auth": {
            "admin_key": ADMIN_KEY,
            "tenants": {
                "dev": {
                    "api_keys": [
                        {"name": "dev", "key": DEV_KEY},
                        {"name": "scoped", "key": SCOPED_KEY, "models": ["fail500-gpt"]},
                    ]
                },
                "budgeted": {"api_keys": [{"name": "main", "key": BUDGET_KEY}]},
            },
        },
        "providers": providers,
        "models": models,
        "routing": {
            "default_chain": ["good-gpt"],
            "default_embedding_model": "all-minilm-l6-v2",
            "fallback_map": fallbacks,
        },
        "ledger": {
            "prices": {
                "good-gpt": {"input_per_mtok_usd": 1.0, "output_per_mtok_usd": 2.0},
                "good-claude": {"input_per_mtok_usd": 3.0, "output_per_mtok_usd": 15.0},
            }
        },
        "cache": {"ttl_seconds": 600, "max_temperature": 0.0},
        "gateway": {"outbox_dir": str(outbox), "outbox_replay_seconds": 0.5},
    }


def start_pipeline_mesh(state: Path) -> PipelineMesh:
    ports = {name: free_port() for name in FAKES}
    config_path = state / "sophia.yaml"
    config_path.write_text(yaml.safe_dump(_config(ports, state / "outbox")))
    environ = mesh_environ({"SOPHIA_CONFIG": str(config_path), "PIPELINE_PROVIDER_KEY": CANARY_KEY})
    environ["SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT"] = str(free_port_block(5))
    running = PipelineMesh(Mesh(state, environ))
    (state / "log").mkdir(parents=True, exist_ok=True)
    for name, fault in FAKES.items():
        accepted = "sk-some-other-key-entirely" if name == "wrongkey" else CANARY_KEY
        command = [
            sys.executable,
            "-m",
            "tests.fakes.provider",
            "--port",
            str(ports[name]),
            "--api-key",
            accepted,
        ]
        if fault:
            command += ["--fault", fault]
        with open(state / "log" / f"fake-{name}.log", "wb") as log:
            running.fakes[name] = subprocess.Popen(
                command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
            )
    for component in ("redis", "router", "cache", "ledger", "gateway", "envoy"):
        running.mesh.start(component)
    running.mesh.wait_ready(["redis", "router", "cache", "ledger", "gateway", "envoy"], 120)
    deadline = time.monotonic() + 30
    for port in ports.values():
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    return running


def stop_pipeline_mesh(running: PipelineMesh) -> None:
    running.mesh.stop_all()
    for process in running.fakes.values():
        process.terminate()
        process.wait(10)
