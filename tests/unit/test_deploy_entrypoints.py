"""The images' own commands, run here as the containers run them: the health check against real gRPC
health servers (mTLS as the internal services serve it, plaintext as the Gateway's public port) and an
HTTP edge, and the edge's entry point rendering a config that Envoy accepts."""

import http.server
import os
import shutil
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from libs.config import REPO_ROOT
from libs.tls import Identity, MeshCredentials
from tools import certs
from tools.deploy_check import images
from tools.ports import free_port

HEALTHCHECK = REPO_ROOT / "deploy" / "docker" / "healthcheck.py"
EDGE = REPO_ROOT / "deploy" / "docker" / "edge.py"


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    certs.generate(directory)
    return directory


class HealthServer:
    """A gRPC server with only grpc.health.v1, as a Sophia service serves it."""

    def __init__(self, credentials: grpc.ServerCredentials | None) -> None:
        self.port = free_port()
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"127.0.0.1:{self.port}"
        if credentials is None:
            self.server.add_insecure_port(address)
        else:
            self.server.add_secure_port(address, credentials)
        self.server.start()

    def set(self, status) -> None:
        self.health.set("", status)

    def stop(self) -> None:
        self.server.stop(None)


def _check(service: str, port: int, cert_dir: Path, **extra: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SOPHIA")}
    environ[f"SOPHIA__SERVICES__{service.upper()}__PORT"] = str(port)
    environ["SOPHIA__TLS__DIR"] = str(cert_dir)
    environ.update(extra)
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), service], env=environ, capture_output=True, text=True, timeout=30
    )


def _mtls_server(cert_dir: Path, identity: Identity) -> HealthServer:
    return HealthServer(MeshCredentials.load(cert_dir, identity).server(require_client_auth=True))


def test_an_internal_service_is_checked_over_mtls_with_its_own_certificate(cert_dir):
    server = _mtls_server(cert_dir, Identity.ROUTER)
    try:
        server.set(health_pb2.HealthCheckResponse.SERVING)
        assert _check("router", server.port, cert_dir).returncode == 0
        server.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        result = _check("router", server.port, cert_dir)
        assert result.returncode == 1
        assert "NOT_SERVING" in result.stderr
    finally:
        server.stop()


def test_a_server_presenting_another_identity_is_not_taken_for_the_service(cert_dir):
    # Something answers on the router's port, but with the cache's certificate.
    server = _mtls_server(cert_dir, Identity.CACHE)
    try:
        server.set(health_pb2.HealthCheckResponse.SERVING)
        result = _check("router", server.port, cert_dir)
        assert result.returncode == 1
        assert "UNAVAILABLE" in result.stderr
    finally:
        server.stop()


def test_the_gateway_is_checked_in_plaintext_on_its_public_port(cert_dir):
    server = HealthServer(None)
    try:
        server.set(health_pb2.HealthCheckResponse.SERVING)
        assert _check("gateway", server.port, cert_dir).returncode == 0
    finally:
        server.stop()


def test_nothing_listening_and_bad_input_fail_with_a_message(cert_dir):
    result = _check("ledger", free_port(), cert_dir)
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: ledger at 127.0.0.1:")
    missing = _check("ledger", free_port(), cert_dir / "absent")
    assert missing.returncode == 1
    assert "ca.pem" in missing.stderr
    usage = subprocess.run([sys.executable, str(HEALTHCHECK), "billing"], capture_output=True, text=True)
    assert usage.returncode == 2
    assert "usage:" in usage.stderr


class _Edge(http.server.BaseHTTPRequestHandler):
    status = 401

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


def _http_check(service: str, port_setting: str, status: int) -> subprocess.CompletedProcess:
    """The health check command for `service` against a local HTTP server that answers `status`."""
    handler = type("Answer", (_Edge,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        return subprocess.run(
            [sys.executable, str(HEALTHCHECK), service],
            env={port_setting: str(server.server_address[1]), "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.shutdown()


@pytest.mark.parametrize(("status", "healthy"), [(401, True), (503, False), (200, False)])
def test_the_edge_is_healthy_when_a_gateway_answers_behind_it(status, healthy):
    result = _http_check("edge", "SOPHIA__EDGE__PORT", status)
    assert (result.returncode == 0) is healthy, result.stderr


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_mcp_server_is_healthy_when_its_healthz_answers(status, healthy):
    result = _http_check("mcp", "SOPHIA__MCP__PORT", status)
    assert (result.returncode == 0) is healthy, result.stderr


def test_the_edge_entry_point_renders_a_config_envoy_accepts(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SOPHIA")}
    environ.update(
        SOPHIA_EDGE_DIR=str(tmp_path),
        SOPHIA__EDGE__HOST="0.0.0.0",
        SOPHIA__SERVICES__GATEWAY__HOST="gateway.sophia.svc",
        SOPHIA__GATEWAY__MAX_INFLIGHT_REQUESTS="2560",
    )
    rendered = subprocess.run(
        [sys.executable, str(EDGE), "--render-only"], env=environ, capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    config = Path(rendered.stdout.strip())
    assert config.parent == tmp_path
    text = config.read_text()
    assert "address: gateway.sophia.svc" in text
    assert "address: 0.0.0.0" in text
    assert "max_requests: 2560" in text
    envoy = REPO_ROOT / ".venv" / "bin" / "envoy"
    validated = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_the_edge_entry_point_refuses_a_bad_config(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SOPHIA")}
    environ.update(SOPHIA_EDGE_DIR=str(tmp_path), SOPHIA__EDGE__PORT="eighty")
    command = [sys.executable, str(EDGE)]
    result = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "edge.port" in result.stderr


def _image_tree(target: str, root: Path) -> Path:
    """The files the image `target` holds under /app, copied from the repository as its COPYs say."""
    layout = images.image_layout(images.DOCKERFILE.read_text(), target)
    for destination, source in sorted(layout.items()):
        path = REPO_ROOT / source
        if path.is_dir():
            shutil.copytree(
                path, root / destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            (root / destination).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / destination)
    return root


def _run_in(tree: Path, *command: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SOPHIA") and k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *command], cwd=tree, env=environ, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("target", "services"),
    [("core", ("gateway", "ledger")), ("mcp", ("mcp",)), ("ml", ("router", "cache", "inference"))],
)
def test_each_image_holds_the_files_its_services_and_health_check_import(tmp_path, target, services):
    tree = _image_tree(target, tmp_path)
    imports = "; ".join(f"import services.{service}.__main__" for service in services)
    probe = f"import sys; {imports}; import libs; assert libs.__file__.startswith(sys.argv[1]), libs.__file__"
    result = _run_in(tree, "-c", probe, str(tree))
    assert result.returncode == 0, result.stderr[-2000:]
    check = _run_in(tree, "deploy/docker/healthcheck.py", services[0])
    assert check.returncode == 1 and check.stderr.startswith("unhealthy:"), check.stderr[-2000:]


def test_the_edge_image_holds_what_its_entry_point_and_envoy_read(tmp_path):
    tree = _image_tree("edge", tmp_path / "app")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SOPHIA") and k != "PYTHONPATH"}
    environ["SOPHIA_EDGE_DIR"] = str(tmp_path / "rendered")
    rendered = subprocess.run(
        [sys.executable, "deploy/docker/edge.py", "--render-only"],
        cwd=tree,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert rendered.returncode == 0, rendered.stderr
    config = Path(rendered.stdout.strip())
    assert str(tree / "build" / "sophia.pb") in config.read_text()
    envoy = REPO_ROOT / ".venv" / "bin" / "envoy"
    validated = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_the_backup_image_snapshots_verifies_and_keeps_the_newest(tmp_path):
    """The backup image's files (laid out as its COPYs say) and its script against a real Redis: each
    run leaves a verified snapshot, and only the newest SOPHIA_BACKUP_KEEP stay."""
    tree = _image_tree("backup", tmp_path / "app")
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            if subprocess.run(["redis-cli", "-u", url, "ping"], capture_output=True).returncode == 0:
                break
            threading.Event().wait(0.1)
        stored = ["redis-cli", "-u", url, "set", "ledger:usage:r1", "1"]
        subprocess.run(stored, check=True, capture_output=True)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SOPHIA") and k != "PYTHONPATH"}
        environ.update(
            PATH=f"{Path(sys.executable).parent}:{environ['PATH']}",
            SOPHIA_REDIS_URL=url,
            SOPHIA_BACKUP_DIR=str(tmp_path / "backups"),
            SOPHIA_BACKUP_KEEP="1",
        )
        runs = []
        for _ in range(2):
            runs.append(
                subprocess.run(
                    ["sh", "deploy/docker/backup.sh"], cwd=tree, env=environ, capture_output=True, text=True
                )
            )
            assert runs[-1].returncode == 0, runs[-1].stderr
            threading.Event().wait(1.1)  # snapshot names are to the second
    finally:
        redis.terminate()
        redis.wait(10)
    assert "verify:" in runs[0].stdout and "1 ledger" in runs[0].stdout, runs[0].stdout
    assert "removed" in runs[1].stdout, runs[1].stdout
    kept = list((tmp_path / "backups").iterdir())
    assert len(kept) == 1 and (kept[0] / "manifest.json").is_file()
